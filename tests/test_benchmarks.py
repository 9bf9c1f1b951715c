"""Every benchmark script runs with --quick (they measure; this only keeps them working)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, load_config
from test_evaluate import trained_workdir

pytestmark = pytest.mark.slow

# Scripts that read the Flickr8k shards, and scripts that build random inputs of the
# configured shapes (they need no data).
DATA_SCRIPTS = ["input_pipeline.py", "eval_speed.py", "flickr8k_quality.py"]
# (decode_speed.py and memory_vs_k.py run as parts of the accelerator suite's test below.)
SYNTHETIC_SCRIPTS = [
    "train_throughput.py",
    "scaling.py",
    "gradualness.py",  # trains on the generated shapes data
    "target_salience.py",  # shapes captions with --quick
    "calibration_ceiling.py",  # shapes captions only
]
# Flags a script's quick run adds, to keep an option working that its defaults leave out.
QUICK_FLAGS = {"train_throughput.py": ["--data_devices=1,2"]}  # the batch split over 2 CPUs
# Scripts that read a trained matching model: given the tests' tiny one.
MATCH_SCRIPTS = ["match_calibration.py", "caption_filter.py"]


def run_quick(script: str, output, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", f"--output={output}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("script", DATA_SCRIPTS)
def test_benchmark_runs_quick(tmp_path, script, flickr8k_dir):
    assert run_quick(script, tmp_path / "result.json")


@pytest.mark.parametrize("script", SYNTHETIC_SCRIPTS)
def test_synthetic_benchmark_runs_quick(tmp_path, script):
    result = run_quick(script, tmp_path / "result.json", *QUICK_FLAGS.get(script, []))
    assert result["quick"] is True
    assert result["machine"]["cpu_count"] and result["machine"]["jax"]
    if script == "train_throughput.py":
        assert [v["data_devices"] for v in result["variants"]] == [1, 2]
        assert all(v["hlo_instructions"] > 0 for v in result["variants"])


@pytest.mark.parametrize("script", MATCH_SCRIPTS)
def test_matching_model_benchmark_runs_quick(tmp_path, tmp_path_factory, script):
    workdir = trained_workdir(tmp_path_factory, "tiny,match")
    result = run_quick(script, tmp_path / "result.json", f"--match_workdir={workdir}")
    assert result["quick"] is True and result["machine"]["cpu_count"]


def test_accelerator_suite_runs_its_parts_and_reports_their_headline(tmp_path):
    # The suite on CPU with --quick, two of its parts: each runs as its script's own main()
    # would (train_throughput.py runs above, with a flag the suite does not pass).
    parts = {"decode_speed", "memory_vs_k"}
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/accelerator_suite.py",
            "--quick",
            f"--parts={','.join(sorted(parts))}",
            f"--output={tmp_path / 'suite.json'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["quick"] is True and set(suite["seconds"]) == parts
    for part in parts:
        assert suite[part]["quick"] is True
        assert suite[part]["machine"]["cpu_count"] and suite[part]["machine"]["jax"]
    ratios = suite["decode_speed"]["ratios"]
    decode_rows = [row for row in suite["headline"] if row[0].startswith("decode:")]
    memory_rows = [row for row in suite["headline"] if row[0].startswith("memory:")]
    assert decode_rows and len(decode_rows) == sum(
        r["baseline"].startswith("AR greedy") and "fixed" not in r["baseline"] for r in ratios
    )
    assert len(memory_rows) == len(suite["memory_vs_k"]["growth"]) > 0
    assert len(suite["headline"]) == len(decode_rows) + len(memory_rows)
    assert "## Accelerator suite" in result.stdout


def test_calibration_ceiling_counts_the_bank_images_each_description_fits(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import calibration_ceiling as ceiling

    captions = ["a red circle", "a blue circle", "a red square beside a circle", "a blue square"]
    exact = ceiling.ExactFit([[c] for c in captions])  # one caption per image
    words = exact.fits(["circle", "a circle", "circle a", "", "green"], False)
    assert words.tolist() == [
        [True, True, True, False],
        [True, True, True, False],
        [True, True, True, False],
        [True] * 4,  # the blank description fits every image
        [False] * 4,
    ]
    ordered = exact.fits(["circle a", "square circle", "red circle"], True)
    assert ordered.tolist() == [
        [False] * 4,
        [False, False, True, False],
        [True, False, True, False],
    ]
    # "circle" fits 3 of 4 images and "square" 2; "a blue circle" and "a blue square" 1 each:
    # each step carries that share of the final description's log(4 / 1) nats.
    chains = [["circle", "a circle", "a blue circle"], ["square", "a square", "a blue square"]]
    third = np.log(4 / 3) / np.log(4)
    np.testing.assert_allclose(exact.progress(chains, True), [[third, third, 1.0], [0.5, 0.5, 1.0]])
    # An image fits when one of its captions does.
    two = ceiling.ExactFit([["a red circle", "a blue circle"]]).fits(["blue circle"], True)
    assert two.tolist() == [[True]]
    with pytest.raises(ValueError, match="fits no bank image"):
        exact.progress([["circle", "a green circle"]], False)


def test_a_run_trained_past_the_asked_budget_is_not_scored_as_that_budget(
    tmp_path_factory, monkeypatch
):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality_runs

    workdir = trained_workdir(tmp_path_factory)  # 20 steps; no checkpoint at step 10
    config = load_config("shapes", "tiny")
    config.total_steps = 10
    with pytest.raises(ValueError, match="no checkpoint of step 10"):
        quality_runs.train_and_score(config, str(workdir), report_images=0)


@pytest.mark.parametrize(
    "script,flag,value,quick_value",
    [
        ("decode_speed", "ks", "4,8", "2"),
        ("scaling", "lengths", "16", "8"),
        ("memory_vs_k", "remat", "none", "dots"),
        ("calibration_ceiling", "num_images", 7, 50),
        ("train_throughput", "rounds", 5, 2),
    ],
)
def test_an_option_given_with_quick_wins_over_the_quick_size(
    monkeypatch, script, flag, value, quick_value
):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = __import__(script)
    assert getattr(module.parse_args(["--quick"]), flag) == quick_value
    assert getattr(module.parse_args(["--quick", f"--{flag}={value}"]), flag) == value
