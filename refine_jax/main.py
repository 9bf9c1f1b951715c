"""Entry point: python -m refine_jax.main --config=configs/shapes.py --workdir=DIR.

On a TPU pod the same command runs on every worker; `jax.distributed.initialize()` finds the
other workers by itself. Elsewhere (several local processes, GPU hosts) pass the coordinator
flags. A single process skips it.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from refine_jax import train

config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics, samples and checkpoints are written.")
flags.DEFINE_enum("mode", "train", ["train"], "What to do with the config.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """Joins the multi-controller runtime when this is one process of several."""
    if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()  # a TPU pod slice: the topology comes from the environment


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax and grain log every step at INFO
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
