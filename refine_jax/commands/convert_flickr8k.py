"""Converts the raw Flickr8k files to tar shards in the layout of ``shared/data/flickr8k``.

    python -m refine_jax.commands.convert_flickr8k --raw_dir=RAW --output_dir=OUT

(`python -m refine_jax.data.flickr8k ...` runs this command too; the inputs are described in
refine_jax/data/flickr8k.py.)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from refine_jax.data.flickr8k import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_QUALITY,
    SAMPLES_PER_SHARD,
    SPLITS,
    convert,
)
from refine_jax.data.shard_writer import OutputExistsError

flags.DEFINE_string("raw_dir", None, "Folder with the raw Flickr8k images and text files.")
flags.DEFINE_string("output_dir", None, "Where to write <split>/NNNNN.tar and references.")
flags.DEFINE_string("images_dir", None, "Images folder (default: found inside raw_dir).")
flags.DEFINE_list("splits", list(SPLITS), "Splits to write (train, val, test).")
flags.DEFINE_integer("image_size", DEFAULT_IMAGE_SIZE, "Resize target; 0 keeps originals.")
flags.DEFINE_enum("resize", "squash", ["squash", "shorter_side"], "How to resize.")
flags.DEFINE_integer("quality", DEFAULT_QUALITY, "JPEG quality of resized images.")
flags.DEFINE_integer("samples_per_shard", SAMPLES_PER_SHARD, "Samples per tar shard.")
flags.DEFINE_string("image_repo", None, "Optional provenance recorded in KEY.json.")
flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Image threads.")
flags.DEFINE_bool("overwrite", False, "Replace shards of an earlier run.")
flags.mark_flags_as_required(["raw_dir", "output_dir"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        reports = convert(
            FLAGS.raw_dir,
            FLAGS.output_dir,
            splits=FLAGS.splits,
            image_size=FLAGS.image_size or None,
            resize=FLAGS.resize,
            quality=FLAGS.quality,
            samples_per_shard=FLAGS.samples_per_shard,
            images_dir=FLAGS.images_dir,
            image_repo=FLAGS.image_repo,
            workers=FLAGS.workers,
            overwrite=FLAGS.overwrite,
        )
    except OutputExistsError as e:  # one line naming the flag, not a traceback naming a keyword
        sys.exit(f"error: {e.describe('rerun with --overwrite')}")
    print(json.dumps({split: r.to_dict() for split, r in reports.items()}, indent=1))


if __name__ == "__main__":
    app.run(main)
