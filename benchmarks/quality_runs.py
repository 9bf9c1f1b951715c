"""What the quality benchmarks share: train a config to its last step, then score that checkpoint.

Not a benchmark itself; `flickr8k_quality.py` and `gradualness.py` import it. A run whose
workdir already holds its final checkpoint is not retrained (training resumes from the last
checkpoint otherwise), so a long comparison can be stopped and started again, and its tables
rebuilt from the trained models alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refine_jax.checkpointing import Checkpointer
from refine_jax.evaluation.evaluate import evaluate_checkpoint
from refine_jax.evaluation.refinement_metrics import paired_difference
from refine_jax.train import train_and_evaluate

# The metrics a quality table shows, from evaluate_checkpoint's summary (DESIGN §4).
SCORES = (
    "final_cider",
    "final_bleu4",
    "final_cider_interval",
    "gradualness_encoding",
    "gradualness_tfidf",
    "match_score_per_step",
    "final_repetition",
    "repetition_per_step",
    "consensus_per_step",
    "cider_per_step",
    "bleu4_per_step",
    "weighted_quality",
    "gradualness",
    "gradualness_raw",
    "progress_per_step",
    "length_adherence",
    "length_ratio_per_step",
    "refine_score",
    "monotonic_fraction",
    "num_blank_final",
    "num_images",
    "checkpoint_step",
)


def scores_of(summary: dict[str, Any]) -> dict[str, Any]:
    """The table's metrics of an evaluate_checkpoint summary, and the eval's output folder."""
    scores = {key: summary[key] for key in SCORES if key in summary}
    return {**scores, "eval_dir": summary["output_dir"]}


def trained_step(workdir: str) -> int:
    """The step of the newest checkpoint in `workdir` (0 when there is none)."""
    checkpointer = Checkpointer(f"{workdir}/checkpoints", save_every=1, async_save=False)
    try:
        return checkpointer.latest_step() or 0
    finally:
        checkpointer.close()


def train_and_score(
    config,
    workdir: str,
    eval_data: str | None = None,
    report_images: int = 20,
    match_workdir: str | None = None,
) -> dict[str, Any]:
    """Trains `config` in `workdir` up to config.total_steps (unless already there) and returns
    the scores of its checkpoint at total_steps (a workdir trained further without that
    checkpoint is an error, not a longer run labelled with this budget) on the held-out split
    (or `eval_data`), with `train_seconds` (None when the run was already trained) and the
    eval's output folder. `match_workdir`: a matching model whose image posteriors measure
    gradualness (DESIGN §11)."""
    train_seconds = None
    if trained_step(workdir) < config.total_steps:
        start = time.perf_counter()
        train_and_evaluate(config, workdir)
        train_seconds = time.perf_counter() - start
    summary = evaluate_checkpoint(
        config,
        workdir,
        eval_data,
        checkpoint_step=config.total_steps,
        max_report_images=report_images,
        match_workdir=match_workdir,
    )
    return {**scores_of(summary), "train_seconds": train_seconds}


def score_with_beam(config, workdir: str, beam_size: int, eval_data: str | None = None) -> dict:
    """The scores of a trained baseline's final checkpoint decoded by beam search."""
    config = config.copy_and_resolve_references()
    config.unlock()
    config.decode.beam_size = beam_size
    summary = evaluate_checkpoint(
        config, workdir, eval_data, eval_name=f"beam{beam_size}", max_report_images=0
    )
    return scores_of(summary)


def final_cider_by_image(eval_dir: str) -> dict[str, float]:
    """Each image's final-step CIDEr-D from an eval's captions.jsonl, by image id."""
    with (Path(eval_dir) / "captions.jsonl").open() as f:
        return {r["image_id"]: r["cider_per_step"][-1] for r in map(json.loads, f)}


def paired_cider_difference(run: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Final CIDEr-D of `run` minus `other` (two scored results) on the same images, with the
    paired bootstrap interval."""
    return paired_difference(
        final_cider_by_image(run["eval_dir"]), final_cider_by_image(other["eval_dir"])
    )


def per_step(values: list[float] | None, digits: int = 3) -> str:
    """A per-step list as a table cell ("0.12 / 0.40 / ..."); "–" when the metric is undefined
    (the progress of a run whose final captions are all blank)."""
    if values is None:
        return "–"
    return " / ".join(f"{v:.{digits}f}" for v in values)
