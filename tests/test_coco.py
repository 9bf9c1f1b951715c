"""Tests of the COCO (Karpathy split) converter and TFDS builder on a generated COCO fixture."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from refine_jax.data import coco
from refine_jax.data.records import decode_image
from refine_jax.data.shards import TarShardSource, load_references
from refine_jax.data.tfds_source import TfdsCaptionSource, tfds_example_to_record

REPO = Path(__file__).resolve().parents[1]

# cocoid -> (folder, Karpathy split or None when not in the Karpathy file)
IMAGES = {
    9: ("train2014", "train"),
    25: ("train2014", "train"),
    30: ("val2014", "restval"),
    34: ("train2014", None),
    42: ("val2014", "restval"),
    73: ("val2014", "val"),
    74: ("val2014", "val"),
    133: ("val2014", "test"),
    136: ("val2014", "test"),
}
KARPATHY_ORDER = [73, 9, 30, 133, 25, 74, 42, 136]  # the file's order is kept within a split


def file_name(cocoid: int) -> str:
    return f"COCO_{IMAGES[cocoid][0]}_{cocoid:012d}.jpg"


def coco_captions(cocoid: int) -> list[str]:
    """The official captions, in annotation-id order (cleaned)."""
    return [f"image {cocoid} official caption {j}." for j in range(3)]


def karpathy_captions(cocoid: int) -> list[str]:
    return [f"image {cocoid} karpathy sentence {j}" for j in range(2)]


def ann_id(cocoid: int, j: int) -> int:
    return 1000 * cocoid + j


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_coco(root: Path) -> tuple[Path, Path]:
    """COCO images + caption files (annotations/), and a Karpathy split file beside them."""
    for cocoid, (folder, _) in IMAGES.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / file_name(cocoid)).write_bytes(jpeg(cocoid, (40 + cocoid % 7, 30)))
    (root / "annotations").mkdir()
    for folder in ("train2014", "val2014"):
        ids = [c for c, (f, _) in IMAGES.items() if f == folder]
        anns = [
            {"image_id": c, "id": ann_id(c, j), "caption": f" {coco_captions(c)[j]}\n"}
            for c in ids
            for j in range(3)
        ][::-1]  # out of id order on purpose
        if folder == "val2014":  # one empty caption: dropped and counted, the image kept
            anns.append({"image_id": 73, "id": ann_id(73, 9), "caption": "  "})
        data = {
            "info": {},
            "images": [
                {"id": c, "file_name": file_name(c), "width": 40, "height": 30} for c in ids
            ],
            "annotations": anns,
        }
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(data))
    karpathy = {
        "dataset": "coco",
        "images": [
            {
                "filepath": IMAGES[c][0],
                "filename": file_name(c),
                "cocoid": c,
                "imgid": i,
                "split": IMAGES[c][1],
                "sentids": [10 * i, 10 * i + 1],
                "sentences": [{"raw": s, "tokens": s.split()} for s in karpathy_captions(c)],
            }
            for i, c in enumerate(KARPATHY_ORDER)
        ],
    }
    path = root / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    return root, path


@pytest.fixture
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    return make_coco(tmp_path / "coco")


def split_keys(restval: str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in KARPATHY_ORDER:
        split = IMAGES[c][1]
        split = restval if split == "restval" else split
        if split is not None:
            out.setdefault(split, []).append(str(c))
    return out


@pytest.mark.parametrize("restval", ["train", "restval", None])
def test_plan_restval_handling(coco_files: tuple[Path, Path], restval: str | None) -> None:
    plan = coco.plan_splits(*coco_files, restval=restval)
    assert {s: [x.key for x in xs] for s, xs in plan.items()} == split_keys(restval)
    if restval == "train":
        assert list(plan) == ["train", "val", "test"]
        assert [x.key for x in plan["train"]] == ["9", "30", "25", "42"]


def test_convert_to_shards(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    out = tmp_path / "out"
    reports = coco.convert(coco_dir, karpathy, out, samples_per_shard=3, workers=2)
    assert list(reports) == ["train", "val", "test"]
    assert reports["val"].counts.dropped == {"whitespace_caption": 1}
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    for split, keys in split_keys("train").items():
        source = TarShardSource(out / split, cache_dir=tmp_path / "cache")
        assert [source.key(i) for i in range(len(source))] == keys
        for i, key in enumerate(keys):
            record = source[i]
            cocoid = int(key)
            assert record["captions"] == coco_captions(cocoid)
            original = (coco_dir / IMAGES[cocoid][0] / file_name(cocoid)).read_bytes()
            assert record["image_bytes"] == original  # kept byte for byte
            assert decode_image(record["image_bytes"]).shape == (30, 40 + cocoid % 7, 3)
        refs = json.loads((out / split / "references.json").read_text())
        assert refs["images"] == [{"id": k, "file_name": f"{k}.jpg"} for k in keys]
        assert [a["id"] for a in refs["annotations"]] == [
            ann_id(int(k), j) for k in keys for j in range(3)
        ]  # the official annotation ids
        assert load_references(out / split) == {k: coco_captions(int(k)) for k in keys}
    train = TarShardSource(out / "train", cache_dir=tmp_path / "cache")
    assert {train[i]["key"] for i in range(len(train))} == {"9", "25", "30", "42"}  # + restval


def test_metadata_and_karpathy_captions(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    shutil.rmtree(coco_dir / "annotations")  # not needed with the Karpathy sentences
    out = tmp_path / "out"
    coco.convert(
        coco_dir, karpathy, out, caption_source="karpathy", restval="restval", image_size=20
    )
    source = TarShardSource(out / "restval", cache_dir=tmp_path / "cache")
    assert [source.key(i) for i in range(len(source))] == ["30", "42"]
    record = source[0]
    assert record["captions"] == karpathy_captions(30)
    assert min(decode_image(record["image_bytes"]).shape[:2]) == 20  # shorter side resized
    with tarfile.open(source.shard_paths[0]) as tar:
        meta = json.loads(tar.extractfile("30.json").read())
    assert meta["source_id"] == file_name(30) and meta["cocoid"] == 30
    assert (meta["split"], meta["karpathy_split"], meta["dataset"]) == (
        "restval",
        "restval",
        "coco",
    )
    assert (meta["height"], meta["source_width"], meta["source_height"]) == (20, 42, 30)
    ids = [
        a["id"]
        for split in ("train", "val", "test", "restval")
        for a in json.loads((out / split / "references.json").read_text())["annotations"]
    ]
    assert len(ids) == len(set(ids)) == 16


def test_missing_image_is_skipped(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    (coco_dir / "val2014" / file_name(74)).unlink()
    report = coco.convert(coco_dir, karpathy, tmp_path / "out", splits=["val"])["val"]
    assert report.counts.good == 1 and report.skipped_keys == {"74": "missing_image"}


def test_missing_inputs_name_the_path(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        coco.convert(coco_dir, tmp_path / "no_such.json", out)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        coco.convert(tmp_path / "nowhere", karpathy, out)
    (coco_dir / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        coco.convert(coco_dir, karpathy, out)
    (coco_dir / "train2014").rename(coco_dir / "moved")
    with pytest.raises(FileNotFoundError, match="train2014"):
        coco.convert(coco_dir, karpathy, out, caption_source="karpathy")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"filepath": "val2014"}]}')
    with pytest.raises(ValueError, match="lacks"):
        coco.load_karpathy(bad)
    with pytest.raises(ValueError, match="restval"):
        coco.plan_splits(coco_dir, karpathy, restval="dev")


def test_tfds_builder_and_record_adapter(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    data_dir = tmp_path / "tfds"
    builder = coco.prepare_tfds(coco_dir, data_dir, karpathy_json=karpathy)
    splits = builder.info.splits
    assert {name: splits[name].num_examples for name in splits} == {"train": 4, "val": 2, "test": 2}
    assert list(data_dir.glob("coco_karpathy_captions/restval_in_train/1.0.0/*.array_record*"))

    # Served by name through tfds.data_source, without TensorFlow.
    ds = tfds.data_source(
        "coco_karpathy_captions",
        split="val",
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    example = ds[0]
    assert int(example["image_id"]) == 73
    assert example["image"] == (coco_dir / "val2014" / file_name(73)).read_bytes()
    assert [c.decode() for c in example["captions"]] == coco_captions(73)

    with pytest.raises(TypeError, match="SkipDecoding"):
        tfds_example_to_record(builder.as_data_source(split="val")[0])

    # The record source gives the same records as the tar shards.
    shards = tmp_path / "shards"
    coco.convert(coco_dir, karpathy, shards)
    for split, keys in split_keys("train").items():
        source = TfdsCaptionSource(split, data_dir)
        tar = TarShardSource(shards / split, cache_dir=tmp_path / "cache")
        assert len(source) == len(keys)
        for i in range(len(source)):
            assert source[i] == tar[i]
    assert TfdsCaptionSource("train", data_dir)[-1]["key"] == "42"


def test_tfds_restval_config_and_unprepared(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, _ = coco_files  # dataset_coco.json is found in the manual_dir
    data_dir = tmp_path / "tfds"
    builder = coco.prepare_tfds(coco_dir, data_dir, config="restval_split")
    assert sorted(builder.info.splits) == ["restval", "test", "train", "val"]
    source = TfdsCaptionSource("restval", data_dir, config="restval_split")
    assert [source[i]["key"] for i in range(len(source))] == ["30", "42"]
    by_dir = TfdsCaptionSource("restval", builder_dir=builder.data_dir)
    assert [by_dir[i] for i in range(2)] == [source[i] for i in range(2)]
    with pytest.raises(FileNotFoundError, match="no_builder_dir"):
        TfdsCaptionSource("train", builder_dir=tmp_path / "no_builder_dir")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        TfdsCaptionSource("train", tmp_path / "empty")


def test_the_tfds_reader_needs_no_builder_code(coco_files: tuple[Path, Path], tmp_path: Path):
    """Training reads the prepared dataset from its files alone: in a process that never imports
    the builder (data.coco), the reader serves each config, and says what to do when the
    dataset is not prepared."""
    coco_dir, karpathy = coco_files
    data_dir = tmp_path / "tfds"
    coco.prepare_tfds(coco_dir, data_dir, karpathy_json=karpathy)
    coco.prepare_tfds(coco_dir, data_dir, config="restval_split")
    reader = f"""
import sys
from refine_jax.data.tfds_source import TfdsCaptionSource
train = TfdsCaptionSource("train", {str(data_dir)!r})
restval = TfdsCaptionSource("restval", {str(data_dir)!r}, config="restval_split")
print([train[i]["key"] for i in range(len(train))], [restval[i]["key"] for i in range(2)])
print("refine_jax.data.coco" in sys.modules)
try:
    TfdsCaptionSource("train", {str(tmp_path / "empty")!r})
except FileNotFoundError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == str(split_keys("train")["train"]) + " ['30', '42']"
    assert out[1] == "False"
    assert "is not prepared" in out[2] and "prepare_tfds" in out[2]


def test_command(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dir, karpathy = coco_files
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "refine_jax.data.coco", f"--coco_dir={coco_dir}",
        f"--karpathy_json={karpathy}", f"--output_dir={out}", "--restval=none", "--workers=1",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert {s: summary[s]["counts"]["good"] for s in summary} == {"train": 2, "val": 2, "test": 2}


def test_tfds_format_refuses_the_tar_only_flags(coco_files: tuple[Path, Path], tmp_path: Path):
    coco_dir, karpathy = coco_files
    data_dir = tmp_path / "tfds"
    cmd = [
        sys.executable, "-m", "refine_jax.data.coco", f"--coco_dir={coco_dir}",
        f"--karpathy_json={karpathy}", f"--output_dir={data_dir}", "--format=tfds",
        "--splits=val", "--image_size=16", "--workers=1",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --splits, --image_size: options of --format=tar only")
    )
    assert not data_dir.exists()  # refused before anything is built


def test_command_rerun_names_the_overwrite_flag(coco_files: tuple[Path, Path], tmp_path: Path):
    coco_dir, karpathy = coco_files
    out = tmp_path / "out"
    coco.convert(coco_dir, karpathy, out, splits=["val"])
    cmd = [
        sys.executable, "-m", "refine_jax.data.coco", f"--coco_dir={coco_dir}",
        f"--karpathy_json={karpathy}", f"--output_dir={out}", "--splits=val", "--workers=1",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: output folder") and "rerun with --overwrite" in last
