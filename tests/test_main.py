"""The main command end to end on the tiny shapes config: metrics and samples files."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("variant,num_steps", [("tiny", 4), ("tiny,autoregressive", 1)])
def test_main_trains_and_writes_metrics_and_samples(tmp_path, variant, num_steps):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.main",
            f"--config=configs/shapes.py:{variant}",
            f"--workdir={tmp_path}",
            "--config.profile_steps=(41,42)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [20, 40, 60]
    for record in metrics:
        assert {"step", "loss", *(f"loss_step_{k}" for k in range(1, num_steps + 1))} <= set(record)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32  # every held-out image once, the last batch padded
    assert len({s["image_id"] for s in samples}) == 32
    for sample in samples:
        assert len(sample["steps"]) == num_steps and len(sample["references"]) == 1
    assert "step 1:" in result.stdout
    assert (tmp_path / "tokenizer" / "spm.model").exists()
    assert metrics[-1]["model_flops_per_second"] > 0 and metrics[-1]["grad_norm"] > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # the opt-in profiler trace
