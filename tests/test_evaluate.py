"""`--mode=eval` end to end on a 20-step tiny shapes checkpoint, `--eval_data` shard folders with
references.json, and the flat metrics the trainer logs (`evaluate_samples`)."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_config
from PIL import Image

from refine_jax.data.shapes import ShapesSource
from refine_jax.evaluation import caption_metrics as cm
from refine_jax.evaluation.evaluate import (
    default_eval_name,
    evaluate_checkpoint,
    evaluate_samples,
    load_model,
    split_metrics,
)

METRIC_KEYS = {
    "cider_per_step",
    "bleu4_per_step",
    "final_cider",
    "weighted_quality",
    "gradualness",
    "length_adherence",
    "refine_score",
    "monotonic_fraction",
    "num_images",
    "gradualness_raw",
    "length_adherence_raw",
    "schedule",
    "weights",
}


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m refine_jax.main ARGS` in the repository; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "refine_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def trained_workdir(tmp_path_factory: pytest.TempPathFactory, variant: str = "tiny") -> Path:
    """A workdir with a 20-step checkpoint of configs/shapes.py:VARIANT, trained once per test
    session: under xdist, the first worker to need it trains it in the session's shared temp
    folder (the others wait on a file lock) and each worker gets its own copy to write in."""
    name = f"trained-{variant.replace(',', '-')}"
    local = tmp_path_factory.getbasetemp()
    # xdist's workers have folders popen-gwN inside the session's own base temp folder.
    shared = local.parent if os.environ.get("PYTEST_XDIST_WORKER") else local
    trained = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (trained / "TRAINED").exists():
            shutil.rmtree(trained, ignore_errors=True)  # a training that failed part-way
            run_main(
                f"--config=configs/shapes.py:{variant}",
                f"--workdir={trained}",
                "--config.total_steps=20",
            )
            (trained / "TRAINED").touch()
    if shared == local:
        return trained
    workdir = local / name
    if not workdir.exists():
        shutil.copytree(trained, workdir)
    return workdir


@pytest.fixture(scope="module")
def refine_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_workdir(tmp_path_factory, "tiny")


@pytest.mark.parametrize("variant,num_steps", [("tiny", 4), ("tiny,autoregressive", 1)])
def test_eval_mode_writes_metrics_captions_and_report(tmp_path_factory, variant, num_steps):
    workdir = trained_workdir(tmp_path_factory, variant)
    # 20 held-out images with batch size 16: the last batch is padded with 12 copies.
    result = run_main(
        f"--config=configs/shapes.py:{variant}",
        f"--workdir={workdir}",
        "--mode=eval",
        "--config.data.eval_size=20",
    )
    out = workdir / "eval" / "heldout"
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["num_images"] == 20 and metrics["num_steps"] == num_steps
    kind = "autoregressive" if num_steps == 1 else "refine"
    assert metrics["checkpoint_step"] == 20 and metrics["model_kind"] == kind
    assert len(metrics["cider_per_step"]) == len(metrics["bleu4_per_step"]) == num_steps
    if num_steps == 1:  # the baseline: one description, schedule [1.0], weights [1.0]
        assert metrics["schedule"] == [1.0] and metrics["weights"] == [1.0]
        assert "chain_agreement" not in metrics
    else:
        assert metrics["schedule"] == [0.25, 0.5, 0.75, 1.0]
        assert len(metrics["chain_agreement"]) == 4  # shapes data knows the true chain
    assert math.isfinite(metrics["final_cider"])
    for key in ("gradualness", "length_adherence", "refine_score"):  # not applicable at K = 1
        assert (metrics[key] is None) if num_steps == 1 else math.isfinite(metrics[key])
    assert metrics["gradualness_encoding"] == "tfidf"  # no matching model given

    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    expected_ids = [ShapesSource("eval", 20, 0, 48)[i]["key"] for i in range(20)]
    assert [r["image_id"] for r in rows] == expected_ids  # every image once, in order
    assert [r["source_index"] for r in rows] == list(range(20))  # where each is in the split
    for row in rows:
        assert len(row["steps"]) == num_steps and len(row["references"]) == 1
    # The scores are those of the written captions: recomputed with the caption scorer, each
    # step's corpus CIDEr-D and BLEU-4 and every image's CIDEr-D; and the whole summary.
    references = {r["image_id"]: r["references"] for r in rows}
    for k in range(num_steps):
        scores = cm.evaluate_captions(references, {r["image_id"]: r["steps"][k] for r in rows})
        assert metrics["cider_per_step"][k] == pytest.approx(scores.corpus["CIDEr"], abs=1e-9)
        assert metrics["bleu4_per_step"][k] == pytest.approx(scores.corpus["Bleu_4"], abs=1e-9)
        for row in rows:
            expected = scores.per_image["CIDEr"][row["image_id"]]
            assert row["cider_per_step"][k] == pytest.approx(expected, abs=1e-9)
    assert metrics["final_cider"] == metrics["cider_per_step"][-1]
    recomputed = split_metrics(rows, load_config("shapes", variant))
    for key, value in recomputed.items():  # approx compares a flat list or number, not a dict
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    assert "final_cider" in result.stdout


def write_shard_folder(folder: Path, num_images: int = 5, corrupt: bool = True) -> dict:
    """A shard folder like the converters write: 00000.tar of KEY.jpg + KEY.txt (first caption)
    and references.json with three captions per image; plus one corrupt JPEG sample. Returns
    the references."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "dog", "cat", "ball"]
    references = {}
    with tarfile.open(folder / "00000.tar", "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(num_images):
            key = f"img{i:03d}"
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG")
            captions = [f"a {words[i % 6]} {words[(i + j) % 6]} number {j}" for j in range(3)]
            references[key] = captions
            add(f"{key}.jpg", buffer.getvalue())
            add(f"{key}.txt", captions[0].encode())
        if corrupt:
            add("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
            add("broken.txt", b"a broken image")
    coco = {
        "images": [{"id": k, "file_name": f"{k}.jpg"} for k in references],
        "annotations": [
            {"image_id": k, "id": n * 10 + j, "caption": c}
            for n, (k, caps) in enumerate(references.items())
            for j, c in enumerate(caps)
        ],
    }
    (folder / "references.json").write_text(json.dumps(coco))
    return references


def test_eval_data_scores_against_all_references(refine_workdir, tmp_path):
    references = write_shard_folder(tmp_path / "mysplit")
    config = load_config("shapes", "tiny")
    loaded = load_model(config, refine_workdir)
    summary = evaluate_checkpoint(
        config,
        refine_workdir,
        eval_data=str(tmp_path / "mysplit"),
        loaded=loaded,
        max_report_images=3,
    )
    out = refine_workdir / "eval" / "mysplit"
    assert Path(summary["output_dir"]) == out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    assert metrics["skipped"] == {"corrupt_image": 1}
    assert metrics["references_from_shard"] == 0
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert {r["image_id"]: r["references"] for r in rows} == references  # all 3, not the .txt
    assert "report.html" in {p.name for p in out.iterdir()}
    assert html_card_count((out / "report.html").read_text()) == 3  # bounded by the limit


def html_card_count(html: str) -> int:
    return html.count("<section class='card'")


def test_checkpoint_step_and_missing_checkpoints(refine_workdir, tmp_path):
    config = load_config("shapes", "tiny")
    assert load_model(config, refine_workdir, checkpoint_step=1).step == 1
    with pytest.raises(ValueError, match=r"no checkpoint of step 7 .*available: \[1, 20\]"):
        load_model(config, refine_workdir, checkpoint_step=7)
    (tmp_path / "tokenizer").symlink_to(refine_workdir / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_model(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(config, tmp_path / "nothing")


def test_evaluate_samples_gives_flat_log_entries():
    config = load_config("shapes", "tiny")
    chain = ["a circle", "a red circle", "a small red circle", "a small red circle"]
    other = ["a square", "a blue square", "a large blue square", "a large blue square"]
    samples = [
        {"image_id": "x", "references": [chain[-1]], "steps": chain, "chain": chain},
        {
            "image_id": "y",
            "references": [other[-1]],
            "steps": other[:3] + ["a square"],
            "chain": other,
        },
        {"image_id": "x", "references": [chain[-1]], "steps": [""] * 4, "chain": chain},
    ]
    flat = evaluate_samples(samples, config)
    json.dumps(flat, allow_nan=False)
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["num_images"] == 3.0  # a repeated image id still counts as its own sample
    assert flat["num_blank_final"] == 1.0
    for key in (
        "final_cider",
        "refine_score",
        "gradualness",
        "length_adherence",
        "weighted_quality",
        "monotonic_fraction",
        "gradualness_raw",
    ):
        assert key in flat
    for k in range(1, 5):
        assert {f"cider_step_{k}", f"bleu4_step_{k}", f"chain_agreement_step_{k}"} <= set(flat)
    assert flat["chain_agreement_step_1"] == pytest.approx(2 / 3)  # x and y, not the blank
    assert flat["chain_agreement_step_4"] == pytest.approx(1 / 3)
    nested = split_metrics(samples, config, per_image=True)
    assert [p["image_id"] for p in nested["per_image"]] == ["x", "y", "x"]
    assert flat["cider_step_4"] == pytest.approx(nested["cider_per_step"][3])
    with pytest.raises(ValueError, match="no reference"):
        evaluate_samples([dict(samples[0], references=[])], config)


def test_default_eval_name(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "00000.tar").touch()
    assert default_eval_name(None) == "heldout"
    assert default_eval_name(str(tmp_path / "val")) == "val"
    assert default_eval_name(str(tmp_path / "val") + "/") == "val"
    assert default_eval_name(str(tmp_path / "val" / "*.tar")) == "val"
    assert default_eval_name(str(tmp_path / "val" / "00000.tar")) == "val"
