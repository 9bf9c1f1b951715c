"""Writes image–caption samples as deterministic webdataset / img2dataset tar shards.

One writer for every converter of the package (COCO, Flickr8k, ...), so all shards share the
layout that :class:`~refine_jax.data.shards.TarShardSource` reads and ``shared/data/flickr8k``
documents:

* ``<split_dir>/00000.tar, 00001.tar, ...``: N samples per shard, each sample three members
  ``KEY.jpg`` (the image), ``KEY.txt`` (the first caption) and ``KEY.json``
  (``{"key", "captions", ...metadata}``);
* ``<split_dir>/references.json``: COCO-caption style ground truth of the split
  (``images`` ``[{id: KEY, file_name: KEY.jpg}]``, ``annotations`` ``[{image_id, id, caption}]``),
  images in shard order, which loads with pycocotools ``COCO()``.

The bytes depend only on the samples: tar members have mtime 2000-01-01, uid/gid 0, no owner
names and mode 0644, so a rebuild is byte-identical. Files appear only when complete (written
under a temporary name, then renamed).

:func:`write_split` adds the part both converters share: read and prepare every image (optionally
resized, see :class:`ImageOptions`) on a thread pool, clean the captions with
:func:`~refine_jax.data.records.check_caption`, and skip-and-count samples whose image is missing
or corrupt or whose captions are all unusable (never a crash, never silent).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from absl import logging
from PIL import Image

from refine_jax.data.records import (
    IMAGE_FORMATS,
    CorruptImageError,
    SkipCounter,
    SkipReason,
    check_caption,
    decode_image,
)
from refine_jax.paths import write_atomically

MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed member time, so rebuilt shards are identical
MEMBER_MODE = 0o644
REFERENCES_NAME = "references.json"
SIZE_FIELDS = ("width", "height", "source_width", "source_height")
RESIZE_MODES = ("squash", "shorter_side")
_CHUNK = 256  # samples prepared per batch of the thread pool (bounds memory)


class OutputExistsError(FileExistsError):
    """An output folder already holds shards of an earlier run (and overwrite was not asked).

    :meth:`describe` lets a command name its own way to overwrite (a flag, not a keyword).
    """

    def __init__(self, folder: str, files: Sequence[str]) -> None:
        self.folder = folder
        self.files = list(files)
        super().__init__(self.describe("pass overwrite=True"))

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:  # survives a process pool
        return type(self), (self.folder, self.files)

    def describe(self, how_to_overwrite: str) -> str:
        """The message, ending ``; {how_to_overwrite} to replace them``."""
        more = " ..." if len(self.files) > 3 else ""
        return (
            f"output folder {self.folder!r} already holds {self.files[:3]}{more}; "
            f"{how_to_overwrite} to replace them"
        )


def earlier_outputs(folder: str | os.PathLike) -> list[str]:
    """The files of an earlier run in an output folder (shards, their indexes, references)."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        name
        for name in os.listdir(folder)
        if name.endswith((".tar", ".tar.index.json", ".tar.tmp"))
        or name in (REFERENCES_NAME, REFERENCES_NAME + ".tmp")
    )


def refuse_earlier_outputs(folders: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """OutputExistsError for the first folder holding an earlier run's files (unless
    `overwrite`), checked before a conversion writes any split, so none is left half-redone."""
    if overwrite:
        return
    for folder in folders:
        old = earlier_outputs(folder)
        if old:
            raise OutputExistsError(os.fspath(folder), old)


def shard_name(index: int) -> str:
    """``00000.tar`` for shard 0."""
    return f"{index:05d}.tar"


def check_key(key: str) -> str:
    """Returns ``key`` if it can name tar members; raises ValueError otherwise.

    The reader splits a member name at the first dot of its base name, so a KEY must be non-empty
    and contain no dot, slash or NUL.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    bad = [c for c in (".", "/", "\\", "\x00") if c in key]
    if bad:
        raise ValueError(f"sample key {key!r} contains {bad[0]!r}, which cannot be in a KEY")
    return key


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes one split's samples to numbered tar shards plus its ``references.json``.

    Use as a context manager (or call :meth:`close`): the last shard and ``references.json`` are
    written on a clean exit; after an exception the partial shard is removed and no
    ``references.json`` is written, so an incomplete split is never mistaken for a complete one.

    Args:
      output_dir: the split folder (created).
      samples_per_shard: N samples per tar (the last one may hold fewer).
      info: the ``info`` object of ``references.json``.
      first_annotation_id: id of the first caption when :meth:`write` gets no explicit ids.
      overwrite: replace shards, indexes and references of an earlier run; without it an output
        folder that already holds them is an error (mixing two runs would corrupt the split).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        samples_per_shard: int = 1000,
        *,
        info: Mapping[str, Any] | None = None,
        first_annotation_id: int = 1,
        overwrite: bool = False,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.output_dir = os.fspath(output_dir)
        self.samples_per_shard = samples_per_shard
        self._info = dict(info or {})
        self._next_ann_id = first_annotation_id
        self._prepare_dir(overwrite)
        self._keys: set[str] = set()
        self._images: list[dict[str, str]] = []
        self._annotations: list[dict[str, Any]] = []
        self._ann_ids: set[int] = set()
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._closed = False
        self.shard_paths: list[str] = []

    def _prepare_dir(self, overwrite: bool) -> None:
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(f"output path is not a directory: {self.output_dir!r}")
        os.makedirs(self.output_dir, exist_ok=True)
        old = earlier_outputs(self.output_dir)
        if old and not overwrite:
            raise OutputExistsError(self.output_dir, old)
        for name in old:
            os.remove(os.path.join(self.output_dir, name))

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return len(self._images)

    def write(
        self,
        key: str,
        image_bytes: bytes,
        captions: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        annotation_ids: Sequence[int] | None = None,
        image_ext: str = "jpg",
    ) -> None:
        """Adds one sample: ``KEY.<image_ext>``, ``KEY.txt`` (first caption) and ``KEY.json``.

        ``KEY.json`` is ``{"key", "captions", **metadata}`` in that order. Captions are written as
        given (clean them first); ``annotation_ids`` (one per caption, unique over the split)
        default to consecutive ids.
        """
        if self._closed:
            raise ValueError("ShardWriter is closed")
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.output_dir!r}")
        captions = list(captions)
        if not captions or not all(isinstance(c, str) and c for c in captions):
            raise ValueError(f"sample {key!r} needs one or more non-empty captions: {captions!r}")
        if annotation_ids is None:
            annotation_ids = range(self._next_ann_id, self._next_ann_id + len(captions))
        ids = [int(i) for i in annotation_ids]
        if len(ids) != len(captions):
            raise ValueError(f"{len(ids)} annotation ids for {len(captions)} captions of {key!r}")
        if len(set(ids)) != len(ids) or self._ann_ids.intersection(ids):
            raise ValueError(f"annotation ids {ids} of {key!r} repeat ids already used")
        meta = {"key": key, "captions": captions}
        for name, value in (metadata or {}).items():
            if name not in meta:
                meta[name] = value
        try:  # before any member is written: a sample goes in whole or not at all
            meta_bytes = json.dumps(meta).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata of {key!r} is not JSON-serialisable: {e}") from e

        if self._tar is None:
            path = os.path.join(self.output_dir, shard_name(len(self.shard_paths)))
            self._tar = tarfile.open(path + ".tmp", "w", format=tarfile.GNU_FORMAT)
            self._in_shard = 0
        add_member(self._tar, f"{key}.{image_ext}", bytes(image_bytes))
        add_member(self._tar, f"{key}.txt", captions[0].encode("utf-8"))
        add_member(self._tar, f"{key}.json", meta_bytes)
        self._in_shard += 1

        self._keys.add(key)
        self._images.append({"id": key, "file_name": f"{key}.{image_ext}"})
        for ann_id, caption in zip(ids, captions, strict=True):
            self._annotations.append({"image_id": key, "id": ann_id, "caption": caption})
        self._ann_ids.update(ids)
        self._next_ann_id = max(self._next_ann_id, max(ids) + 1)
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        tmp = self._tar.name
        self._tar.close()
        self._tar = None
        final = os.fspath(tmp).removesuffix(".tmp")
        os.replace(tmp, final)
        self.shard_paths.append(final)

    def references(self) -> dict[str, Any]:
        """The split's COCO-caption style ground truth (what ``references.json`` holds)."""
        return {
            "info": self._info,
            "licenses": [],
            "type": "captions",
            "images": list(self._images),
            "annotations": list(self._annotations),
        }

    def close(self) -> list[str]:
        """Finishes the last shard, writes ``references.json``; returns the shard paths."""
        if self._closed:
            return list(self.shard_paths)
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        refs = json.dumps(self.references()).encode("utf-8")
        write_atomically(os.path.join(self.output_dir, REFERENCES_NAME), refs)
        return list(self.shard_paths)

    def abort(self) -> None:
        """Drops the unfinished shard (finished shards stay; no ``references.json``)."""
        if self._tar is not None:
            tmp = self._tar.name
            self._tar.close()
            self._tar = None
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageOptions:
    """How a converter stores images.

    ``size=None`` keeps JPEG files byte for byte (other formats are re-encoded as JPEG); otherwise
    the image is resized: ``"squash"`` to ``size`` x ``size`` ignoring the aspect ratio (as in the
    Flickr8k copy), ``"shorter_side"`` so that its shorter side is ``size``. Resized images are
    RGB JPEG at ``quality`` (optimize=True, 4:2:0, no EXIF), resampled with LANCZOS.
    ``verify`` fully decodes kept images so corrupt ones are skipped rather than written.
    """

    size: int | None = None
    resize: str = "squash"
    quality: int = 90
    verify: bool = True

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"image size must be >= 1 or None, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {self.quality}")


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for a shard: JPEG bytes, its size and the source file's size."""

    data: bytes
    width: int
    height: int
    source_width: int
    source_height: int


def _target_size(width: int, height: int, options: ImageOptions) -> tuple[int, int]:
    size = options.size
    assert size is not None
    if options.resize == "squash":
        return size, size
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, options: ImageOptions) -> PreparedImage:
    """Turns encoded image bytes into the JPEG stored in a shard (see :class:`ImageOptions`).

    Decoding goes through :func:`~refine_jax.data.records.decode_image` (EXIF orientation, alpha,
    grayscale and CMYK handled), so it raises :class:`CorruptImageError` for bad bytes.
    """
    if options.size is None:
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                fmt, (width, height) = im.format, im.size
        except Exception as e:  # Pillow raises several types for unreadable headers
            raise CorruptImageError(f"cannot read image header ({len(data)} bytes): {e}") from e
        if fmt == "JPEG":
            if options.verify:
                decode_image(data)
            return PreparedImage(data, width, height, width, height)
    pixels = decode_image(data)
    src_h, src_w = pixels.shape[:2]
    im = Image.fromarray(pixels)
    if options.size is not None:
        target = _target_size(src_w, src_h, options)
        if target != im.size:
            im = im.resize(target, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=options.quality, optimize=True)
    return PreparedImage(buf.getvalue(), im.width, im.height, src_w, src_h)


# ---------------------------------------------------------------------------------------------
# Converting a list of source files


@dataclass(frozen=True)
class SourceSample:
    """One sample to convert: its KEY, image file, raw captions and metadata.

    ``metadata`` goes into ``KEY.json`` after ``key`` and ``captions``, in its order; the size
    fields ``width``, ``height``, ``source_width``, ``source_height`` are filled in from the
    prepared image (in place when present in ``metadata``, else appended).
    ``annotation_ids`` (one per raw caption) keep ids stable when a caption is dropped.
    ``skip_reason``, when set, is why the converter refused the sample while planning (its
    image is never read): it is counted and listed in the report like any other skip.
    """

    key: str
    image_path: str
    captions: Sequence[str]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    annotation_ids: Sequence[int] | None = None
    skip_reason: str | None = None


@dataclass
class SplitReport:
    """What :func:`write_split` did: shards written, exact counts, and which samples it skipped."""

    split_dir: str
    shard_paths: list[str] = field(default_factory=list)
    counts: SkipCounter = field(default_factory=SkipCounter)
    skipped_keys: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (at most 20 skipped keys listed)."""
        return {
            "split_dir": self.split_dir,
            "shards": len(self.shard_paths),
            "counts": self.counts.to_dict(),
            "skipped_keys": dict(list(self.skipped_keys.items())[:20]),
        }


@dataclass
class PreparedSample:
    """A source sample after caption cleaning and image preparation.

    ``skip_reason`` is set (and ``image`` None) when the sample cannot be written; ``ids`` are the
    annotation ids of the kept ``captions`` (None: number them consecutively); ``dropped`` holds
    the reasons of rejected captions of a kept sample.
    """

    sample: SourceSample
    image: PreparedImage | None
    captions: list[str]
    ids: list[int] | None
    dropped: list[str]
    skip_reason: str | None
    detail: str = ""


def prepare_sample(sample: SourceSample, options: ImageOptions) -> PreparedSample:
    """Cleans the captions, then reads and prepares the image (the thread-pool part)."""
    if sample.skip_reason is not None:
        return PreparedSample(sample, None, [], None, [], sample.skip_reason, "refused")
    captions: list[str] = []
    ids: list[int] | None = [] if sample.annotation_ids is not None else None
    problems: list[str] = []
    raw_ids = list(sample.annotation_ids) if sample.annotation_ids is not None else None
    if raw_ids is not None and len(raw_ids) != len(sample.captions):
        raise ValueError(
            f"{len(raw_ids)} annotation ids for {len(sample.captions)} captions of {sample.key!r}"
        )
    for i, raw in enumerate(sample.captions):
        text, reason = check_caption(raw)
        if reason is None:
            captions.append(text)
            if ids is not None and raw_ids is not None:
                ids.append(raw_ids[i])
        else:
            problems.append(str(reason))
    if not captions:
        reason = problems[0] if problems else str(SkipReason.MISSING_CAPTION)
        return PreparedSample(sample, None, [], None, [], reason, "no usable caption")
    try:
        with open(sample.image_path, "rb") as f:
            data = f.read()
    except OSError as e:
        return PreparedSample(sample, None, [], None, [], str(SkipReason.MISSING_IMAGE), str(e))
    try:
        image = prepare_image(data, options)
    except CorruptImageError as e:
        return PreparedSample(sample, None, [], None, [], str(SkipReason.CORRUPT_IMAGE), str(e))
    return PreparedSample(sample, image, captions, ids, problems, None)


def prepare_samples(
    samples: Iterable[SourceSample], options: ImageOptions, workers: int
) -> Iterator[PreparedSample]:
    """Prepares samples on ``workers`` threads, yielding them in input order."""
    if workers <= 1:
        for sample in samples:
            yield prepare_sample(sample, options)
        return
    with ThreadPoolExecutor(workers) as pool:
        chunk: list[SourceSample] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == _CHUNK:
                yield from pool.map(lambda s: prepare_sample(s, options), chunk)
                chunk = []
        yield from pool.map(lambda s: prepare_sample(s, options), chunk)


def sample_metadata(prepared: PreparedSample) -> dict[str, Any]:
    """The sample's metadata with the image size fields filled in (see :class:`SourceSample`)."""
    assert prepared.image is not None
    meta = dict(prepared.sample.metadata)
    img = prepared.image
    sizes = (img.width, img.height, img.source_width, img.source_height)
    for name, value in zip(SIZE_FIELDS, sizes, strict=True):
        meta[name] = value
    return meta


def write_split(
    samples: Iterable[SourceSample],
    split_dir: str | os.PathLike,
    *,
    image_options: ImageOptions | None = None,
    samples_per_shard: int = 1000,
    info: Mapping[str, Any] | None = None,
    first_annotation_id: int = 1,
    workers: int = 1,
    overwrite: bool = False,
) -> SplitReport:
    """Converts source files to one split's tar shards and ``references.json``.

    Samples are written in input order. A sample is skipped (and counted, with its KEY in the
    report) when its image file is missing (``missing_image``) or undecodable
    (``corrupt_image``), none of its captions is usable, or the converter refused it while
    planning (its ``skip_reason``, e.g. ``unusable_name``); a bad caption among good ones is
    dropped and counted. Raises ValueError when no sample at all could be written.
    """
    options = image_options or ImageOptions()
    report = SplitReport(os.fspath(split_dir))
    with ShardWriter(
        split_dir,
        samples_per_shard,
        info=info,
        first_annotation_id=first_annotation_id,
        overwrite=overwrite,
    ) as writer:
        for prepared in prepare_samples(samples, options, workers):
            key = prepared.sample.key
            if prepared.skip_reason is not None:
                report.counts.skip(prepared.skip_reason)
                report.skipped_keys[key] = prepared.skip_reason
                logging.warning(
                    "Skipping %s (%s): %s %s",
                    key,
                    prepared.skip_reason,
                    prepared.sample.image_path,
                    prepared.detail,
                )
                continue
            assert prepared.image is not None
            writer.write(
                key,
                prepared.image.data,
                prepared.captions,
                sample_metadata(prepared),
                prepared.ids,
            )
            report.counts.good += 1
            for reason in prepared.dropped:
                report.counts.drop(reason)
        if writer.num_samples == 0:
            writer.abort()
            raise ValueError(
                f"no sample could be written to {os.fspath(split_dir)!r}: {report.counts.to_json()}"
            )
    report.shard_paths = list(writer.shard_paths)
    logging.info(
        "Wrote %d samples in %d shard(s) to %s: %s",
        writer.num_samples,
        len(writer.shard_paths),
        report.split_dir,
        report.counts.to_json(),
    )
    return report


def path_inside(folder: str | os.PathLike, *parts: str) -> bool:
    """Whether folder/parts stays inside folder as written (no ``..`` out, no absolute part), so
    a converter never reads outside its input folder; symbolic links inside it are followed."""
    base = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.join(base, *parts))
    return os.path.commonpath([base, path]) == base


def require_path(path: str | os.PathLike, what: str, is_dir: bool = False) -> str:
    """Returns ``path`` as a string; raises FileNotFoundError naming it (and ``what``) if absent."""
    s = os.fspath(path)
    ok = os.path.isdir(s) if is_dir else os.path.isfile(s)
    if not ok:
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{what}: {kind} not found: {s!r}")
    return s
