"""Gradualness against the length schedule and the loss weighting, on the shapes data.

Trains the refinement captioner of `configs/shapes.py` once per setting, at the same step
budget, and scores each on the held-out shapes images: per-step CIDEr-D, progress p_k against
the ideal s(k), gradualness G, length adherence A, weighted quality Q_w, R = Q_w·G, and
monotonicity (DESIGN §4). The settings: the linear and the log length schedule (linear loss
weights), and, under the linear schedule, the loss weightings linear, geometric (ratio 2),
uniform and final-only. The shapes data is generated in process, so nothing is downloaded.

    python benchmarks/gradualness.py --root=/work/runs/gradualness   # 5 runs, ~4 min each
    python benchmarks/gradualness.py --quick                         # seconds: 2 tiny runs

A setting whose workdir already holds its final checkpoint is only scored. Prints markdown
tables and saves JSON (default benchmarks/results/gradualness[_quick].json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common
import quality_runs

from refine_jax.config import load_config_file

# name -> (length schedule, loss weighting)
SETTINGS = {
    "linear_schedule": ("linear", "linear"),
    "log_schedule": ("log", "linear"),
    "weights_geometric": ("linear", "geometric"),
    "weights_uniform": ("linear", "uniform"),
    "weights_final_only": ("linear", "final_only"),
}
QUICK_SETTINGS = ("linear_schedule", "log_schedule")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny runs of a few steps")
    parser.add_argument("--root", default=None, help="where the workdirs live (default: tmp)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    scratch = None if args.root else tempfile.TemporaryDirectory(prefix="gradualness-")
    root = Path(args.root or scratch.name)
    names = QUICK_SETTINGS if args.quick else tuple(SETTINGS)
    spec = str(common.REPO / "configs" / "shapes.py") + (":tiny" if args.quick else "")
    results = {}
    for name in names:
        schedule, weighting = SETTINGS[name]
        config = load_config_file(
            spec,
            **{
                "targets.schedule": schedule,
                "targets.loss_weighting": weighting,
                "total_steps": 10 if args.quick else args.steps,
            },
        )
        if args.quick:
            config.unlock()
            config.data.eval_size = 32
        print(f"--- {name}: schedule {schedule}, loss weights {weighting}")
        results[name] = {
            "schedule": schedule,
            "loss_weighting": weighting,
            "total_steps": config.total_steps,
            **quality_runs.train_and_score(config, str(root / name)),
        }

    rows = [
        [
            name,
            r["schedule"],
            r["loss_weighting"],
            r["final_cider"],
            r["weighted_quality"],
            r["gradualness"],
            r["gradualness_raw"],
            r["length_adherence"],
            r["refine_score"],
            r["monotonic_fraction"],
        ]
        for name, r in results.items()
    ]
    headers = ["setting", "schedule", "loss weights", "final CIDEr-D", "Q_w", "G", "G raw"]
    print(common.markdown_table(headers + ["A", "R", "monotonic"], rows))
    print()
    curve_rows = [
        [
            name,
            quality_runs.per_step(r["cider_per_step"]),
            quality_runs.per_step(r["progress_per_step"]),
            quality_runs.per_step(r["length_ratio_per_step"]),
        ]
        for name, r in results.items()
    ]
    print(
        common.markdown_table(
            ["setting", "CIDEr-D per step", "progress p_k", "length ratio per step"], curve_rows
        )
    )
    result = {
        "benchmark": "gradualness",
        "quick": args.quick,
        "machine": common.machine_info(),
        "steps": results[names[0]]["total_steps"],
        "runs": results,
    }
    common.save(result, args.output, "gradualness_quick" if args.quick else "gradualness")
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
