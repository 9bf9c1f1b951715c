"""How the training step time grows with K (refinement steps) and L (canvas length).

Jits the trainer's `train_step` for the Flickr8k configuration (configs/flickr8k.py: batch
64, 64 px, width 192, vocabulary 2,500) at K = 2, 4, 6, 8, 12, 16 with the canvas L = 28,
and at L = 16, 24, 32, 48, 64 with K = 4, with random weights and a random batch of the
pipeline's shapes. Every configuration is timed once per round, the rounds alternating over
all of them so that background load falls on all alike; a point is its median. Then it fits
step_time = a + b*K (and a + b*L) by least squares and reports the intercept a (the cost
that does not repeat per step: the encoder, the optimizer), the slope b (one more detailer
step, or one more canvas position), R^2 and each point's residual. The analytic FLOPs of
each point (refine_jax/flops.py) are fitted the same way, for comparison.

    python benchmarks/scaling.py               # 11 compiles + timings, ~15 minutes on 2 cores
    python benchmarks/scaling.py --quick       # seconds: tiny config, 2 points
    python benchmarks/scaling.py --ks=2,4,8 --lengths= --rounds=5

Writes JSON to --output (default benchmarks/results/scaling.json).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import common  # noqa: I001 (the folder's shared helpers, imported first)
import numpy as np

from refine_jax.flops import training_flops_per_example


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, 2 points: seconds")
    parser.add_argument("--output", default=None, help="JSON result path")
    parser.add_argument("--ks", default="2,4,6,8,12,16", help="K values, at --base_length")
    parser.add_argument("--lengths", default="16,24,32,48,64", help="L values, at --base_k")
    parser.add_argument("--base_k", type=int, default=4, help="K of the canvas-length series")
    parser.add_argument("--base_length", type=int, default=28, help="L of the K series")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--remat", default=None, help="none | full | dots (default: config's)")
    parser.add_argument("--steps", type=int, default=2, help="consecutive steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings per point (median)")
    quick = dict(ks="2,4", lengths="8", base_k=2, base_length=8, steps=1, rounds=2)  # 2 compiles
    return common.parse_args_with_quick(parser, argv, quick)


def fit_line(x: list[float], y: list[float]) -> dict:
    """Least-squares y = a + b*x: intercept, slope, R^2 and the residuals (y - fit)."""
    x_arr, y_arr = np.asarray(x, float), np.asarray(y, float)
    design = np.stack([np.ones_like(x_arr), x_arr], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y_arr, rcond=None)
    fitted = a + b * x_arr
    residuals = y_arr - fitted
    total = float(np.sum((y_arr - y_arr.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residuals**2)) / total if total > 0 else 1.0
    return {
        "intercept": float(a),
        "slope": float(b),
        "r2": r2,
        "fitted": fitted.tolist(),
        "residuals": residuals.tolist(),
    }


def step_flops(runner: common.TrainStepRunner) -> float:
    config = runner.config
    vocab = config.tokenizer.vocab_size
    return training_flops_per_example(config, vocab) * runner.batch_size


def main(argv=None) -> int:
    args = parse_args(argv)
    ks = [int(v) for v in args.ks.split(",") if v]
    lengths = [int(v) for v in args.lengths.split(",") if v]
    series = {
        "K": [(k, args.base_length) for k in ks],
        "L": [(args.base_k, length) for length in lengths],
    }
    load_before = os.getloadavg()
    runners = {}
    for k, length in dict.fromkeys(series["K"] + series["L"]):
        config = common.load_config(
            "tiny" if args.quick else "",
            args.batch_size,
            num_refine_steps=k,
            canvas_length=length,
            remat=args.remat,
        )
        runner = common.TrainStepRunner(config)
        runners[(k, length)] = runner
        print(f"compiled K={k} L={length} in {runner.first_call_s:.1f}s", flush=True)

    measures = {
        f"K={k} L={length}": functools.partial(r.run, args.steps)
        for (k, length), r in runners.items()
    }
    seconds = common.interleaved(measures, args.rounds)

    info = common.machine_info()
    print(f"\n## Train step time vs K and L ({common.machine_line(info)})\n")
    fits = {}
    points = []
    for axis, keys in series.items():
        if not keys:
            continue
        x = [k if axis == "K" else length for k, length in keys]
        times = [common.median(seconds[f"K={k} L={length}"]) for k, length in keys]
        flops = [step_flops(runners[key]) for key in keys]
        fit = fit_line(x, times)
        flops_fit = fit_line(x, flops)
        fits[axis] = {"time": fit, "analytic_flops": flops_fit}
        rows = []
        for i, (k, length) in enumerate(keys):
            name = f"K={k} L={length}"
            point = {
                "series": axis,
                "k": k,
                "canvas_length": length,
                "seconds_per_step": times[i],
                "seconds_per_step_all": seconds[name],
                "spread": common.spread(seconds[name]),
                "analytic_flops_per_step": flops[i],
                "fitted_seconds": fit["fitted"][i],
                "residual_seconds": fit["residuals"][i],
            }
            points.append(point)
            rows.append(
                [k, length, times[i], 100 * point["spread"], flops[i] / 1e9, fit["fitted"][i]]
                + [fit["residuals"][i], 100 * fit["residuals"][i] / fit["fitted"][i]]
            )
        headers = ["K", "L", "s/step", "spread %", "GFLOP/step", "fit s", "residual s"]
        headers.append("residual %")
        print(f"### step time vs {axis}\n")
        print(common.markdown_table(headers, rows))
        print(
            f"\nfit: step_time = {fit['intercept']:.3f} s + {fit['slope']:.4f} s * {axis} "
            f"(R^2 = {fit['r2']:.4f})\n"
            f"analytic FLOPs: {flops_fit['intercept'] / 1e9:.2f} GFLOP + "
            f"{flops_fit['slope'] / 1e9:.3f} GFLOP * {axis} (R^2 = {flops_fit['r2']:.4f})\n"
        )

    first = next(iter(runners.values()))
    result = {
        "benchmark": "scaling" + ("_quick" if args.quick else ""),
        "quick": args.quick,
        "config": "configs/flickr8k.py" + (":tiny" if args.quick else ""),
        "model": {
            k: v
            for k, v in common.model_summary(first.config).items()
            if k not in ("num_refine_steps", "canvas_length")
        },
        "steps_per_timing": args.steps,
        "rounds": args.rounds,
        "points": points,
        "fits": fits,
        "machine": {**info, "load_average_before": [round(x, 2) for x in load_before]},
    }
    common.save(result, args.output, result["benchmark"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
