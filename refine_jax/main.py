"""Entry point: python -m refine_jax.main --config=configs/shapes.py --workdir=DIR."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from refine_jax import train

config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics, samples and checkpoints are written.")
flags.DEFINE_enum("mode", "train", ["train"], "What to do with the config.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
