"""Captions a shard set with a trained checkpoint into new shards (teacher captions).

    python -m refine_jax.commands.caption_shards --workdir=TEACHER_DIR \\
        --input=../shared/data/flickr8k/train --output=/tmp/flickr8k_teacher/train \\
        [--method=beam --beam=3] [--checkpoint_step=N] [--part=0 --num_parts=1]

Re-running the same command resumes (finished shards are skipped). Train on the result with
`configs/flickr8k.py:distill --config.data.train_path=OUTPUT` (teacher caption rate 1.0,
measured best in BENCHMARKS.md; see `refine_jax.caption_shards`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from refine_jax.caption_shards import Decoding, caption_shard_set
from refine_jax.model_loading import load_model
from refine_jax.paths import absolute
from refine_jax.workdir_config import config_for_workdir

config_flags.DEFINE_config_file(
    "config", None, "The teacher's config (default: WORKDIR/config.json).", lock_config=True
)
flags.DEFINE_string("workdir", None, "The teacher's workdir (checkpoints, tokenizer).")
flags.DEFINE_string("input", None, "Input tar shards: a folder, glob or file.")
flags.DEFINE_string("output", None, "The folder to write the captioned shards to.")
flags.DEFINE_enum("method", "beam", ["beam", "greedy"], "Baseline decoding (refinement: K steps).")
flags.DEFINE_integer("beam", 3, "Beam size for --method=beam.")
flags.DEFINE_integer("checkpoint_step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_integer("part", 0, "Caption shards part, part + num_parts, ... (parallel runs).")
flags.DEFINE_integer("num_parts", 1, "How many parallel runs share the shards.")
flags.mark_flags_as_required(["workdir", "input", "output"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_for_workdir(FLAGS.config, FLAGS.workdir)
    loaded = load_model(config, FLAGS.workdir, FLAGS.checkpoint_step)
    teacher = {
        "workdir": absolute(FLAGS.workdir),  # the same teacher however it is spelled
        "checkpoint_step": loaded.step,
        "model_kind": config.model.kind,
    }
    summary = caption_shard_set(
        loaded,
        FLAGS.input,
        FLAGS.output,
        Decoding(FLAGS.method, FLAGS.beam),
        teacher,
        FLAGS.part,
        FLAGS.num_parts,
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
