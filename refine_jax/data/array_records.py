"""ArrayRecord files of image–caption records: the record encoding and the grain source.

The files are written by the converter (`refine_jax.data.array_record_convert`), one
``<shard>.array_record`` per tar shard with ``<shard>.array_record.stats.json`` beside it.

Record encoding, all integers unsigned 32-bit little-endian::

    b"RJC1" or b"RJC2"                        magic and version
    len(key)      key as UTF-8
    len(image)    image bytes as stored in the shard (JPEG/PNG/WebP)
    n_captions    then, n_captions times: len(caption)  caption as UTF-8
    n_teacher     version 2 only; then, n_teacher times: len(caption)  a teacher's caption

A record with teacher captions (from `refine_jax.caption_shards`) is written as version 2, any
other as version 1, so converting shards without them gives the same bytes as before.
"""

from __future__ import annotations

import json
import struct
from typing import SupportsIndex

from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath

from refine_jax.data.records import (
    TEACHER_CAPTIONS_FIELD,
    Record,
    SkipCounter,
    Skipped,
    SkipReason,
    checked_index,
    skipped,
)
from refine_jax.data.shards import NoSamplesError, PathsArg, expand_paths

MAGIC = b"RJC1"
MAGIC_WITH_TEACHERS = b"RJC2"
SUFFIX = ".array_record"
STATS_SUFFIX = ".stats.json"
_U32 = struct.Struct("<I")


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_record(record: Record) -> bytes:
    """Serialises a record (key, image bytes, captions, teacher captions if any) in the
    documented format."""
    teachers = record.get(TEACHER_CAPTIONS_FIELD) or []
    parts = [MAGIC_WITH_TEACHERS if teachers else MAGIC]

    def add(blob: bytes) -> None:
        if len(blob) > 0xFFFFFFFF:
            raise ValueError(f"field of {len(blob)} bytes is too long to encode")
        parts.append(_U32.pack(len(blob)))
        parts.append(blob)

    add(record["key"].encode("utf-8"))
    add(bytes(record["image_bytes"]))
    for captions in (record["captions"], teachers) if teachers else (record["captions"],):
        parts.append(_U32.pack(len(captions)))
        for caption in captions:
            add(caption.encode("utf-8"))
    return b"".join(parts)


def decode_record(data: bytes) -> Record:
    """Inverse of :func:`encode_record`; raises ValueError on malformed data."""
    view = memoryview(data)
    magic = bytes(view[:4])
    if magic not in (MAGIC, MAGIC_WITH_TEACHERS):
        raise ValueError(f"not a refine_jax caption record (magic {bytes(view[:4])!r})")
    pos = 4

    def take_u32() -> int:
        nonlocal pos
        if pos + 4 > len(view):
            raise ValueError("record ends inside a length field")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        return n

    def take() -> bytes:
        nonlocal pos
        n = take_u32()
        if pos + n > len(view):
            raise ValueError("record ends inside a field")
        blob = bytes(view[pos : pos + n])
        pos += n
        return blob

    key = take().decode("utf-8")
    image = take()
    captions = [take().decode("utf-8") for _ in range(take_u32())]
    record: Record = {"key": key, "image_bytes": image, "captions": captions}
    if magic == MAGIC_WITH_TEACHERS:
        record[TEACHER_CAPTIONS_FIELD] = [take().decode("utf-8") for _ in range(take_u32())]
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} trailing bytes after the record")
    return record


# ---------------------------------------------------------------------------------------------
# Source


def stats_path(array_record_path: str) -> str:
    """The per-file stats JSON written by the converter beside an ArrayRecord file."""
    return array_record_path + STATS_SUFFIX


class ArrayRecordCaptionSource:
    """Grain ``RandomAccessDataSource`` of records from ArrayRecord files written by the converter.

    ``paths``: a directory of ``*.array_record`` files, a glob, a file, or a list of these.
    ``source[i]`` returns a record, or a ``corrupt_record`` skip marker if the bytes do not decode.
    """

    def __init__(self, paths: PathsArg) -> None:
        self._paths = expand_paths(paths, SUFFIX)
        self._source = ArrayRecordDataSource(self._paths)
        if len(self._source) == 0:
            raise NoSamplesError(f"no records in {paths!r} ({', '.join(self._paths[:5])})")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> Record | Skipped:
        i = checked_index(index, len(self))
        try:
            return decode_record(self._source[i])
        except (ValueError, UnicodeDecodeError):
            return skipped(f"#{i}", SkipReason.CORRUPT_RECORD)

    @property
    def paths(self) -> list[str]:
        """The ArrayRecord files of this source, in order."""
        return list(self._paths)

    def structural_counts(self) -> SkipCounter:
        """What the converter left out of these files (from their stats JSON; good = 0)."""
        total = SkipCounter()
        for path in self._paths:
            p = epath.Path(stats_path(path))
            if p.exists():
                counts = SkipCounter.from_dict(json.loads(p.read_text()))
                counts.good = 0
                total.merge(counts)
        return total

    def __repr__(self) -> str:
        return f"ArrayRecordCaptionSource({len(self._paths)} files, {len(self)} records)"
