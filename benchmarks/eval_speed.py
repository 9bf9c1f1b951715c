"""How long `--mode=eval` takes on the 1,000 Flickr8k val images at the Flickr8k config's size.

Runs what `python -m refine_jax.main --config=configs/flickr8k.py --mode=eval
--eval_data=DATA/val` runs (open and check the split, batched jitted decoding of every step,
CIDEr-D/BLEU/gradualness metrics, the report with attention heatmaps of 50 images, and the
files), with randomly initialised parameters instead of a checkpoint: decoding cost does not
depend on the weights, and random weights write full-length captions, the slowest case for the
metrics. The tokenizer is trained on the training captions first (not timed). The issue's
target: under a minute on CPU.

    python benchmarks/eval_speed.py [--quick] [--data=../shared/data/flickr8k] [--output=FILE]

--quick evaluates the first 128 images with a 10-image report. Prints and saves JSON (default
benchmarks/results/eval_speed[_quick].json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flickr8k_config(data: Path):
    """configs/flickr8k.py's default config (unlocked), reading `data`."""
    spec = importlib.util.spec_from_file_location(
        "flickr8k_config", REPO / "configs" / "flickr8k.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    config.unlock()
    config.data.path = str(data)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 images, 10 in the report")
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "flickr8k"),
        help="the Flickr8k shard folder (with train/ and val/)",
    )
    parser.add_argument("--output", default=None, help="where to save the JSON result")
    args = parser.parse_args(argv)

    import jax

    from refine_jax.data.shards import load_references
    from refine_jax.evaluation.evaluate import evaluate_checkpoint, load_model
    from refine_jax.tokenizer import train_tokenizer

    data = Path(args.data)
    if not (data / "val" / "references.json").exists():
        print(f"no Flickr8k shards at {data} (expected val/ with references.json)", file=sys.stderr)
        return 2
    config = flickr8k_config(data)
    num_images = 128 if args.quick else 0
    config.data.max_eval_examples = num_images
    report_images = 10 if args.quick else 50

    tick = time.perf_counter()
    captions = [c for refs in load_references(data / "train").values() for c in refs]
    tokenizer = train_tokenizer(captions, config.tokenizer.vocab_size)
    tokenizer_seconds = time.perf_counter() - tick

    with tempfile.TemporaryDirectory(prefix="eval-speed-") as workdir:
        start = time.perf_counter()
        loaded = load_model(config, workdir, random_init=True, tokenizer=tokenizer)
        init_seconds = time.perf_counter() - start
        tick = time.perf_counter()
        summary = evaluate_checkpoint(
            config,
            workdir,
            eval_data=str(data / "val"),
            max_report_images=report_images,
            loaded=loaded,
            num_threads=os.cpu_count() or 2,
        )
        eval_seconds = time.perf_counter() - tick
        report_bytes = (Path(summary["output_dir"]) / "report.html").stat().st_size

    m = config.model
    result = {
        "benchmark": "eval_speed" + ("_quick" if args.quick else ""),
        "images": summary["num_images"],
        "eval_seconds": round(eval_seconds, 2),
        "images_per_second": round(summary["num_images"] / eval_seconds, 1),
        "target_seconds": 60,
        "meets_target": eval_seconds < 60 if not args.quick else None,
        "stages_seconds": {k: round(v, 2) for k, v in summary["seconds"].items()},
        "param_init_seconds": round(init_seconds, 2),
        "tokenizer_training_seconds": round(tokenizer_seconds, 2),
        "report_images": report_images,
        "report_megabytes": round(report_bytes / 1e6, 2),
        "final_cider_random_init": round(summary["final_cider"], 4),
        "config": {
            "file": "configs/flickr8k.py",
            "image_size": m.image_size,
            "patch_size": m.patch_size,
            "width": m.width,
            "encoder_depth": m.encoder_depth,
            "detailer_depth": m.detailer_depth,
            "num_refine_steps": m.num_refine_steps,
            "canvas_length": m.canvas_length,
            "vocab_size": tokenizer.vocab_size,
            "batch_size": config.batch_size,
        },
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    output = (
        Path(args.output)
        if args.output
        else (REPO / "benchmarks" / "results" / f"{result['benchmark']}.json")
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(f"saved {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
