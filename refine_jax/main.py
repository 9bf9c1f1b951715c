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
import sys
import traceback

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from refine_jax import train
from refine_jax.errors import RefineJaxError

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
flags.DEFINE_string(
    "match_workdir",
    None,
    "eval/caption: a matching model's workdir (model.kind='match'): every step gets an "
    "image-text score, and eval measures gradualness by its image posteriors.",
)
flags.DEFINE_string("images", None, "caption: a folder, glob or file of JPEG/PNG/WebP images.")
flags.DEFINE_string(
    "start_from",
    None,
    "caption: a partial description (step 0) every image continues from, e.g. 'a dog'.",
)
flags.DEFINE_string(
    "output", None, "caption: the JSONL file to write (default: DIR/captions/NAME.jsonl)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool(
    "verbose", False, "On an error, print its traceback too (it is always in DIR/error.log)."
)
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """Joins the multi-controller runtime when this is one process of several."""
    if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()  # a TPU pod slice: the topology comes from the environment


# Errors that are the input's or the environment's, not the code's: reported as their message.
USER_ERRORS = (RefineJaxError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def report_error(error: BaseException, workdir: str | None, verbose: bool) -> int:
    """Reports an error as one line on stderr (with its traceback when `verbose`), writes the
    traceback to WORKDIR/error.log, and returns the exit status."""
    details = "".join(traceback.format_exception(error))
    log = None
    if workdir:
        index = jax.process_index()
        log = epath.Path(workdir) / ("error.log" if index == 0 else f"error.{index}.log")
        try:  # epath: a gs:// workdir gets its log there, not in a local folder named "gs:"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(details)
        except OSError:
            log = None
    if verbose:
        sys.stderr.write(details)
    message = str(error).strip() or type(error).__name__
    if not isinstance(error, USER_ERRORS):
        message = f"{type(error).__name__}: {message}"
    where = f" (traceback in {log})" if log and not verbose else ""
    print(f"error: {message}{where}", file=sys.stderr, flush=True)
    return 1


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the project's error from a config file (an unknown variant,
    say) and a config override naming no key of the config (which ml_collections reports as a
    long traceback) turned into one line."""
    try:
        try:
            return FLAGS(argv)
        except flags.Error as error:
            cause = error
            while (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, RefineJaxError):
                print(f"error: {cause}", file=sys.stderr)
                sys.exit(2)
            return app.parse_flags_with_usage(argv)  # absl's own report and usage
    except (AttributeError, KeyError) as error:
        while error.args and isinstance(error.args[0], Exception):  # KeyError in AttributeError
            error = error.args[0]
        key, *hint = str(error.args[0] if error.args else error).splitlines()
        overrides = " ".join(a.split("=")[0] for a in argv[1:] if a.startswith("--config."))
        print(
            f"error: unknown config key {key} in {overrides or 'the config'}. "
            + " ".join([*hint, "Every key is in refine_jax/config.py:base_config."]),
            file=sys.stderr,
        )
        sys.exit(2)


def main(argv):
    """Runs the mode; the project's errors end the process with one line and status 1."""
    try:
        run_mode(argv)
    except app.UsageError:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        sys.exit(report_error(error, FLAGS.workdir, FLAGS.verbose))


def run_mode(argv):
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
            match_workdir=FLAGS.match_workdir,
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
            start_from=FLAGS.start_from,
            match_workdir=FLAGS.match_workdir,
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
