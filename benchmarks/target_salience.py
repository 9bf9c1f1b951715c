"""Which words the coarse-to-fine targets write first, on real captions (DESIGN §3).

For every image of a Flickr8k split and each of its reference captions, builds the K-step
salience targets (statistics from the training captions) and reports, per step k:

- `subject`: the share of step-k targets that contain the caption's subject (the first
  noun-like phrase head, `refine_jax.targets.subject_position`);
- `consensus`: the share that contain a content word used by a majority (3 of 5) of the
  image's references (`evaluation.refinement_metrics.consensus_words`), a check that does not
  depend on the noun test.

    python benchmarks/target_salience.py --data=../shared/data/flickr8k
    python benchmarks/target_salience.py --quick     # shapes captions, seconds

Prints a markdown table and a few example chains; saves JSON (default
benchmarks/results/target_salience[_quick].json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common

from refine_jax.data.shapes import generate
from refine_jax.evaluation.refinement_metrics import consensus_words
from refine_jax.targets import (
    SalienceStats,
    caption_words,
    step_word_indices,
    subject_position,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shapes captions instead")
    parser.add_argument("--data", default="../shared/data/flickr8k", help="train/ and val/")
    parser.add_argument("--num_steps", type=int, default=4)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    if args.quick:
        train = [generate(0, "train", i)["captions"] for i in range(500)]
        images = [generate(0, "eval", i)["captions"] for i in range(100)]
    else:
        train = common.read_split(f"{args.data}/train")
        images = common.read_split(f"{args.data}/val")
    stats = SalienceStats.from_captions(c for refs in train for c in refs)
    k = args.num_steps
    subject, consensus, total = [0] * k, [0] * k, 0
    examples = []
    for references in images:
        agreed = consensus_words([" ".join(caption_words(c)) for c in references])
        for caption in references:
            words = caption_words(caption)
            steps = step_word_indices(words, k, stats)
            subj = subject_position(words, stats)
            total += 1
            for step, kept in enumerate(steps):
                subject[step] += subj is not None and subj in kept
                consensus[step] += bool(agreed & {words[i] for i in kept})
            if len(examples) < 8:
                examples.append([" ".join(words[i] for i in kept) for kept in steps])
    result = {
        "quick": args.quick,
        "machine": common.machine_info(),
        "captions": total,
        "subject_share": [s / total for s in subject],
        "consensus_share": [c / total for c in consensus],
        "examples": examples,
    }
    print(f"\n## Target salience ({total} captions, K={k})\n")
    print("| step | contains the subject | contains a word 3 of 5 references use |")
    print("| ---: | ---: | ---: |")
    for step in range(k):
        print(f"| {step + 1} | {subject[step] / total:.3f} | {consensus[step] / total:.3f} |")
    print("\nExamples:")
    for chain in examples:
        print("  " + " → ".join(chain))
    output = Path(args.output or RESULTS / f"target_salience{'_quick' if args.quick else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
