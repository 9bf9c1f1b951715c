"""The grain input pipeline: records -> model-ready, batched NumPy arrays.

A record is a dict with `key`, `captions` (all references) and either `image` (uint8 HWC) or
`image_bytes` (encoded). `CaptionFeatures` turns one record into the arrays one example
needs: the image in [-1, 1], the K coarse-to-fine targets on the canvas, the full caption
(for the baseline), the scheduled length of each step, and a `truncated` flag so the trainer
can count captions longer than the canvas instead of dropping them silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grain
import numpy as np
from PIL import Image

from refine_jax.targets import caption_words, coarse_to_fine, schedule_fractions
from refine_jax.tokenizer import PAD_ID, Tokenizer


def preprocess_image(
    image: np.ndarray, size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """uint8 HWC -> float32 [size, size, 3] in [-1, 1]; random crop with `rng`, else centre."""
    height, width = image.shape[:2]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        resized_h, resized_w = max(size, round(height * scale)), max(size, round(width * scale))
        image = np.asarray(
            Image.fromarray(image).resize((resized_w, resized_h), Image.BILINEAR), np.uint8
        )
        if rng is None:
            top, left = (resized_h - size) // 2, (resized_w - size) // 2
        else:
            top = int(rng.integers(0, resized_h - size + 1))
            left = int(rng.integers(0, resized_w - size + 1))
        image = image[top : top + size, left : left + size]
    return image.astype(np.float32) / 127.5 - 1.0


def pad_to(ids: Sequence[int], length: int) -> np.ndarray:
    out = np.full((length,), PAD_ID, np.int32)
    out[: len(ids)] = ids
    return out


@dataclass
class CaptionFeatures(grain.transforms.RandomMap):
    """Record -> example arrays; in training the caption is drawn among the references."""

    tokenizer: Tokenizer
    num_steps: int
    canvas_length: int
    image_size: int
    target_kind: str = "salience"
    schedule: str = "linear"
    log_a: float = 4.0
    random_crop: bool = False

    def fit_to_canvas(self, caption: str) -> tuple[str, bool]:
        """The caption, cut by whole words until its tokens fit the canvas; and whether it was."""
        words = caption_words(caption)
        while words and len(self.tokenizer.encode(" ".join(words))) > self.canvas_length:
            words = words[:-1]
        text = " ".join(words)
        return text, text != " ".join(caption_words(caption))

    def features(self, record: dict, caption: str, rng: np.random.Generator | None) -> dict:
        caption, truncated = self.fit_to_canvas(caption)
        steps = coarse_to_fine(
            caption,
            self.num_steps,
            self.tokenizer.salience,
            self.target_kind,
            self.schedule,
            self.log_a,
        )
        full = self.tokenizer.encode(caption)
        fractions = schedule_fractions(self.num_steps, self.schedule, self.log_a)
        image = record["image"] if "image" in record else _decode(record["image_bytes"])
        return {
            "image": preprocess_image(image, self.image_size, rng if self.random_crop else None),
            "targets": np.stack([pad_to(self.tokenizer.encode(s), self.canvas_length) for s in steps]),
            "caption": pad_to(full, self.canvas_length),
            "scheduled_lengths": (fractions * len(full)).astype(np.float32),
            "truncated": np.asarray(truncated),
            "mask": np.asarray(True),
        }

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        caption = record["captions"][int(rng.integers(len(record["captions"])))]
        return self.features(record, caption, rng)

    def map(self, record: dict) -> dict:
        """Evaluation: the first reference, centre crop."""
        return self.features(record, record["captions"][0], None)


def _decode(image_bytes: bytes) -> np.ndarray:
    from refine_jax.data.records import decode_image

    return decode_image(image_bytes)


def train_batches(
    source,
    features: CaptionFeatures,
    global_batch_size: int,
    seed: int,
    num_threads: int = 2,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's part of each training batch.

    All processes shuffle identically (reshuffled each epoch); global batch b is examples
    [b·G, (b+1)·G) of that order, and process p reads its contiguous 1/P of it, so the
    processes read disjoint slices that together cover every example once per epoch, and the
    global batch does not depend on how many processes assemble it.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} does not divide over {process_count} processes"
        )
    local_batch_size = global_batch_size // process_count
    dataset = (
        grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()
        .repeat()
        .random_map(features)
        .batch(local_batch_size, drop_remainder=True)
    )[process_index::process_count]
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
    return iter(dataset.to_iter_dataset(read))


def eval_batches(
    source, features: CaptionFeatures, batch_size: int
) -> Iterator[tuple[dict, list[dict]]]:
    """Every example exactly once, in order: (arrays, records) per batch. The last batch is
    padded with copies of its last example whose `mask` is False."""
    for start in range(0, len(source), batch_size):
        records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        examples = [features.map(r) for r in records]
        padding = batch_size - len(examples)
        examples += [dict(examples[-1], mask=np.asarray(False))] * padding
        yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}, records
