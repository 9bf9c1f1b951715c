"""Quality at an equal budget on Flickr8k: the refinement captioner against the autoregressive one.

Trains both `configs/flickr8k.py` models (the refinement captioner, and the `:autoregressive`
baseline: same encoder and width, same steps, batch size, optimizer and tokenizer) on
`DATA/train`, then scores each final checkpoint on the 1,000 `DATA/val` photos: CIDEr-D and
BLEU-4 per step and final, weighted quality Q_w, gradualness G, length adherence A, refinement
score R = Q_w·G and monotonicity (DESIGN §4). A model whose workdir already holds its final
checkpoint is only scored, so the tables can be rebuilt from trained runs:

    python benchmarks/flickr8k_quality.py --root=/work/runs        # ~1 h per model, 2-core CPU
    python benchmarks/flickr8k_quality.py --root=/work/runs --skip_baseline \\
        --name=flickr8k_left --set targets.layout=left              # an ablation of the refiner
    python benchmarks/flickr8k_quality.py --quick                   # seconds: tiny models
    python benchmarks/flickr8k_quality.py --root=/work/runs --beam=3 \
        --match_workdir=/work/runs/flickr8k_match    # + the baseline's beam search; G by the
                                                     # matching model's image posteriors

Workdirs: ROOT/flickr8k_tokenizer (shared), ROOT/NAME (refinement; NAME defaults to
flickr8k_refine) and ROOT/flickr8k_ar. `--set KEY=VALUE` (repeatable) overrides a key of the
refinement model's config (values are Python literals). Prints markdown tables and saves JSON
(default benchmarks/results/flickr8k_quality[_quick].json).
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from pathlib import Path

import common
import quality_runs

from refine_jax.config import load_config_file
from refine_jax.data import training_captions
from refine_jax.data.shards import TarShardSource
from refine_jax.tokenizer import Tokenizer, train_tokenizer


def shared_tokenizer(path: Path, data: Path, vocab_size: int) -> str:
    """The tokenizer both models use: trained once on the training captions, kept at `path`."""
    try:
        Tokenizer.load(path)
    except FileNotFoundError:
        captions = training_captions(TarShardSource(str(data / "train")), 100_000)
        train_tokenizer(captions, vocab_size).save(path)
    return str(path)


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set needs KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a bare string such as targets.layout=left
    return overrides


def config_for(arg: str, data: Path, tokenizer: str, quick: bool, overrides: dict):
    config = load_config_file(str(common.REPO / "configs" / "flickr8k.py") + f":{arg}", **overrides)
    config.unlock()
    config.data.path = str(data)
    config.tokenizer.path = tokenizer
    if quick:
        config.data.max_eval_examples = 32
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 steps, 32 images")
    parser.add_argument("--data", default=str(common.REPO.parent / "shared/data/flickr8k"))
    parser.add_argument("--root", default=None, help="where the workdirs live (default: tmp)")
    parser.add_argument("--name", default="flickr8k_refine", help="the refinement run's workdir")
    parser.add_argument("--set", action="append", default=[], help="refinement KEY=VALUE")
    parser.add_argument("--skip_baseline", action="store_true", help="score the refiner only")
    parser.add_argument("--beam", type=int, default=1, help="> 1: also score the baseline's beam")
    parser.add_argument("--match_workdir", default=None, help="matching model: G in its space")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    data = Path(args.data)
    if not (data / "val" / "references.json").exists():
        print(f"no Flickr8k shards at {data} (expected val/ with references.json)", file=sys.stderr)
        return 2
    scratch = None if args.root else tempfile.TemporaryDirectory(prefix="flickr8k-quality-")
    root = Path(args.root or scratch.name)
    variant = "tiny" if args.quick else ""
    overrides = parse_overrides(args.set)
    base = config_for(variant, data, "", args.quick, {})
    tokenizer = shared_tokenizer(root / "flickr8k_tokenizer", data, base.tokenizer.vocab_size)
    runs = {args.name: config_for(variant, data, tokenizer, args.quick, overrides)}
    if not args.skip_baseline:
        ar_arg = ",".join(filter(None, [variant, "autoregressive"]))
        runs["flickr8k_ar"] = config_for(ar_arg, data, tokenizer, args.quick, {})

    results = {}
    for name, config in runs.items():
        print(f"--- {name}: {config.model.kind}, {config.total_steps} steps of {config.batch_size}")
        results[name] = {
            "kind": config.model.kind,
            "workdir": str(root / name),
            "total_steps": config.total_steps,
            "batch_size": config.batch_size,
            "overrides": overrides if config.model.kind == "refine" else {},
            **quality_runs.train_and_score(
                config, str(root / name), str(data / "val"), match_workdir=args.match_workdir
            ),
        }
        if config.model.kind != "refine" and args.beam > 1:
            results[f"{name}_beam{args.beam}"] = {
                **results[name],
                **quality_runs.score_with_beam(
                    config, str(root / name), args.beam, str(data / "val")
                ),
            }

    rows = [
        [
            name,
            r["kind"],
            f"{r['total_steps']} × {r['batch_size']}",
            r["final_cider"],
            "[{:.3f}, {:.3f}]".format(*r["final_cider_interval"]),
            r["final_bleu4"],
            r["final_repetition"],
            r["gradualness"] if r["kind"] == "refine" else "–",
            r["length_adherence"] if r["kind"] == "refine" else "–",
            r["refine_score"] if r["kind"] == "refine" else "–",
        ]
        for name, r in results.items()
    ]
    print(
        common.markdown_table(
            [
                "run",
                "model",
                "steps × batch",
                "CIDEr-D",
                "95% interval",
                "BLEU-4",
                "repeated word",
                "G",
                "A",
                "R",
            ],
            rows,
        )
    )
    for name, r in results.items():
        if r["kind"] == "refine":
            print(
                f"\n{name} per step: CIDEr-D {quality_runs.per_step(r['cider_per_step'])}; "
                f"BLEU-4 {quality_runs.per_step(r['bleu4_per_step'])}; progress "
                f"{quality_runs.per_step(r['progress_per_step'])}; length ratio "
                f"{quality_runs.per_step(r['length_ratio_per_step'])}; consensus word "
                f"{quality_runs.per_step(r['consensus_per_step'])}; repeated word "
                f"{quality_runs.per_step(r['repetition_per_step'])}; G encoding "
                f"{r.get('gradualness_encoding')} (TF-IDF G {r.get('gradualness_tfidf')})"
            )
    result = {
        "benchmark": "flickr8k_quality",
        "quick": args.quick,
        "machine": common.machine_info(),
        "data": str(data),
        "runs": results,
    }
    for name, r in results.items():
        if r["kind"] != "refine":
            paired = quality_runs.paired_cider_difference(results[args.name], r)
            result.setdefault("paired_cider_difference", {})[name] = paired
            low, high = paired["interval"]
            print(
                f"\npaired final CIDEr-D, {args.name} - {name}: {paired['mean']:+.3f} "
                f"[{low:+.3f}, {high:+.3f}] over {paired['num_images']} images"
            )
    if "flickr8k_ar" in results and results["flickr8k_ar"]["final_cider"]:
        ratio = results[args.name]["final_cider"] / results["flickr8k_ar"]["final_cider"]
        result["cider_ratio_refine_over_ar"] = ratio
        print(f"\nfinal CIDEr-D, refinement / autoregressive: {ratio:.3f} (goal: >= 1)")
    common.save(result, args.output, "flickr8k_quality_quick" if args.quick else "flickr8k_quality")
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
