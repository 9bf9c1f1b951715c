"""Peak memory of one training step against the number of refinement steps K, with and
without rematerialisation of the detailer, from XLA's compiled memory analysis.

Compiles (never runs) the trainer's jitted `train_step` (refine_jax.train; the state is
donated, as in the trainer) for the Flickr8k configuration (configs/flickr8k.py: batch 64,
64 px, width 192, canvas 28, vocabulary 2,500) at K = 2, 4, 8, 16 and `config.model.remat`
= none, full, dots, and reads `compiled.memory_analysis()`:

    argument  the buffers passed in: parameters, AdamW state, the batch
    output    the buffers returned: the new state and the metrics
    alias     output bytes that reuse a donated argument's buffer (the state, updated in place)
    temp      XLA's scratch for the step: activations kept for the backward pass, gradients,
              workspaces; buffer assignment already overlaps buffers whose lifetimes do not

    peak = argument + output - alias + temp

Arguments live for the whole step, outputs that alias a donated argument are the same bytes
(counted once), and the temporaries are one allocation XLA makes for the step. This is the
device memory a step needs; it is what grows with K when every step's activations are kept
for the backward pass. Nothing is timed, so the numbers do not depend on the machine's load.

    python benchmarks/memory_vs_k.py            # 12 compiles, about 5 minutes on 2 cores
    python benchmarks/memory_vs_k.py --quick    # seconds: tiny config, K = 2, 4, remat dots

Writes JSON to --output (default benchmarks/results/memory_vs_k.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common  # noqa: I001 (the folder's shared helpers, imported first)
import jax

from refine_jax.config import REMAT_POLICIES

FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, K = 2, 4, dots")
    parser.add_argument("--output", default=None, help="JSON result path")
    parser.add_argument("--ks", default="2,4,8,16", help="comma list of K")
    parser.add_argument("--remat", default=",".join(REMAT_POLICIES), help="comma list")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--growth_from", type=int, default=4, help="K the growth is relative to")
    return common.parse_args_with_quick(parser, argv, dict(ks="2,4", remat="dots", growth_from=2))


def step_memory(config) -> dict[str, int]:
    """The compiled train step's memory analysis, in bytes, and the peak it implies."""
    _, step, state = common.abstract_train_state(config)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in common.synthetic_batch(config).items()
    }
    stats = step.lower(state, batch).compile().memory_analysis()
    sizes = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in FIELDS}
    sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    reported_peak = getattr(stats, "peak_memory_in_bytes", 0)
    if reported_peak:
        sizes["xla_peak_memory"] = int(reported_peak)
    return sizes


def main(argv=None) -> int:
    args = parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    remats = [r for r in args.remat.split(",") if r]
    load_before = os.getloadavg()
    records = []
    for remat in remats:
        for k in ks:
            config = common.load_config(
                "tiny" if args.quick else "", args.batch_size, num_refine_steps=k, remat=remat
            )
            start = time.perf_counter()
            sizes = step_memory(config)
            seconds = time.perf_counter() - start
            records.append({"remat": remat, "k": k, "bytes": sizes, "compile_s": seconds})
            print(
                f"remat={remat} K={k}: peak {sizes['peak'] / 2**20:.1f} MiB "
                f"(temp {sizes['temp'] / 2**20:.1f} MiB); compiled in {seconds:.1f}s",
                flush=True,
            )

    mib = lambda n: n / 2**20
    rows = []
    growth = {}
    for remat in remats:
        mine = {r["k"]: r["bytes"] for r in records if r["remat"] == remat}
        base = mine.get(args.growth_from)
        for k in ks:
            b = mine[k]
            change = round(100 * (b["peak"] / base["peak"] - 1), 1) + 0.0 if base else "-"
            rows.append(
                [remat, k, mib(b["argument"]), mib(b["output"] - b["alias"]), mib(b["temp"])]
                + [mib(b["peak"]), change]
            )
        last = max(ks)
        if base and last != args.growth_from:
            growth[remat] = {
                "from_k": args.growth_from,
                "to_k": last,
                "peak_growth": mine[last]["peak"] / base["peak"] - 1,
                "temp_growth": mine[last]["temp"] / base["temp"] - 1,
            }
    info = common.machine_info()
    config = common.load_config("tiny" if args.quick else "")
    print(f"\n## Train step memory vs K ({common.machine_line(info)}; compile only)\n")
    headers = ["remat", "K", "arguments MiB", "outputs not aliased MiB", "temp MiB", "peak MiB"]
    headers.append(f"peak vs K={args.growth_from} %")
    print(common.markdown_table(headers, rows, ["", "", ",.1f", ",.3f", ",.1f", ",.1f", "+.1f"]))
    print()
    for remat, g in growth.items():
        goal = " (goal with remat: < 25%)" if remat != "none" else ""
        print(
            f"remat={remat}: K={g['from_k']} -> {g['to_k']}: peak {100 * g['peak_growth']:+.1f}%, "
            f"temp {100 * g['temp_growth']:+.1f}%{goal}"
        )

    result = {
        "benchmark": "memory_vs_k" + ("_quick" if args.quick else ""),
        "quick": args.quick,
        "config": "configs/flickr8k.py" + (":tiny" if args.quick else ""),
        "model": {  # K and remat vary by point
            k: v
            for k, v in common.model_summary(config).items()
            if k not in ("num_refine_steps", "remat")
        }
        | {"batch_size": args.batch_size or config.batch_size},
        "peak_formula": "argument + output - alias + temp",
        "points": records,
        "growth": growth,
        "machine": {**info, "load_average_before": [round(x, 2) for x in load_before]},
    }
    common.save(result, args.output, result["benchmark"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
