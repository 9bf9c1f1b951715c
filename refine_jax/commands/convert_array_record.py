"""Converts tar shards to ArrayRecord files (parallel, resumable; skip counts per shard).

    python -m refine_jax.commands.convert_array_record --input=SHARDS --output=DIR [--workers=N]

(`python -m refine_jax.data.array_record_convert ...` runs this command too; the record format
is described in refine_jax/data/array_record_convert.py.)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from refine_jax.data.array_record_convert import convert

flags.DEFINE_string("input", None, "Tar shards: directory, glob or file (comma-separated).")
flags.DEFINE_string("output", None, "Output directory for the .array_record files.")
flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Shards converted in parallel.")
flags.DEFINE_string("cache_dir", None, "Where to cache tar member indexes (default: auto).")
flags.DEFINE_bool("verify_images", True, "Decode every image; leave out corrupt ones.")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    inputs = [p for p in FLAGS.input.split(",") if p]
    report = convert(inputs, FLAGS.output, FLAGS.workers, FLAGS.cache_dir, FLAGS.verify_images)
    print(json.dumps(report.to_dict(), indent=1))
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
