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
``.jpg`` (any ``%``, ``.`` or slash percent-escaped, see :func:`key_of`). Images are squashed
to 160x160 by default (``--image_size``, ``--resize``), JPEG quality 90. Captions keep their
original spacing (only stripped) in ``#0..#4`` order.
Annotation ids are numbered over train, val, test in that order (train 1-30000, val 30001-35000,
test 35001-40000), so they are unique across splits and independent of which splits are built.

Known quirk of the token file: the captions of ``2258277193_586949ec62.jpg`` are listed under
``2258277193_586949ec62.jpg.1``; any ``NAME.jpg<suffix>`` is attached to ``NAME.jpg``. Each
caption number is kept once: a repeated ``NAME#i`` line is ignored (with a warning), and
``NAME.jpg#i`` wins over ``NAME.jpg.1#i``. A caption that is not UTF-8 is dropped and counted
(``non_utf8_caption``); a UTF-8 byte-order mark is ignored. ::

    python -m refine_jax.data.flickr8k --raw_dir=RAW --output_dir=OUT

(the command lives in :mod:`refine_jax.commands.convert_flickr8k`)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from absl import logging

from refine_jax.data.records import SkipReason, check_caption
from refine_jax.data.shard_writer import (
    ImageOptions,
    SourceSample,
    SplitReport,
    path_inside,
    refuse_earlier_outputs,
    require_path,
    write_split,
)

TOKEN_FILE = "Flickr8k.token.txt"
UTF8_BOM = b"\xef\xbb\xbf"
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
# Characters of an image name escaped in its KEY: those a KEY cannot hold, and the escape itself.
_KEY_ESCAPES = {c: f"%{ord(c):02X}" for c in "%./\\\x00"}


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


@dataclass(frozen=True)
class _TokenLine:
    """One caption line of the token file: where it sorts, where it is, what it says."""

    order: int
    line_no: int
    ref: str
    caption: str
    quirk: bool  # listed under a name such as X.jpg.1 rather than the image's own X.jpg


def parse_token_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{image file name: raw captions in #i order}`` from ``Flickr8k.token.txt``.

    Captions are kept raw (cleaning happens when writing). Malformed lines (no tab) are logged
    and left out; a UTF-8 byte-order mark is ignored. A caption that is not valid UTF-8 is kept
    with surrogate escapes, so the writer drops and counts it as ``non_utf8_caption`` (and the
    annotation ids of the image's other captions stay the same). An image gets one caption per
    number: a repeated ``NAME#i`` line is ignored (counted in a warning), and when both
    ``X.jpg#i`` and a quirk name such as ``X.jpg.1#i`` exist, ``X.jpg#i`` wins.
    """
    path = require_path(path, "Flickr8k captions")
    with open(path, "rb") as f:
        data = f.read().removeprefix(UTF8_BOM)
    text = data.decode("utf-8", errors="surrogateescape")
    # Per image: caption number (or, for a line without one, its text) -> the line kept for it.
    kept: dict[str, dict[int | str, _TokenLine]] = {}
    ignored: list[_TokenLine] = []
    for line_no, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            logging.warning("%s:%d: no tab between name and caption, line ignored", path, line_no)
            continue
        ref, caption = line.split("\t", 1)
        if check_caption(caption)[1] == SkipReason.NON_UTF8_CAPTION:
            logging.warning(
                "%s:%d: caption is not valid UTF-8; it is dropped (%s)",
                path,
                line_no,
                SkipReason.NON_UTF8_CAPTION,
            )
        ref = ref.strip()
        name, _, number = ref.partition("#")
        image = image_file_name(name)
        if image != name:
            logging.info("%s:%d: captions of %r attached to %r", path, line_no, name, image)
        lines = kept.setdefault(image, {})
        numbered = number.strip().isdigit()
        slot: int | str = int(number) if numbered else caption.strip()
        order = int(number) if numbered else len(lines)
        entry = _TokenLine(order, line_no, ref, caption, quirk=image != name)
        earlier = lines.get(slot)
        if earlier is None:
            lines[slot] = entry
        elif earlier.quirk and not entry.quirk:  # X.jpg#i beats X.jpg.1#i
            lines[slot] = entry
            ignored.append(earlier)
        else:  # otherwise the first line of a NAME#i wins
            ignored.append(entry)
    if ignored:
        logging.warning(
            "%s: %d repeated caption line(s) ignored, one caption per NAME#i is kept "
            "(first: line %d, %r)",
            path,
            len(ignored),
            ignored[0].line_no,
            ignored[0].ref,
        )
    return {
        image: [e.caption for e in sorted(lines.values(), key=lambda e: (e.order, e.line_no))]
        for image, lines in kept.items()
    }


def read_split_list(path: str | os.PathLike) -> list[str]:
    """The image file names of a split list, in order; raises ValueError on a repeated name."""
    path = require_path(path, "Flickr8k split list")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of a name
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{path}: image {name!r} is listed twice")
        seen.add(name)
    return names


def key_of(name: str) -> str:
    """KEY of an image file: its name without ``.jpg``, any ``%``, ``.``, ``/``, ``\\`` escaped.

    A KEY cannot hold a dot or a slash (see :func:`~refine_jax.data.shard_writer.check_key`).
    Standard Flickr8k names have none of these characters, so their KEY is the plain name; the
    percent-escape is one-to-one, so other names still get unique, stable KEYs
    (``a.v2.jpg`` -> ``a%2Ev2``).
    """
    stem = name[:-4] if name.lower().endswith(".jpg") else name
    return "".join(_KEY_ESCAPES.get(c, c) for c in stem)


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
            "refused, left out and counted as unusable_name",
            len(outside),
            raw.images_dir,
            min(outside),
        )
    # Nor may it leave a sample without a KEY of its own (".jpg"; "a.JPG" after "a.jpg").
    first_with_key: dict[str, str] = {}
    keyless: set[str] = set()
    for name in (n for names in lists.values() for n in names):
        key = key_of(name)
        if not key or first_with_key.setdefault(key, name) != name:
            keyless.add(name)
    if keyless:
        logging.warning(
            "%d image name(s) of the split lists give an empty KEY or that of another name "
            "(e.g. %r); refused, left out and counted as unusable_name",
            len(keyless),
            min(keyless),
        )
    next_id = 1
    plan: dict[str, list[SourceSample]] = {}
    for split in SPLITS:
        samples = []
        for name in lists[split]:
            caps = captions.get(name, [])
            ids = list(range(next_id, next_id + len(caps)))
            next_id += len(caps)  # numbered even when left out, so later ids stay the same
            if name in outside or name in keyless:  # counted in the report under its name
                samples.append(
                    SourceSample(
                        key=name,
                        image_path=name,
                        captions=caps,
                        annotation_ids=ids,
                        skip_reason=str(SkipReason.UNUSABLE_NAME),
                    )
                )
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
    refuse_earlier_outputs((os.path.join(output_dir, s) for s in splits), overwrite)
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
