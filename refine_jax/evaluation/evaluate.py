"""`--mode=eval`: describe a split with a trained checkpoint and score every step (DESIGN §4).

    python -m refine_jax.main --config=C --workdir=DIR --mode=eval \\
        [--eval_data=SHARD_FOLDER] [--eval_name=NAME] [--checkpoint_step=N] [--report_images=50]

writes DIR/eval/NAME/metrics.json, captions.jsonl and report.html. The split is the config's
held-out source, or the tar shards at --eval_data scored against all references of the COCO-style
`references.json` beside them. The trainer's periodic evaluation calls `evaluate_samples`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer, model_signature
from refine_jax.config import validate_config
from refine_jax.data import make_sources
from refine_jax.data.pipeline import CaptionFeatures
from refine_jax.data.records import is_record
from refine_jax.evaluation.attention import (
    added_word_indices,
    added_words_attention,
    attention_overlay,
    describe_with_attention,
    to_uint8,
    token_word_indices,
)
from refine_jax.evaluation.captioning import describe_split
from refine_jax.evaluation.refinement_metrics import chain_agreement, refinement_metrics
from refine_jax.evaluation.report import ReportImage, select_images, write_report
from refine_jax.losses import step_weights
from refine_jax.models import build_model
from refine_jax.sharding import to_host
from refine_jax.targets import schedule_fractions
from refine_jax.tokenizer import Tokenizer

DEFAULT_EVAL_NAME = "heldout"


# ---------------------------------------------------------------------------------------------
# Metrics of described samples (what the trainer calls).


def step_schedule(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(s(k), w_k) of the config's refinement steps; ([1.0], [1.0]) for the autoregressive
    baseline, which writes one description."""
    m, t = config.model, config.targets
    if m.kind != "refine":
        return np.ones(1), np.ones(1)
    return (
        schedule_fractions(m.num_refine_steps, t.schedule, t.log_a),
        step_weights(m.num_refine_steps, t.loss_weighting, t.geometric_ratio),
    )


def split_metrics(
    samples: Sequence[dict], config: ml_collections.ConfigDict, per_image: bool = False
) -> dict[str, Any]:
    """`refinement_metrics` of describe_split samples (every sample counted once, even when two
    share an image id), with the schedule and weights used and, when every sample carries the
    true chain (shapes data), the per-step `chain_agreement`."""
    if not samples:
        raise ValueError("no samples to evaluate")
    missing = [s["image_id"] for s in samples if not s["references"]]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no reference caption, e.g. {missing[:3]}")
    schedule, weights = step_schedule(config)
    trajectories = {n: list(s["steps"]) for n, s in enumerate(samples)}
    references = {n: list(s["references"]) for n, s in enumerate(samples)}
    metrics = refinement_metrics(trajectories, references, schedule, weights, per_image=per_image)
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


# ---------------------------------------------------------------------------------------------
# The model of a checkpoint.


@dataclass
class LoadedModel:
    """A model with its parameters on the mesh, and what describing a split needs."""

    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    features: CaptionFeatures
    fractions: np.ndarray
    mesh: Mesh
    rules: tuple
    step: int | None  # the checkpoint step; None for freshly initialised parameters

    def put_batch(self, batch: dict) -> dict:
        """A host batch every process holds whole -> global arrays on the mesh."""
        return sharding.global_batch_from_full(batch, self.mesh, self.rules)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical axis rules the model runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Tokenizer:
    """The configured tokenizer (config.tokenizer.path), else the one training kept in workdir."""
    path = config.tokenizer.path or Path(workdir) / "tokenizer"
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; train first (--mode=train) or set --config.tokenizer.path"
        ) from None


def _abstract_state(
    config: ml_collections.ConfigDict, model: nn.Module, vocab_size: int, mesh: Mesh, rules: tuple
) -> tuple[Any, Any]:
    """(abstract TrainState, its shardings), built as train.py builds the real one."""
    from refine_jax import train  # here, not at the top: the trainer imports this module

    optimizer, _ = train.make_optimizer(config)

    def init_state():
        params = train.init_variables(model, config, vocab_size)
        return train.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(nn.unbox(params)))

    boxed = jax.eval_shape(init_state)
    abstract = jax.eval_shape(lambda: nn.unbox(init_state()))
    return abstract, sharding.logical_shardings(boxed, mesh, rules)


def restore_params(
    config: ml_collections.ConfigDict,
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    vocab_size: int,
    mesh: Mesh,
    rules: tuple,
    step: int | None = None,
) -> tuple[Any, int]:
    """(params, step) of checkpoint `step` (default: the latest) in `checkpoint_dir`, restored
    with `Checkpointer.restore` into the sharded state layout of this config and mesh; a
    checkpoint of another model shape fails naming what differs."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints at {checkpoint_dir}")
    target, shardings = _abstract_state(config, model, vocab_size, mesh, rules)
    checkpointer = Checkpointer(checkpoint_dir, save_every=1, keep=1_000_000, async_save=False)
    try:
        available = sorted(checkpointer.manager.all_steps())
        if not available:
            raise FileNotFoundError(f"no checkpoints at {checkpoint_dir}")
        step = available[-1] if step is None else int(step)
        if step not in available:
            raise ValueError(
                f"no checkpoint of step {step} in {checkpoint_dir}; available: {available}"
            )
        state = checkpointer.restore(
            step, target, shardings, None, model_signature(config, target.params)
        )
    finally:
        checkpointer.close()
    return state.params, step


def load_model(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    checkpoint_step: int | None = None,
    random_init: bool = False,
    tokenizer: Tokenizer | None = None,
) -> LoadedModel:
    """The config's model with the parameters of checkpoint `checkpoint_step` (default: the
    latest) in workdir/checkpoints, or freshly initialised ones with `random_init` (benchmarks)."""
    validate_config(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(map(tuple, config.mesh.axis_rules))
    tokenizer = tokenizer or load_tokenizer(config, workdir)
    m, t = config.model, config.targets
    model = build_model(config, tokenizer.vocab_size)
    features = CaptionFeatures.from_config(config, tokenizer)  # evaluation uses its `map`
    fractions = schedule_fractions(m.num_refine_steps, t.schedule, t.log_a).astype(np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if random_init:
            from refine_jax import train

            params, _ = sharding.create_sharded(
                lambda: train.init_variables(model, config, tokenizer.vocab_size), mesh, rules
            )
            step = None
        else:
            params, step = restore_params(
                config,
                Path(workdir) / "checkpoints",
                model,
                tokenizer.vocab_size,
                mesh,
                rules,
                checkpoint_step,
            )
    return LoadedModel(config, model, params, tokenizer, features, fractions, mesh, rules, step)


# ---------------------------------------------------------------------------------------------
# The split.


class ReferencedShards:
    """A shard split scored against a COCO-style references file: the good records of the
    shards, in order, each with all of its references (`load_references`); bad samples are
    counted in `skipped` and left out. An image the references file does not list (or lists
    without captions) keeps the captions of its shard sample, counted as
    `references_from_shard`. `limit` > 0 keeps the first `limit` samples of the shards."""

    def __init__(self, path: str | os.PathLike, num_threads: int = 4, limit: int = 0):
        from refine_jax.data.shards import TarShardSource, load_references

        self.path = os.fspath(path)
        self.source = TarShardSource(self.path)
        self.references = load_references(self.path)
        # Every image is decoded once here, so a corrupt one is left out rather than failing
        # the evaluation half way.
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            count = min(limit, len(self.source)) if limit > 0 else len(self.source)
            checked = list(pool.map(self.source.read, range(count)))
        self.counts = self.source.structural_counts().observe_all(checked)
        self.skipped = dict(self.counts.skipped)
        self.indices = [i for i, element in enumerate(checked) if is_record(element)]
        self.references_from_shard = sum(
            not self.references.get(checked[i]["key"]) for i in self.indices
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        record = self.source.read(self.indices[index], verify_image=False)
        captions = self.references.get(record["key"]) or record["captions"]
        return {
            "key": record["key"],
            "image_bytes": record["image_bytes"],
            "captions": list(captions),
        }


def default_eval_name(eval_data: str | None) -> str:
    """NAME of DIR/eval/NAME: the shard folder's name, or 'heldout' for the config's split."""
    if not eval_data:
        return DEFAULT_EVAL_NAME
    path = os.path.abspath(os.path.expanduser(os.fspath(eval_data)))
    wildcard = min((path.index(c) for c in "*?[" if c in path), default=None)
    if wildcard is not None:  # the folder the glob's first pattern part lies in
        path = os.path.dirname(path[:wildcard])
    elif not os.path.isdir(path):  # a shard file
        path = os.path.dirname(path)
    return os.path.basename(path.rstrip("/")) or DEFAULT_EVAL_NAME


def eval_split(
    config: ml_collections.ConfigDict, eval_data: str | None = None, num_threads: int = 4
) -> tuple[Any, dict]:
    """(source, info) of the split to evaluate: `eval_data` shards scored against their
    references.json, else the config's held-out source; config.data.max_eval_examples > 0
    keeps the first that many samples of either."""
    if eval_data:
        split = ReferencedShards(eval_data, num_threads, config.data.get("max_eval_examples", 0))
        return split, {
            "eval_data": os.path.abspath(os.fspath(eval_data)),
            "skipped": dict(split.skipped),
            "references_from_shard": split.references_from_shard,
        }
    return make_sources(config)[1], {"eval_data": f"held-out {config.data.name}"}


# ---------------------------------------------------------------------------------------------
# Report material: thumbnails and attention heatmaps of the shown images.


def _attention_fn(model: nn.Module):
    return jax.jit(functools.partial(describe_with_attention, model))


def source_positions(source: Any, samples: Sequence[dict]) -> list[int]:
    """The position in `source` of each sample: the same position when every element was
    described, else found by key (the eval pipeline leaves unusable elements out)."""
    if len(samples) == len(source):
        return list(range(len(samples)))
    positions: dict[str, int] = {}
    for i in range(len(source)):
        key = source.key(i) if hasattr(source, "key") else source[i]["key"]
        positions.setdefault(key, i)
    return [positions[s["image_id"]] for s in samples]


def report_images(
    loaded: LoadedModel,
    source: Any,
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
    positions = source_positions(source, samples)
    items: list[ReportImage] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        images = np.stack([loaded.features.map(source[positions[i]])["image"] for i in chunk])
        padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(chunk), 0)])
        with loaded.context():
            placed = loaded.put_batch({"image": padded})["image"]
            canvases, attention = attend(loaded.params, placed, jnp.asarray(loaded.fractions))
        canvases, attention = to_host(canvases), to_host(attention)  # [B, K, L], [B, K, L, N]
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
                    str(sample["image_id"]),
                    list(sample["references"]),
                    list(sample["steps"]),
                    list(per_image[i]["cider"]),
                    pixels,
                    heatmaps,
                    words_for,
                )
            )
    return items


# ---------------------------------------------------------------------------------------------
# --mode=eval


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    eval_data: str | None = None,
    eval_name: str | None = None,
    checkpoint_step: int | None = None,
    max_report_images: int = 50,
    loaded: LoadedModel | None = None,
    num_threads: int = 4,
) -> dict[str, Any]:
    """Describes the split with the checkpoint, scores it, and writes DIR/eval/NAME/
    metrics.json, captions.jsonl and report.html (process 0). Returns the metrics (with
    `output_dir` and `seconds`). `loaded` reuses an already loaded model."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = loaded or load_model(config, workdir, checkpoint_step)
    timings["load_model"] = time.perf_counter() - start

    tick = time.perf_counter()
    source, info = eval_split(config, eval_data, num_threads)
    timings["open_split"] = time.perf_counter() - tick

    tick = time.perf_counter()
    with loaded.context():
        samples = describe_split(
            loaded.model,
            loaded.params,
            source,
            loaded.features,
            loaded.tokenizer,
            config.batch_size,
            loaded.fractions,
            put_batch=loaded.put_batch,
        )
    timings["describe"] = time.perf_counter() - tick

    tick = time.perf_counter()
    metrics = split_metrics(samples, config, per_image=True)
    per_image = metrics.pop("per_image")
    timings["metrics"] = time.perf_counter() - tick

    tick = time.perf_counter()
    shown, worst, dropped = select_images(per_image, max_report_images)
    cards = report_images(loaded, source, samples, per_image, shown)
    timings["report_attention"] = time.perf_counter() - tick

    name = eval_name or default_eval_name(eval_data)
    output_dir = Path(workdir) / "eval" / name
    summary = {
        "eval_name": name,
        **info,
        "checkpoint_step": loaded.step,
        "model_kind": config.model.kind,
        **metrics,
    }
    if jax.process_index() == 0:
        tick = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "captions.jsonl", "w", encoding="utf-8") as f:
            for sample, scores in zip(samples, per_image, strict=True):
                row = {
                    "image_id": sample["image_id"],
                    "references": sample["references"],
                    "steps": sample["steps"],
                    "cider_per_step": scores["cider"],
                }
                if "chain" in sample:
                    row["chain"] = sample["chain"]
                f.write(json.dumps(row) + "\n")
        ids = [str(samples[i]["image_id"]) for i in range(len(samples))]
        write_report(
            output_dir / "report.html",
            metrics,
            cards,
            metrics["schedule"],
            metrics["weights"],
            worst=[ids[i] for i in worst],
            dropped=[ids[i] for i in dropped],
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


def print_summary(summary: dict[str, Any], out=sys.stdout) -> None:
    """A few lines for the console: the headline metrics and where the files are."""
    keys = (
        "num_images",
        "final_cider",
        "final_bleu4",
        "weighted_quality",
        "gradualness",
        "length_adherence",
        "refine_score",
        "monotonic_fraction",
    )
    print(f"eval {summary['eval_name']} (checkpoint {summary['checkpoint_step']}):", file=out)
    for key in keys:
        value = summary[key]
        print(
            f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}", file=out
        )
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
