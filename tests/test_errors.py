"""One-line errors from the entry point; eval inputs, JSON sidecars and COCO or Flickr8k image
paths that are refused with a message naming the file instead of being read."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from test_coco import coco_files  # noqa: F401  (fixture)
from test_flickr8k_convert import TRAIN, jpeg, make_raw
from test_shards import sample, write_tar

from refine_jax.data import coco, flickr8k
from refine_jax.data.records import SkipReason
from refine_jax.data.referenced_shards import ReferencedShards
from refine_jax.data.shards import TarShardSource, load_references
from refine_jax.errors import DataError


def run_main(workdir, *flags):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.main",
            "--config=configs/shapes.py:tiny",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_unknown_config_key_is_one_line(tmp_path):
    result = run_main(tmp_path, "--config.model.no_such_key=1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'no_such_key' in --config.model.no_such_key. Every key is in "
        "refine_jax/config.py:base_config."
    ]


def test_an_unknown_config_variant_is_one_line(tmp_path):
    result = run_main(tmp_path, "--config=configs/shapes.py:tinyy")  # the later --config wins
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config variant(s) ['tinyy']; allowed: ['tiny', 'autoregressive', 'match']"
    ]


def test_a_config_error_is_one_line_with_the_traceback_in_error_log_or_with_verbose(tmp_path):
    result = run_main(tmp_path, "--config.learning_rate=nan")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite config value: config.learning_rate = nan")
    assert f"(traceback in {tmp_path / 'error.log'})" in last
    assert "Traceback" not in result.stderr
    assert "Traceback" in (tmp_path / "error.log").read_text()
    verbose = run_main(tmp_path, "--config.learning_rate=nan", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def shard_folder(root, keys, references):
    write_tar(root / "00000.tar", [m for key in keys for m in sample(key, [f"a {key}"])])
    (root / "references.json").write_text(references)
    return root


def test_an_unparsable_references_file_is_named(tmp_path):
    folder = shard_folder(tmp_path, ["a", "b"], "{not json")
    with pytest.raises(DataError, match=f"cannot read the references file {folder}/references"):
        load_references(folder)


def test_references_that_match_no_image_fail(tmp_path):
    references = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}
    folder = shard_folder(tmp_path, ["a", "b"], json.dumps(references))
    with pytest.raises(DataError, match="list none of its 2 images"):
        ReferencedShards(folder)


def test_a_json_sidecar_over_the_size_limit_is_not_read_and_is_counted(tmp_path):
    huge = json.dumps({"captions": ["x" * 5000]}).encode()
    members = [
        *sample("small", ["a small json"]),
        ("huge.jpg", sample("huge", ["y"])[0][1]),
        ("huge.txt", b"the txt caption"),
        ("huge.json", huge),
        ("only.jpg", sample("only", ["z"])[0][1]),
        ("only.json", huge),
    ]
    write_tar(tmp_path / "00000.tar", members)
    source = TarShardSource(tmp_path / "00000.tar", max_json_bytes=1000)
    records = {source.key(i): source.read(i) for i in range(len(source))}
    assert records["small"]["captions"] == ["a small json"]
    assert records["huge"]["captions"] == ["the txt caption"]
    assert records["huge"]["dropped"] == [SkipReason.JSON_TOO_LARGE]
    assert records["only"]["skip_reason"] == SkipReason.JSON_TOO_LARGE


def test_the_coco_converter_refuses_paths_outside_the_coco_folder(coco_files, tmp_path):  # noqa: F811
    coco_dir, karpathy = coco_files
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not for the converter")
    data = json.loads(karpathy.read_text())
    data["images"][0]["filepath"], data["images"][0]["filename"] = "..", "secret.jpg"
    data["images"][1]["filepath"], data["images"][1]["filename"] = "val2014", str(secret)
    karpathy.write_text(json.dumps(data))
    refused = {str(data["images"][i]["cocoid"]) for i in (0, 1)}
    plan = coco.plan_splits(coco_dir, karpathy, caption_source="karpathy")
    planned = [s for samples in plan.values() for s in samples]
    assert refused.isdisjoint(s.key for s in planned)
    assert all(str(s.image_path).startswith(str(coco_dir)) for s in planned)
    assert len(planned) == len(data["images"]) - 2


def test_the_flickr8k_converter_never_reads_outside_its_images_folder(tmp_path):
    raw = make_raw(tmp_path / "raw")
    (raw / "secret.jpg").write_bytes(jpeg(90))  # beside the images folder, not in it
    elsewhere = tmp_path / "elsewhere" / "absolute.jpg"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(jpeg(91))
    text = raw / "Flickr8k_text"
    hostile = ["../secret.jpg", str(elsewhere)]
    with open(text / "Flickr_8k.trainImages.txt", "a") as f:
        f.write("".join(f"{name}\n" for name in hostile))
    with open(text / "Flickr8k.token.txt", "a") as f:
        f.write("".join(f"{name}#0\ta caption of {name}\n" for name in hostile))
    out = tmp_path / "out"
    reports = flickr8k.convert(raw, out, splits=["train"])
    source = TarShardSource(out / "train", cache_dir=tmp_path / "cache")
    assert [source.key(i) for i in range(len(source))] == TRAIN
    assert reports["train"].counts.good == len(TRAIN)
    assert reports["train"].counts.skipped == {"unusable_name": 2}
    assert set(reports["train"].skipped_keys) == set(hostile)
    references = load_references(out / "train")
    assert sorted(references) == sorted(TRAIN)
