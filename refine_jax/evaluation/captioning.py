"""Describe a whole split: batched, jitted decoding of every step for every image, once each."""

from __future__ import annotations

import numpy as np

from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.model_kinds import decode_batch
from refine_jax.sharding import to_host
from refine_jax.targets import normalize_caption
from refine_jax.tokenizer import Tokenizer


def describe_split(
    model,
    params,
    source,
    features: CaptionFeatures,
    tokenizer: Tokenizer,
    batch_size: int,
    fractions: np.ndarray,
    put_batch=lambda batch: batch,
    beam_size: int = 1,
    drop_repeats: bool = False,
) -> list[dict]:
    """Per image: `image_id`, `source_index` (its position in `source`; ids may repeat),
    `references`, `steps` (the decoded description of each step),
    `targets` (the coarse-to-fine targets of its first reference) and `chain` when the source
    knows the true one. `put_batch` places a host batch, which every process holds whole, on
    the devices. `beam_size` > 1: the baseline decodes by beam search (else greedily).
    `drop_repeats`: a word repeating the one before it is blanked
    (`Tokenizer.drop_repeated_words`); a sample whose words it changed keeps the model's own
    descriptions as `steps_as_written`, so repetition can still be measured on them."""
    samples = []
    for arrays, records in eval_batches(source, features, batch_size):
        canvases = decode_batch(
            model,
            params,
            put_batch({"image": arrays["image"]})["image"],
            np.asarray(fractions, np.float32),
            "beam" if beam_size > 1 else "greedy",
            beam_size,
        )
        written = to_host(canvases)  # [B, K, L]
        canvases = tokenizer.drop_repeated_words(written) if drop_repeats else written
        for i, record in enumerate(records):
            sample = {
                "image_id": record["key"],
                "source_index": int(arrays["index"][i]),  # its position in `source`
                "references": list(record["captions"]),
                "steps": [tokenizer.decode(c) for c in canvases[i]],
                "targets": [tokenizer.decode(t) for t in arrays["targets"][i]],
            }
            if not np.array_equal(canvases[i], written[i]):
                sample["steps_as_written"] = [tokenizer.decode(c) for c in written[i]]
            if "chain" in record:
                sample["chain"] = list(record["chain"])
            samples.append(sample)
    return samples


def exact_match_rates(samples: list[dict]) -> dict[str, float]:
    """Share of images whose final step equals a reference, and whose step k equals its target."""
    n = max(len(samples), 1)
    rates = {
        "final_matches_reference": sum(
            normalize_caption(s["steps"][-1]) in {normalize_caption(r) for r in s["references"]}
            for s in samples
        )
        / n
    }
    num_steps = len(samples[0]["steps"]) if samples else 0
    for k in range(num_steps):
        rates[f"step_{k + 1}_matches_target"] = (
            sum(s["steps"][k] == s["targets"][k if num_steps > 1 else -1] for s in samples) / n
        )
    return rates
