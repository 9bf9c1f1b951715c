"""A converter from tar shards to ArrayRecord files (the format and reader: `data.array_records`).

Tar shards need a member index and one read per sample; at scale ArrayRecord is the better
random-access format for grain. The converter writes one ``<shard>.array_record`` file per
``<shard>.tar`` (only good records, in shard order) plus ``<shard>.array_record.stats.json`` with
the exact skip counts of that shard::

    python -m refine_jax.data.array_record_convert --input=SHARDS --output=DIR [--workers=N]

(the command lives in :mod:`refine_jax.commands.convert_array_record`)

``--input`` is a directory, glob or shard path (comma-separated for several). It is resumable:
each output is written under a temporary name and renamed when complete, and a shard whose
output exists is skipped, unless the shard has changed since (its size, mtime and fingerprint are
recorded in the stats file, under ``input_shard``).

The record encoding is documented in :mod:`refine_jax.data.array_records`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from refine_jax.data.array_records import SUFFIX, encode_record, stats_path
from refine_jax.data.records import (
    SkipCounter,
)
from refine_jax.data.shards import (
    NoSamplesError,
    PathsArg,
    ShardIndex,
    TarShardSource,
    expand_paths,
    load_or_build_index,
)
from refine_jax.paths import write_atomically

WRITER_OPTIONS = "group_size:1"  # one record per chunk: what grain needs for fast random reads
INPUT_FIELD = "input_shard"  # the stats JSON field recording which shard contents it came from


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

    ``status`` is ``"converted"`` or ``"skipped"`` (output already complete and made from this
    very shard: its counts are read back from the stats file). The stats file records the
    shard's size, mtime and fingerprint as its index has them, so an output made from an older
    version of the shard (or with no record of its input) is reconverted, never kept stale. The
    output appears only when complete (temporary name, rename).
    """
    index, _ = load_or_build_index(shard, cache_dir)
    made_from = input_record(index)
    out = epath.Path(output)
    if out.exists():
        stats = _read_stats(output)
        if stats is not None and stats.get(INPUT_FIELD) == made_from:
            return "skipped", SkipCounter.from_dict(stats)
        logging.info("Reconverting %s: %s was not made from its current contents", shard, output)
        out.unlink()  # first, so that a crash below never leaves the stale output looking done

    try:
        source = TarShardSource(shard, cache_dir=cache_dir, verify_images=verify_images)
        counts = source.structural_counts()
    except NoSamplesError as e:
        logging.warning("%s", e)
        source = None
        counts = _index_counts(index)

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
        stats = {**counts.to_dict(), INPUT_FIELD: made_from}
        write_atomically(stats_path(output), json.dumps(stats, indent=1))
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


def input_record(index: ShardIndex) -> dict[str, Any]:
    """What the stats file records of the input shard: size, mtime and fingerprint (as indexed)."""
    return {"size": index.size, "mtime_ns": index.mtime_ns, "fingerprint": index.fingerprint}


def _read_stats(output: str) -> dict[str, Any] | None:
    """The stats JSON beside ``output``; None when it is absent or unreadable."""
    try:
        stats = json.loads(epath.Path(stats_path(output)).read_text())
    except (OSError, ValueError) as e:
        logging.info("No usable stats for %s: %s", output, e)
        return None
    return stats if isinstance(stats, dict) else None


def _index_counts(index: ShardIndex) -> SkipCounter:
    """Structural counts of a shard with no readable sample, from its index."""
    counts = SkipCounter()
    for reason, n in index.skipped.items():
        counts.skip(reason, n)
    for reason, n in index.dropped.items():
        counts.drop(reason, n)
    counts.shard_errors[index.path] = index.error or "no readable sample"
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
