"""Captions/s of K-step refinement against the autoregressive baseline, batch 1 and batch 64.

Builds the Flickr8k configuration (configs/flickr8k.py: 64 px, width 192, canvas 28,
vocabulary 2,500) as the refinement model at K = 4, 6, 8 and as its autoregressive baseline
(`:autoregressive`: the same encoder and width, a causal decoder as deep as the detailer;
about the same parameter count), all with random weights, and times
`refine_jax.decoding.decode_batch` (what evaluation runs) on random images: refinement, the
baseline's greedy decoding and its beam search (beam 3), each at batch 1 and batch 64. Each
is jit-compiled first; then every row is timed once per round, rounds alternating over the
rows so that background load falls on all of them alike; a row's number is its median.

Decoded length: the baseline's greedy and beam decoders are a `lax.scan` over all
canvas_length + 1 = 29 positions, with no early exit when every caption has ended (an ended
caption only writes pad). So their cost does not depend on where the random weights put eos:
both models always write a full 28-token canvas, the like-for-like comparison. A decoder that
did stop at eos would save time at batch 1 only (in a batch of 64 Flickr8k captions the
longest is ~28 tokens). The row "stops after N tokens" bounds that case: the baseline built
with a canvas of N tokens (default 13, the mean Flickr8k val caption), so it runs N + 1
positions (with a shorter cache, so slightly faster than an early-exiting decoder would be).

    python benchmarks/decode_speed.py            # about 5 minutes on 2 shared cores
    python benchmarks/decode_speed.py --quick    # seconds: tiny config, K=2, batch 1

Writes JSON to --output (default benchmarks/results/decode_speed.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import common  # noqa: I001 (the folder's shared helpers, imported first)
import jax
import jax.numpy as jnp
import profile_table

from refine_jax.decoding import decode_batch
from refine_jax.models import build_model
from refine_jax.special_tokens import PAD_ID


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config: runs in seconds")
    parser.add_argument("--output", default=None, help="JSON result path")
    parser.add_argument("--ks", default="4,6,8", help="comma list of refinement steps K")
    parser.add_argument("--batch_sizes", default="1,64", help="comma list")
    parser.add_argument("--beam", type=int, default=3, help="beam width of the beam rows")
    parser.add_argument(
        "--ar_stop_length",
        type=int,
        default=13,
        help="also time a baseline that stops after this many tokens, at batch 1 (0: no)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timings per row (median)")
    parser.add_argument(
        "--profile_dir",
        default="",
        help="trace every row into this folder and sum its op time by model part and op kind",
    )
    parser.add_argument("--target_s", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.batch_sizes, args.rounds, args.target_s = "2", "1", 2, 0.01
        args.ar_stop_length = 8
    return args


_MODELS: dict = {}


def model_and_params(config):
    """The model of `config` with random parameters, made once per distinct model."""
    model = build_model(config, config.tokenizer.vocab_size)
    if model not in _MODELS:
        _MODELS[model] = common.init_params(config, model)
    return model, _MODELS[model]


class Row:
    """One decoder at one batch size, compiled; `time()` gives seconds per batch."""

    def __init__(self, name, config, method, beam, batch_size):
        self.name, self.config, self.method, self.beam = name, config, method, beam
        self.batch_size = batch_size
        self.model, self.params = model_and_params(config)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.params)))
        self.images = jax.device_put(common.synthetic_images(config, batch_size))
        self.fractions = common.fractions(config)
        start = time.perf_counter()
        canvases = self.call()
        jax.block_until_ready(canvases)
        self.compile_s = time.perf_counter() - start
        final = canvases[:, -1]  # [B, L]: the last step's canvas (the only one for the baseline)
        self.mean_tokens = float(jnp.mean(jnp.sum(final != PAD_ID, axis=-1)))
        self.reps = 1
        self.seconds: list[float] = []

    def call(self):
        return decode_batch(
            self.model, self.params, self.images, self.fractions, self.method, self.beam
        )

    def calibrate(self, target_s: float) -> None:
        self.reps = common.reps_for(self.call, target_s)

    def time(self) -> float:
        return common.time_call(self.call, self.reps)

    def hlo_text(self) -> str:
        return (
            decode_batch.lower(
                self.model, self.params, self.images, self.fractions, self.method, self.beam
            )
            .compile()
            .as_text()
        )


def make_rows(args) -> list[Row]:
    base = "tiny" if args.quick else ""
    ar = ",".join(filter(None, [base, "autoregressive"]))
    rows = []

    def add(*row_args) -> None:
        row = Row(*row_args)
        rows.append(row)
        print(
            f"compiled {row.name} at batch {row.batch_size}: {row.num_params:,} parameters, "
            f"{row.compile_s:.1f}s",
            flush=True,
        )

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for k in [int(k) for k in args.ks.split(",")]:
            add(f"refine K={k}", common.load_config(base, num_refine_steps=k), "greedy", 1, batch)
        add("AR greedy", common.load_config(ar), "greedy", 1, batch)
        add(f"AR beam {args.beam}", common.load_config(ar), "beam", args.beam, batch)
        if args.ar_stop_length and batch == 1:
            config = common.load_config(ar, canvas_length=args.ar_stop_length)
            add(f"AR greedy, stops after {args.ar_stop_length} tokens", config, "greedy", 1, batch)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    rows = make_rows(args)
    for row in rows:
        row.calibrate(args.target_s)
    measures = {f"{r.name} @ {r.batch_size}": r.time for r in rows}
    seconds = common.interleaved(measures, args.rounds)
    for row in rows:
        row.seconds = seconds[f"{row.name} @ {row.batch_size}"]

    rate = lambda r: r.batch_size / common.median(r.seconds)
    table = [
        [
            r.name,
            r.batch_size,
            r.num_params,
            r.config.model.canvas_length + (r.config.model.kind != "refine"),
            r.mean_tokens,
            1e3 * common.median(r.seconds),
            100 * common.spread(r.seconds),
            rate(r),
        ]
        for r in rows
    ]
    info = common.machine_info()
    print(f"\n## Decoding speed ({common.machine_line(info)})\n")
    headers = ["decoder", "batch", "parameters", "positions", "mean tokens written"]
    headers += ["ms per batch", "spread %", "captions/s"]
    print(common.markdown_table(headers, table))

    by_name = {(r.name, r.batch_size): r for r in rows}
    batches = sorted({r.batch_size for r in rows})
    baselines = ["AR greedy", f"AR beam {args.beam}"]
    if args.ar_stop_length:
        baselines.append(f"AR greedy, stops after {args.ar_stop_length} tokens")
    ratios = []
    ratio_rows = []
    for r in rows:
        if r.config.model.kind != "refine" or r.batch_size != batches[0]:
            continue
        cells = [r.name]
        for baseline in baselines:
            for b in batches:
                mine, theirs = by_name.get((r.name, b)), by_name.get((baseline, b))
                if mine is None or theirs is None:
                    cells.append("-")
                    continue
                ratio = rate(mine) / rate(theirs)
                cells.append(ratio)
                ratios.append(
                    {"refine": r.name, "baseline": baseline, "batch_size": b, "ratio": ratio}
                )
        ratio_rows.append(cells)
    headers = ["refine / baseline"] + [f"{bl} @ {b}" for bl in baselines for b in batches]
    print("\n### Captions/s ratios (goal vs AR greedy: >= 5x at batch 1, >= 2x at batch 64)\n")
    print(common.markdown_table(headers, ratio_rows))

    profiles = {}
    if args.profile_dir:
        for i, r in enumerate(rows):
            name = f"{r.name} @ {r.batch_size}"
            folder = Path(args.profile_dir) / f"{i}_{common.slug(name)}"
            run = lambda r=r: r.time() * r.reps
            profiles[name] = profile_table.profile_ops(run, r.hlo_text(), folder, r.reps)
            profile_table.print_profile(name, profiles[name], "batch")

    result = {
        "benchmark": "decode_speed" + ("_quick" if args.quick else ""),
        "quick": args.quick,
        "config": "configs/flickr8k.py" + (":tiny" if args.quick else ""),
        "decoded_positions_note": (
            "greedy and beam decoding scan all canvas_length + 1 positions (no early exit); "
            "refinement writes the full canvas K times"
        ),
        "rows": [
            {
                "decoder": r.name,
                "batch_size": r.batch_size,
                "model": common.model_summary(r.config),
                "method": r.method,
                "beam": r.beam,
                "num_params": r.num_params,
                "compile_s": r.compile_s,
                "mean_tokens_random_weights": r.mean_tokens,
                "calls_per_timing": r.reps,
                "seconds_per_batch": common.median(r.seconds),
                "seconds_per_batch_all": r.seconds,
                "captions_per_s": rate(r),
            }
            for r in rows
        ],
        "ratios": ratios,
        "profiles": profiles,
        "machine": {**info, "load_average_before": [round(x, 2) for x in load_before]},
    }
    common.save(result, args.output, result["benchmark"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
