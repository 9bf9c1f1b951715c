"""The matching model as a yardstick (DESIGN §4, §11): its retrieval recall on the held-out split,
and the calibration of gradualness in its space (image posteriors) against the cosine between its
text embeddings and CIDEr's TF-IDF space.

Calibration: for each held-out image, three chains end in its first reference: the perfect one
(the salience targets a captioner is trained to write), "blank until the last step" and
"complete at step 1". A usable encoding scores the perfect chain near 1 and the other two near
0 (the TF-IDF encoding does not: DESIGN §4).

    python benchmarks/match_calibration.py --match_workdir=/work/runs/shapes_match
    python benchmarks/match_calibration.py --match_workdir=/work/runs/flickr8k_match
    python benchmarks/match_calibration.py --match_workdir=DIR --bank_train_images=20000
    python benchmarks/match_calibration.py --quick    # trains a tiny shapes model first (~1 min)

The workdir's recorded config names the data. Prints markdown tables and saves JSON (default
benchmarks/results/match_calibration[_quick].json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import common

from refine_jax.config import load_config_file
from refine_jax.data import FirstN, make_sources
from refine_jax.evaluation.matching import (
    CALIBRATION_CHAINS,
    MatchEmbedder,
    calibration,
    split_retrieval,
)
from refine_jax.model_loading import load_model
from refine_jax.train import train_and_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match_workdir", default=None, help="a trained matching model")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny shapes model (trained first if none given)"
    )
    parser.add_argument("--num_steps", type=int, default=4, help="K of the calibration chains")
    parser.add_argument(
        "--bank_train_images",
        type=int,
        default=0,
        help="add the first N training images to the posterior's bank (default: the split only)",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not args.quick and not args.match_workdir:
        parser.error("give --match_workdir (or --quick)")

    scratch = tempfile.TemporaryDirectory(prefix="match-calibration-") if args.quick else None
    workdir = args.match_workdir or scratch.name
    if args.quick and not args.match_workdir:
        config = load_config_file(str(common.REPO / "configs" / "shapes.py") + ":tiny,match")
        train_and_evaluate(config, workdir)

    loaded = load_model(None, workdir)
    train_source, eval_source = make_sources(loaded.config)
    embedder = MatchEmbedder.from_loaded(loaded)
    start = time.perf_counter()
    with loaded.context():
        retrieval = split_retrieval(embedder, eval_source)
        extra = None
        if args.bank_train_images:
            extra = embedder.embed_split(FirstN(train_source, args.bank_train_images))[1]
        calibrated = calibration(
            embedder, eval_source, loaded.tokenizer.salience, args.num_steps, extra
        )
    seconds = time.perf_counter() - start

    result = {
        "quick": args.quick,
        "machine": common.machine_info(),
        "match_workdir": args.match_workdir,
        "checkpoint_step": loaded.step,
        "data": loaded.config.data.to_dict(),
        "bank_train_images": args.bank_train_images,
        "retrieval": retrieval,
        "calibration": calibrated,
        "seconds": seconds,
    }
    print(f"\n## Retrieval ({retrieval['num_images']} images, {retrieval['num_texts']} texts)\n")
    print("| direction | R@1 | R@5 | R@10 |\n| --- | ---: | ---: | ---: |")
    for way in ("image_to_text", "text_to_image"):
        row = " | ".join(f"{retrieval[f'{way}_r@{k}']:.3f}" for k in (1, 5, 10))
        print(f"| {way.replace('_', ' ')} | {row} |")
    images = retrieval["num_images"]
    print(f"\n## Calibration of gradualness G ({images} images, K={args.num_steps})\n")
    print(
        "| chain | G, matching model (posteriors) | G, text-embedding cosine | G, TF-IDF "
        "| progress p_k, matching model |"
    )
    print("| --- | ---: | ---: | ---: | --- |")
    for name in CALIBRATION_CHAINS:
        c = calibrated[name]
        progress = ", ".join(f"{p:.2f}" for p in c["progress_per_step"] or ())
        print(
            f"| {name} | {c['gradualness']:.3f} | {c['gradualness_cosine']:.3f} "
            f"| {c['gradualness_tfidf']:.3f} | {progress} |"
        )
    common.save(
        result, args.output, "match_calibration_quick" if args.quick else "match_calibration"
    )
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
