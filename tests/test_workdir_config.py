"""A workdir records the config it was trained with: `--mode=eval` and `--mode=caption` work from
`--workdir` alone, also when the workdir is a URI (`gs://bucket/run`, here a fake bucket mapped
onto a local folder), and a given `--config` of another model shape fails naming the keys."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from absl import flags
from conftest import load_config
from etils import epath
from etils.epath import testing as epath_testing
from PIL import Image
from test_evaluate import run_main, trained_workdir

from refine_jax import model_loading
from refine_jax.checkpointing import Checkpointer
from refine_jax.evaluation.caption_images import caption_images
from refine_jax.evaluation.evaluate import evaluate_checkpoint
from refine_jax.workdir_config import (
    CONFIG_FILE,
    config_for_workdir,
    read_recorded_config,
    record_config,
)

BUCKET = "gs://test-bucket"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_workdir(tmp_path_factory, "tiny")


def write_images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40 + i, 50), (60 * i, 120, 0)).save(folder / f"img{i}.png")
    return folder


def test_recorded_config_reads_back_equal_with_tuples(tmp_path):
    config = load_config("shapes", "tiny,autoregressive")
    record_config(config, tmp_path)
    recorded = read_recorded_config(tmp_path)
    assert recorded.to_dict() == config.to_dict()
    assert isinstance(recorded.mesh.shape, tuple) and isinstance(recorded.mesh.axis_rules[0], tuple)
    assert read_recorded_config(tmp_path / "elsewhere") is None


def test_recorded_locations_are_absolute_so_the_workdir_reads_the_same_data_from_anywhere(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = load_config("shapes", "tiny")
    config.data.path = "data/flickr8k"
    config.data.eval_path = "val/*.tar, gs://bucket/val"
    config.tokenizer.path = "~/tok.model"
    config.model.pretrained_encoder = ""
    record_config(config, tmp_path)
    recorded = read_recorded_config(tmp_path)
    assert recorded.data.path == str(tmp_path / "data" / "flickr8k")
    assert recorded.data.eval_path == f"{tmp_path / 'val' / '*.tar'},gs://bucket/val"
    assert recorded.tokenizer.path == os.path.expanduser("~/tok.model")
    assert recorded.model.pretrained_encoder == ""
    assert config.data.path == "data/flickr8k"  # the caller's config is left as it is


def test_config_for_workdir_prefers_the_given_config_and_names_shape_differences(tmp_path):
    trained = load_config("shapes", "tiny")
    record_config(trained, tmp_path)
    assert config_for_workdir(None, tmp_path).to_dict() == trained.to_dict()
    given = load_config("shapes", "tiny")
    given.model.dropout_rate = 0.3  # not a shape: allowed, and the given config wins
    assert config_for_workdir(given, tmp_path).model.dropout_rate == 0.3
    given.model.width, given.model.num_refine_steps = 64, 6
    with pytest.raises(ValueError) as error:
        config_for_workdir(given, tmp_path)
    assert "model.width: recorded 32, given 64" in str(error.value)
    assert "model.num_refine_steps: recorded 4, given 6" in str(error.value)
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_FILE} does not exist.*--config"):
        config_for_workdir(None, tmp_path / "untrained")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": {"no_such_key": 1}}))
    with pytest.raises(ValueError, match="model.no_such_key"):
        read_recorded_config(tmp_path)


def test_trainer_records_its_config_and_eval_caption_need_only_the_workdir(workdir, tmp_path):
    recorded = json.loads((workdir / CONFIG_FILE).read_text())
    assert recorded["total_steps"] == 20 and recorded["model"]["width"] == 32  # the overrides
    images = write_images(tmp_path / "photos")
    run_main(f"--workdir={workdir}", "--mode=eval", "--eval_name=from_workdir")
    metrics = json.loads((workdir / "eval" / "from_workdir" / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == 20 and metrics["num_steps"] == 4
    output = tmp_path / "captions.jsonl"
    run_main(f"--workdir={workdir}", "--mode=caption", f"--images={images}", f"--output={output}")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["steps"]) == 4 for r in rows)


# ---------------------------------------------------------------------------------------------
# A URI workdir: every epath call on gs://test-bucket/... lands in a local folder, and the
# checkpointer's arrays (read by tensorstore, not epath) are read from that folder too.


@contextlib.contextmanager
def fake_bucket(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def local(path) -> str:
        text = os.fspath(path)
        return str(root) + text[len(BUCKET) :] if text.startswith(BUCKET) else text

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    class BucketCheckpointer(Checkpointer):
        def __init__(self, directory, *args, **kwargs):
            assert os.fspath(directory).startswith(BUCKET + "/"), directory  # `//` kept
            super().__init__(local(directory), *args, **kwargs)

    monkeypatch.setattr(model_loading, "Checkpointer", BucketCheckpointer)
    functions = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove")
    with epath_testing.mock_epath(
        **{name: one for name in (*functions, "rmtree", "stat", "walk")},
        rename=two,
        replace=two,
        copy=two,
    ):
        yield


def run_main_in_process(*args: str) -> None:
    """refine_jax.main's main with these flags, in this process (where the fake bucket is)."""
    from refine_jax import main

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["refine_jax.main", *args])
    try:
        main.main(["refine_jax.main"])
    finally:
        flags.FLAGS.unparse_flags()


def test_eval_and_caption_with_a_uri_workdir(workdir, tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    shutil.copytree(workdir, bucket / "run", ignore=shutil.ignore_patterns("eval", "captions"))
    images = write_images(tmp_path / "photos")
    uri = f"{BUCKET}/run"
    with fake_bucket(bucket, monkeypatch):
        assert epath.Path(uri, "tokenizer", "spm.model").exists()  # the fake bucket works
        summary = evaluate_checkpoint(None, uri, eval_name="uri", max_report_images=2)
        assert summary["output_dir"] == f"{uri}/eval/uri"
        assert summary["checkpoint_step"] == 20
        out = io.StringIO()
        captioned = caption_images(None, uri, images, stdout=out, stderr=io.StringIO())
        assert captioned["output"] == f"{uri}/captions/photos.jsonl"
        run_main_in_process(f"--workdir={uri}", "--mode=eval", "--eval_name=main_uri")
        run_main_in_process(f"--workdir={uri}", "--mode=caption", f"--images={images}")
    for name in ("uri", "main_uri"):
        assert (bucket / "run" / "eval" / name / "report.html").exists()
        metrics = json.loads((bucket / "run" / "eval" / name / "metrics.json").read_text())
        assert metrics["num_images"] == 32
    rows = (bucket / "run" / "captions" / "photos.jsonl").read_text().splitlines()
    assert len(rows) == 3 and len(json.loads(rows[0])["steps"]) == 4
    assert not Path("gs:").exists()  # nothing was written to a local `gs:/...` folder
