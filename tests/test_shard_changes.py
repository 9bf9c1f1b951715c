"""Shard indexes keyed by content: a replaced shard is indexed again even with the same size and
mtime, a shard rewritten under a reading source is named instead of read as garbage, and an
unreadable shard is counted every time its source is opened."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
from test_shards import image_bytes, sample, write_tar

from refine_jax.data import shards
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


@pytest.mark.parametrize("rewrite", ["other names", "other sizes", "other layout"])
def test_a_shard_rewritten_under_a_reading_source_is_named(tmp_path, rewrite):
    path = shard_of(tmp_path / "00000.tar", "a")
    source = TarShardSource(path)
    assert source[0]["key"] == "a0"  # holds the shard open
    if rewrite == "other names":  # every member where it was, only the names differ
        shard_of(path, "b")
    elif rewrite == "other sizes":  # the same names where they were, other images
        bigger = image_bytes("JPEG", size=(40, 30))
        write_tar(path, [m for i in range(3) for m in sample(f"a{i}", [f"a {i}"], bigger)])
    else:
        write_tar(path, sample("longer_key_0", ["another caption, longer than before"]) * 3)
    with pytest.raises(ShardChangedError, match="changed since it was indexed") as error:
        source[0]
    assert str(path) in str(error.value)
    with pytest.raises(ShardChangedError):
        source.read_captions(0)


@pytest.fixture
def fingerprints_taken(monkeypatch) -> list[str]:
    """The paths `shard_fingerprint` hashes, in order."""
    taken: list[str] = []
    original = shards.shard_fingerprint

    def counting(path: str, size: int) -> str:
        taken.append(path)
        return original(path, size)

    monkeypatch.setattr(shards, "shard_fingerprint", counting)
    return taken


def test_a_long_name_cut_in_its_tar_header_matches_as_far_as_it_goes(tmp_path, fingerprints_taken):
    # 121 bytes: GNU tar keeps the first 100 in the header, ending inside a character.
    key = "a" + "\u00e9" * 60
    path = write_tar(tmp_path / "00000.tar", sample(key, ["long name"]) + sample("b", ["b"]))
    source = TarShardSource(path)
    fingerprints_taken.clear()
    assert [source[i]["captions"] for i in range(len(source))] == [["long name"], ["b"]]
    assert source[0]["key"] == key
    assert fingerprints_taken == []  # matched from the header alone


def test_a_header_naming_its_member_elsewhere_costs_one_check_until_it_changes(
    tmp_path, fingerprints_taken
):
    # In a PAX tar a non-ASCII name lives in an extended record; the plain header holds "?"s.
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sample("caf\u00e9", ["a PAX sample"]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = TarShardSource(path)
    fingerprints_taken.clear()
    for _ in range(3):
        assert source[0]["captions"] == ["a PAX sample"]
    assert fingerprints_taken == [str(path)]  # the shard is checked once, not on every read
    shard_of(path, "x", 1)
    with pytest.raises(ShardChangedError, match="changed since it was indexed"):
        source[0]


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


def test_a_stale_index_in_the_cache_dir_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    path = shard_of(tmp_path / "s" / "00000.tar", "a")
    assert keys(TarShardSource(path, cache_dir=cache)) == ["a0", "a1", "a2"]
    cached = Path(shards.cache_index_path(str(path), str(cache)))
    assert cached.exists() and not Path(sidecar_index_path(str(path))).exists()

    # Replaced with the same size and mtime: the cached index no longer describes it.
    before = path.stat()
    shard_of(path, "b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    reopened = TarShardSource(path, cache_dir=cache)
    assert reopened.rebuilt_shards == [str(path)] and keys(reopened) == ["b0", "b1", "b2"]

    # An index of another format version is rebuilt, and the cache holds the current one again.
    old = json.loads(cached.read_text())
    old["version"] = shards.INDEX_VERSION - 1
    cached.write_text(json.dumps(old))
    assert TarShardSource(path, cache_dir=cache).rebuilt_shards == [str(path)]
    assert json.loads(cached.read_text())["version"] == shards.INDEX_VERSION
    assert TarShardSource(path, cache_dir=cache).rebuilt_shards == []

    # A cached index of another shard (identical bytes, another path) is not used for this one.
    twin = tmp_path / "t" / "00000.tar"
    twin.parent.mkdir()
    twin.write_bytes(path.read_bytes())
    os.utime(twin, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    Path(shards.cache_index_path(str(twin), str(cache))).write_text(cached.read_text())
    twin_source = TarShardSource(twin, cache_dir=cache)
    assert twin_source.rebuilt_shards == [str(twin)] and keys(twin_source) == ["b0", "b1", "b2"]
