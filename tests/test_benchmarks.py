"""Every benchmark script runs with --quick (they measure; this only keeps them working)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("script", ["input_pipeline.py", "eval_speed.py"])
def test_benchmark_runs_quick(tmp_path, script, flickr8k_dir):
    output = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", f"--output={output}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(output.read_text())
