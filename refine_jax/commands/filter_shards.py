"""Filters a shard set's captions with a matching model into new shards (BLIP's CapFilt).

    python -m refine_jax.commands.filter_shards --match_workdir=MATCH_DIR \\
        --input=SHARDS --output=FILTERED [--threshold=0.5] [--part=0 --num_parts=1]

To also weigh a captioner's captions, caption the set first with
`python -m refine_jax.commands.caption_shards` and filter its output. Re-running the same
command resumes (finished shards are skipped). See `refine_jax.filter_shards`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags

from refine_jax.evaluation.matching import MatchEmbedder
from refine_jax.filter_shards import filter_shard_set
from refine_jax.model_loading import load_model
from refine_jax.paths import absolute

flags.DEFINE_string("match_workdir", None, "The matching model's workdir (model.kind='match').")
flags.DEFINE_string("input", None, "Input tar shards: a folder, glob or file.")
flags.DEFINE_string("output", None, "The folder to write the filtered shards to.")
flags.DEFINE_float("threshold", 0.5, "Keep captions the matching head scores at least this.")
flags.DEFINE_integer("checkpoint_step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_integer("part", 0, "Filter shards part, part + num_parts, ... (parallel runs).")
flags.DEFINE_integer("num_parts", 1, "How many parallel runs share the shards.")
flags.mark_flags_as_required(["match_workdir", "input", "output"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    loaded = load_model(None, FLAGS.match_workdir, FLAGS.checkpoint_step)
    scorer = {"match_workdir": absolute(FLAGS.match_workdir), "checkpoint_step": loaded.step}
    with loaded.context():
        summary = filter_shard_set(
            MatchEmbedder.from_loaded(loaded),
            FLAGS.input,
            FLAGS.output,
            FLAGS.threshold,
            FLAGS.part,
            FLAGS.num_parts,
            scorer,
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
