"""Caption filtering with the matching model: how well it catches captions that belong to
another image (DESIGN §11, BLIP's CapFilt).

Copies a held-out shard set with a share of its captions swapped for a caption of another,
random image, filters the copy with `refine_jax.filter_shards` (threshold 0, so every caption's
score is kept), and reports, per threshold, the precision and recall of "dropped" as a detector
of "swapped", and the share of the true captions kept.

    python benchmarks/caption_filter.py --match_workdir=/work/runs/flickr8k_match \\
        --data=../shared/data/flickr8k/val
    python benchmarks/caption_filter.py --quick    # a tiny shapes model on generated shards

Prints a markdown table and saves JSON (default benchmarks/results/caption_filter[_quick].json).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from PIL import Image

from refine_jax.config import load_config_file
from refine_jax.data.records import is_record
from refine_jax.data.shapes import generate
from refine_jax.data.shard_writer import ShardWriter
from refine_jax.data.shards import TarShardSource
from refine_jax.evaluation.matching import MatchEmbedder
from refine_jax.filter_shards import filter_shard_set
from refine_jax.model_loading import load_model
from refine_jax.train import train_and_evaluate

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def shapes_records(count: int) -> list[dict]:
    records = []
    for i in range(count):
        example = generate(0, "eval", i)
        buffer = io.BytesIO()
        Image.fromarray(example["image"]).save(buffer, format="JPEG", quality=95)
        records.append(
            {
                "key": example["key"],
                "image_bytes": buffer.getvalue(),
                "captions": example["captions"],
            }
        )
    return records


def swapped_copy(records: list[dict], share: float, folder: Path, seed: int) -> set:
    """Writes the records with `share` of all captions swapped for one of another image;
    returns the (key, caption) pairs that were swapped in."""
    rng = np.random.default_rng(seed)
    slots = [(i, j) for i, r in enumerate(records) for j in range(len(r["captions"]))]
    chosen = rng.choice(len(slots), int(round(share * len(slots))), replace=False)
    captions = [list(r["captions"]) for r in records]
    swapped = set()
    for s in chosen:
        i, j = slots[s]
        other = (i + int(rng.integers(1, len(records)))) % len(records)
        text = records[other]["captions"][int(rng.integers(len(records[other]["captions"])))]
        if text in records[i]["captions"]:
            continue  # the same words describe both images: not a wrong caption
        captions[i][j] = text
        swapped.add((records[i]["key"], text.strip()))
    with ShardWriter(folder, samples_per_shard=250) as writer:
        for record, texts in zip(records, captions, strict=True):
            writer.write(record["key"], record["image_bytes"], texts)
    return swapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match_workdir", default=None)
    parser.add_argument("--data", default=None, help="a held-out shard folder (default: shapes)")
    parser.add_argument("--swap_share", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="a tiny shapes model, 64 images")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not args.quick and not args.match_workdir:
        parser.error("give --match_workdir (or --quick)")

    scratch = tempfile.TemporaryDirectory(prefix="caption-filter-")
    root = Path(scratch.name)
    workdir = args.match_workdir or str(root / "match")
    if args.quick and not args.match_workdir:
        config = load_config_file(str(common.REPO / "configs" / "shapes.py") + ":tiny,match")
        train_and_evaluate(config, workdir)
    if args.data:
        source = TarShardSource(args.data)
        records = [r for r in (source[i] for i in range(len(source))) if is_record(r)]
    else:
        records = shapes_records(64 if args.quick else 500)
    swapped = swapped_copy(records, args.swap_share, root / "noisy", seed=0)

    loaded = load_model(None, workdir)
    start = time.perf_counter()
    with loaded.context():
        summary = filter_shard_set(
            MatchEmbedder.from_loaded(loaded), str(root / "noisy"), str(root / "out"), 0.0
        )
    seconds = time.perf_counter() - start
    scored = []  # (score, swapped?)
    for shard in sorted((root / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    for verdict in meta["match_scores"]:
                        pair = (meta["key"], verdict["caption"])
                        scored.append((verdict["score"], pair in swapped))
    scores = np.array([s for s, _ in scored])
    is_swapped = np.array([w for _, w in scored])
    rows = []
    for threshold in THRESHOLDS:
        dropped = scores < threshold
        caught = np.sum(dropped & is_swapped)
        rows.append(
            {
                "threshold": threshold,
                "precision": float(caught / max(dropped.sum(), 1)),
                "recall": float(caught / max(is_swapped.sum(), 1)),
                "true_kept": float(np.mean(~dropped[~is_swapped])),
            }
        )
    order = np.argsort(-scores)  # area under the ROC curve: P(true scores above swapped)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores), 0, -1)
    positives, negatives = (~is_swapped).sum(), is_swapped.sum()
    auc = (ranks[~is_swapped].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    result = {
        "quick": args.quick,
        "machine": common.machine_info(),
        "match_workdir": args.match_workdir,
        "data": args.data or "shapes (generated)",
        "images": len(records),
        "captions": len(scored),
        "swapped": int(is_swapped.sum()),
        "roc_auc": float(auc),
        "thresholds": rows,
        "filter_seconds": seconds,
        "summary": {k: v for k, v in summary.items() if k != "output_dir"},
    }
    print(
        f"\n## Caption filtering ({len(records)} images, {len(scored)} captions, "
        f"{int(is_swapped.sum())} swapped; ROC AUC {auc:.3f}; {seconds:.0f} s)\n"
    )
    print(
        common.markdown_table(
            ["threshold", "precision", "recall", "true captions kept"],
            [[r["threshold"], r["precision"], r["recall"], r["true_kept"]] for r in rows],
        )
    )
    common.save(result, args.output, "caption_filter_quick" if args.quick else "caption_filter")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
