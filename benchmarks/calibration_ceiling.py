"""How high can gradualness measured as information score the perfect calibration chains?
(DESIGN §4, §11; the calibration in `match_calibration.py`)

The matching model's gradualness (`evaluation.matching.posterior_progress`) asks how much of
what the final description says about which image it is each step already says. Here the
matching model is replaced by exact fit: a description fits the images one of whose captions
contains its words, and its posterior is uniform over them. For nested descriptions (each
step's words a subset of the next one's, as the salience chains are) the divergence ratio of
`posterior_progress` becomes

    p_k = log(B / |S_k|) / log(B / |S_K|),    S_k = the bank images that step k fits,

the share of the final description's information about which of the B bank images it is that
step k already carries. Two readings of "contains its words": as a multiset (`words`), or in
order (`ordered`: "a circle beside a square" fits only captions that name the circle first).
The bank is the held-out split's images plus the first N training images, the bank that
`match_calibration.py --bank_train_images=N` gives the learned model, image for image.

On shapes a caption is a function of the scene, so exact fit is the ideal matching model and
its G the ceiling for the posterior form. On photos it is not: exact words single out a caption
("a boy top jumping" fits one of 1,000 photos) where the photo's content would fit many, so
there it only shows how early the chains' words identify their caption.

    python benchmarks/calibration_ceiling.py                      # shapes: banks of 500 to 20,500
    python benchmarks/calibration_ceiling.py --match_workdir=DIR  # that run's salience stats
    python benchmarks/calibration_ceiling.py --data=../shared/data/flickr8k \
        --bank_train_images=0,6000
    python benchmarks/calibration_ceiling.py --quick              # 50 shapes chains, seconds

Prints a markdown table and saves JSON (default
benchmarks/results/calibration_ceiling_{shapes,flickr8k}[_quick].json).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common
import numpy as np

from refine_jax.data.shapes import KINDS, generate
from refine_jax.evaluation.matching import calibration_chains
from refine_jax.evaluation.refinement_metrics import refinement_metrics
from refine_jax.targets import SalienceStats, caption_words, schedule_fractions
from refine_jax.tokenizer import Tokenizer

READINGS = ("words", "ordered")


class ExactFit:
    """Which images of a bank each description fits: a word-count index of the bank's captions,
    built once and shared by both readings and every chain set."""

    def __init__(self, bank: Sequence[Sequence[str]]):  # each image's captions
        self.size = len(bank)
        self.captions = [caption_words(c) for image in bank for c in image]
        self.owner = np.repeat(np.arange(len(bank)), [len(image) for image in bank])
        self.vocab: dict[str, int] = {}
        for words in self.captions:
            for word in words:
                self.vocab.setdefault(word, len(self.vocab))
        self.counts = np.zeros((len(self.vocab), len(self.captions)), np.int16)  # [V, captions]
        for j, words in enumerate(self.captions):
            for word in words:
                self.counts[self.vocab[word], j] += 1

    def fits(self, texts: Sequence[str], ordered: bool) -> np.ndarray:
        """[len(texts), bank size] bool: does one of image b's captions contain text t's words
        (as a multiset; with `ordered`, also in t's order)."""
        rows: dict[str, np.ndarray] = {}
        for text in dict.fromkeys(texts):  # each distinct text once
            words = caption_words(text)
            fits = np.ones(len(self.captions), bool)
            for word, needed in collections.Counter(words).items():
                fits &= self.counts[self.vocab[word]] >= needed if word in self.vocab else False
            if ordered and words:
                # Each word whole, in order, with any words between them.
                joined = "(?: | .* )".join(map(re.escape, words))
                pattern = re.compile(f"(?:^| ){joined}(?: |$)")
                for j in np.flatnonzero(fits):
                    fits[j] = bool(pattern.search(" ".join(self.captions[j])))
            rows[text] = np.zeros(self.size, bool)
            rows[text][self.owner[fits]] = True
        return np.stack([rows[t] for t in texts]) if texts else np.zeros((0, self.size), bool)

    def progress(self, chains: Sequence[Sequence[str]], ordered: bool) -> np.ndarray:
        """p_k [N, K] of each nested chain under the exact-fit posterior over the bank (module
        docstring); NaN rows where the final description fits every bank image (no span)."""
        flat = [text for chain in chains for text in chain]
        sizes = self.fits(flat, ordered).sum(axis=1).reshape(len(chains), -1)  # [N, K]
        if (sizes == 0).any():
            raise ValueError("a description fits no bank image: its own image must be in the bank")
        information = np.log(self.size / sizes)  # [N, K] nats about which bank image it is
        span = information[:, -1:]
        return np.where(span > 0, information / np.where(span > 0, span, 1.0), np.nan)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 shapes chains, small banks")
    parser.add_argument(
        "--data", default=None, help="a Flickr8k shard root (train/, val/); default: shapes"
    )
    parser.add_argument("--num_images", type=int, default=500, help="shapes: held-out chains")
    parser.add_argument("--seed", type=int, default=0, help="shapes: the config's seed")
    parser.add_argument(
        "--bank_train_images", default="0,5000,20000", help="comma list: training images added"
    )
    parser.add_argument("--num_steps", type=int, default=4, help="K of the chains")
    parser.add_argument(
        "--match_workdir",
        default=None,
        help="take the salience statistics from this run's tokenizer (default: from the "
        "training captions: all of Flickr8k's, or --salience_scenes generated ones)",
    )
    parser.add_argument(
        "--salience_scenes", type=int, default=20_000, help="shapes: training scenes counted"
    )
    parser.add_argument("--output", default=None)
    quick = dict(data=None, num_images=50, bank_train_images="0,200", salience_scenes=200)
    return common.parse_args_with_quick(parser, argv, quick)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra_sizes = [int(n) for n in args.bank_train_images.split(",")]

    start = time.perf_counter()
    scene_chains = None
    if args.data:  # every val photo with captions; its first reference ends the chain
        held_out = [c for c in common.read_split(f"{args.data}/val") if c]
        train = common.read_split(f"{args.data}/train")
    else:
        scenes = [generate(args.seed, "eval", i) for i in range(args.num_images)]
        held_out = [s["captions"] for s in scenes]
        num_train = max(*extra_sizes, args.salience_scenes)
        train = [generate(args.seed, "train", i)["captions"] for i in range(num_train)]
        if args.num_steps == len(scenes[0]["chain"]):  # the generator's own coarse-to-fine steps
            scene_chains = dict(enumerate(s["chain"] for s in scenes))
    counted = train if args.data else train[: args.salience_scenes]
    if args.match_workdir:
        salience = Tokenizer.load(Path(args.match_workdir) / "tokenizer").salience
    else:
        salience = SalienceStats.from_captions(c for image in counted for c in image)
    chain_sets = {
        "salience targets": {
            i: calibration_chains(captions[0], salience, args.num_steps)["perfect"]
            for i, captions in enumerate(held_out)
        }
    }
    if scene_chains:
        chain_sets["scene (shape, layout, size, colour)"] = scene_chains
    references = dict(enumerate(held_out))
    schedule = schedule_fractions(args.num_steps)
    weights = np.full(args.num_steps, 1.0 / args.num_steps)
    num_shapes = [sum(w in KINDS for w in caption_words(c[0])) for c in held_out]

    rows = []
    for extra in extra_sizes:
        exact = ExactFit(held_out + train[:extra])
        for (chain_name, chains), reading in itertools.product(chain_sets.items(), READINGS):
            progress = exact.progress(list(chains.values()), reading == "ordered")
            metrics = refinement_metrics(
                chains, references, schedule, weights, step_progress=progress, per_image=True
            )
            by_count = None
            if not args.data:  # shapes: G by the number of shapes the caption names
                per_image = {r["image_id"]: r["gradualness"] for r in metrics["per_image"]}
                groups = collections.defaultdict(list)
                for i, n in enumerate(num_shapes):
                    groups[n].append(per_image[i])
                by_count = {n: float(np.mean(groups[n])) for n in sorted(groups)}
            rows.append(
                {
                    "chains": chain_name,
                    "bank_size": exact.size,
                    "reading": reading,
                    "gradualness": metrics["gradualness"],
                    "progress_per_step": metrics["progress_per_step"],
                    "gradualness_by_num_shapes": by_count,
                }
            )
    name = "flickr8k" if args.data else "shapes"
    result = {
        "quick": args.quick,
        "machine": common.machine_info(),
        "data": args.data or "shapes",
        "num_images": len(held_out),
        "num_steps": args.num_steps,
        "salience_from": args.match_workdir or f"{len(counted)} training images' captions",
        "rows": rows,
        "examples": {
            label: [chains[i] for i in range(min(3, len(chains)))]
            for label, chains in chain_sets.items()
        },
        "seconds": time.perf_counter() - start,
    }
    print(f"\n## Chains under the exact-fit posterior ({len(held_out)} {name} images)\n")
    headers = ["chains", "bank images", "reading", "G", "progress p_1..p_K"]
    table = []
    for row in rows:
        progress = ", ".join(f"{p:.2f}" for p in row["progress_per_step"])
        table.append(
            [row["chains"], row["bank_size"], row["reading"], row["gradualness"], progress]
        )
        if row["gradualness_by_num_shapes"]:
            by_count = row["gradualness_by_num_shapes"].values()
            table[-1].append(" / ".join(f"{g:.2f}" for g in by_count))
    if not args.data:
        headers.append("G by number of shapes (1 / 2 / 3)")
    print(common.markdown_table(headers, table, ["", "", "", ".3f"]))
    common.save(result, args.output, f"calibration_ceiling_{name}{'_quick' if args.quick else ''}")
    print(f"({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
