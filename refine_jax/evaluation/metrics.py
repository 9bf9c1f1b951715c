"""Scores of described samples: the DESIGN §4 metrics of a split, nested for an eval run's
metrics.json and flat for the trainer's `eval/...` log entries. All the trainer imports of
evaluation's scoring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from refine_jax.evaluation.refinement_metrics import chain_agreement, refinement_metrics
from refine_jax.model_kinds import model_kind


def step_schedule(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(s(k), w_k) of the config's refinement steps; ([1.0], [1.0]) for the autoregressive
    baseline, which writes one description (each model kind says, model_kinds.py)."""
    return model_kind(config.model.kind).step_schedule(config)


def split_metrics(
    samples: Sequence[dict],
    config: ml_collections.ConfigDict,
    per_image: bool = False,
    match: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`refinement_metrics` of describe_split samples (every sample counted once, even when two
    share an image id), with the schedule and weights used and, when every sample carries the
    true chain (shapes data), the per-step `chain_agreement`.

    Gradualness G (and R = Q_w * G) is measured in the matching model's space (its image
    posteriors, `evaluation.matching.posterior_progress`) when `match`
    (`evaluation.matching.score_steps` of the samples) is given, else in CIDEr's TF-IDF space;
    `gradualness_encoding` says which. The TF-IDF values are always also reported, as
    `gradualness_tfidf`, `gradualness_raw_tfidf`, `progress_per_step_tfidf` and
    `refine_score_tfidf`; with `match`, the mean per-step `match_score_per_step` and
    `ref_match_score_per_step` too."""
    if not samples:
        raise ValueError("no samples to evaluate")
    missing = [s["image_id"] for s in samples if not s["references"]]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no reference caption, e.g. {missing[:3]}")
    schedule, weights = step_schedule(config)
    trajectories = {n: list(s["steps"]) for n, s in enumerate(samples)}
    references = {n: list(s["references"]) for n, s in enumerate(samples)}
    metrics = refinement_metrics(
        trajectories,
        references,
        schedule,
        weights,
        per_image=per_image,
        step_progress=None if match is None else match["step_progress"],
        written=(  # tokenised again only when decode.drop_repeats changed some description
            {n: list(s.get("steps_as_written", s["steps"])) for n, s in enumerate(samples)}
            if any("steps_as_written" in s for s in samples)
            else None
        ),
    )
    metrics["gradualness_encoding"] = "tfidf" if match is None else "match"
    if match is not None:
        metrics["match_score_per_step"] = match["match_score"].mean(axis=0).tolist()
        metrics["ref_match_score_per_step"] = match["ref_match_score"].mean(axis=0).tolist()
        for entry, scores in zip(metrics.get("per_image", ()), match["match_score"], strict=False):
            entry["match_score"] = scores.tolist()
    metrics["schedule"] = [float(x) for x in schedule]
    metrics["weights"] = [float(x) for x in weights]
    num_steps = metrics["num_steps"]
    if all(len(s.get("chain") or ()) == num_steps for s in samples):
        metrics["chain_agreement"] = chain_agreement(
            trajectories, {n: list(s["chain"]) for n, s in enumerate(samples)}
        )
    if per_image:
        for entry in metrics["per_image"]:
            entry["image_id"] = samples[entry["image_id"]]["image_id"]
    return metrics


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat, float-valued keys for a log line: scalars as they are, per-step lists as
    `<name>_step_<k>` (cider_step_1, bleu4_step_1, progress_step_1, length_ratio_step_1,
    chain_agreement_step_1, ...)."""
    lists = {
        "cider_per_step": "cider",
        "bleu4_per_step": "bleu4",
        "progress_per_step": "progress",
        "length_ratio_per_step": "length_ratio",
        "chain_agreement": "chain_agreement",
        "progress_per_step_tfidf": "progress_tfidf",
        "match_score_per_step": "match_score",
        "ref_match_score_per_step": "ref_match_score",
        "repetition_per_step": "repetition",
        "repetition_as_written_per_step": "repetition_as_written",
        "consensus_per_step": "consensus",
    }
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key in lists:
            for k, v in enumerate(value or (), 1):
                flat[f"{lists[key]}_step_{k}"] = float(v)
        elif isinstance(value, bool | int | float) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def evaluate_samples(
    samples: Sequence[dict], config: ml_collections.ConfigDict
) -> dict[str, float]:
    """DESIGN §4 metrics of `describe_split` output as flat JSON-serialisable floats, for
    `eval/...` log entries: final_cider, final_bleu4, weighted_quality, gradualness(_raw),
    length_adherence(_raw), refine_score, monotonic_fraction, num_images, num_steps,
    num_blank_final and per step cider_step_k, bleu4_step_k, progress_step_k,
    length_ratio_step_k (and chain_agreement_step_k on data with known chains)."""
    return flatten_metrics(split_metrics(samples, config))


__all__ = ["evaluate_samples", "flatten_metrics", "split_metrics", "step_schedule"]
