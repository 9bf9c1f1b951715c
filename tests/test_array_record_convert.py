"""Tests of the tar -> ArrayRecord converter and the ArrayRecord caption source."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from refine_jax.data.array_record_convert import convert, output_path_for
from refine_jax.data.array_records import (
    ArrayRecordCaptionSource,
    decode_record,
    encode_record,
    stats_path,
)
from refine_jax.data.records import SkipCounter, decode_image, is_record
from refine_jax.data.shards import NoSamplesError, TarShardSource, iter_records

REPO = Path(__file__).resolve().parents[1]
FLICKR_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "val"


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, captions: list[str], image: bytes) -> list[tuple[str, bytes]]:
    meta = json.dumps({"captions": captions}).encode()
    return [(f"{key}.jpg", image), (f"{key}.txt", captions[0].encode()), (f"{key}.json", meta)]


def make_shards(root: Path) -> None:
    """Three shards: two good ones (one with a non-ASCII caption) and one with bad samples."""
    write_tar(
        root / "00000.tar", sample("a0", ["un café", "x"], jpeg(0)) + sample("a1", ["y"], jpeg(1))
    )
    write_tar(root / "00001.tar", sample("b0", ["z"], jpeg(2)))
    write_tar(
        root / "00002.tar",
        sample("c0", ["ok"], jpeg(3))
        + sample("c1", ["bad image"], b"not an image")
        + [("c2.jpg", jpeg(4)), ("c2.txt", b"   ")]
        + [("c3.txt", b"no image")],
    )


def test_encoding_round_trip_and_malformed():
    record = {"key": "k/ü", "image_bytes": b"\x00\xff" * 7, "captions": ["a", "", "ça"]}
    assert decode_record(encode_record(record)) == record
    data = encode_record(record)
    for bad in (b"", b"XXXX" + data[4:], data[:-1], data + b"\0"):
        with pytest.raises(ValueError):
            decode_record(bad)


def test_teacher_captions_survive_the_conversion(tmp_path):
    # Distilled shards (refine_jax.caption_shards) carry a teacher's captions in KEY.json.
    meta = {"captions": ["a web caption"], "teacher_captions": ["a teacher caption", "two"]}
    write_tar(
        tmp_path / "tars" / "00000.tar",
        [("t0.jpg", jpeg(0)), ("t0.json", json.dumps(meta).encode())]
        + sample("plain", ["no teacher"], jpeg(1)),
    )
    convert(tmp_path / "tars", tmp_path / "ar", workers=1)
    tar_records = list(iter_records(TarShardSource(tmp_path / "tars")))
    source = ArrayRecordCaptionSource(tmp_path / "ar")
    assert [source[i] for i in range(len(source))] == tar_records
    assert tar_records[0]["teacher_captions"] == ["a teacher caption", "two"]
    assert "teacher_captions" not in tar_records[1]
    record = tar_records[0]
    assert encode_record(record)[:4] == b"RJC2"  # version 1 has no room for them
    assert encode_record(tar_records[1])[:4] == b"RJC1"  # files without them are unchanged
    with pytest.raises(ValueError):
        decode_record(encode_record(record)[:-1])


def test_convert_round_trips_every_sample_and_resumes(tmp_path):
    make_shards(tmp_path / "tars")
    out = tmp_path / "ar"
    report = convert(tmp_path / "tars", out, workers=1)
    assert sorted(report.converted) == sorted(str(p) for p in (tmp_path / "tars").glob("*.tar"))
    assert not report.skipped and not report.failed
    assert sorted(os.listdir(out)) == [
        f"0000{i}.array_record{s}" for i in range(3) for s in ("", ".stats.json")
    ]

    tar_counts = SkipCounter()
    tar_records = list(iter_records(TarShardSource(tmp_path / "tars"), tar_counts))
    source = ArrayRecordCaptionSource(out)
    ar_records = [source[i] for i in range(len(source))]
    assert ar_records == tar_records  # byte for byte, same order
    assert [r["key"] for r in ar_records] == ["a0", "a1", "b0", "c0"]
    assert ar_records[0]["captions"] == ["un café", "x"]
    assert decode_image(ar_records[3]["image_bytes"]).shape == (12, 20, 3)
    # The conversion counted exactly what a pass over the tars counts.
    assert report.counts.to_dict() == tar_counts.to_dict()
    assert dict(report.counts.skipped) == {
        "corrupt_image": 1,
        "whitespace_caption": 1,
        "missing_image": 1,
    }
    assert source.structural_counts().skipped == report.counts.skipped
    ar_counts = SkipCounter()
    assert len(list(iter_records(source, ar_counts))) == 4
    assert ar_counts.to_dict() == tar_counts.to_dict()

    # Second run: every shard is complete and left alone.
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert(str(tmp_path / "tars" / "*.tar"), out, workers=1)
    assert sorted(again.skipped) == sorted(report.converted) and not again.converted
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert again.counts.to_dict() == report.counts.to_dict()

    # A lost output (and a stale temporary file from a crash) redoes only that shard.
    os.remove(out / "00001.array_record")
    (out / "00001.array_record.tmp-123-abcd").write_bytes(b"partial")
    third = convert(tmp_path / "tars", out, workers=1)
    assert third.converted == [str(tmp_path / "tars" / "00001.tar")]
    assert len(third.skipped) == 2
    redone = ArrayRecordCaptionSource(out / "00001.array_record")
    assert [redone[i]["key"] for i in range(len(redone))] == ["b0"]


def test_a_rebuilt_input_shard_is_reconverted(tmp_path):
    tars, out = tmp_path / "tars", tmp_path / "ar"
    make_shards(tars)
    convert(tars, out, workers=1)
    # Shard 00001 rebuilt with a fixed caption: same size and mtime, other contents.
    shard = tars / "00001.tar"
    before = shard.stat()
    write_tar(shard, sample("b0", ["fixed"], jpeg(2)))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size
    # The stats of shard 00002 do not say which contents they came from: not trusted either.
    stats_00002 = Path(stats_path(str(out / "00002.array_record")))
    stats = json.loads(stats_00002.read_text())
    stats.pop("input_shard", None)
    stats_00002.write_text(json.dumps(stats))

    again = convert(tars, out, workers=1)
    assert sorted(again.converted) == [str(tars / "00001.tar"), str(tars / "00002.tar")]
    assert again.skipped == [str(tars / "00000.tar")] and again.counts.good == 4
    assert ArrayRecordCaptionSource(out / "00001.array_record")[0]["captions"] == ["fixed"]
    recorded = json.loads(Path(stats_path(str(out / "00001.array_record"))).read_text())
    assert recorded["input_shard"]["size"] == before.st_size
    assert recorded["input_shard"]["mtime_ns"] == before.st_mtime_ns
    assert convert(tars, out, workers=1).converted == []  # now complete and current


def test_convert_in_parallel_workers(tmp_path):
    make_shards(tmp_path / "tars")
    report = convert([tmp_path / "tars"], tmp_path / "ar", workers=2)
    assert len(report.converted) == 3 and not report.failed
    assert len(ArrayRecordCaptionSource(tmp_path / "ar")) == 4


def test_command_line(tmp_path):
    make_shards(tmp_path / "tars")
    cmd = [
        sys.executable,
        "-m",
        "refine_jax.data.array_record_convert",
        f"--input={tmp_path / 'tars' / '00000.tar'},{tmp_path / 'tars' / '00001.tar'}",
        f"--output={tmp_path / 'ar'}",
        "--workers=1",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(summary["converted"]) == 2 and summary["counts"]["good"] == 3
    assert sorted(p.name for p in (tmp_path / "ar").glob("*.array_record")) == [
        "00000.array_record",
        "00001.array_record",
    ]


@pytest.mark.skipif(not (FLICKR_VAL / "00000.tar").exists(), reason=f"no data at {FLICKR_VAL}")
def test_flickr_val_round_trip(tmp_path):
    report = convert(FLICKR_VAL, tmp_path / "ar", cache_dir=str(tmp_path / "cache"))
    assert report.counts.good == 1000 and report.counts.total_skipped == 0
    tar_source = TarShardSource(FLICKR_VAL, cache_dir=tmp_path / "cache", verify_images=False)
    ar_source = ArrayRecordCaptionSource(tmp_path / "ar")
    assert len(ar_source) == len(tar_source) == 1000
    for i in range(1000):
        assert ar_source[i] == tar_source[i]


def test_errors_and_corrupt_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ArrayRecordCaptionSource(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="array_record"):
        ArrayRecordCaptionSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no_tars"):
        convert(tmp_path / "no_tars", tmp_path / "out")

    path = tmp_path / "x.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(encode_record({"key": "k", "image_bytes": b"img", "captions": ["c"]}))
    writer.write(b"garbage")
    writer.close()
    source = ArrayRecordCaptionSource(path)
    assert is_record(source[0]) and source[-2]["key"] == "k"
    assert source[1] == {"key": "#1", "skip_reason": "corrupt_record"}
    with pytest.raises(IndexError):
        source[2]

    empty = tmp_path / "e.array_record"
    ArrayRecordWriter(str(empty), "group_size:1").close()
    with pytest.raises(NoSamplesError, match="e.array_record"):
        ArrayRecordCaptionSource(empty)


def test_shard_with_nothing_readable_converts_to_empty_file(tmp_path):
    write_tar(tmp_path / "tars" / "00000.tar", sample("a", ["a"], jpeg(0)))
    write_tar(tmp_path / "tars" / "00001.tar", [("lonely.jpg", jpeg(1))])
    report = convert(tmp_path / "tars", tmp_path / "ar")
    assert len(report.converted) == 2 and not report.failed
    assert report.counts.skipped == {"missing_caption": 1}
    source = ArrayRecordCaptionSource(tmp_path / "ar")
    assert len(source) == 1
    stats = json.loads(Path(stats_path(str(tmp_path / "ar" / "00001.array_record"))).read_text())
    assert stats["skipped"] == {"missing_caption": 1}
    assert output_path_for("gs://b/x/00007.tar", "gs://o") == "gs://o/00007.array_record"
    write_tar(tmp_path / "other" / "00000.tar", sample("z", ["z"], jpeg(2)))
    with pytest.raises(ValueError, match="both write"):
        convert([tmp_path / "tars", tmp_path / "other"], tmp_path / "ar2")


def test_a_failed_shard_is_reported_leaves_no_output_and_converts_on_rerun(tmp_path):
    make_shards(tmp_path / "tars")
    out = tmp_path / "ar"
    # The stats file of shard 00001 cannot be written: a folder holds its name.
    blocker = Path(stats_path(str(out / "00001.array_record")))
    blocker.mkdir(parents=True)
    report = convert(tmp_path / "tars", out, workers=1)
    failed = str(tmp_path / "tars" / "00001.tar")
    assert list(report.failed) == [failed]
    assert "Error" in report.failed[failed] and str(blocker) in report.failed[failed]
    assert sorted(report.converted) == [str(tmp_path / "tars" / f"0000{i}.tar") for i in (0, 2)]
    # The failed shard's samples are neither written nor counted; no partial file is left.
    assert report.counts.good == 3
    assert sorted(p.name for p in out.iterdir() if "00001" in p.name) == [blocker.name]
    assert [k for k in ("a0", "a1", "c0")] == [
        r["key"] for r in map(ArrayRecordCaptionSource(out).__getitem__, range(3))
    ]

    # The command exits non-zero and names the shard; once the cause is gone a rerun converts
    # only that shard.
    cmd = [
        sys.executable,
        "-m",
        "refine_jax.commands.convert_array_record",
        f"--input={tmp_path / 'tars'}",
        f"--output={out}",
        "--workers=1",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert list(json.loads(result.stdout)["failed"]) == [failed]
    blocker.rmdir()
    again = convert(tmp_path / "tars", out, workers=1)
    assert again.converted == [failed] and len(again.skipped) == 2 and not again.failed
    assert again.counts.good == 4
