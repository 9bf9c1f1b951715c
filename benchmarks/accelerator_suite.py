"""One command for a machine with a GPU or TPU: decoding speed, training throughput against the
device's own measured matmul roofline, and training memory against K, in one JSON and one table.

Runs, in this process and on the default JAX backend, `decode_speed.py` (refinement K=4, 8
against the early-stopping baseline, batch 1 and 64), `train_throughput.py` (refinement and
baseline at the Flickr8k config, float32 and bfloat16, the PRNG implementations, against a
square matmul of the same dtype timed in the same run) and `memory_vs_k.py` (K = 2, 4, 8, 16,
remat none and dots), each with its own JSON kept under the suite's; then prints the headline
numbers: refinement's batch-1 latency ratio against baseline greedy, examples/s and MFU, peak
memory growth with K. Sized to finish in under 8 minutes on one accelerator; `--quick` runs
every part at its tiny size (a minute on a CPU), which is what the test suite checks.

    python benchmarks/accelerator_suite.py             # on the accelerator machine
    python benchmarks/accelerator_suite.py --quick     # anywhere, seconds to a minute

Writes JSON to --output (default benchmarks/results/accelerator_suite[_quick].json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common
import decode_speed
import memory_vs_k
import train_throughput

# (name, module, arguments of the full run); --quick replaces them with --quick.
PARTS = (
    ("decode_speed", decode_speed, ["--ks=4,8", "--batch_sizes=1,64", "--rounds=5"]),
    (
        "train_throughput",
        train_throughput,
        ["--dtype=float32,bfloat16", "--prng=threefry2x32,rbg", "--rounds=5", "--steps=5"],
    ),
    ("memory_vs_k", memory_vs_k, ["--ks=2,4,8,16", "--remat=none,dots"]),
)


def headline(results: dict) -> list[list]:
    """The suite's table: one row per headline number, with where it comes from."""
    rows = []
    decode = results.get("decode_speed") or {}
    for ratio in decode.get("ratios", []):
        if ratio["baseline"].startswith("AR greedy") and "fixed" not in ratio["baseline"]:
            rows.append(
                [
                    f"decode: {ratio['refine']} / {ratio['baseline']}, batch {ratio['batch_size']}",
                    f"{ratio['ratio']:.2f}x captions/s",
                ]
            )
    for variant in (results.get("train_throughput") or {}).get("variants", []):
        rows.append(
            [
                f"train: {variant['name']} prng={variant.get('prng', '')}",
                f"{variant['examples_per_s']:.1f} ex/s, MFU {variant['mfu']:.3f}",
            ]
        )
    memory = results.get("memory_vs_k") or {}
    for remat, growth in (memory.get("growth") or {}).items():
        rows.append(
            [
                f"memory: peak growth K={growth['from_k']}→{growth['to_k']}, remat={remat}",
                f"{growth['peak_growth']:+.0%}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every part at its tiny size")
    parser.add_argument("--parts", default=",".join(p[0] for p in PARTS), help="comma list")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    wanted = [p for p in args.parts.split(",") if p]
    unknown = set(wanted) - {p[0] for p in PARTS}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {[p[0] for p in PARTS]}")

    results: dict = {"quick": args.quick, "machine": common.machine_info(), "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="accelerator-suite-") as scratch:
        for name, module, full_args in PARTS:
            if name not in wanted:
                continue
            output = Path(scratch) / f"{name}.json"
            start = time.perf_counter()
            status = module.main(
                [*(["--quick"] if args.quick else full_args), f"--output={output}"]
            )
            results["seconds"][name] = time.perf_counter() - start
            if status:
                raise SystemExit(f"{name} failed with status {status}")
            results[name] = json.loads(output.read_text())
    rows = headline(results)
    results["headline"] = rows
    machine = results["machine"]
    print(f"\n## Accelerator suite: {machine['device_kind']} ({machine['backend']})\n")
    print(common.markdown_table(["measure", "value"], rows))
    print("\nseconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    common.save(
        results, args.output, "accelerator_suite_quick" if args.quick else "accelerator_suite"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
