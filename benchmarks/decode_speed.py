"""Captions/s of K-step refinement against the autoregressive baseline, batch 1 and batch 64.

Builds the Flickr8k configuration (configs/flickr8k.py: 64 px, width 192, canvas 28,
vocabulary 2,500) as the refinement model at K = 4, 6, 8 and as its autoregressive baseline
(`:autoregressive`: the same encoder and width, a causal decoder as deep as the detailer;
about the same parameter count), all with random weights, and times
`refine_jax.model_kinds.decode_batch` (what evaluation and captioning run) on random images:
refinement, the baseline's greedy decoding and its beam search (beam 3), each at batch 1 and
batch 64. Each is jit-compiled first; then every row is timed once per round, rounds
alternating over the rows so that background load falls on all of them alike; a row's number
is its median.

Decoded length: the baseline stops once every caption of the batch has ended (eos), as a
user's run does (`early_stop=True`, the default), so its cost depends on caption length. Random
weights would almost never end a caption, so the baseline's eos logit gets a bias, found by
bisection, that makes its greedy captions of the image pool average --ar_mean_tokens tokens
(default 13, the mean Flickr8k val caption). Each baseline row is timed twice: with early stop
(what a user runs) and in the fixed-length mode (`early_stop=False`: all canvas_length + 1 = 29
positions, the worst case: a batch with a caption that fills the canvas). Refinement always
writes K full canvases, whatever the weights.

Images: a pool of random images, as many as the largest batch (at least 16). A batch-64 row
decodes the pool; a batch-1 row decodes one pool image per call, in turn, so its time is the
mean over captions of different lengths. The columns "decoder calls" (per batch, the mean
over the pool) and "mean / longest tokens" say how much each row decoded.

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
import numpy as np
import profile_table

from refine_jax.decoding import beam_decode_with_steps, greedy_decode_with_steps
from refine_jax.model_kinds import build_model, decode_batch
from refine_jax.special_tokens import EOS_ID, PAD_ID


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config: runs in seconds")
    parser.add_argument("--output", default=None, help="JSON result path")
    parser.add_argument("--ks", default="4,6,8", help="comma list of refinement steps K")
    parser.add_argument("--batch_sizes", default="1,64", help="comma list")
    parser.add_argument("--beam", type=int, default=3, help="beam width of the beam rows")
    parser.add_argument(
        "--ar_mean_tokens",
        type=float,
        default=13.0,
        help="mean greedy caption length the baseline's eos bias is set for (0: no bias)",
    )
    parser.add_argument(
        "--unroll_scans",
        action="store_true",
        help="every model with config.model.unroll_scans (the scans as straight-line code)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timings per row (median)")
    parser.add_argument(
        "--profile_dir",
        default="",
        help="trace every row into this folder and sum its op time by model part and op kind",
    )
    parser.add_argument("--target_s", type=float, default=0.5, help="seconds per timing")
    quick = dict(ks="2", batch_sizes="1", rounds=2, target_s=0.01, ar_mean_tokens=4.0)
    return common.parse_args_with_quick(parser, argv, quick)


# Decoder calls made per batch, jitted once per model and setting (the timed function,
# decode_batch, returns the captions only).
_greedy_calls = jax.jit(greedy_decode_with_steps, static_argnums=(0, 3))
_beam_calls = jax.jit(beam_decode_with_steps, static_argnums=(0, 3, 4, 5))


def with_eos_bias(params, bias: float):
    """`params` with `bias` added to the baseline's eos logit (boxed or plain leaves)."""
    leaf = params["decoder"]["logits"]["bias"]
    value = getattr(leaf, "value", leaf)
    value = value.at[EOS_ID].add(bias)
    leaf = leaf.replace_boxed(value) if hasattr(leaf, "replace_boxed") else value
    logits = {**params["decoder"]["logits"], "bias": leaf}
    return {**params, "decoder": {**params["decoder"], "logits": logits}}


def caption_lengths(captions) -> np.ndarray:
    return np.sum(np.asarray(captions) != PAD_ID, axis=-1)


def calibrate_eos_bias(model, params, images, target: float, iterations: int = 14):
    """The eos bias whose greedy captions of `images` average about `target` tokens, and that
    mean. A larger bias never lengthens a caption, so the mean falls as the bias grows."""
    mean = lambda b: float(
        caption_lengths(_greedy_calls(model, with_eos_bias(params, b), images, True)[0]).mean()
    )
    low, high = 0.0, 1.0
    if mean(low) <= target:
        return low, mean(low)
    while mean(high) > target:
        low, high = high, 2 * high
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if mean(middle) > target else (low, middle)
    # The bracket's ends give means on either side of the target: take the closer.
    return min(((b, mean(b)) for b in (low, high)), key=lambda bm: abs(bm[1] - target))


class Models:
    """The model of each config with random parameters, made once per distinct model; the
    baseline's with the calibrated eos bias."""

    def __init__(self, pool, mean_tokens: float):
        self.pool, self.mean_tokens = pool, mean_tokens
        self.made: dict = {}
        self.calibration: dict | None = None

    def get(self, config):
        model = build_model(config, config.tokenizer.vocab_size)
        if model not in self.made:
            params = common.init_params(config, model)
            if config.model.kind != "refine" and self.mean_tokens > 0:
                start = time.perf_counter()
                bias, mean = calibrate_eos_bias(model, params, self.pool, self.mean_tokens)
                params = with_eos_bias(params, bias)
                self.calibration = {
                    "eos_bias": bias,
                    "target_mean_tokens": self.mean_tokens,
                    "greedy_mean_tokens": mean,
                    "seconds": time.perf_counter() - start,
                }
                print(f"baseline eos bias {bias:.3f}: greedy captions of {mean:.1f} tokens")
            self.made[model] = params
        return model, self.made[model]


class Row:
    """One decoder at one batch size, compiled; `time()` gives seconds per batch."""

    def __init__(self, name, config, method, beam, batch_size, early_stop, models, pool):
        self.name, self.config, self.method, self.beam = name, config, method, beam
        self.batch_size, self.early_stop = batch_size, early_stop
        self.model, self.params = models.get(config)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.params)))
        count = len(pool) // batch_size
        self.batches = [
            jax.device_put(pool[i * batch_size : (i + 1) * batch_size]) for i in range(count)
        ]
        self.fractions = common.fractions(config)
        self.turn = 0
        start = time.perf_counter()
        jax.block_until_ready(self.decode(self.batches[0]))
        self.compile_s = time.perf_counter() - start
        # What each batch of the pool decodes: tokens written and decoder calls made.
        finals = np.concatenate([np.asarray(self.decode(b)[:, -1]) for b in self.batches])
        lengths = caption_lengths(finals)
        self.mean_tokens, self.longest = float(lengths.mean()), int(lengths.max())
        self.decoder_calls = self.mean_calls()
        self.reps = 1
        self.seconds: list[float] = []

    def decode(self, images):
        return decode_batch(
            self.model,
            self.params,
            images,
            self.fractions,
            self.method,
            self.beam,
            early_stop=self.early_stop,
        )

    def mean_calls(self) -> float:
        """Decoder calls per batch, the mean over the pool (refinement: K passes over L)."""
        m = self.config.model
        if m.kind == "refine":
            return float(m.num_refine_steps)
        if self.method == "beam" and self.beam > 1:
            calls = lambda b: _beam_calls(
                self.model, self.params, b, self.beam, 0.0, self.early_stop
            )
        else:
            calls = lambda b: _greedy_calls(self.model, self.params, b, self.early_stop)
        return float(np.mean([int(calls(b)[1]) for b in self.batches]))

    def call(self):
        """One batch of the pool, the next one each call."""
        images = self.batches[self.turn]
        self.turn = (self.turn + 1) % len(self.batches)
        return self.decode(images)

    def calibrate(self, target_s: float) -> None:
        self.reps = common.reps_for(self.call, target_s)

    def time(self) -> float:
        return common.time_call(self.call, self.reps)

    def hlo_text(self) -> str:
        return (
            decode_batch.lower(
                self.model,
                self.params,
                self.batches[0],
                self.fractions,
                self.method,
                self.beam,
                early_stop=self.early_stop,
            )
            .compile()
            .as_text()
        )


def baseline_names(beam: int) -> list[str]:
    return [
        "AR greedy",
        "AR greedy, fixed length",
        f"AR beam {beam}",
        f"AR beam {beam}, fixed length",
    ]


def make_rows(args, pool) -> tuple[list[Row], Models]:
    base = "tiny" if args.quick else ""
    ar = ",".join(filter(None, [base, "autoregressive"]))
    models = Models(pool, args.ar_mean_tokens)
    rows = []

    def add(*row_args) -> None:
        row = Row(*row_args, models, pool)
        rows.append(row)
        print(
            f"compiled {row.name} at batch {row.batch_size}: {row.num_params:,} parameters, "
            f"{row.compile_s:.1f}s",
            flush=True,
        )

    greedy, fixed, beam, beam_fixed = baseline_names(args.beam)
    unroll = args.unroll_scans or None  # None: the config's own value
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for k in [int(k) for k in args.ks.split(",")]:
            config = common.load_config(base, num_refine_steps=k, unroll_scans=unroll)
            add(f"refine K={k}", config, "greedy", 1, batch, True)
        baseline = common.load_config(ar, unroll_scans=unroll)
        add(greedy, baseline, "greedy", 1, batch, True)
        add(fixed, baseline, "greedy", 1, batch, False)
        add(beam, baseline, "beam", args.beam, batch, True)
        add(beam_fixed, baseline, "beam", args.beam, batch, False)
    return rows, models


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    image_config = common.load_config("tiny" if args.quick else "")
    pool = jnp.asarray(common.synthetic_images(image_config, max(max(batch_sizes), 16)))
    rows, models = make_rows(args, pool)
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
            r.decoder_calls,
            r.mean_tokens,
            r.longest,
            1e3 * common.median(r.seconds),
            100 * common.spread(r.seconds),
            rate(r),
        ]
        for r in rows
    ]
    info = common.machine_info()
    print(f"\n## Decoding speed ({common.machine_line(info)})\n")
    headers = ["decoder", "batch", "parameters", "sequential passes", "mean tokens", "longest"]
    headers += ["ms per batch", "spread %", "captions/s"]
    print(common.markdown_table(headers, table))

    by_name = {(r.name, r.batch_size): r for r in rows}
    batches = sorted({r.batch_size for r in rows})
    baselines = baseline_names(args.beam)
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
    early_gain = [
        [n, b, rate(by_name[(n, b)]) / rate(by_name[(f"{n}, fixed length", b)])]
        for n in baselines[::2]
        for b in batches
    ]
    print("\n### Baseline: captions/s with early stop / fixed length\n")
    print(common.markdown_table(["decoder", "batch", "ratio"], early_gain))

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
            "the baseline stops once every caption of the batch has ended (early_stop) or runs "
            "all canvas_length + 1 positions (fixed length, the worst case); its eos logit is "
            "biased so that random weights write captions of about ar_mean_tokens tokens; "
            "refinement writes the full canvas K times"
        ),
        "ar_mean_tokens": args.ar_mean_tokens,
        "eos_calibration": models.calibration,
        "image_pool": len(pool),
        "rows": [
            {
                "decoder": r.name,
                "batch_size": r.batch_size,
                "model": common.model_summary(r.config),
                "method": r.method,
                "beam": r.beam,
                "early_stop": r.early_stop,
                "num_params": r.num_params,
                "compile_s": r.compile_s,
                "decoder_calls_per_batch": r.decoder_calls,
                "mean_tokens": r.mean_tokens,
                "longest_caption_tokens": r.longest,
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
