"""Converts COCO captions (Karpathy split) to tar shards, or prepares its TFDS dataset.

    python -m refine_jax.commands.convert_coco --coco_dir=COCO --karpathy_json=dataset_coco.json \\
        --output_dir=OUT [--restval=train] [--image_size=0] [--format=tar|tfds]

(`python -m refine_jax.data.coco ...` runs this command too; the inputs are described in
refine_jax/data/coco.py.)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from refine_jax.data.coco import CAPTION_SOURCES, CocoKarpathyConfig, convert, prepare_tfds
from refine_jax.data.shard_writer import OutputExistsError

flags.DEFINE_string("coco_dir", None, "Folder with train2014/, val2014/ and caption files.")
flags.DEFINE_string("karpathy_json", None, "Karpathy's dataset_coco.json.")
flags.DEFINE_string("output_dir", None, "Tar shards: <split>/ folders; tfds: the data_dir.")
flags.DEFINE_enum("format", "tar", ["tar", "tfds"], "Write tar shards or the TFDS dataset.")
flags.DEFINE_string("restval", "train", "Where restval goes: train, restval, or none.")
flags.DEFINE_enum("caption_source", "coco", list(CAPTION_SOURCES), "Where captions come from.")
flags.DEFINE_list("splits", None, "Splits to write (default: all).")
flags.DEFINE_integer("image_size", 0, "Resize target (0 keeps the COCO JPEG files).")
flags.DEFINE_enum("resize", "shorter_side", ["squash", "shorter_side"], "How to resize.")
flags.DEFINE_integer("quality", 90, "JPEG quality of resized images.")
flags.DEFINE_integer("samples_per_shard", 1000, "Samples per tar shard.")
flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Image threads.")
flags.DEFINE_bool("overwrite", False, "Replace shards of an earlier run.")
flags.mark_flags_as_required(["coco_dir", "karpathy_json", "output_dir"])
# Flags of the tar shards only: the TFDS builder writes every split with the original images.
TAR_ONLY_FLAGS = ("splits", "image_size", "resize", "quality", "samples_per_shard", "overwrite")
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    restval = None if FLAGS.restval.lower() in ("", "none") else FLAGS.restval
    if FLAGS.format == "tfds":
        given = [name for name in TAR_ONLY_FLAGS if FLAGS[name].present]
        if given:  # refused rather than silently ignored
            flag_names = ", ".join(f"--{name}" for name in given)
            sys.exit(
                f"error: {flag_names}: options of --format=tar only; the TFDS builder prepares "
                "every split with the original COCO images, and keeps a dataset already prepared"
            )
        named = {("train", "coco"): "restval_in_train", ("restval", "coco"): "restval_split"}
        config = named.get((restval, FLAGS.caption_source)) or CocoKarpathyConfig(
            name=f"restval_{restval or 'dropped'}_{FLAGS.caption_source}",
            restval=restval,
            caption_source=FLAGS.caption_source,
        )
        builder = prepare_tfds(
            FLAGS.coco_dir,
            FLAGS.output_dir,
            karpathy_json=FLAGS.karpathy_json,
            config=config,
            workers=FLAGS.workers,
        )
        print(builder.info.splits)
        return
    try:
        reports = convert(
            FLAGS.coco_dir,
            FLAGS.karpathy_json,
            FLAGS.output_dir,
            restval=restval,
            caption_source=FLAGS.caption_source,
            splits=FLAGS.splits,
            image_size=FLAGS.image_size or None,
            resize=FLAGS.resize,
            quality=FLAGS.quality,
            samples_per_shard=FLAGS.samples_per_shard,
            workers=FLAGS.workers,
            overwrite=FLAGS.overwrite,
        )
    except OutputExistsError as e:  # one line naming the flag, not a traceback naming a keyword
        sys.exit(f"error: {e.describe('rerun with --overwrite')}")
    print(json.dumps({split: r.to_dict() for split, r in reports.items()}, indent=1))


if __name__ == "__main__":
    app.run(main)
