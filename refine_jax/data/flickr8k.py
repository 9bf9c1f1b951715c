"""Converts the raw Flickr8k files to tar shards in the layout of ``shared/data/flickr8k``.

Input (``--raw_dir``), as distributed in ``Flickr8k_Dataset.zip`` and ``Flickr8k_text.zip``:

* an images folder (``Flicker8k_Dataset/``, ``Flickr8k_Dataset/``, ``Images/`` or ``images/``,
  or ``--images_dir``) of ``NAME.jpg`` files;
* ``Flickr8k.token.txt``: lines ``NAME.jpg#i<TAB>caption``, five per image;
* ``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt``, ``Flickr_8k.testImages.txt``: the
  standard 6000 / 1000 / 1000 split, one file name per line.

The text files may sit in ``raw_dir`` or ``raw_dir/Flickr8k_text/``. Output (``--output_dir``):
``train/``, ``val/`` (the dev list), ``test/``, each with ``00000.tar ...`` (1000 samples per
shard, in the order of the split list) and ``references.json``; KEY is the file name without
``.jpg``. Images are squashed to 160x160 by default (``--image_size``, ``--resize``), JPEG
quality 90. Captions keep their original spacing (only stripped) in ``#0..#4`` order.
Annotation ids are numbered over train, val, test in that order (train 1-30000, val 30001-35000,
test 35001-40000), so they are unique across splits and independent of which splits are built.

Known quirk of the token file: the captions of ``2258277193_586949ec62.jpg`` are listed under
``2258277193_586949ec62.jpg.1``; any ``NAME.jpg<suffix>`` is attached to ``NAME.jpg``. ::

    python -m refine_jax.data.flickr8k --raw_dir=RAW --output_dir=OUT

(the command lives in :mod:`refine_jax.commands.convert_flickr8k`)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from absl import logging

from refine_jax.data.shard_writer import (
    ImageOptions,
    SourceSample,
    SplitReport,
    path_inside,
    require_path,
    write_split,
)

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
SPLITS = tuple(SPLIT_FILES)
IMAGE_DIR_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
TEXT_DIR_NAMES = ("", "Flickr8k_text")
DEFAULT_IMAGE_SIZE = 160
DEFAULT_QUALITY = 90
SAMPLES_PER_SHARD = 1000


@dataclass(frozen=True)
class RawFiles:
    """Where the raw Flickr8k files of one download are."""

    images_dir: str
    token_file: str
    split_files: Mapping[str, str]


def _find_text_file(raw_dir: str, name: str) -> str:
    tried = [os.path.join(raw_dir, sub, name) for sub in TEXT_DIR_NAMES]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Flickr8k file {name!r} not found; looked for {tried}")


def locate_raw_files(raw_dir: str | os.PathLike, images_dir: str | None = None) -> RawFiles:
    """Finds the images folder, token file and split lists; errors name what is missing."""
    raw = require_path(raw_dir, "Flickr8k raw folder", is_dir=True)
    if images_dir is not None:
        images = require_path(images_dir, "Flickr8k images folder", is_dir=True)
    else:
        tried = [os.path.join(raw, name) for name in IMAGE_DIR_NAMES]
        found = [p for p in tried if os.path.isdir(p)]
        if not found:
            raise FileNotFoundError(
                f"Flickr8k images folder not found; looked for {tried} (or pass images_dir)"
            )
        images = found[0]
    return RawFiles(
        images_dir=images,
        token_file=_find_text_file(raw, TOKEN_FILE),
        split_files={split: _find_text_file(raw, name) for split, name in SPLIT_FILES.items()},
    )


def image_file_name(name: str) -> str:
    """The image a token-file name refers to: ``X.jpg.1`` (the known quirk) -> ``X.jpg``."""
    i = name.lower().find(".jpg")
    return name[: i + 4] if i >= 0 else name


def parse_token_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{image file name: raw captions in #i order}`` from ``Flickr8k.token.txt``.

    Captions are kept raw (cleaning happens when writing). Malformed lines (no tab) are logged
    and left out.
    """
    path = require_path(path, "Flickr8k captions")
    numbered: dict[str, list[tuple[int, int, str]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read().replace("\r\n", "\n").replace("\r", "\n")
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            logging.warning("%s:%d: no tab between name and caption, line ignored", path, line_no)
            continue
        ref, caption = line.split("\t", 1)
        name, _, number = ref.strip().partition("#")
        image = image_file_name(name)
        if image != name:
            logging.info("%s:%d: captions of %r attached to %r", path, line_no, name, image)
        entries = numbered.setdefault(image, [])
        order = int(number) if number.strip().isdigit() else len(entries)
        entries.append((order, line_no, caption))
    return {name: [c for _, _, c in sorted(entries)] for name, entries in numbered.items()}


def read_split_list(path: str | os.PathLike) -> list[str]:
    """The image file names of a split list, in order; raises ValueError on a repeated name."""
    path = require_path(path, "Flickr8k split list")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{path}: image {name!r} is listed twice")
        seen.add(name)
    return names


def key_of(name: str) -> str:
    """KEY of an image file: its name without ``.jpg``."""
    base = os.path.basename(name)
    return base[:-4] if base.lower().endswith(".jpg") else base


def plan_splits(raw: RawFiles, image_repo: str | None = None) -> dict[str, list[SourceSample]]:
    """The samples of every split, in split-list order, with globally numbered annotation ids."""
    captions = parse_token_file(raw.token_file)
    lists = {split: read_split_list(raw.split_files[split]) for split in SPLITS}
    owner: dict[str, str] = {}
    for split, names in lists.items():
        for name in names:
            if name in owner:
                raise ValueError(f"image {name!r} is in both the {owner[name]} and {split} lists")
            owner[name] = split
    # A listed name must not lead the converter to read outside the images folder.
    outside = {n for names in lists.values() for n in names if not path_inside(raw.images_dir, n)}
    if outside:
        logging.warning(
            "%d image name(s) of the split lists lead outside the images folder %s (e.g. %r); "
            "refused and left out",
            len(outside),
            raw.images_dir,
            min(outside),
        )
    next_id = 1
    plan: dict[str, list[SourceSample]] = {}
    for split in SPLITS:
        samples = []
        for name in lists[split]:
            caps = captions.get(name, [])
            ids = list(range(next_id, next_id + len(caps)))
            next_id += len(caps)  # numbered even when left out, so later ids stay the same
            if name in outside:
                continue
            meta: dict[str, object] = {
                "source_id": name,
                "width": None,
                "height": None,
                "split": split,
                "dataset": "flickr8k",
            }
            if image_repo:
                meta["image_repo"] = image_repo
            meta["source_width"] = meta["source_height"] = None
            samples.append(
                SourceSample(
                    key=key_of(name),
                    image_path=os.path.join(raw.images_dir, name),
                    captions=caps,
                    metadata=meta,
                    annotation_ids=ids,
                )
            )
        plan[split] = samples
    return plan


def convert(
    raw_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    resize: str = "squash",
    quality: int = DEFAULT_QUALITY,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    images_dir: str | None = None,
    image_repo: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, SplitReport]:
    """Converts the raw Flickr8k files to ``output_dir/<split>/`` shards; returns per-split reports.

    ``image_size=None`` keeps the original JPEG files. ``image_repo`` (optional) is recorded in
    every ``KEY.json`` as the place the pixels came from. Missing or corrupt images and images
    without captions are skipped and counted in the reports.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown Flickr8k split(s) {unknown}; choose from {list(SPLITS)}")
    raw = locate_raw_files(raw_dir, images_dir)
    plan = plan_splits(raw, image_repo)
    options = ImageOptions(size=image_size, resize=resize, quality=quality)
    reports = {}
    for split in splits:
        reports[split] = write_split(
            plan[split],
            os.path.join(os.fspath(output_dir), split),
            image_options=options,
            samples_per_shard=samples_per_shard,
            info={
                "description": f"Flickr8k {split} references (raw Flickr8k.token.txt captions)",
                "dataset": "flickr8k",
            },
            workers=workers,
            overwrite=overwrite,
        )
    return reports


if __name__ == "__main__":  # the command lives in refine_jax/commands/convert_flickr8k.py
    import runpy

    runpy.run_module("refine_jax.commands.convert_flickr8k", run_name="__main__", alter_sys=True)
