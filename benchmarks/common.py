"""What the model benchmarks share: the config, synthetic inputs, the train step, timing,
machine info and output (reading a profiler trace back is in profile_table.py).

Not a benchmark itself. The scripts in this folder import it as `common` (Python puts the
script's folder first on the path). Speed does not depend on what the weights are, so every
model here is randomly initialised, and its inputs are random arrays of the configured shapes.
No data files are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refine_jax.config import load_config_file, validate_config
from refine_jax.data.shards import TarShardSource
from refine_jax.model_kinds import build_model
from refine_jax.special_tokens import PAD_ID
from refine_jax.targets import schedule_fractions
from refine_jax.train import bind_train_step
from refine_jax.train_state import init_variables, initial_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "flickr8k.py"
RESULTS = REPO / "benchmarks" / "results"
FIRST_WORD_ID = 5  # ids below are pad, unk, bos, eos and blank


def parse_args_with_quick(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """`parser`'s arguments; with --quick, `quick` replaces those options' defaults, so an
    option given on the command line still wins over the quick size."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def load_config(arg: str = "", batch_size: int | None = None, **model_overrides: Any):
    """configs/flickr8k.py's get_config(arg) with `config.model` keys overridden (None: keep
    the config's value), checked as the trainer checks it."""
    overrides = {f"model.{k}": v for k, v in model_overrides.items() if v is not None}
    if batch_size:
        overrides["batch_size"] = batch_size
    config = load_config_file(f"{CONFIG_FILE}:{arg}", **overrides)
    validate_config(config)
    return config


def model_summary(config) -> dict[str, Any]:
    """The config values a speed number depends on."""
    m = config.model
    keys = (
        "kind",
        "image_size",
        "patch_size",
        "width",
        "num_heads",
        "mlp_dim",
        "encoder_depth",
        "detailer_depth",
        "num_refine_steps",
        "canvas_length",
        "dtype",
        "remat",
        "unroll_scans",
        "freeze_encoder",
        "dropout_rate",
        "dropout_bits",
    )
    return {
        **{k: m[k] for k in keys},
        "vocab_size": config.tokenizer.vocab_size,
        "batch_size": config.batch_size,
    }


def fractions(config) -> jnp.ndarray:
    """The scheduled fractions s(k) the trainer and evaluation give the refinement model."""
    t = config.targets
    return jnp.asarray(
        schedule_fractions(config.model.num_refine_steps, t.schedule, t.log_a), jnp.float32
    )


def synthetic_images(config, batch_size: int, seed: int = 0) -> np.ndarray:
    size = config.model.image_size
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch_size, size, size, 3)).astype(np.float32)


def synthetic_batch(config, batch_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of the pipeline's keys and shapes, filled with random captions.

    Each caption has a random length that fits the canvas; step k's target is its first
    s(k) share of tokens, padded. The cost of a step does not depend on the ids, only on
    the shapes, so the exact target layout does not matter here.
    """
    m = config.model
    batch_size = batch_size or config.batch_size
    length, vocab = m.canvas_length, config.tokenizer.vocab_size
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(8, length - 1), min(20, length - 1) + 1, batch_size)
    words = rng.integers(FIRST_WORD_ID, vocab, (batch_size, length)).astype(np.int32)
    positions = np.arange(length)[None, :]
    caption = np.where(positions < lengths[:, None], words, PAD_ID).astype(np.int32)
    s = np.asarray(fractions(config))
    step_lengths = np.maximum(np.round(s[None, :] * lengths[:, None]), 1).astype(np.int32)
    targets = np.where(positions[None] < step_lengths[..., None], caption[:, None], PAD_ID)
    return {
        "image": synthetic_images(config, batch_size, seed),
        "targets": targets.astype(np.int32),  # [B, K, L]
        "caption": caption,  # [B, L]
        "scheduled_lengths": (s[None, :] * lengths[:, None]).astype(np.float32),  # [B, K]
        "mask": np.ones((batch_size,), bool),
    }


def make_train_step(config, jit_kwargs: dict | None = None):
    """The trainer's train step for `config` (single device), jitted, and a fresh state.

    Returns (model, step, state, num_params); the state is donated to each call, as in the
    trainer.
    """
    vocab = config.tokenizer.vocab_size
    model = build_model(config, vocab)
    optimizer, schedule = make_optimizer(config)
    # The trainer's state (refine_jax.train_state), jitted: one compile instead of running (and
    # compiling) every init op on its own.
    state = jax.jit(lambda: nn.unbox(initial_state(model, config, vocab, optimizer)))()
    params = state.params
    step = jax.jit(
        bind_train_step(config, model, optimizer, schedule),
        donate_argnums=0,
        **(jit_kwargs or {}),
    )
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return model, step, state, int(num_params)


def init_params(config, model):
    """`init_variables` for `model`, jitted (much faster than running its ops one by one)."""
    vocab = config.tokenizer.vocab_size
    return jax.jit(lambda: init_variables(model, config, vocab))()


def abstract_train_state(config):
    """Shapes of the model, state and jittable step without allocating the parameters."""
    vocab = config.tokenizer.vocab_size
    model = build_model(config, vocab)
    optimizer, schedule = make_optimizer(config)
    state = jax.eval_shape(lambda: nn.unbox(initial_state(model, config, vocab, optimizer)))
    step = jax.jit(bind_train_step(config, model, optimizer, schedule), donate_argnums=0)
    return model, step, state


class TrainStepRunner:
    """A compiled train step with its own state and a resident batch; `run(n)` times n steps."""

    def __init__(self, config, batch_size: int | None = None, seed: int = 0):
        self.config = config
        self.batch_size = batch_size or config.batch_size
        self.model, self.step, self.state, self.num_params = make_train_step(config)
        self.batch = jax.device_put(synthetic_batch(config, self.batch_size, seed))
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)  # compiles
        jax.block_until_ready(metrics)
        self.first_call_s = time.perf_counter() - start

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` consecutive steps (dispatch overlaps, as in training)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def time_call(fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call of `fn` (which returns arrays), over `reps` calls, blocking at the end."""
    start = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def reps_for(fn: Callable[[], Any], target_s: float, most: int = 10_000) -> int:
    """How many calls of `fn` (already compiled) take about `target_s` seconds."""
    once = time_call(fn, 1)
    return int(min(most, max(1, round(target_s / max(once, 1e-6)))))


def interleaved(
    measures: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[float]]:
    """Runs every measurement once per round, in turn, so that a change in the machine's load
    falls on all of them alike; returns each one's list of results."""
    results: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
        log(f"round {r + 1}/{rounds} done; load average {os.getloadavg()[0]:.2f}")
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the repeated timings disagree."""
    mid = median(values)
    return float((max(values) - min(values)) / mid) if mid else 0.0


def matmul_flops_per_s(size: int, dtype: str = "float32", reps: int = 5, rounds: int = 3) -> dict:
    """The machine's dense-matmul rate in this process: a jitted [size, size] @ [size, size]
    product of `dtype`, the median of `rounds` timings of `reps` products each."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (size, size), jnp.dtype(dtype))
    product = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(product(a, b))
    seconds = [time_call(lambda: product(a, b), reps) for _ in range(rounds)]
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": dtype,
        "seconds_per_product": median(seconds),
        "flops_per_s": flops / median(seconds),
        "flops_per_s_best": flops / min(seconds),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def machine_line(info: dict[str, Any]) -> str:
    device = info["processor"] if info["backend"] == "cpu" else info["device_kind"]
    return (
        f"JAX {info['jax']} {info['backend']} backend, {device}, {info['cpu_count']} CPUs, "
        f"load average {info['load_average'][0]:.2f}"
    )


def cell(value: Any) -> str:
    """A number as a table shows it: three significant digits, thousands separated."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], formats: Sequence[str] = ()
) -> str:
    """A markdown table; numbers right-aligned. `formats`: a format spec per column ("" for
    the default of `cell`), e.g. ",.1f"."""
    numeric = lambda i: (
        bool(rows) and all(isinstance(row[i], int | float) or row[i] == "-" for row in rows)
    )
    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]

    def show(value: Any, i: int) -> str:
        spec = formats[i] if i < len(formats) else ""
        if spec and isinstance(value, int | float) and not isinstance(value, bool):
            return format(value, spec)
        return cell(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(show(v, i) for i, v in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def read_split(folder: str) -> list[list[str]]:
    """Every image's captions of a shard split, without decoding its images."""
    source = TarShardSource(folder)
    return [source.read_captions(i)[0] for i in range(len(source))]


def slug(name: str) -> str:
    """`name` as a file name."""
    return re.sub(r"[^\w.=-]+", "_", name)


def save(result: dict[str, Any], output: str | None, name: str) -> Path:
    path = Path(output) if output else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path
