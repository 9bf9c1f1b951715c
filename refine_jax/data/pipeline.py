"""The grain input pipeline: records -> model-ready, batched NumPy arrays.

A source element is a record (``key``, ``captions`` (all references) and either ``image``, uint8
HWC, or ``image_bytes``, encoded) or a skip marker ``{"key", "skip_reason"}`` (see
:mod:`refine_jax.data.records`). :class:`CaptionFeatures` turns either into the arrays of one
example, so a bad sample never stops the pipeline and is never filtered away unseen:

* a good record gives the image in [-1, 1], the K coarse-to-fine targets on the canvas, the full
  caption (for the baseline) and the scheduled length of each step, with ``mask=True``;
* a skip marker, an image that does not decode, or a caption with no word fitting the canvas
  gives a placeholder of the same shapes with ``mask=False`` (the loss ignores it);
* every example carries ``skip_reason``, a code into :data:`SKIP_REASONS` (0 = ok). A caption
  cut to fit the canvas is still used (``mask=True``) and coded ``truncated_caption``. Parts
  dropped from a usable record (one empty caption among five) are counted in ``dropped``.

Because the reasons travel inside the batches, the counts are exact however many grain threads
or worker processes made them: the trainer adds :func:`count_skips` of each batch. Problems a
source found while indexing (a truncated tar, a sample without image) never reach a batch;
:func:`structural_skip_counts` reports them once.

Batch fields (B = this process's batch)::

    image [B, S, S, 3] f32      targets [B, K, L] i32     caption [B, L] i32
    word_subset [B, L] i32 (training: a random word subset of the caption; evaluation: it all)
    scheduled_lengths [B, K] f32   mask [B] bool   truncated [B] bool   skip_reason [B] i32
    dropped [B, R] i32 (R = len(SKIP_REASONS))   index [B] i32 (in its source)   source [B] i32
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex

import grain
import ml_collections
import numpy as np
from PIL import Image

from refine_jax.data.caption_source import (
    CaptionSource,
    HasTrainingDataset,
    structural_counts_of,
)
from refine_jax.data.records import (
    TEACHER_CAPTIONS_FIELD,
    CorruptImageError,
    SkipReason,
    decode_image,
    rgb_image,
)
from refine_jax.special_tokens import BLANK_ID, PAD_ID
from refine_jax.targets import (
    canvas_targets,
    caption_words,
    schedule_fractions,
    step_word_indices,
)
from refine_jax.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Skip codes

TRUNCATED_CAPTION = "truncated_caption"
NO_TEACHER_CAPTION = "no_teacher_caption"
#: Code table of ``skip_reason``: 0 is a good example; then every `records.SkipReason`; then
#: ``truncated_caption`` (caption cut to fit the canvas; the example is still used unless no
#: word fits), ``no_teacher_caption`` (only as a dropped part: distillation asked for a
#: teacher's caption and the record has none, so a reference was used) and ``other`` (a reason
#: this table does not know).
SKIP_REASONS: tuple[str, ...] = (
    "ok",
    *(r.value for r in SkipReason),
    TRUNCATED_CAPTION,
    NO_TEACHER_CAPTION,
    "other",
)
SKIP_CODES: dict[str, int] = {name: code for code, name in enumerate(SKIP_REASONS)}
#: Fields added to source elements: the element's index in its source, and the source's id.
INDEX_FIELD, SOURCE_FIELD = "_index", "_source"
#: Prefix of the counts of parts dropped from delivered examples (``dropped/empty_caption``).
DROPPED_PREFIX = "dropped/"


def skip_code(reason: str | None) -> int:
    """The code of a skip reason (None: 0, ok); reasons outside the table map to ``other``."""
    if reason is None:
        return 0
    return SKIP_CODES.get(str(reason), SKIP_CODES["other"])


def count_skips(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Non-zero counts by reason name of one batch: examples per ``skip_reason`` (not ``ok``) and
    parts dropped from delivered examples (``dropped/<reason>``). Padding rows count nothing."""
    counts: dict[str, int] = {}
    codes = np.bincount(np.asarray(batch["skip_reason"]).reshape(-1), minlength=len(SKIP_REASONS))
    for code, n in enumerate(codes[1:], start=1):
        if n:
            counts[SKIP_REASONS[min(code, len(SKIP_REASONS) - 1)]] = int(n)
    if "dropped" in batch:
        parts = np.asarray(batch["dropped"]).reshape(-1, len(SKIP_REASONS)).sum(axis=0)  # [R]
        for code, n in enumerate(parts):
            if n:
                counts[DROPPED_PREFIX + SKIP_REASONS[code]] = int(n)
    return counts


def structural_skip_counts(source: CaptionSource) -> dict[str, int]:
    """What the source left out while indexing (never in a batch), as non-zero counts by reason;
    parts dropped from delivered samples as ``dropped/<reason>``. Empty for sources without."""
    counter = structural_counts_of(source)
    counts = {str(k): int(v) for k, v in sorted(counter.skipped.items()) if v}
    for reason, n in sorted(counter.dropped.items()):
        if n:
            counts[DROPPED_PREFIX + str(reason)] = int(n)
    return counts


# ---------------------------------------------------------------------------------------------
# Images and tokens


def preprocess_image(
    image: np.ndarray, size: int, rng: np.random.Generator | None = None, min_scale: float = 1.0
) -> np.ndarray:
    """uint8 HWC -> float32 [size, size, 3] in [-1, 1].

    Without ``rng`` (evaluation): the centre square of the image, resized. With ``rng``
    (training): a random square whose side is a uniform fraction in [min_scale, 1] of the shorter
    side, at a random position, resized. Never flipped: captions say "left" and "right".
    """
    height, width = image.shape[:2]
    side = min(height, width)
    if rng is None:
        crop = side
        top, left = (height - crop) // 2, (width - crop) // 2
    else:
        crop = side if min_scale >= 1.0 else max(1, round(side * rng.uniform(min_scale, 1.0)))
        top = int(rng.integers(0, height - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
    if crop == size:
        image = image[top : top + size, left : left + size]
    else:  # crop and resize in one pass (Pillow's bilinear filter antialiases when shrinking)
        box = (left, top, left + crop, top + crop)
        image = np.asarray(
            Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box), np.uint8
        )
    return image.astype(np.float32) / 127.5 - 1.0


def pad_to(ids: Sequence[int], length: int) -> np.ndarray:
    """Token ids padded with PAD_ID to ``length`` (cut to it if longer)."""
    out = np.full((length,), PAD_ID, np.int32)
    ids = list(ids)[:length]
    out[: len(ids)] = ids
    return out


# ---------------------------------------------------------------------------------------------
# Features


@dataclass
class CaptionFeatures(grain.transforms.RandomMap):
    """Record or skip marker -> example arrays (see the module docstring).

    ``random_map`` (training) draws the caption among the references (or, at
    ``teacher_caption_rate``, among a teacher's captions) and, with ``random_crop``,
    a random crop; ``map`` (evaluation) takes the first reference and the centre crop.
    """

    tokenizer: Tokenizer
    num_steps: int
    canvas_length: int
    image_size: int
    target_kind: str = "salience"
    schedule: str = "linear"
    log_a: float = 4.0
    layout: str = "aligned"
    random_crop: bool = False
    crop_min_scale: float = 1.0
    teacher_caption_rate: float = 0.0

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, tokenizer: Tokenizer
    ) -> CaptionFeatures:
        """The features a config asks for (model sizes, targets, ``data.random_crop``)."""
        m, t, d = config.model, config.targets, config.data
        return cls(
            tokenizer,
            m.num_refine_steps,
            m.canvas_length,
            m.image_size,
            t.kind,
            t.schedule,
            t.log_a,
            t.layout,
            d.random_crop,
            d.crop_min_scale,
            d.teacher_caption_rate,
        )

    def fit_to_canvas(self, caption: str) -> tuple[str, bool]:
        """The longest word prefix of the caption whose tokens fit the canvas, and whether that
        cut anything. One encode when it fits; a binary search over word counts otherwise."""
        words = caption_words(caption)
        text = " ".join(words)
        if len(self.tokenizer.encode(text)) <= self.canvas_length:
            return text, False
        low, high = 0, len(words) - 1  # the answer lies in [low, high]; len(words) does not fit
        while low < high:
            mid = (low + high + 1) // 2
            if len(self.tokenizer.encode(" ".join(words[:mid]))) <= self.canvas_length:
                low = mid
            else:
                high = mid - 1
        return " ".join(words[:low]), True

    def placeholder(self, record: Mapping[str, Any], reason: str) -> dict[str, np.ndarray]:
        """An example of the right shapes that the loss ignores (``mask=False``), coded
        ``reason``."""
        k, length, s = self.num_steps, self.canvas_length, self.image_size
        return {
            "image": np.zeros((s, s, 3), np.float32),
            "targets": np.zeros((k, length), np.int32),
            "caption": np.zeros((length,), np.int32),
            "word_subset": np.zeros((length,), np.int32),
            "scheduled_lengths": np.zeros((k,), np.float32),
            "truncated": np.asarray(reason == TRUNCATED_CAPTION),
            "mask": np.asarray(False),
            "skip_reason": np.asarray(skip_code(reason), np.int32),
            "dropped": np.zeros((len(SKIP_REASONS),), np.int32),
            **_tags(record),
        }

    def features(
        self, record: Mapping[str, Any], caption: str | None, rng: np.random.Generator | None
    ) -> dict[str, np.ndarray]:
        """The example of one record with ``caption`` chosen among its references (None: the
        record has none)."""
        if "skip_reason" in record:
            return self.placeholder(record, record["skip_reason"])
        if caption is None:
            return self.placeholder(record, SkipReason.MISSING_CAPTION.value)
        try:
            if "image" in record:
                image = rgb_image(record["image"])
            else:
                image = decode_image(record["image_bytes"])
        except CorruptImageError:
            return self.placeholder(record, SkipReason.CORRUPT_IMAGE.value)
        caption, truncated = self.fit_to_canvas(caption)
        if not caption:  # not even the first word fits the canvas
            return self.placeholder(record, TRUNCATED_CAPTION)
        words = caption_words(caption)
        word_tokens = [self.tokenizer.encode(word) for word in words]
        full = [token for tokens in word_tokens for token in tokens]
        steps = step_word_indices(
            words,
            self.num_steps,
            self.tokenizer.salience,
            self.target_kind,
            self.schedule,
            self.log_a,
        )
        targets = canvas_targets(word_tokens, steps, self.layout, BLANK_ID)
        fractions = schedule_fractions(self.num_steps, self.schedule, self.log_a)
        crop_rng = rng if self.random_crop else None
        dropped = np.zeros((len(SKIP_REASONS),), np.int32)
        for reason in record.get("dropped", ()):
            dropped[skip_code(reason)] += 1
        subset = full if rng is None else random_word_subset(word_tokens, rng)
        return {
            "image": preprocess_image(image, self.image_size, crop_rng, self.crop_min_scale),
            "targets": np.stack([pad_to(ids, self.canvas_length) for ids in targets]),  # [K, L]
            "caption": pad_to(full, self.canvas_length),
            "word_subset": pad_to(subset, self.canvas_length),
            "scheduled_lengths": (fractions * len(full)).astype(np.float32),
            "truncated": np.asarray(truncated),
            "mask": np.asarray(True),
            "skip_reason": np.asarray(
                skip_code(TRUNCATED_CAPTION if truncated else None), np.int32
            ),
            "dropped": dropped,
            **_tags(record),
        }

    def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
        """Training: a teacher's caption at ``teacher_caption_rate`` where the record has one
        (distilled shards), else one of the references, drawn uniformly. A record without one
        while the rate asks for them is counted as ``dropped/no_teacher_caption``, so training
        on shards that were never captioned shows in the logged counts."""
        captions = record.get("captions") or [None]
        teachers = record.get(TEACHER_CAPTIONS_FIELD)
        if teachers and rng.random() < self.teacher_caption_rate:
            captions = teachers
        elif not teachers and self.teacher_caption_rate > 0:
            record = {**record, "dropped": (*record.get("dropped", ()), NO_TEACHER_CAPTION)}
        caption = captions[int(rng.integers(len(captions)))]
        return self.features(record, caption, rng)

    def map(self, record: Mapping[str, Any]) -> dict:
        """Evaluation: the first reference, centre crop."""
        return self.features(record, (record.get("captions") or [None])[0], None)


def random_word_subset(word_tokens: Sequence[Sequence[int]], rng: np.random.Generator) -> list[int]:
    """The tokens of a random subset of the words, in caption order: each word kept with one
    probability drawn uniformly per call, at least one word kept. (The matching model trains
    on these, so short descriptions embed near their images; never in salience order.)"""
    keep = rng.random(len(word_tokens)) < rng.random()
    if not keep.any():
        keep[rng.integers(len(word_tokens))] = True
    return [t for tokens, kept in zip(word_tokens, keep, strict=True) if kept for t in tokens]


def _tags(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Where the example came from: index in its source and which source of a mixture."""
    return {
        "index": np.asarray(record.get(INDEX_FIELD, -1), np.int32),
        "source": np.asarray(record.get(SOURCE_FIELD, 0), np.int32),
    }


# ---------------------------------------------------------------------------------------------
# Sources as grain datasets


class TaggedSource:
    """A source whose elements also carry their index (and a source id, for mixtures)."""

    def __init__(self, source: Any, source_id: int = 0) -> None:
        if len(source) >= 2**31:
            raise ValueError(f"{source!r} has {len(source)} samples; split it (int32 indexes)")
        self.source, self.source_id = source, source_id

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: SupportsIndex) -> dict:
        i = int(index)
        return {**self.source[i], INDEX_FIELD: i, SOURCE_FIELD: self.source_id}

    def __repr__(self) -> str:
        return f"TaggedSource({self.source!r}, source_id={self.source_id})"


def epoch_dataset(source: Any, seed: int, source_id: int = 0) -> grain.MapDataset:
    """Endless tagged elements of ``source``: each epoch a fresh global shuffle of all of them,
    the same on every process for the same seed."""
    if len(source) == 0:
        raise ValueError(f"data source {source!r} is empty")
    return grain.MapDataset.source(TaggedSource(source, source_id)).seed(seed).shuffle().repeat()


def training_dataset(source: CaptionSource, seed: int) -> grain.MapDataset:
    """The endless shuffled element stream of a source; a mixture builds its own."""
    if isinstance(source, HasTrainingDataset):  # e.g. mixture.MixtureSource
        return source.training_dataset(seed)
    return epoch_dataset(source, seed)


# ---------------------------------------------------------------------------------------------
# Batches


def local_batch_size(global_batch_size: int, process_count: int = 1, batch_shards: int = 1) -> int:
    """This process's share of the global batch; clear errors when it does not divide."""
    if global_batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"config.batch_size {global_batch_size} does not divide over {process_count} "
            f"processes; use a multiple of {process_count}"
        )
    if global_batch_size % batch_shards:
        raise ValueError(
            f"config.batch_size {global_batch_size} does not divide over the {batch_shards} "
            "batch shards (data x fsdp devices) of the mesh"
        )
    return global_batch_size // process_count


def train_batches(
    source: Any,
    features: CaptionFeatures,
    global_batch_size: int,
    seed: int,
    num_threads: int = 2,
    process_index: int = 0,
    process_count: int = 1,
    *,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    prefetch_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's part of each training batch.

    All processes shuffle identically (reshuffled each epoch); global batch b is examples
    [b·G, (b+1)·G) of that order, and process p reads its contiguous 1/P of it, so the
    processes read disjoint slices that together cover every example once per epoch, and the
    global batch does not depend on how many processes assemble it. Batches never mix an
    incomplete remainder (the stream is endless, so no example is lost at an epoch's end).

    ``process_index`` / ``process_count``: the block of the batch's rows this process reads and
    the number of blocks (`sharding.process_batch_block`: processes whose devices hold the same
    rows read the same block). ``num_threads`` read and transform elements in this process;
    ``num_workers`` > 0 moves that into grain worker processes (``mp_prefetch``; needs parsed
    absl flags, as under ``absl.app.run``). The iterator's ``get_state()`` / ``set_state()``
    restore its position exactly (saved with ``grain.checkpoint.CheckpointSave``).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = local_batch_size(global_batch_size, process_count)
    dataset = (
        training_dataset(source, seed).random_map(features).batch(local, drop_remainder=True)
    )[process_index::process_count]
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    iter_dataset = dataset.to_iter_dataset(read)
    if num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(iter_dataset)


@dataclass
class _EvalExample(grain.transforms.Map):
    """Record -> (example arrays, the record without its pixels) for evaluation."""

    features: CaptionFeatures

    def map(self, record: Mapping[str, Any]) -> tuple[dict, dict]:
        meta = {
            k: v
            for k, v in record.items()
            if k not in ("image", "image_bytes", INDEX_FIELD, SOURCE_FIELD)
        }
        return self.features.map(record), meta


def eval_batches(
    source: Any,
    features: CaptionFeatures,
    batch_size: int,
    *,
    num_threads: int = 2,
    skip_counts: collections.Counter | None = None,
) -> Iterator[tuple[dict, list[dict]]]:
    """Every usable example exactly once, in source order: (arrays, records) per batch.

    ``records`` are the rows' records without pixels (``key``, all ``captions``, ...). Unusable
    examples (skip markers, corrupt images, nothing fitting the canvas) are left out of the
    batches and added, with truncated captions and dropped parts, to ``skip_counts`` (by the
    names :func:`count_skips` uses). The last batch is padded with copies of its last example
    whose ``mask`` is False and which count nothing.
    """
    if batch_size < 1:
        raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
    dataset = grain.MapDataset.source(TaggedSource(source)).map(_EvalExample(features))
    # Elements read ahead: enough to keep the threads busy, bounded so 224 px float images of a
    # large eval batch do not pile up in memory.
    ahead = min(2 * batch_size, 128)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=ahead)
    examples: list[dict] = []
    records: list[dict] = []
    for example, record in dataset.to_iter_dataset(read):
        if skip_counts is not None:
            one = {k: example[k][None] for k in ("skip_reason", "dropped")}  # a batch of 1
            skip_counts.update(count_skips(one))
        if not example["mask"]:
            continue
        examples.append(example)
        records.append(record)
        if len(examples) == batch_size:
            yield _stack(examples), records
            examples, records = [], []
    if examples:
        padding = dict(
            examples[-1],
            mask=np.asarray(False),
            truncated=np.asarray(False),
            skip_reason=np.asarray(0, np.int32),
            dropped=np.zeros_like(examples[-1]["dropped"]),
        )
        examples += [padding] * (batch_size - len(examples))
        yield _stack(examples), records


def _stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
