"""Shard indexes keyed by content: a replaced shard is indexed again even with the same size and
mtime, a shard rewritten under a reading source is named instead of read as garbage, and an
unreadable shard is counted every time its source is opened."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from test_shards import sample, write_tar

from refine_jax.data.pipeline import SKIP_REASONS, structural_skip_counts
from refine_jax.data.shards import ShardChangedError, TarShardSource, sidecar_index_path


def shard_of(path: Path, prefix: str, n: int = 3) -> Path:
    """A shard of samples PREFIX0.. whose member sizes do not depend on the prefix's letter."""
    members = []
    for i in range(n):
        members += sample(f"{prefix}{i}", [f"caption {prefix} {i}"])
    return write_tar(path, members)


def keys(source: TarShardSource) -> list[str]:
    return [source[i]["key"] for i in range(len(source))]


def test_a_shard_replaced_with_the_same_size_and_mtime_is_indexed_again(tmp_path):
    path = shard_of(tmp_path / "00000.tar", "a")
    assert keys(TarShardSource(path)) == ["a0", "a1", "a2"]
    before = path.stat()
    shard_of(path, "b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    reopened = TarShardSource(path)
    assert reopened.rebuilt_shards == [str(path)]
    assert keys(reopened) == ["b0", "b1", "b2"]
    assert TarShardSource(path).rebuilt_shards == []  # and cached again


def test_an_index_of_the_format_without_fingerprints_is_rebuilt(tmp_path):
    path = shard_of(tmp_path / "00000.tar", "a")
    TarShardSource(path)
    index_file = Path(sidecar_index_path(str(path)))
    old = json.loads(index_file.read_text())
    old["version"] = 1  # the format before fingerprints were recorded
    old.pop("fingerprint", None)
    index_file.write_text(json.dumps(old))
    assert TarShardSource(path).rebuilt_shards == [str(path)]


@pytest.mark.parametrize("same_layout", [True, False])
def test_a_shard_rewritten_under_a_reading_source_is_named(tmp_path, same_layout):
    path = shard_of(tmp_path / "00000.tar", "a")
    source = TarShardSource(path)
    assert source[0]["key"] == "a0"  # holds the shard open
    if same_layout:  # every member where it was, only the names differ
        shard_of(path, "b")
    else:
        write_tar(path, sample("longer_key_0", ["another caption, longer than before"]) * 3)
    with pytest.raises(ShardChangedError, match="changed since it was indexed") as error:
        for i in range(len(source)):
            source[i]
    assert str(path) in str(error.value)
    with pytest.raises(ShardChangedError):
        source.read_captions(0)


def test_a_name_cut_in_its_tar_header_is_read_as_indexed(tmp_path):
    # 121 bytes: the 100-byte header name ends inside a character, so it matches no key as
    # written; the shard is unchanged, so its samples are read as they are.
    key = "a" + "\u00e9" * 60
    path = write_tar(tmp_path / "00000.tar", sample(key, ["long name"]) + sample("b", ["b"]))
    source = TarShardSource(path)
    assert [source[i]["captions"] for i in range(len(source))] == [["long name"], ["b"]]
    assert source[0]["key"] == key


def test_an_unreadable_shard_is_counted_and_named_on_every_open(tmp_path, caplog):
    shard_of(tmp_path / "00000.tar", "a")
    bad = tmp_path / "00001.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    for opening in ("indexed", "from the cached index"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            source = TarShardSource(tmp_path)
        assert (source.rebuilt_shards == []) == (opening == "from the cached index")
        assert len(source) == 3
        assert structural_skip_counts(source) == {"unreadable_shard": 1}, opening
        assert "not a readable tar" in source.structural_counts().shard_errors[str(bad)]
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(str(bad) in w for w in warnings), opening
    assert "unreadable_shard" in SKIP_REASONS  # a count the trainer logs
