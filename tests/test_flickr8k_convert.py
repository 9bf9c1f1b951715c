"""Tests of the Flickr8k raw-files converter and the shared shard writer, on generated fixtures."""

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
from PIL import Image

from refine_jax.data import flickr8k
from refine_jax.data.records import decode_image
from refine_jax.data.shard_writer import MTIME, ShardWriter, check_key
from refine_jax.data.shards import TarShardSource, load_references

REPO = Path(__file__).resolve().parents[1]
QUIRK = "2258277193_586949ec62"


def jpeg(seed: int, size: tuple[int, int] = (48, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def caps(name: str) -> list[str]:
    return [f"{name} caption {i} ." for i in range(5)]


TRAIN = ["1000_aa", "1001_bb", QUIRK]
VAL = ["2000_cc", "2001_dd"]
TEST = ["3000_ee"]
EXTRA = ["4000_ff"]  # captioned, in no split list


def make_raw(root: Path, text_subdir: str = "Flickr8k_text") -> Path:
    """A small Flickr8k download: images, a token file (CRLF, shuffled, the .jpg.1 quirk)."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    for i, key in enumerate(TRAIN + VAL + TEST + EXTRA):
        (images / f"{key}.jpg").write_bytes(jpeg(i, (48 + 8 * i, 32)))
    lines = []
    for key in TRAIN + VAL + TEST + EXTRA:
        name = f"{key}.jpg.1" if key == QUIRK else f"{key}.jpg"
        for i, c in enumerate(caps(key)):
            lines.append(f"{name}#{i}\t  {c} ")
    lines = lines[::-1]  # captions must come out in #i order regardless of line order
    text = root / text_subdir
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    for fname, keys in [
        ("Flickr_8k.trainImages.txt", TRAIN),
        ("Flickr_8k.devImages.txt", VAL),
        ("Flickr_8k.testImages.txt", TEST),
    ]:
        (text / fname).write_text("".join(f"{k}.jpg\n" for k in keys))
    return root


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "raw")


def read_split(split_dir: Path, tmp_path: Path) -> dict[str, dict]:
    source = TarShardSource(split_dir, cache_dir=tmp_path / "cache")
    return {source[i]["key"]: source[i] for i in range(len(source))}


def test_convert_layout_captions_and_splits(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reports = flickr8k.convert(raw, out, samples_per_shard=2)
    assert sorted(os.listdir(out)) == ["test", "train", "val"]
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert reports["train"].counts.good == 3 and not reports["train"].counts.skipped

    for split, keys in [("train", TRAIN), ("val", VAL), ("test", TEST)]:
        source = TarShardSource(out / split, cache_dir=tmp_path / "cache")
        assert [source.key(i) for i in range(len(source))] == keys  # split-list order
        for i, key in enumerate(keys):
            record = source[i]
            assert record["captions"] == caps(key)  # stripped, #0..#4, inner spacing kept
            assert decode_image(record["image_bytes"]).shape == (160, 160, 3)
    # The quirk: captions listed under NAME.jpg.1 belong to NAME.jpg.
    assert read_split(out / "train", tmp_path)[QUIRK]["captions"] == caps(QUIRK)

    # Member layout and metadata of one sample.
    with tarfile.open(out / "val" / "00000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == [f"{VAL[0]}.{e}" for e in ("jpg", "txt", "json")]
        assert all(
            (m.mtime, m.uid, m.gid, m.mode, m.uname) == (MTIME, 0, 0, 0o644, "") for m in members
        )
        assert tar.extractfile(members[1]).read() == caps(VAL[0])[0].encode()
        meta = json.loads(tar.extractfile(members[2]).read())
    assert list(meta) == [
        "key", "captions", "source_id", "width", "height", "split", "dataset",
        "source_width", "source_height",
    ]  # fmt: skip
    assert meta["source_id"] == f"{VAL[0]}.jpg" and meta["split"] == "val"
    assert (meta["width"], meta["height"], meta["source_height"]) == (160, 160, 32)


def test_references_json(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flickr8k.convert(raw, out, image_size=24)
    all_ids = []
    for split, keys, first_id in [("train", TRAIN, 1), ("val", VAL, 16), ("test", TEST, 26)]:
        refs = json.loads((out / split / "references.json").read_text())
        assert set(refs) == {"info", "licenses", "type", "images", "annotations"}
        assert refs["type"] == "captions" and refs["licenses"] == []
        assert refs["images"] == [{"id": k, "file_name": f"{k}.jpg"} for k in keys]
        ids = [a["id"] for a in refs["annotations"]]
        assert ids == list(range(first_id, first_id + 5 * len(keys)))  # numbered train->val->test
        assert [a["image_id"] for a in refs["annotations"]] == [k for k in keys for _ in range(5)]
        assert load_references(out / split) == {k: caps(k) for k in keys}
        all_ids += ids
    assert len(all_ids) == len(set(all_ids))

    coco = pytest.importorskip("pycocotools.coco")
    gt = coco.COCO(str(out / "val" / "references.json"))
    assert sorted(gt.getImgIds()) == sorted(VAL)
    res = gt.loadRes([{"image_id": VAL[0], "caption": "a caption"}])
    assert len(res.getAnnIds()) == 1


def test_deterministic_and_overwrite(raw: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    flickr8k.convert(raw, a, splits=["train"], image_size=16, samples_per_shard=2, workers=2)
    flickr8k.convert(raw, b, splits=["train"], image_size=16, samples_per_shard=2)
    names = sorted(os.listdir(a / "train"))
    assert names == ["00000.tar", "00001.tar", "references.json"]
    for name in names:
        assert (a / "train" / name).read_bytes() == (b / "train" / name).read_bytes()
    with pytest.raises(FileExistsError, match=f"{a / 'train'}.*pass overwrite=True"):
        flickr8k.convert(raw, a, splits=["train"], image_size=16)
    TarShardSource(a / "train", cache_dir=None)  # writes sidecar indexes next to the shards
    flickr8k.convert(raw, a, splits=["train"], image_size=16, overwrite=True)
    assert sorted(os.listdir(a / "train")) == ["00000.tar", "references.json"]
    assert len(TarShardSource(a / "train", cache_dir=tmp_path / "c")) == 3


def test_a_rerun_refused_for_a_later_split_rewrites_no_earlier_one(
    raw: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flickr8k.convert(raw, out, splits=["val"], image_size=16)
    with pytest.raises(FileExistsError, match=f"{out / 'val'}"):
        flickr8k.convert(raw, out, splits=["train", "val"], image_size=16)
    assert not (out / "train").exists()  # refused before the train split was written


def test_bad_images_are_skipped_and_counted(raw: Path, tmp_path: Path) -> None:
    images = raw / "Flicker8k_Dataset"
    (images / f"{TRAIN[0]}.jpg").unlink()
    (images / f"{TRAIN[1]}.jpg").write_bytes(jpeg(1)[:60])  # truncated JPEG
    report = flickr8k.convert(raw, tmp_path / "out", splits=["train"], image_size=16)["train"]
    assert report.counts.good == 1
    assert dict(report.counts.skipped) == {"missing_image": 1, "corrupt_image": 1}
    assert report.skipped_keys == {TRAIN[0]: "missing_image", TRAIN[1]: "corrupt_image"}
    assert list(read_split(tmp_path / "out" / "train", tmp_path)) == [QUIRK]
    # Annotation ids stay those of the full numbering.
    refs = json.loads((tmp_path / "out" / "train" / "references.json").read_text())
    assert [a["id"] for a in refs["annotations"]] == list(range(11, 16))


def test_text_files_at_top_level_and_original_images(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", text_subdir="")
    out = tmp_path / "out"
    flickr8k.convert(raw, out, splits=["val"], image_size=None)
    record = TarShardSource(out / "val", cache_dir=tmp_path / "cache")[0]
    assert record["image_bytes"] == (raw / "Flicker8k_Dataset" / f"{VAL[0]}.jpg").read_bytes()


def test_missing_inputs_name_the_path(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        flickr8k.convert(tmp_path / "nowhere", out)
    with pytest.raises(FileNotFoundError, match="not_there"):
        flickr8k.convert(raw, out, images_dir=str(tmp_path / "not_there"))
    (raw / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr_8k.devImages.txt"):
        flickr8k.convert(raw, out)
    (raw / "Flickr8k_text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        flickr8k.convert(raw, out)
    os.rename(raw / "Flicker8k_Dataset", raw / "elsewhere")
    with pytest.raises(FileNotFoundError, match="Flicker8k_Dataset"):
        flickr8k.convert(raw, out)
    with pytest.raises(ValueError, match="unknown Flickr8k split"):
        flickr8k.convert(raw, out, splits=["dev"])


def test_token_parsing_and_keys(tmp_path: Path) -> None:
    token = tmp_path / "t.txt"
    token.write_text("a.jpg#1\tsecond\nno tab here\na.jpg#0\tfirst\nb.jpg.1#0\tquirk\n")
    assert flickr8k.parse_token_file(token) == {"a.jpg": ["first", "second"], "b.jpg": ["quirk"]}
    assert flickr8k.image_file_name(f"{QUIRK}.jpg.1") == f"{QUIRK}.jpg"
    assert flickr8k.key_of("1000268201_693b08cb0e.jpg") == "1000268201_693b08cb0e"
    dup = tmp_path / "list.txt"
    dup.write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(ValueError, match="listed twice"):
        flickr8k.read_split_list(dup)


def test_non_utf8_caption_is_dropped_and_counted(raw: Path, tmp_path: Path) -> None:
    token = raw / "Flickr8k_text" / "Flickr8k.token.txt"
    bad = f"{TRAIN[0]} caption 2 .".encode()
    token.write_bytes(token.read_bytes().replace(bad, bad.replace(b"caption", b"capti\xf6n")))
    report = flickr8k.convert(raw, tmp_path / "out", splits=["train"], image_size=16)["train"]
    assert report.counts.good == 3 and dict(report.counts.dropped) == {"non_utf8_caption": 1}
    refs = json.loads((tmp_path / "out" / "train" / "references.json").read_text())
    first = [(a["id"], a["caption"]) for a in refs["annotations"] if a["image_id"] == TRAIN[0]]
    assert first == [(i + 1, c) for i, c in enumerate(caps(TRAIN[0])) if i != 2]  # ids kept


def test_byte_order_mark_keeps_the_first_caption(tmp_path: Path) -> None:
    token = tmp_path / "t.txt"
    token.write_text("a.jpg#0\tfirst\na.jpg#1\tsecond\n", encoding="utf-8-sig")
    assert flickr8k.parse_token_file(token) == {"a.jpg": ["first", "second"]}


def test_a_split_list_with_a_byte_order_mark_or_not_utf8_reads_or_names_the_file(
    tmp_path: Path,
) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("a.jpg\nb.jpg\n", encoding="utf-8-sig")
    assert flickr8k.read_split_list(listed) == ["a.jpg", "b.jpg"]
    listed.write_bytes(b"a.jpg\nb\xf6.jpg\n")
    with pytest.raises(ValueError, match="list.txt is not UTF-8 text"):
        flickr8k.read_split_list(listed)


def test_repeated_caption_lines_are_kept_once(
    raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "t.txt"
    token.write_text(
        "a.jpg#0\tfirst\na.jpg#1\tsecond\na.jpg#0\tfirst again\n"
        "b.jpg.1#0\tquirk 0\nb.jpg#0\town 0\nb.jpg#1\town 1\nb.jpg.1#1\tquirk 1\n"
    )
    # One caption per number: the first line wins, but X.jpg#i beats the quirk's X.jpg.1#i.
    assert flickr8k.parse_token_file(token) == {
        "a.jpg": ["first", "second"],
        "b.jpg": ["own 0", "own 1"],
    }
    assert "3 repeated caption line(s) ignored" in caplog.text
    # A token file with its lines appended again converts as the original one.
    real = raw / "Flickr8k_text" / "Flickr8k.token.txt"
    real.write_bytes(real.read_bytes() * 2)
    flickr8k.convert(raw, tmp_path / "out", splits=["train"], image_size=16)
    assert load_references(tmp_path / "out" / "train") == {k: caps(k) for k in TRAIN}
    refs = json.loads((tmp_path / "out" / "train" / "references.json").read_text())
    assert [a["id"] for a in refs["annotations"]] == list(range(1, 16))


def test_image_name_with_a_dot_gets_an_escaped_key(raw: Path, tmp_path: Path) -> None:
    assert flickr8k.key_of("a.v2.jpg") == "a%2Ev2"
    assert flickr8k.key_of("a%2Ev2.jpg") == "a%252Ev2"  # the escape is one-to-one
    old, new = f"{TRAIN[1]}.jpg", f"{TRAIN[1]}.v2.jpg"
    images, text = raw / "Flicker8k_Dataset", raw / "Flickr8k_text"
    os.rename(images / old, images / new)
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt"):
        (text / name).write_text((text / name).read_text().replace(old, new))
    # A second name with the KEY of a listed one (case of .jpg) is refused, not a crash mid-way.
    (images / f"{TRAIN[0]}.JPG").write_bytes(jpeg(9))
    with open(text / "Flickr_8k.trainImages.txt", "a") as f:
        f.write(f"{TRAIN[0]}.JPG\n")
    out = tmp_path / "out" / "train"
    report = flickr8k.convert(raw, tmp_path / "out", splits=["train"], samples_per_shard=1)["train"]
    assert report.counts.good == 3
    assert report.counts.skipped == {"unusable_name": 1}
    assert report.skipped_keys == {f"{TRAIN[0]}.JPG": "unusable_name"}
    key = f"{TRAIN[1]}%2Ev2"
    assert load_references(out) == {
        TRAIN[0]: caps(TRAIN[0]),
        key: caps(TRAIN[1]),
        QUIRK: caps(QUIRK),
    }
    with tarfile.open(out / "00001.tar") as tar:
        assert tar.getnames() == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
        assert json.loads(tar.extractfile(f"{key}.json").read())["source_id"] == new


def test_shard_writer_rejects_bad_input(tmp_path: Path) -> None:
    for key in ["", "a.b", "a/b"]:
        with pytest.raises(ValueError):
            check_key(key)
    writer = ShardWriter(tmp_path / "w", 2)
    writer.write("k1", jpeg(0), ["one"])
    with pytest.raises(ValueError, match="duplicate"):
        writer.write("k1", jpeg(0), ["one"])
    with pytest.raises(ValueError, match="non-empty captions"):
        writer.write("k2", jpeg(0), [])
    with pytest.raises(ValueError, match="repeat"):
        writer.write("k3", jpeg(0), ["x"], annotation_ids=[1])
    with pytest.raises(ValueError, match="'k4' is not JSON-serialisable"):
        writer.write("k4", jpeg(0), ["x"], metadata={"width": object()})
    writer.close()
    refs = json.loads((tmp_path / "w" / "references.json").read_text())
    assert refs["annotations"] == [{"image_id": "k1", "id": 1, "caption": "one"}]
    with tarfile.open(tmp_path / "w" / "00000.tar") as tar:  # no member of a rejected sample
        assert tar.getnames() == ["k1.jpg", "k1.txt", "k1.json"]
    # An exception inside the context leaves no partial shard and no references.json.
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x", 2) as w:
        w.write("k1", jpeg(0), ["one"])
        raise RuntimeError("stop")
    assert os.listdir(tmp_path / "x") == []


def test_command(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "refine_jax.data.flickr8k", f"--raw_dir={raw}",
        f"--output_dir={out}", "--splits=val", "--image_size=16", "--workers=1",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["val"]["counts"]["good"] == 2
    assert load_references(out / "val") == {k: caps(k) for k in VAL}


def test_command_rerun_names_the_overwrite_flag(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flickr8k.convert(raw, out, splits=["val"], image_size=16)
    cmd = [
        sys.executable, "-m", "refine_jax.data.flickr8k", f"--raw_dir={raw}",
        f"--output_dir={out}", "--splits=val", "--image_size=16", "--workers=1",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "overwrite=True" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: output folder {str(out / 'val')!r} already holds "
        "['00000.tar', 'references.json']; rerun with --overwrite to replace them"
    )


def test_rebuilds_shared_val_references(flickr8k_dir: Path, tmp_path: Path) -> None:
    """Raw files rebuilt from the shared copy convert back to the same references and metadata."""
    raw = tmp_path / "raw"
    (raw / "Images").mkdir(parents=True)
    lines, lists = [], {}
    for split, fname in [("train", "trainImages"), ("val", "devImages")]:
        refs = load_references(flickr8k_dir / split)
        lists[split] = list(refs)
        lines += [f"{k}.jpg#{i}\t{c}" for k, cs in refs.items() for i, c in enumerate(cs)]
        (raw / f"Flickr_8k.{fname}.txt").write_text("".join(f"{k}.jpg\n" for k in refs))
    (raw / "Flickr_8k.testImages.txt").write_text("")
    (raw / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    shared_val = TarShardSource(flickr8k_dir / "val", cache_dir=tmp_path / "cache")
    for i in range(len(shared_val)):
        record = shared_val.read(i, verify_image=False)
        (raw / "Images" / f"{record['key']}.jpg").write_bytes(record["image_bytes"])

    flickr8k.convert(
        raw, tmp_path / "out", splits=["val"], image_repo="RlNZLER/Image-Text-Matching"
    )
    ours, theirs = tmp_path / "out" / "val", flickr8k_dir / "val"
    assert (ours / "references.json").read_bytes() == (theirs / "references.json").read_bytes()
    with tarfile.open(ours / "00000.tar") as a, tarfile.open(theirs / "00000.tar") as b:
        ma, mb = a.getmembers(), b.getmembers()
        assert [m.name for m in ma] == [m.name for m in mb]
        for x, y in zip(ma[:60], mb[:60], strict=True):
            if x.name.endswith(".json"):
                ja, jb = json.loads(a.extractfile(x).read()), json.loads(b.extractfile(y).read())
                jb["source_width"] = jb["source_height"] = 160  # ours came from 160-px copies
                assert list(ja.items()) == list(jb.items())
            elif x.name.endswith(".txt"):
                assert a.extractfile(x).read() == b.extractfile(y).read()
