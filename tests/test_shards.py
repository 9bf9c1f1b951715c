"""Tests of the tar-shard source and record helpers, on Flickr8k val and generated bad data."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refine_jax.data.records import (
    CorruptImageError,
    SkipCounter,
    check_caption,
    clean_caption,
    decode_image,
    is_record,
)
from refine_jax.data.shards import (
    NoSamplesError,
    TarShardSource,
    cache_index_path,
    iter_captions,
    iter_records,
    load_references,
    sidecar_index_path,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR_VAL = SHARED_DATA / "flickr8k" / "val"


# ---------------------------------------------------------------------------------------------
# Helpers that write shards


def image_bytes(fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> bytes:
    """Real encoded image bytes from Pillow."""
    rng = np.random.default_rng(len(fmt) + len(mode))
    if mode in ("RGB", "RGBA"):
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        im = Image.fromarray(arr, mode)
    elif mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
    elif mode == "P":
        im = Image.new("RGB", size, (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


JPEG = image_bytes("JPEG")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Writes a tar with fixed metadata (mtime 0 etc.), like the real shards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, captions: list[str], image: bytes = JPEG, ext: str = "jpg") -> list:
    """The three members of a webdataset sample: image, first caption, json with all captions."""
    meta = json.dumps({"key": key, "captions": captions}).encode()
    return [(f"{key}.{ext}", image), (f"{key}.txt", captions[0].encode()), (f"{key}.json", meta)]


def member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size) of every member."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def make_bad_shard_set(root: Path) -> tuple[set[str], dict[str, int], dict[str, int]]:
    """Three shards holding every kind of bad data; returns (good keys, skipped, dropped)."""
    good: set[str] = set()
    members: list[tuple[str, bytes]] = []
    for i in range(3):
        members += sample(f"good{i}", [f"caption {i} a", f"caption {i} b"])
        good.add(f"good{i}")
    members += sample("png", ["a png image"], image_bytes("PNG", "RGBA"), "png")
    members += sample("webp", ["a webp image"], image_bytes("WEBP"), "webp")
    members += [("jpeg_txt_only.jpeg", JPEG), ("jpeg_txt_only.txt", b"  only a txt caption \n")]
    good |= {"png", "webp", "jpeg_txt_only"}
    # Good samples with a dropped part: one empty caption among three, an unparsable json, a
    # duplicate member; plus an ignored extra member.
    members += sample("one_empty", ["first", "", "third"])
    members += [("bad_json.jpg", JPEG), ("bad_json.txt", b"fine"), ("bad_json.json", b"{nope")]
    members += sample("dup", ["dup caption"]) + [("dup.txt", b"second copy")]
    members += [("extra.jpg", JPEG), ("extra.txt", b"has a cls"), ("extra.cls", b"3")]
    good |= {"one_empty", "bad_json", "dup", "extra"}
    # Skipped at read time (content).
    members += sample("corrupt", ["corrupt jpeg"], b"\xff\xd8\xff\xe0 this is not a jpeg")
    members += sample("cut_jpeg", ["jpeg cut in half"], JPEG[: len(JPEG) // 2])
    members += [("zero_image.jpg", b""), ("zero_image.txt", b"empty image member")]
    members += [("empty.jpg", JPEG), ("empty.txt", b"")]
    members += [("blank.jpg", JPEG), ("blank.txt", b" \t\n ")]
    members += [("latin1.jpg", JPEG), ("latin1.txt", "caf\xe9 au lait".encode("latin-1"))]
    members += [("json_no_captions.jpg", JPEG), ("json_no_captions.json", b'{"url": "x"}')]
    # Skipped at index time (structure).
    members += [("no_image.txt", b"caption without image"), ("no_image.json", b"{}")]
    members += [("no_caption.jpg", JPEG)]
    write_tar(root / "00000.tar", members)

    # A shard cut in the middle of its last sample's image data.
    path = write_tar(
        root / "00001.tar", sample("t0", ["t0"]) + sample("t1", ["t1"]) + sample("t2", ["t2"])
    )
    _, data_offset, _ = member_offsets(path)["t2.jpg"]
    truncate(path, data_offset + 100)
    good |= {"t0", "t1"}

    # A shard cut inside the header of its next sample's first member (name still readable).
    path = write_tar(root / "00002.tar", sample("h0", ["h0"]) + sample("h1", ["h1"]))
    header_offset, _, _ = member_offsets(path)["h1.jpg"]
    truncate(path, header_offset + 300)
    good.add("h0")

    skipped = {
        "corrupt_image": 3,
        "empty_caption": 1,
        "whitespace_caption": 1,
        "non_utf8_caption": 1,
        "missing_caption": 2,
        "missing_image": 1,
        "truncated_shard": 2,
    }
    dropped = {"empty_caption": 1, "bad_json": 1, "duplicate_member": 1}
    return good, skipped, dropped


# ---------------------------------------------------------------------------------------------
# Real data


needs_flickr = pytest.mark.skipif(
    not (FLICKR_VAL / "00000.tar").exists(),
    reason=f"shared Flickr8k data not found at {FLICKR_VAL}",
)


@needs_flickr
def test_flickr_val_every_key_once_with_all_references(tmp_path):
    before = sorted(os.listdir(FLICKR_VAL))
    source = TarShardSource(FLICKR_VAL, cache_dir=tmp_path / "cache")
    refs = load_references(FLICKR_VAL)
    assert len(source) == len(refs) == 1000
    counter = SkipCounter()
    seen: dict[str, list[str]] = {}
    for i in range(len(source)):
        captions, dropped, reason = source.read_captions(i)
        assert reason is None and not dropped
        key = source.key(i)
        assert key not in seen
        seen[key] = captions
        counter.good += 1
    assert seen == refs  # every key once, its 5 references in order
    assert all(len(c) == 5 for c in seen.values())
    assert counter.good == 1000 and source.structural_counts().total_skipped == 0
    # The read-only shared folder is untouched; the index went to the cache dir.
    assert sorted(os.listdir(FLICKR_VAL)) == before
    assert os.path.exists(cache_index_path(str(FLICKR_VAL / "00000.tar"), str(tmp_path / "cache")))


@needs_flickr
def test_flickr_val_decodes_images(tmp_path):
    source = TarShardSource(FLICKR_VAL / "00000.tar", cache_dir=tmp_path)
    refs = load_references(FLICKR_VAL / "references.json")
    for i in (0, 1, 500, 999):
        record = source[i]
        assert is_record(record)
        assert record["captions"] == refs[record["key"]]
        image = decode_image(record["image_bytes"])
        assert image.shape == (160, 160, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Bad data


def test_bad_data_read_to_the_end_with_exact_counts(tmp_path):
    good, skipped, dropped = make_bad_shard_set(tmp_path / "shards")
    source = TarShardSource(tmp_path / "shards")
    counter = SkipCounter()
    records = list(iter_records(source, counter))
    keys = [r["key"] for r in records]
    assert sorted(keys) == sorted(good)  # every good sample, each once
    assert counter.good == len(good)
    assert dict(counter.skipped) == skipped
    assert dict(counter.dropped) == dropped
    assert set(counter.shard_errors) == {
        str(tmp_path / "shards" / "00001.tar"),
        str(tmp_path / "shards" / "00002.tar"),
    }
    # Every sample in the shards is accounted for, exactly once.
    assert counter.good + counter.total_skipped == len(good) + sum(skipped.values())

    by_key = {r["key"]: r for r in records}
    assert by_key["good1"]["captions"] == ["caption 1 a", "caption 1 b"]
    assert by_key["jpeg_txt_only"]["captions"] == ["only a txt caption"]
    assert by_key["one_empty"]["captions"] == ["first", "third"]
    assert by_key["one_empty"]["dropped"] == ["empty_caption"]
    assert by_key["bad_json"]["captions"] == ["fine"]
    assert by_key["dup"]["captions"] == ["dup caption"]
    assert "dropped" not in by_key["good0"]
    for key in ("good0", "png", "webp", "t1", "h0"):
        assert decode_image(by_key[key]["image_bytes"]).shape == (16, 24, 3)

    # The JSON form of the counts round-trips, and counters merge.
    again = SkipCounter.from_dict(json.loads(counter.to_json()))
    assert again.to_dict() == counter.to_dict()
    assert (again + counter).skipped["corrupt_image"] == 6


def test_a_folder_or_shard_whose_name_holds_glob_characters_is_read_as_itself(tmp_path):
    good, _, _ = make_bad_shard_set(tmp_path / "shards")
    (tmp_path / "shards").rename(tmp_path / "set [v2]")
    whole = [r["key"] for r in iter_records(TarShardSource(tmp_path / "set [v2]"))]
    assert sorted(whole) == sorted(good)
    (tmp_path / "set [v2]" / "00000.tar").rename(tmp_path / "set [v2]" / "0[0].tar")
    one = TarShardSource(tmp_path / "set [v2]" / "0[0].tar")
    assert one.shard_paths == [str(tmp_path / "set [v2]" / "0[0].tar")]
    # A pattern is still a pattern where no file or folder has its name.
    assert len(TarShardSource(str(tmp_path / "set [[]v2]" / "*.tar")).shard_paths) == 3


def test_skip_markers_name_the_sample(tmp_path):
    make_bad_shard_set(tmp_path / "shards")
    source = TarShardSource(tmp_path / "shards" / "00000.tar")
    markers = {source.key(i): source[i] for i in range(len(source)) if not is_record(source[i])}
    assert markers["corrupt"] == {"key": "corrupt", "skip_reason": "corrupt_image"}
    assert markers["latin1"]["skip_reason"] == "non_utf8_caption"
    assert markers["json_no_captions"]["skip_reason"] == "missing_caption"
    # Without image verification the corrupt bytes come through untouched.
    record = source.read(next(i for i in range(len(source)) if source.key(i) == "corrupt"), False)
    assert record["image_bytes"].startswith(b"\xff\xd8\xff\xe0 this")


def test_iter_captions_counts_without_reading_images(tmp_path):
    good, skipped, _ = make_bad_shard_set(tmp_path / "shards")
    counter = SkipCounter()
    captions = list(iter_captions(TarShardSource(tmp_path / "shards"), counter))
    assert "caption 0 b" in captions and "a webp image" in captions
    # Images are not checked here: the three corrupt-image samples count as good.
    assert counter.good == len(good) + 3
    assert counter.skipped["corrupt_image"] == 0
    assert counter.skipped["truncated_shard"] == skipped["truncated_shard"]


@pytest.mark.parametrize(
    ("cut", "good", "lost"),
    [
        ("data:s1.json", {"s0"}, 1),  # in the data of the last sample's json
        ("data:s2.jpg", {"s0", "s1"}, 1),  # in the data of the next sample's image
        ("header+120:s1.json", {"s0"}, 1),  # in the last sample's json header (name readable)
        ("header+4:s1.json", {"s0"}, 1),  # name cut to "s1.j": still the last sample's
        ("header+2:s1.json", {"s0"}, 1),  # name cut to "s1": unknown; s1 lacks the json s0 has
        ("header:s1.txt", {"s0"}, 1),  # cleanly between two members of the last sample
        ("header:s1.json", {"s0"}, 1),  # ... which would otherwise lose its json's references
        ("header+10:s2.jpg", {"s0", "s1"}, 1),  # in the header of the next sample
        ("header:s2.jpg", {"s0", "s1"}, 0),  # cleanly after a member, no end-of-archive marker
        ("end+700", {"s0", "s1", "s2"}, 0),  # inside the end-of-archive marker
    ],
)
def test_truncation_points(tmp_path, cut, good, lost):
    path = write_tar(
        tmp_path / "x.tar", sample("s0", ["a"]) + sample("s1", ["b"]) + sample("s2", ["c"])
    )
    offsets = member_offsets(path)
    where, _, name = cut.partition(":")
    if where == "data":
        size = offsets[name][1] + 3
    elif where.startswith("header"):
        size = offsets[name][0] + int(where.partition("+")[2] or 0)
    else:
        last = offsets["s2.json"]
        size = last[1] + 512 + int(where.partition("+")[2])
    truncate(path, size)
    source = TarShardSource(path)
    counts = source.structural_counts()
    keys = {r["key"] for r in iter_records(source)}
    assert keys == good, cut
    assert counts.skipped["truncated_shard"] == lost
    assert counts.total_skipped == lost  # never misreported as missing_image / missing_caption
    assert "truncated" in counts.shard_errors[str(path)]


@pytest.mark.parametrize(
    ("damaged", "good"),
    [
        ("s3.jpg", {"s0", "s1", "s2", "s4", "s5"}),  # the first member of a sample
        ("s3.txt", {"s0", "s1", "s2", "s4", "s5"}),  # inside a sample: s3 would lack its txt
        ("s3.json", {"s0", "s1", "s2", "s4", "s5"}),  # the last member of a sample
    ],
)
def test_a_damaged_header_mid_shard_loses_only_its_sample(tmp_path, damaged, good):
    path = write_tar(tmp_path / "x.tar", sum((sample(f"s{i}", [f"c{i}"]) for i in range(6)), []))
    header = member_offsets(path)[damaged][0]
    with open(path, "r+b") as f:  # one flipped bit in the header's checksum field
        f.seek(header + 148)
        byte = f.read(1)[0]
        f.seek(header + 148)
        f.write(bytes([byte ^ 1]))
    source = TarShardSource(path)
    counts = source.structural_counts()
    assert {r["key"] for r in iter_records(source)} == good
    assert dict(counts.skipped) == {"truncated_shard": 1}
    assert f"unreadable tar data at bytes {header}-" in counts.shard_errors[str(path)]


def test_tars_joined_end_to_end_read_as_one(tmp_path):
    a = write_tar(tmp_path / "a.tar", sample("a0", ["x"]) + sample("a1", ["y"]))
    b = write_tar(tmp_path / "b.tar", sample("b0", ["z"]))
    joined = tmp_path / "joined" / "ab.tar"
    joined.parent.mkdir()
    joined.write_bytes(a.read_bytes() + b.read_bytes())  # b's headers after a's end marker
    source = TarShardSource(joined)
    assert [r["key"] for r in iter_records(source)] == ["a0", "a1", "b0"]
    counts = source.structural_counts()
    assert counts.total_skipped == 0 and not counts.shard_errors


# ---------------------------------------------------------------------------------------------
# Index cache


def test_index_is_cached_next_to_shard_and_reused(tmp_path):
    path = write_tar(tmp_path / "s" / "00000.tar", sample("a", ["a"]) + sample("b", ["b"]))
    first = TarShardSource(tmp_path / "s")
    assert first.rebuilt_shards == [str(path)]
    index_file = Path(sidecar_index_path(str(path)))
    assert index_file.exists()
    mtime = index_file.stat().st_mtime_ns

    second = TarShardSource(tmp_path / "s" / "*.tar")
    assert second.rebuilt_shards == [] and len(second) == 2
    assert index_file.stat().st_mtime_ns == mtime  # not rewritten

    # A changed shard (new content, new mtime) is re-indexed.
    write_tar(path, sample("a", ["a"]) + sample("b", ["b"]) + sample("c", ["c"]))
    third = TarShardSource([path])
    assert third.rebuilt_shards == [str(path)] and len(third) == 3
    assert TarShardSource(path).rebuilt_shards == []

    # Same size but a different mtime: also re-indexed.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert TarShardSource(path).rebuilt_shards == [str(path)]

    # A damaged index file is ignored and rebuilt rather than trusted.
    index_file.write_text("{not json")
    fourth = TarShardSource(path)
    assert fourth.rebuilt_shards == [str(path)] and len(fourth) == 3
    index_file.write_bytes(b"\xff\xfe not even UTF-8")  # so is one that is not text at all
    fifth = TarShardSource(path)
    assert fifth.rebuilt_shards == [str(path)] and len(fifth) == 3


def test_read_only_folder_indexes_into_cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    path = write_tar(folder / "00000.tar", sample("a", ["a"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        source = TarShardSource(folder)
        assert len(source) == 1 and source.rebuilt_shards == [str(path)]
        assert sorted(os.listdir(folder)) == ["00000.tar"]
        cached = list((tmp_path / "xdg" / "refine_jax" / "tar_index").iterdir())
        assert len(cached) == 1
        assert TarShardSource(folder).rebuilt_shards == []
    finally:
        folder.chmod(0o755)


def test_explicit_cache_dir_and_pickling(tmp_path):
    path = write_tar(tmp_path / "s" / "00000.tar", sample("a", ["a"]) + sample("b", ["b", "c"]))
    source = TarShardSource(path, cache_dir=tmp_path / "cache")
    assert not Path(sidecar_index_path(str(path))).exists()
    assert source[1]["captions"] == ["b", "c"]  # opens a file handle
    clone = pickle.loads(pickle.dumps(source))
    assert clone[1] == source[1] and clone[-2]["key"] == "a" and len(clone) == 2
    with pytest.raises(IndexError):
        source[2]
    source.close()
    assert source[0]["key"] == "a"  # reopens lazily


def _keys_in_child(source: TarShardSource, queue) -> None:
    queue.put([source[i]["key"] for i in reversed(range(len(source)))])


def test_forked_worker_reads_with_its_own_handles(tmp_path):
    members = []
    for i in range(6):
        members += sample(f"k{i}", [f"c{i}"])
    source = TarShardSource(write_tar(tmp_path / "00000.tar", members))
    assert source[0]["key"] == "k0"  # the parent holds an open handle now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_keys_in_child, args=(source, queue))
    child.start()
    keys = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert keys == [f"k{i}" for i in reversed(range(6))]
    assert [source[i]["key"] for i in range(6)] == [f"k{i}" for i in range(6)]


def test_random_access_through_grain(tmp_path):
    grain = pytest.importorskip("grain")
    members = []
    for i in range(20):
        members += sample(f"k{i:02d}", [f"c{i}"])
    write_tar(tmp_path / "00000.tar", members[:30])
    write_tar(tmp_path / "00001.tar", members[30:])
    source = TarShardSource(tmp_path)
    ds = grain.MapDataset.source(source).shuffle(seed=3).filter(is_record)
    keys = [element["key"] for element in ds]
    assert sorted(keys) == [f"k{i:02d}" for i in range(20)]
    assert keys != sorted(keys)


# ---------------------------------------------------------------------------------------------
# Clear errors


def test_clear_errors_for_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        TarShardSource(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match=r"no files match.*nothing\*\.tar"):
        TarShardSource(str(tmp_path / "nothing*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        TarShardSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty list"):
        TarShardSource([])
    with pytest.raises(FileNotFoundError, match="references"):
        load_references(tmp_path / "empty")


def test_clear_error_when_nothing_is_readable(tmp_path):
    write_tar(tmp_path / "a" / "00000.tar", [("x.jpg", JPEG), ("y.txt", b"caption only")])
    (tmp_path / "a" / "00001.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(NoSamplesError, match=str(tmp_path / "a")) as err:
        TarShardSource(tmp_path / "a")
    message = str(err.value)
    assert "missing_caption" in message and "missing_image" in message
    assert "not a readable tar" in message
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "00000.tar").write_bytes(b"")
    with pytest.raises(NoSamplesError, match="00000.tar"):
        TarShardSource(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# Records


def test_clean_caption():
    assert clean_caption(b"  A dog runs .\n") == "A dog runs ."
    assert clean_caption("two  spaces kept") == "two  spaces kept"
    assert clean_caption("\ufeffbom".encode()) == "bom"
    assert check_caption(b"") == (None, "empty_caption")
    assert check_caption("") == (None, "empty_caption")
    assert check_caption(b" \t\r\n") == (None, "whitespace_caption")
    assert check_caption(b"\xff\xfeabc") == (None, "non_utf8_caption")
    assert check_caption("lone \ud800 surrogate") == (None, "non_utf8_caption")
    assert check_caption("caf\u00e9".encode()) == ("caf\u00e9", None)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("WEBP", "RGB")],
)
def test_decode_image_formats(fmt, mode):
    arr = decode_image(image_bytes(fmt, mode))
    assert arr.shape == (16, 24, 3) and arr.dtype == np.uint8


def test_a_16_bit_grey_png_is_scaled_by_its_bit_depth_not_its_brightest_pixel():
    for value in (200, 65535):  # a dark image and a white one
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(buf, format="PNG")
        assert np.unique(decode_image(buf.getvalue())).tolist() == [round(value / 257)]


def test_decode_image_transparency_over_white_and_corrupt_bytes():
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    assert (decode_image(buf.getvalue()) == 255).all()
    for bad in (b"", b"junk", JPEG[: len(JPEG) // 2], image_bytes("PNG")[:-40]):
        with pytest.raises(CorruptImageError):
            decode_image(bad)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")  # decodable, but not an accepted format
    with pytest.raises(CorruptImageError):
        decode_image(buf.getvalue())
