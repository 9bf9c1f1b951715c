"""Input pipeline throughput against the training step's consumption, in the same run.

Reads the Flickr8k training shards through the training pipeline of `configs/flickr8k.py`
(decode, random crop + resize, tokenise, coarse-to-fine targets, batch) with the config's
worker settings and measures images/s; then jits the train step of that config's model on a
real batch and measures the images/s it consumes; then runs the two together (training fed by
the pipeline, as in the trainer). The pipeline should deliver at least 3x what training
consumes, so the input is never the bottleneck.

    python benchmarks/input_pipeline.py                     # full measurement, ~2 minutes
    python benchmarks/input_pipeline.py --quick             # seconds; tiny model, few batches

Writes the numbers as JSON to --output (default benchmarks/results/input_pipeline.json).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
from absl import app, flags

from refine_jax.data import make_sources, training_captions
from refine_jax.data.pipeline import CaptionFeatures, count_skips, train_batches
from refine_jax.model_kinds import build_model
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train import bind_train_step
from refine_jax.train_state import initial_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k"

flags.DEFINE_bool("quick", False, "A few batches on the tiny variant: checks it runs, in seconds.")
flags.DEFINE_string("data", str(DEFAULT_DATA), "Flickr8k folder with train/ and val/ shards.")
flags.DEFINE_string("config", str(REPO / "configs" / "flickr8k.py"), "Config file (get_config).")
flags.DEFINE_integer("num_threads", None, "Override config.data.num_threads.")
flags.DEFINE_integer("num_workers", None, "Override config.data.num_workers.")
flags.DEFINE_integer("pipeline_batches", 94, "Batches timed for the pipeline (94 x 64 = 1 epoch).")
flags.DEFINE_integer("train_steps", 10, "Train steps timed.")
flags.DEFINE_string(
    "output",
    str(REPO / "benchmarks" / "results" / "input_pipeline.json"),
    "Where the JSON result goes.",
)
FLAGS = flags.FLAGS


def load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def time_pipeline(source, features, config, batches: int) -> tuple[float, dict]:
    """Images/s of the training pipeline alone (after 2 warm-up batches), and its skip counts."""
    iterator = train_batches(
        source,
        features,
        config.batch_size,
        config.seed,
        config.data.num_threads,
        num_workers=config.data.num_workers,
        worker_buffer_size=config.data.worker_buffer_size,
    )
    for _ in range(2):
        next(iterator)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for _ in range(batches):
        for reason, n in count_skips(next(iterator)).items():
            counts[reason] = counts.get(reason, 0) + n
    seconds = time.perf_counter() - start
    return batches * config.batch_size / seconds, counts


def make_step(config, vocab_size: int):
    """The trainer's jitted train step (single device) and a fresh state."""
    model = build_model(config, vocab_size)
    optimizer, schedule = make_optimizer(config)
    state = jax.jit(lambda: nn.unbox(initial_state(model, config, vocab_size, optimizer)))()
    step = jax.jit(bind_train_step(config, model, optimizer, schedule), donate_argnums=0)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    return step, state, num_params


def time_training(step, state, batch, steps: int, batch_size: int):
    """Images/s the train step consumes on one resident batch (after compiling)."""
    batch = jax.device_put(batch)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start), state


def time_fed_training(step, state, source, features, config, steps: int) -> float:
    """Images/s of training fed by the pipeline, both sharing the machine as in the trainer."""
    iterator = train_batches(
        source,
        features,
        config.batch_size,
        config.seed + 1,
        config.data.num_threads,
        num_workers=config.data.num_workers,
        worker_buffer_size=config.data.worker_buffer_size,
    )
    state, metrics = step(state, next(iterator))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, next(iterator))
    jax.block_until_ready(metrics)
    return steps * config.batch_size / (time.perf_counter() - start)


def main(argv) -> None:
    del argv
    config = load_config(FLAGS.config, "tiny" if FLAGS.quick else "")
    config.data.path = FLAGS.data
    if FLAGS.num_threads is not None:
        config.data.num_threads = FLAGS.num_threads
    if FLAGS.num_workers is not None:
        config.data.num_workers = FLAGS.num_workers
    pipeline_batches = 5 if FLAGS.quick else FLAGS.pipeline_batches
    train_steps = 2 if FLAGS.quick else FLAGS.train_steps
    load_before = os.getloadavg()
    print(f"JAX {jax.default_backend()} backend: {jax.devices()[0].device_kind}", flush=True)

    start = time.perf_counter()
    train_source, _ = make_sources(config)
    tokenizer = train_tokenizer(training_captions(train_source), config.tokenizer.vocab_size)
    features = CaptionFeatures.from_config(config, tokenizer)
    setup_s = time.perf_counter() - start
    print(
        f"setup (index shards, train tokenizer): {setup_s:.1f}s; {len(train_source)} samples, "
        f"vocabulary {tokenizer.vocab_size}",
        flush=True,
    )

    pipeline_rate, counts = time_pipeline(train_source, features, config, pipeline_batches)
    print(
        f"pipeline: {pipeline_rate:.0f} images/s ({pipeline_batches} batches of "
        f"{config.batch_size}, {config.data.num_threads} threads, "
        f"{config.data.num_workers} worker processes); counts {counts}",
        flush=True,
    )

    step, state, num_params = make_step(config, tokenizer.vocab_size)
    batch = next(train_batches(train_source, features, config.batch_size, config.seed))
    train_rate, state = time_training(step, state, batch, train_steps, config.batch_size)
    print(
        f"training step: {train_rate:.1f} images/s ({num_params:,} parameters, "
        f"{config.batch_size / train_rate:.3f}s per step of {config.batch_size})",
        flush=True,
    )

    fed_rate = time_fed_training(step, state, train_source, features, config, train_steps)
    ratio = pipeline_rate / train_rate
    print(
        f"training fed by the pipeline: {fed_rate:.1f} images/s "
        f"({fed_rate / train_rate:.0%} of the step alone)"
    )
    print(f"pipeline / training = {ratio:.1f}x (needs >= 3x): {'OK' if ratio >= 3 else 'TOO SLOW'}")

    m = config.model
    result = {
        "benchmark": "input_pipeline",
        "quick": FLAGS.quick,
        "config": f"{Path(FLAGS.config).name}{':tiny' if FLAGS.quick else ''}",
        "data": FLAGS.data,
        "samples": len(train_source),
        "batch_size": config.batch_size,
        "image_size": m.image_size,
        "model": {
            k: m[k]
            for k in (
                "width",
                "encoder_depth",
                "detailer_depth",
                "num_refine_steps",
                "canvas_length",
                "patch_size",
            )
        },
        "vocab_size": tokenizer.vocab_size,
        "num_params": int(num_params),
        "num_threads": config.data.num_threads,
        "num_workers": config.data.num_workers,
        "pipeline_batches": pipeline_batches,
        "train_steps": train_steps,
        "pipeline_images_per_s": pipeline_rate,
        "train_images_per_s": train_rate,
        "fed_train_images_per_s": fed_rate,
        "ratio": ratio,
        "meets_3x": ratio >= 3,
        "skip_counts": counts,
        "setup_s": setup_s,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
