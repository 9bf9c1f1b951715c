"""COCO captions (Karpathy split) from the raw COCO files, offline: tar shards, and a TFDS builder.

Input: the files a user downloads from cocodataset.org plus Karpathy's split file:

* ``COCO_DIR/train2014/``, ``COCO_DIR/val2014/``: the images (``COCO_val2014_000000391895.jpg``);
* ``captions_train2014.json``, ``captions_val2014.json`` in ``COCO_DIR/annotations/`` (as in
  ``annotations_trainval2014.zip``) or ``COCO_DIR/``;
* ``dataset_coco.json`` (Karpathy & Fei-Fei): ``images`` with ``filepath``, ``filename``,
  ``cocoid``, ``split`` (train / val / test / restval) and ``sentences`` ``[{raw}]``.

The split comes from the Karpathy file; the captions by default from the official COCO caption
files (``caption_source="coco"``: with their annotation ids, in id order) or from the Karpathy
``raw`` sentences (``caption_source="karpathy"``, then the COCO caption files are not needed).
``restval`` is merged into ``train`` by default (``restval="restval"`` keeps it as its own
split, ``restval=None`` leaves it out). KEY is the COCO image id as a decimal string.

(a) :func:`convert` writes ``OUTPUT/<split>/NNNNN.tar`` + ``references.json`` with
:mod:`refine_jax.data.shard_writer` (images kept byte for byte unless ``image_size`` is set)::

    python -m refine_jax.data.coco --coco_dir=COCO --karpathy_json=dataset_coco.json \\
        --output_dir=OUT [--restval=train] [--image_size=0] [--format=tar|tfds]

(the command lives in :mod:`refine_jax.commands.convert_coco`)

(b) :class:`CocoKarpathyCaptions` is a TFDS builder that needs no TensorFlow: it writes
``array_record`` files with features ``image`` (the encoded JPEG), ``image_id``, ``file_name``
and ``captions``, so ``tfds.data_source("coco_karpathy_captions", ...)`` serves it. Its
``manual_dir`` holds the raw files above (``dataset_coco.json`` in it, or passed as
``karpathy_json``). The prepared dataset is read at training time by
:class:`refine_jax.data.tfds_source.TfdsCaptionSource`, which needs nothing from this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from refine_jax.data.shard_writer import (
    ImageOptions,
    SourceSample,
    SplitReport,
    path_inside,
    prepare_samples,
    refuse_earlier_outputs,
    require_path,
    write_split,
)

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
CAPTION_SOURCES = ("coco", "karpathy")
KARPATHY_FILE = "dataset_coco.json"
IMAGE_FOLDERS = ("train2014", "val2014")


# ---------------------------------------------------------------------------------------------
# Reading the raw files


def caption_file(coco_dir: str | os.PathLike, folder: str) -> str:
    """``captions_<folder>.json`` in ``coco_dir/annotations/`` or ``coco_dir/``."""
    name = f"captions_{folder}.json"
    tried = [os.path.join(os.fspath(coco_dir), sub, name) for sub in ("annotations", "")]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"COCO caption file {name!r} not found; looked for {tried}")


def _load_json(path: str, what: str) -> Any:
    require_path(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from e


def load_coco_captions(path: str) -> dict[int, list[tuple[int, str]]]:
    """``{image id: [(annotation id, caption), ...] in id order}`` of a COCO caption file."""
    data = _load_json(path, "COCO caption file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"COCO caption file {path!r} has no 'annotations' list")
    out: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        out.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), ann["caption"]))
    for anns in out.values():
        anns.sort(key=lambda a: a[0])
    return out


def load_karpathy(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``images`` list of Karpathy's ``dataset_coco.json``, checked for the needed fields."""
    path = os.fspath(path)
    data = _load_json(path, "Karpathy split file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"Karpathy split file {path!r} has no 'images' list")
    for i, image in enumerate(images):
        missing = [k for k in ("filepath", "filename", "cocoid", "split") if k not in image]
        if missing:
            raise ValueError(f"{path!r}: images[{i}] lacks {missing}")
        if image["split"] not in KARPATHY_SPLITS:
            raise ValueError(
                f"{path!r}: images[{i}] has split {image['split']!r}, not one of {KARPATHY_SPLITS}"
            )
    return images


def target_split(karpathy_split: str, restval: str | None) -> str | None:
    """The output split of a Karpathy split: restval goes to ``restval`` (None: left out)."""
    return restval if karpathy_split == "restval" else karpathy_split


def _check_options(restval: str | None, caption_source: str) -> None:
    if restval is not None and restval not in (*SPLITS, "restval"):
        raise ValueError(f"restval must be one of {(*SPLITS, 'restval')} or None, got {restval!r}")
    if caption_source not in CAPTION_SOURCES:
        raise ValueError(f"caption_source must be one of {CAPTION_SOURCES}: {caption_source!r}")


def plan_splits(
    coco_dir: str | os.PathLike,
    karpathy_json: str | os.PathLike,
    *,
    restval: str | None = "train",
    caption_source: str = "coco",
) -> dict[str, list[SourceSample]]:
    """The samples of each output split, in the order of the Karpathy file.

    Raises FileNotFoundError naming the path when the Karpathy file, an image folder it refers
    to, or (for ``caption_source="coco"``) a caption file is missing. Individual missing images
    are not checked here: the writers skip and count them.
    """
    _check_options(restval, caption_source)
    coco_dir = require_path(coco_dir, "COCO folder", is_dir=True)
    images = load_karpathy(karpathy_json)
    kept = [im for im in images if target_split(im["split"], restval) is not None]
    outside = [im for im in kept if not path_inside(coco_dir, im["filepath"], im["filename"])]
    if outside:
        first = outside[0]
        logging.warning(
            "%d image(s) of %s name a path outside the COCO folder %s (e.g. %r); refused and "
            "left out",
            len(outside),
            os.fspath(karpathy_json),
            coco_dir,
            os.path.join(first["filepath"], first["filename"]),
        )
        kept = [im for im in kept if path_inside(coco_dir, im["filepath"], im["filename"])]
    folders = sorted({im["filepath"] for im in kept})
    for folder in folders:
        require_path(os.path.join(coco_dir, folder), "COCO image folder", is_dir=True)
    coco_caps: dict[int, list[tuple[int, str]]] = {}
    if caption_source == "coco":
        for folder in folders:
            coco_caps.update(load_coco_captions(caption_file(coco_dir, folder)))

    order = [*SPLITS, "restval"]
    plan: dict[str, list[SourceSample]] = {}
    next_id = 1
    for im in kept:
        split = target_split(im["split"], restval)
        assert split is not None
        cocoid = int(im["cocoid"])
        if caption_source == "coco":
            anns = coco_caps.get(cocoid, [])
            captions = [c for _, c in anns]
            ids = [i for i, _ in anns]
        else:
            captions = [s.get("raw", "") for s in im.get("sentences", [])]
            ids = list(range(next_id, next_id + len(captions)))
            next_id += len(captions)
        meta = {
            "source_id": im["filename"],
            "filepath": im["filepath"],
            "cocoid": cocoid,
            "width": None,
            "height": None,
            "split": split,
            "karpathy_split": im["split"],
            "dataset": "coco",
            "source_width": None,
            "source_height": None,
        }
        plan.setdefault(split, []).append(
            SourceSample(
                key=str(cocoid),
                image_path=os.path.join(coco_dir, im["filepath"], im["filename"]),
                captions=captions,
                metadata=meta,
                annotation_ids=ids,
            )
        )
    for split, samples in plan.items():
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Karpathy split file lists a cocoid twice in split {split!r}")
    return {s: plan[s] for s in order if s in plan}


# ---------------------------------------------------------------------------------------------
# (a) Tar shards


def convert(
    coco_dir: str | os.PathLike,
    karpathy_json: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    restval: str | None = "train",
    caption_source: str = "coco",
    splits: Sequence[str] | None = None,
    image_size: int | None = None,
    resize: str = "shorter_side",
    quality: int = 90,
    samples_per_shard: int = 1000,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, SplitReport]:
    """Converts the raw COCO files to ``output_dir/<split>/`` tar shards; returns the reports.

    ``splits`` defaults to every split the Karpathy file yields (train, val, test and, with
    ``restval="restval"``, restval). ``image_size=None`` keeps the COCO JPEG files as they are.
    """
    plan = plan_splits(coco_dir, karpathy_json, restval=restval, caption_source=caption_source)
    chosen = list(plan) if splits is None else list(splits)
    missing = [s for s in chosen if s not in plan]
    if missing:
        raise ValueError(f"split(s) {missing} have no images in {os.fspath(karpathy_json)!r}")
    options = ImageOptions(size=image_size, resize=resize, quality=quality)
    refuse_earlier_outputs((os.path.join(output_dir, s) for s in chosen), overwrite)
    reports = {}
    for split in chosen:
        reports[split] = write_split(
            plan[split],
            os.path.join(os.fspath(output_dir), split),
            image_options=options,
            samples_per_shard=samples_per_shard,
            info={
                "description": f"COCO 2014 captions, Karpathy {split} split "
                f"({caption_source} captions)",
                "dataset": "coco",
            },
            workers=workers,
            overwrite=overwrite,
        )
    return reports


# ---------------------------------------------------------------------------------------------
# (b) TFDS builder (array_record, no TensorFlow)

MANUAL_INSTRUCTIONS = f"""\
Download from https://cocodataset.org the 2014 images (train2014.zip, val2014.zip) and
annotations_trainval2014.zip, and Karpathy's split file {KARPATHY_FILE} (in
caption_datasets.zip). Extract them into the manual_dir so that it holds
`train2014/`, `val2014/`, `annotations/captions_train2014.json`,
`annotations/captions_val2014.json` and `{KARPATHY_FILE}` (or pass karpathy_json=...).
"""


@dataclasses.dataclass(eq=False)
class CocoKarpathyConfig(tfds.core.BuilderConfig):
    """Where restval goes (``train``, ``restval`` or None) and where captions come from."""

    restval: str | None = "train"
    caption_source: str = "coco"


class CocoKarpathyCaptions(
    tfds.core.GeneratorBasedBuilder, skip_registration=(__name__ == "__main__")
):
    """COCO 2014 captions in the Karpathy split, written as array_record (no TensorFlow needed).

    Each example: ``image`` (the COCO JPEG bytes as downloaded; read them undecoded with
    ``decoders={"image": tfds.decode.SkipDecoding()}``), ``image_id`` (cocoid), ``file_name``
    and ``captions``. Examples keep the order of the Karpathy file (shuffling is disabled).
    Images that are missing or do not decode are left out and logged.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        CocoKarpathyConfig(
            name="restval_in_train",
            description="Karpathy split; restval merged into train (113,287 / 5,000 / 5,000).",
            restval="train",
        ),
        CocoKarpathyConfig(
            name="restval_split",
            description="Karpathy split; restval kept as its own split.",
            restval="restval",
        ),
    ]
    DEFAULT_CONFIG_NAME = "restval_in_train"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (TFDS's default lookup needs ``importlib_resources`` for a package.)"""
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        karpathy_json: str | os.PathLike | None = None,
        workers: int = 1,
        file_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._karpathy_json = os.fspath(karpathy_json) if karpathy_json is not None else None
        self._workers = workers

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO 2014 image captions in the Karpathy train/val/test split.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image_id": np.int64,
                    "file_name": tfds.features.Text(),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            homepage="https://cocodataset.org",
            disable_shuffling=True,
        )

    def _karpathy_path(self, manual_dir: str) -> str:
        if self._karpathy_json is not None:
            return require_path(self._karpathy_json, "Karpathy split file")
        tried = [os.path.join(manual_dir, sub, KARPATHY_FILE) for sub in ("", "annotations")]
        for path in tried:
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"Karpathy split file not found; looked for {tried} (or pass karpathy_json=...)"
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual_dir = os.fspath(dl_manager.manual_dir)
        config = self.builder_config
        assert isinstance(config, CocoKarpathyConfig)
        plan = plan_splits(
            manual_dir,
            self._karpathy_path(manual_dir),
            restval=config.restval,
            caption_source=config.caption_source,
        )
        return {split: self._generate_examples(samples) for split, samples in plan.items()}

    def _generate_examples(
        self, samples: Sequence[SourceSample]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        options = ImageOptions(size=None, verify=True)
        for prepared in prepare_samples(samples, options, self._workers):
            sample = prepared.sample
            if prepared.skip_reason is not None or prepared.image is None:
                logging.warning(
                    "Leaving out %s (%s): %s %s",
                    sample.key,
                    prepared.skip_reason,
                    sample.image_path,
                    prepared.detail,
                )
                continue
            yield (
                sample.key,
                {
                    "image": prepared.image.data,
                    "image_id": int(sample.metadata["cocoid"]),
                    "file_name": str(sample.metadata["source_id"]),
                    "captions": prepared.captions,
                },
            )


def prepare_tfds(
    coco_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    karpathy_json: str | os.PathLike | None = None,
    config: str | CocoKarpathyConfig | None = None,
    workers: int = 1,
) -> CocoKarpathyCaptions:
    """Builds the TFDS dataset from the raw files in ``coco_dir`` into ``data_dir``."""
    coco_dir = require_path(coco_dir, "COCO folder", is_dir=True)
    builder = CocoKarpathyCaptions(
        data_dir=os.fspath(data_dir), config=config, karpathy_json=karpathy_json, workers=workers
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=coco_dir))
    return builder


if __name__ == "__main__":  # the command lives in refine_jax/commands/convert_coco.py
    import runpy

    runpy.run_module("refine_jax.commands.convert_coco", run_name="__main__", alter_sys=True)
