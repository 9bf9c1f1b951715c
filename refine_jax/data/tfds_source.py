"""The prepared COCO Karpathy TFDS dataset (`data.coco.CocoKarpathyCaptions`) as a record source.

The runtime reader, apart from the offline builder: it finds the prepared files by data_dir and
config name, or by their version folder, reads them without TensorFlow, and turns each example
into the package's record format (JPEG bytes undecoded; the pipeline decodes them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, SupportsIndex

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from refine_jax.data.records import (
    Record,
    Skipped,
    SkipReason,
    check_caption,
    checked_index,
    skipped,
)

DATASET_NAME = "coco_karpathy_captions"  # the name TFDS gives data.coco.CocoKarpathyCaptions


def _text(value: Any) -> str | bytes:
    return value if isinstance(value, str) else bytes(value)


def tfds_example_to_record(example: Mapping[str, Any]) -> Record | Skipped:
    """A ``coco_karpathy_captions`` example (image not decoded) -> a record or skip marker.

    KEY is ``str(image_id)``, as in the tar shards; captions are cleaned with
    :func:`~refine_jax.data.records.check_caption` and a sample with none left is skipped.
    """
    key = str(int(example["image_id"]))
    image = example["image"]
    if isinstance(image, np.ndarray) and image.dtype != object:
        raise TypeError(
            "the example's image is decoded pixels; read the data source with "
            "decoders={'image': tfds.decode.SkipDecoding()} to keep the JPEG bytes"
        )
    captions: list[str] = []
    dropped: list[str] = []
    for raw in list(example["captions"]):
        text, reason = check_caption(_text(raw))
        if reason is None:
            captions.append(text)
        else:
            dropped.append(str(reason))
    if not captions:
        return skipped(key, dropped[0] if dropped else SkipReason.MISSING_CAPTION)
    record: Record = {"key": key, "image_bytes": bytes(image), "captions": captions}
    if dropped:
        record["dropped"] = dropped
    return record


class TfdsCaptionSource:
    """Grain random-access source of records from the prepared ``coco_karpathy_captions`` dataset.

    ``source[i]`` is a record (or a skip marker for a sample without usable captions), with the
    JPEG bytes undecoded (the pipeline decodes them). The dataset is found by ``data_dir`` and
    ``config`` name, or by ``builder_dir`` (the version folder, for any config).
    """

    def __init__(
        self,
        split: str,
        data_dir: str | os.PathLike | None = None,
        config: str | None = None,
        builder_dir: str | os.PathLike | None = None,
    ) -> None:
        if builder_dir is not None:  # e.g. a custom config: .../coco_karpathy_captions/CFG/1.0.0
            if not epath.Path(builder_dir).is_dir():
                raise FileNotFoundError(
                    f"TFDS dataset folder not found: {os.fspath(builder_dir)!r}"
                )
            builder = tfds.builder_from_directory(os.fspath(builder_dir))
        else:
            name = DATASET_NAME + (f"/{config}" if config else "")
            where = os.fspath(data_dir) if data_dir else None  # None: TFDS's default data_dir
            try:  # read from the prepared files; the builder class need not be imported
                builder = tfds.builder(name, data_dir=where)
                prepared = builder.is_prepared()
            except tfds.core.registered.DatasetNotFoundError:
                prepared = False
            if not prepared:
                raise FileNotFoundError(
                    f"TFDS dataset {name!r} is not prepared in {where or 'TFDS_DATA_DIR'!r}; "
                    "build it with refine_jax.data.coco.prepare_tfds (or --format=tfds)"
                )
        self.split = split
        self._source = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> Record | Skipped:
        i = checked_index(index, len(self))
        return tfds_example_to_record(self._source[i])

    def __repr__(self) -> str:
        return f"TfdsCaptionSource({DATASET_NAME}, split={self.split!r}, {len(self)})"
