"""Captioning a shard set with a checkpoint: same layout, originals kept next to the teacher's
captions, bad samples skipped and counted, finished shards skipped on a re-run, and training
draws the teacher's captions at the configured rate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import trained_workdir
from test_workdir_config import BUCKET, fake_bucket

from refine_jax.caption_shards import SIDECAR_SUFFIX, Decoding, caption_shard_set
from refine_jax.data.pipeline import (
    NO_TEACHER_CAPTION,
    SKIP_REASONS,
    CaptionFeatures,
    count_skips,
)
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD
from refine_jax.data.shard_writer import ShardWriter
from refine_jax.data.shards import TarShardSource
from refine_jax.errors import ConfigError
from refine_jax.model_loading import load_model
from refine_jax.train import check_teacher_captions
from refine_jax.workdir_config import config_for_workdir


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_input(folder: Path) -> dict[str, list[str]]:
    """Two shards of 3 samples; one sample's image is corrupt. Returns the good samples'
    captions by key."""
    good = {}
    with ShardWriter(folder, samples_per_shard=3) as writer:
        for i in range(6):
            captions = [f"a photo number {i}", f"picture {i}"]
            image = b"\xff\xd8\xff\xe0 not really a jpeg" if i == 4 else jpeg(i)
            writer.write(f"s{i}", image, captions)
            if i != 4:
                good[f"s{i}"] = captions
    return good


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    workdir = trained_workdir(tmp_path_factory, "tiny")
    return load_model(config_for_workdir(None, workdir), workdir)


def test_captioned_shards_keep_originals_add_the_teacher_and_count_bad_samples(loaded, tmp_path):
    good = make_input(tmp_path / "in")
    teacher = {"workdir": "W", "checkpoint_step": loaded.step}
    summary = caption_shard_set(
        loaded, str(tmp_path / "in"), str(tmp_path / "out"), teacher=teacher
    )
    assert summary["shards_done"] == summary["shards_total"] == 2
    assert summary["written"] == 5 and summary["skipped"] == {"corrupt_image": 1}
    names = sorted(p.name for p in (tmp_path / "in").glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == names
    source = TarShardSource(str(tmp_path / "out"), verify_images=True)
    records = [source[i] for i in range(len(source))]
    assert {r["key"]: r["captions"] for r in records} == good
    for record in records:
        assert len(record.get(TEACHER_CAPTIONS_FIELD, [])) <= 1
    metas = [json.loads(member) for member in _json_members(tmp_path / "out")]
    assert all(m["teacher"] == {**teacher, "method": "beam", "beam": 3} for m in metas)
    assert all(len(m["teacher_steps"]) == loaded.config.model.num_refine_steps for m in metas)
    assert all(
        m[TEACHER_CAPTIONS_FIELD] == ([m["teacher_steps"][-1]] if m["teacher_steps"][-1] else [])
        for m in metas
    )
    references = json.loads((tmp_path / "out" / "references.json").read_text())
    assert len(references["annotations"]) == 10


def _json_members(folder: Path) -> list[bytes]:
    import tarfile

    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]
    return out


def test_a_rerun_skips_finished_shards_and_finishes_the_rest(loaded, tmp_path):
    make_input(tmp_path / "in")
    first = caption_shard_set(
        loaded, str(tmp_path / "in"), str(tmp_path / "out"), part=0, num_parts=2
    )
    assert first["shards_done"] == 1 and not (tmp_path / "out" / "references.json").exists()
    done = sorted((tmp_path / "out").glob(f"*{SIDECAR_SUFFIX}"))[0]
    stamp = done.stat().st_mtime_ns
    # Another teacher decoding would mix two teachers in one set: refused.
    with pytest.raises(ValueError, match="other settings .*'method': 'beam'.*this run: .*greedy"):
        caption_shard_set(
            loaded, str(tmp_path / "in"), str(tmp_path / "out"), Decoding("greedy"), None, 1, 2
        )
    logged = []
    second = caption_shard_set(
        loaded, str(tmp_path / "in"), str(tmp_path / "out"), log=logged.append
    )
    assert second["shards_done"] == 2 and second["written"] == 5
    assert done.stat().st_mtime_ns == stamp  # not captioned again
    assert any("already captioned" in line for line in logged)
    assert (tmp_path / "out" / "references.json").exists()


def test_a_uri_output_folder_is_written_through_epath(loaded, tmp_path, monkeypatch):
    good = make_input(tmp_path / "in")
    bucket = tmp_path / "bucket"
    with fake_bucket(bucket, monkeypatch):
        summary = caption_shard_set(loaded, str(tmp_path / "in"), f"{BUCKET}/teacher")
        logged = []
        caption_shard_set(loaded, str(tmp_path / "in"), f"{BUCKET}/teacher", log=logged.append)
    assert summary["shards_done"] == 2 and summary["written"] == len(good)
    assert sum("already captioned" in line for line in logged) == 2
    out = bucket / "teacher"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        p.name for p in (tmp_path / "in").glob("*.tar")
    )
    assert not list(out.glob("*.tmp"))
    assert {r["key"] for r in TarShardSource(str(out))} == set(good)
    assert json.loads((out / "references.json").read_text())["annotations"]
    assert not Path("gs:").exists()  # nothing went to a local `gs:/...` folder


def test_training_draws_teacher_captions_at_the_configured_rate(loaded):
    record = {"key": "k", "image": np.zeros((8, 8, 3), np.uint8), "captions": ["a red circle"]}
    record[TEACHER_CAPTIONS_FIELD] = ["a large red circle"]
    tokenizer = loaded.tokenizer
    config = loaded.config

    def captions_drawn(rate: float) -> set[str]:
        features = CaptionFeatures.from_config(config, tokenizer)
        features.teacher_caption_rate = rate
        rng = np.random.default_rng(0)
        drawn = set()
        for _ in range(40):
            example = features.random_map(record, rng)
            drawn.add(tokenizer.decode(example["caption"]))
        return drawn

    assert captions_drawn(0.0) == {"a red circle"}
    assert captions_drawn(1.0) == {"a large red circle"}
    assert captions_drawn(0.5) == {"a red circle", "a large red circle"}


def test_asking_for_teacher_captions_from_uncaptioned_records_is_counted(loaded):
    record = {"key": "k", "image": np.zeros((8, 8, 3), np.uint8), "captions": ["a red circle"]}
    features = CaptionFeatures.from_config(loaded.config, loaded.tokenizer)
    rng = np.random.default_rng(0)
    missing = SKIP_REASONS.index(NO_TEACHER_CAPTION)

    features.teacher_caption_rate = 0.5
    example = features.random_map(record, rng)
    assert loaded.tokenizer.decode(example["caption"]) == "a red circle"  # trained on, counted
    assert count_skips({k: example[k][None] for k in ("skip_reason", "dropped")}) == {
        "dropped/no_teacher_caption": 1
    }
    assert example["dropped"][missing] == 1
    features.teacher_caption_rate = 0.0  # not asked for: nothing counted
    assert not features.random_map(record, rng)["dropped"].any()
    record[TEACHER_CAPTIONS_FIELD] = ["a large red circle"]
    features.teacher_caption_rate = 0.5
    assert not features.random_map(record, rng)["dropped"].any()


def test_distilling_from_shards_no_teacher_captioned_is_refused_before_training(loaded, tmp_path):
    make_input(tmp_path / "in")
    config = loaded.config.copy_and_resolve_references()
    config.data.teacher_caption_rate = 0.5
    with pytest.raises(ConfigError, match="point config.data.train_path at shards written by"):
        check_teacher_captions(config, TarShardSource(str(tmp_path / "in")))
    caption_shard_set(loaded, str(tmp_path / "in"), str(tmp_path / "out"), Decoding())
    check_teacher_captions(config, TarShardSource(str(tmp_path / "out")))  # captioned: fine
    config.data.teacher_caption_rate = 0.0
    check_teacher_captions(config, TarShardSource(str(tmp_path / "in")))  # not asked for


def test_bad_part_is_refused(loaded, tmp_path):
    with pytest.raises(ValueError, match="part must be in"):
        caption_shard_set(
            loaded, str(tmp_path), str(tmp_path / "o"), Decoding(), part=2, num_parts=2
        )
