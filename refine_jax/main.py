"""Entry point: python -m refine_jax.main --config=configs/shapes.py --workdir=DIR.

Modes:
    --mode=train (default)  train, evaluating periodically; re-running resumes.
    --mode=eval             describe a split with a checkpoint of DIR and score it:
                            DIR/eval/NAME/{metrics.json, captions.jsonl, report.html}
                            [--eval_data=SHARD_FOLDER] [--eval_name=NAME] [--checkpoint_step=N]
                            [--report_images=50]
    --mode=caption          describe your own images: --images=FOLDER_OR_GLOB [--output=FILE]

Training records its config in DIR/config.json; eval and caption read it, so `--workdir=DIR`
alone is enough there (a given --config wins, and must match the recorded model shape).

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

config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (file.py:variant); eval/caption default: DIR/config.json.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where metrics, samples and checkpoints are written.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "caption"], "What to do with the config.")
flags.DEFINE_string(
    "eval_data",
    None,
    "eval: a folder (or glob) of tar shards with a COCO-style "
    "references.json beside them; default: the config's held-out split.",
)
flags.DEFINE_string(
    "eval_name",
    None,
    "eval: NAME of DIR/eval/NAME (default: the eval_data folder's name, or 'heldout').",
)
flags.DEFINE_integer(
    "checkpoint_step", None, "eval/caption: the checkpoint step to load (default: the latest)."
)
flags.DEFINE_integer("report_images", 50, "eval: at most this many images in report.html.")
flags.DEFINE_string("images", None, "caption: a folder, glob or file of JPEG/PNG/WebP images.")
flags.DEFINE_string(
    "output", None, "caption: the JSONL file to write (default: DIR/captions/NAME.jsonl)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["workdir"])
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
    if FLAGS.mode == "train":
        if FLAGS.config is None:
            raise app.UsageError("--mode=train needs --config=FILE.py[:VARIANT]")
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        from refine_jax.evaluation import evaluate

        summary = evaluate.evaluate_checkpoint(
            FLAGS.config,
            FLAGS.workdir,
            eval_data=FLAGS.eval_data,
            eval_name=FLAGS.eval_name,
            checkpoint_step=FLAGS.checkpoint_step,
            max_report_images=FLAGS.report_images,
        )
        if jax.process_index() == 0:
            evaluate.print_summary(summary)
    else:
        if not FLAGS.images:
            raise app.UsageError("--mode=caption needs --images=FOLDER_OR_GLOB")
        from refine_jax.evaluation import caption_images

        caption_images.caption_images(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.images,
            output=FLAGS.output,
            checkpoint_step=FLAGS.checkpoint_step,
        )


if __name__ == "__main__":
    app.run(main)
