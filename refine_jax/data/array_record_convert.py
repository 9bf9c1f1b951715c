"""ArrayRecord files of image–caption records, and a converter from tar shards.

Tar shards need a member index and one read per sample; at scale ArrayRecord is the better
random-access format for grain. The converter writes one ``<shard>.array_record`` file per
``<shard>.tar`` (only good records, in shard order) plus ``<shard>.array_record.stats.json`` with
the exact skip counts of that shard::

    python -m refine_jax.data.array_record_convert --input=SHARDS --output=DIR [--workers=N]

(the command lives in :mod:`refine_jax.commands.convert_array_record`)

``--input`` is a directory, glob or shard path (comma-separated for several). It is resumable:
each output is written under a temporary name and renamed when complete, and a shard whose
output exists is skipped.

Record encoding (version 1), all integers unsigned 32-bit little-endian::

    b"RJC1"                                   magic and version
    len(key)      key as UTF-8
    len(image)    image bytes as stored in the shard (JPEG/PNG/WebP)
    n_captions    then, n_captions times: len(caption)  caption as UTF-8
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from refine_jax.data.records import (
    Record,
    SkipCounter,
    Skipped,
    SkipReason,
    checked_index,
    skipped,
)
from refine_jax.data.shards import (
    NoSamplesError,
    PathsArg,
    TarShardSource,
    expand_paths,
    load_or_build_index,
)
from refine_jax.paths import write_atomically

MAGIC = b"RJC1"
SUFFIX = ".array_record"
STATS_SUFFIX = ".stats.json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: what grain needs for fast random reads
_U32 = struct.Struct("<I")


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_record(record: Record) -> bytes:
    """Serialises a record (key, image bytes, captions) in the documented format."""
    parts = [MAGIC]

    def add(blob: bytes) -> None:
        if len(blob) > 0xFFFFFFFF:
            raise ValueError(f"field of {len(blob)} bytes is too long to encode")
        parts.append(_U32.pack(len(blob)))
        parts.append(blob)

    add(record["key"].encode("utf-8"))
    add(bytes(record["image_bytes"]))
    parts.append(_U32.pack(len(record["captions"])))
    for caption in record["captions"]:
        add(caption.encode("utf-8"))
    return b"".join(parts)


def decode_record(data: bytes) -> Record:
    """Inverse of :func:`encode_record`; raises ValueError on malformed data."""
    view = memoryview(data)
    if bytes(view[:4]) != MAGIC:
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
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} trailing bytes after the record")
    return {"key": key, "image_bytes": image, "captions": captions}


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


# ---------------------------------------------------------------------------------------------
# Converter


def output_path_for(shard: str, output_dir: str) -> str:
    """``DIR/00000.array_record`` for shard ``.../00000.tar``."""
    base = shard.rstrip("/").rsplit("/", 1)[-1]
    base = base.removesuffix(".tar")
    return f"{output_dir.rstrip('/')}/{base}{SUFFIX}"


def convert_shard(
    shard: str,
    output: str,
    cache_dir: str | None = None,
    verify_images: bool = True,
) -> tuple[str, SkipCounter]:
    """Converts one tar shard to one ArrayRecord file; returns ``(status, counts)``.

    ``status`` is ``"converted"`` or ``"skipped"`` (output already complete: its counts are read
    back from the stats file). The output appears only when complete (temporary name, rename).
    """
    out = epath.Path(output)
    if out.exists():
        sp = epath.Path(stats_path(output))
        counts = SkipCounter.from_dict(json.loads(sp.read_text())) if sp.exists() else SkipCounter()
        return "skipped", counts

    try:
        source = TarShardSource(shard, cache_dir=cache_dir, verify_images=verify_images)
        counts = source.structural_counts()
    except NoSamplesError as e:
        logging.warning("%s", e)
        source = None
        counts = _index_counts(shard, cache_dir)

    remote = "://" in output
    tmp_dir = tempfile.mkdtemp(prefix="array_record_") if remote else None
    tmp_name = f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    local_tmp = os.path.join(tmp_dir, tmp_name) if tmp_dir else os.fspath(out.parent / tmp_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = ArrayRecordWriter(local_tmp, WRITER_OPTIONS)
        try:
            if source is not None:
                for i in range(len(source)):
                    element = source[i]
                    if counts.observe(element):
                        writer.write(encode_record(element))
        finally:
            writer.close()
        if source is not None:
            source.close()
        write_atomically(stats_path(output), json.dumps(counts.to_dict(), indent=1))
        if remote:
            staged = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
            epath.Path(local_tmp).copy(staged)
            epath.Path(staged).replace(output)
        else:
            os.replace(local_tmp, output)
    finally:
        if os.path.exists(local_tmp):
            os.remove(local_tmp)
        if tmp_dir:
            os.rmdir(tmp_dir)
    return "converted", counts


def _index_counts(shard: str, cache_dir: str | None) -> SkipCounter:
    """Structural counts of a shard with no readable sample (its index is cached by now)."""
    index, _ = load_or_build_index(shard, cache_dir)
    counts = SkipCounter()
    for reason, n in index.skipped.items():
        counts.skip(reason, n)
    for reason, n in index.dropped.items():
        counts.drop(reason, n)
    counts.shard_errors[shard] = index.error or "no readable sample"
    return counts


def _convert_job(job: tuple[str, str, str | None, bool]) -> tuple[str, str, dict[str, Any]]:
    shard, output, cache_dir, verify = job
    try:
        status, counts = convert_shard(shard, output, cache_dir, verify)
        return shard, status, counts.to_dict()
    except Exception as e:  # reported per shard; the other shards still convert
        return shard, "failed", {"error": f"{type(e).__name__}: {e}"}


@dataclass
class ConversionReport:
    """What a conversion run did: shards converted, skipped as complete, failed; total counts."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: SkipCounter = field(default_factory=SkipCounter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "converted": sorted(self.converted),
            "skipped": sorted(self.skipped),
            "failed": self.failed,
            "counts": self.counts.to_dict(),
        }


def convert(
    inputs: PathsArg,
    output_dir: str | os.PathLike,
    workers: int = 1,
    cache_dir: str | None = None,
    verify_images: bool = True,
) -> ConversionReport:
    """Converts every tar shard of ``inputs`` into ``output_dir``, ``workers`` shards at a time.

    ``workers`` > 1 uses separate processes (spawned, so safe with threads in the parent).
    Failures are collected per shard rather than aborting the run; rerunning retries them.
    """
    shards = expand_paths(inputs, ".tar")
    out_dir = os.fspath(output_dir)
    outputs = [output_path_for(s, out_dir) for s in shards]
    seen: dict[str, str] = {}
    for shard, out in zip(shards, outputs, strict=True):
        if out in seen:
            raise ValueError(f"shards {seen[out]!r} and {shard!r} would both write {out!r}")
        seen[out] = shard
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(s, o, cache_dir, verify_images) for s, o in zip(shards, outputs, strict=True)]

    report = ConversionReport()
    start = time.time()
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(jobs))) as pool:
            results = list(pool.imap_unordered(_convert_job, jobs))
    else:
        results = [_convert_job(job) for job in jobs]
    for shard, status, info in results:
        if status == "failed":
            report.failed[shard] = info["error"]
            logging.error("Converting %s failed: %s", shard, info["error"])
            continue
        getattr(report, status).append(shard)
        report.counts.merge(SkipCounter.from_dict(info))
    logging.info(
        "Converted %d shard(s), %d already complete, %d failed in %.1fs: %s",
        len(report.converted),
        len(report.skipped),
        len(report.failed),
        time.time() - start,
        report.counts.to_json(),
    )
    return report


if __name__ == "__main__":  # the command lives in refine_jax/commands/convert_array_record.py
    import runpy

    runpy.run_module(
        "refine_jax.commands.convert_array_record", run_name="__main__", alter_sys=True
    )
