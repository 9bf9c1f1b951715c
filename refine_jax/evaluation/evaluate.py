"""`--mode=eval`: describe a split with a trained checkpoint and score every step (DESIGN §4).

    python -m refine_jax.main --config=C --workdir=DIR --mode=eval \\
        [--eval_data=SHARD_FOLDER] [--eval_name=NAME] [--checkpoint_step=N] [--report_images=50]

writes DIR/eval/NAME/metrics.json, captions.jsonl and report.html. The split is the config's
held-out source, or the tar shards at --eval_data scored against all references of the COCO-style
`references.json` beside them. Without --config, the config recorded in DIR at training is used.
Scoring lives in `evaluation.metrics` (what the trainer imports), checkpoint loading in
`refine_jax.model_loading`; both are re-exported here.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from refine_jax.data import make_sources
from refine_jax.data.caption_source import CaptionSource
from refine_jax.data.referenced_shards import ReferencedShards
from refine_jax.evaluation.attention import (
    added_word_indices,
    added_words_attention,
    attention_overlay,
    to_uint8,
    token_word_indices,
)
from refine_jax.evaluation.captioning import describe_split
from refine_jax.evaluation.matching import MatchEmbedder, score_steps, split_retrieval
from refine_jax.evaluation.metrics import (
    evaluate_samples,
    flatten_metrics,
    split_metrics,
    step_schedule,
)
from refine_jax.evaluation.report import ReportImage, select_images, write_report
from refine_jax.model_kinds import describe_with_attention, model_kind
from refine_jax.model_loading import LoadedModel, load_model, restore_params
from refine_jax.paths import absolute, folder_name
from refine_jax.sharding import to_host
from refine_jax.workdir_config import config_for_workdir

DEFAULT_EVAL_NAME = "heldout"


# ---------------------------------------------------------------------------------------------
# The split.


def default_eval_name(eval_data: str | None) -> str:
    """NAME of DIR/eval/NAME: the shard folder's name, or 'heldout' for the config's split."""
    if not eval_data:
        return DEFAULT_EVAL_NAME
    return folder_name(eval_data, DEFAULT_EVAL_NAME)


def eval_split(
    config: ml_collections.ConfigDict, eval_data: str | None = None, num_threads: int = 4
) -> tuple[CaptionSource, dict]:
    """(source, info) of the split to evaluate: `eval_data` shards scored against their
    references.json, else the config's held-out source; config.data.max_eval_examples > 0
    keeps the first that many samples of either."""
    if eval_data:
        split = ReferencedShards(eval_data, num_threads, config.data.get("max_eval_examples", 0))
        return split, {
            "eval_data": absolute(eval_data),
            "skipped": dict(split.skipped),
            "references_from_shard": split.references_from_shard,
        }
    return make_sources(config)[1], {"eval_data": f"held-out {config.data.name}"}


# ---------------------------------------------------------------------------------------------
# Report material: thumbnails and attention heatmaps of the shown images.


@functools.lru_cache(maxsize=8)
def _attention_fn(model: nn.Module):
    """The jitted attention pass of a model, built once per model (each evaluation of a run
    reuses its compilation)."""
    return jax.jit(functools.partial(describe_with_attention, model), static_argnames="beam")


def report_images(
    loaded: LoadedModel,
    source: CaptionSource,
    samples: Sequence[dict],
    per_image: Sequence[dict],
    indices: Sequence[int],
) -> list[ReportImage]:
    """Cards for samples `indices`: the model's view of the image and, per step, the attention
    heatmap of the words that step added (last detailer layer, heads averaged, over the tokens
    of the added words)."""
    if not indices:
        return []
    batch_size = loaded.config.batch_size
    attend = _attention_fn(loaded.model)
    items: list[ReportImage] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        records = [source[samples[i]["source_index"]] for i in chunk]
        images = np.stack([loaded.features.map(record)["image"] for record in records])
        padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(chunk), 0)])
        with loaded.context():
            placed = loaded.put_batch({"image": padded})["image"]
            canvases, attention = attend(
                loaded.params,
                placed,
                jnp.asarray(loaded.fractions),
                beam=loaded.config.decode.beam_size,  # the captions describe_split wrote
            )
        canvases, attention = to_host(canvases), to_host(attention)  # [B, K, L], [B, K, L, N]
        if loaded.config.decode.drop_repeats:  # as describe_split wrote them
            canvases = loaded.tokenizer.drop_repeated_words(canvases)
        for b, i in enumerate(chunk):
            pixels = to_uint8(images[b])
            heatmaps, words_for = [], []
            previous = ""
            for k in range(canvases.shape[1]):
                tokens = canvases[b, k]
                text = loaded.tokenizer.decode(tokens)
                added = added_word_indices(previous, text)
                weights = added_words_attention(
                    attention[b, k], token_word_indices(loaded.tokenizer, tokens), added
                )
                words = text.split()
                heatmaps.append(None if weights is None else attention_overlay(pixels, weights))
                words_for.append([words[j] for j in added])
                previous = text
            sample = samples[i]
            items.append(
                ReportImage(
                    i,
                    str(sample["image_id"]),
                    list(sample["references"]),
                    list(sample["steps"]),
                    list(per_image[i]["cider"]),
                    pixels,
                    heatmaps,
                    words_for,
                    per_image[i].get("match_score"),
                )
            )
    return items


# ---------------------------------------------------------------------------------------------
# --mode=eval


def evaluate_checkpoint(
    config: ml_collections.ConfigDict | None,
    workdir: str | epath.PathLike,
    eval_data: str | None = None,
    eval_name: str | None = None,
    checkpoint_step: int | None = None,
    max_report_images: int = 50,
    loaded: LoadedModel | None = None,
    num_threads: int = 4,
    match_workdir: str | epath.PathLike | None = None,
) -> dict[str, Any]:
    """Describes the split with the checkpoint, scores it, and writes DIR/eval/NAME/
    metrics.json, captions.jsonl and report.html (process 0). Returns the metrics (with
    `output_dir` and `seconds`). `loaded` reuses an already loaded model; `config` None: the
    one recorded in the workdir at training. `match_workdir`: a matching model's workdir whose
    image posteriors measure gradualness and which scores every step against its image.

    A matching model's own checkpoint is evaluated by retrieval recall instead (metrics.json
    only)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    workdir = epath.Path(workdir)
    config = loaded.config if loaded and config is None else config_for_workdir(config, workdir)
    loaded = loaded or load_model(config, workdir, checkpoint_step)
    timings["load_model"] = time.perf_counter() - start

    tick = time.perf_counter()
    source, info = eval_split(config, eval_data, num_threads)
    timings["open_split"] = time.perf_counter() - tick
    name = eval_name or default_eval_name(eval_data)
    output_dir = workdir / "eval" / name
    if not model_kind(config.model.kind).describes:  # the matching model
        return _evaluate_retrieval(loaded, source, info, name, output_dir, timings, start)

    tick = time.perf_counter()
    with loaded.context():
        samples = describe_split(
            loaded.model,
            loaded.params,
            source,
            loaded.features,
            loaded.tokenizer,
            loaded.config.batch_size,  # rounded to a multiple of the batch shards
            loaded.fractions,
            put_batch=loaded.put_batch,
            beam_size=config.decode.beam_size,
            drop_repeats=config.decode.drop_repeats,
        )
    timings["describe"] = time.perf_counter() - tick

    scored = None
    if match_workdir:
        tick = time.perf_counter()
        matcher = load_model(None, match_workdir)
        with matcher.context():
            scored = score_steps(MatchEmbedder.from_loaded(matcher), source, samples)
        timings["match_scores"] = time.perf_counter() - tick

    tick = time.perf_counter()
    metrics = split_metrics(samples, config, per_image=True, match=scored)
    per_image = metrics.pop("per_image")
    timings["metrics"] = time.perf_counter() - tick

    tick = time.perf_counter()
    shown, worst, dropped = select_images(per_image, max_report_images)
    cards = report_images(loaded, source, samples, per_image, shown)
    timings["report_attention"] = time.perf_counter() - tick

    summary = {
        "eval_name": name,
        **info,
        "checkpoint_step": loaded.step,
        "model_kind": config.model.kind,
        **({"match_workdir": str(match_workdir)} if match_workdir else {}),
        **metrics,
    }
    if jax.process_index() == 0:
        tick = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "captions.jsonl").open("w") as f:
            for sample, scores in zip(samples, per_image, strict=True):
                row = {
                    "image_id": sample["image_id"],
                    "source_index": sample["source_index"],  # its position in the split
                    "references": sample["references"],
                    "steps": sample["steps"],
                    "cider_per_step": scores["cider"],
                }
                if "steps_as_written" in sample:  # before decode.drop_repeats
                    row["steps_as_written"] = sample["steps_as_written"]
                if "match_score" in scores:
                    row["match_score_per_step"] = scores["match_score"]
                if "chain" in sample:
                    row["chain"] = sample["chain"]
                f.write(json.dumps(row) + "\n")
        write_report(
            output_dir / "report.html",
            metrics,
            cards,
            metrics["schedule"],
            metrics["weights"],
            worst=worst,
            dropped=dropped,
            title=f"{name}: {config.model.kind} captioner, checkpoint step {loaded.step}",
            info={
                "eval split": info["eval_data"],
                "checkpoint": loaded.step,
                "model": config.model.kind,
                "images": len(samples),
                "steps K": metrics["num_steps"],
                "shown in report": len(cards),
            },
        )
        timings["write"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        summary["seconds"] = timings
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["output_dir"] = str(output_dir)
    summary.setdefault("seconds", timings)
    return summary


def _evaluate_retrieval(
    loaded: LoadedModel,
    source: CaptionSource,
    info: dict[str, Any],
    name: str,
    output_dir: epath.Path,
    timings: dict[str, float],
    start: float,
) -> dict[str, Any]:
    """A matching model's eval: retrieval recall of the split's images against all of their
    references, both ways, written to DIR/eval/NAME/metrics.json."""
    tick = time.perf_counter()
    with loaded.context():
        recall = split_retrieval(MatchEmbedder.from_loaded(loaded), source)
    timings["retrieval"] = time.perf_counter() - tick
    summary = {
        "eval_name": name,
        **info,
        "checkpoint_step": loaded.step,
        "model_kind": "match",
        **recall,
    }
    timings["total"] = time.perf_counter() - start
    summary["seconds"] = timings
    if jax.process_index() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["output_dir"] = str(output_dir)
    return summary


def print_summary(summary: dict[str, Any], out=sys.stdout) -> None:
    """A few lines for the console: the headline metrics and where the files are."""
    print(f"eval {summary['eval_name']} (checkpoint {summary['checkpoint_step']}):", file=out)
    if not model_kind(summary["model_kind"]).describes:  # retrieval recall
        print(f"  {summary['num_images']} images, {summary['num_texts']} texts", file=out)
        for key, value in summary.items():
            if "_r@" in key:
                print(f"  {key}: {value:.4f}", file=out)
        print(f"  wrote {summary['output_dir']}/metrics.json", file=out)
        return
    keys = (
        "num_images",
        "final_cider",
        "final_cider_interval",
        "final_bleu4",
        "final_repetition",
        "weighted_quality",
        "gradualness",
        "length_adherence",
        "refine_score",
        "monotonic_fraction",
    )
    for key in keys:
        value = summary[key]
        if value is None:
            value = "n/a (one step: nothing to refine)"
        elif key == "gradualness":
            value = f"{value:.4f} (encoding: {summary['gradualness_encoding']})"
        elif key == "final_cider_interval":
            value = f"[{value[0]:.4f}, {value[1]:.4f}] (95% bootstrap over images)"
        print(
            f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}", file=out
        )
    if "match_score_per_step" in summary:
        scores = ", ".join(f"{c:.4f}" for c in summary["match_score_per_step"])
        print(f"  image-text match score per step: {scores}", file=out)
    print("  CIDEr per step: " + ", ".join(f"{c:.4f}" for c in summary["cider_per_step"]), file=out)
    print(f"  wrote {summary['output_dir']}/{{metrics.json,captions.jsonl,report.html}}", file=out)


__all__ = [
    "LoadedModel",
    "ReferencedShards",
    "evaluate_checkpoint",
    "evaluate_samples",
    "flatten_metrics",
    "load_model",
    "restore_params",
    "split_metrics",
    "step_schedule",
]
