"""The notebooks in colabs/ run top to bottom on the CPU under REFINE_JAX_QUICK=1 (they train,
decode and evaluate for real, on tiny budgets), and are committed without outputs.

Each notebook runs in an ipykernel started with this test's own Python (a kernelspec written to
a temporary JUPYTER_PATH), in its own temporary working directory. The notebooks run one after
the other and their kernels share a temporary JAX compilation cache, so the tiny shapes model
that each of them trains compiles once (the test suite's other worker keeps the second core
busy meanwhile)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, TEST_XLA_FLAGS
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL_NAME = "refine-jax-tests"
CELL_TIMEOUT_S = 900  # a guard against hangs: on an idle 2-core CPU no cell takes a minute


def test_the_three_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {
        "quickstart.ipynb",
        "caption_your_images.ipynb",
        "explore_refinement.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    assert notebook.cells[0].cell_type == "markdown"
    for package in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "sentencepiece"):
        assert f"| {package} |" in notebook.cells[0].source  # the pinned versions


def kernel_environment(root: Path) -> dict[str, str]:
    """Writes a kernelspec for this Python under root and returns the kernels' environment."""
    spec_dir = root / "share" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "refine_jax tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    tmp = root / "tmp"
    tmp.mkdir()
    env = dict(os.environ)
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # without a device-count flag of the caller's
    env.update(
        JUPYTER_PATH=str(root / "share"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
        IPYTHONDIR=str(root / "ipython"),  # no user profile or start-up files
        TMPDIR=str(tmp),  # the notebooks' temporary workdirs and images
        REFINE_JAX_QUICK="1",
        JAX_PLATFORMS="cpu",
        # One CPU device (conftest's 8 fake ones are a jax.config setting, which a kernel does
        # not inherit) and unoptimised XLA: the tiny models compile for longer than they run.
        JAX_NUM_CPU_DEVICES="1",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYDEVD_DISABLE_FILE_VALIDATION="1",  # quiets a debugpy warning at kernel start
    )
    return env


def run_notebook(name: str, env: dict[str, str], workdir: Path) -> dict:
    """{notebook (executed), error (None or the failing cell's), seconds}."""
    notebook = nbformat.read(COLABS / name, as_version=4)
    cwd = workdir / Path(name).stem
    cwd.mkdir()
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(cwd)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=env)
    except Exception as e:  # CellExecutionError names the cell; reported by the test
        error = e
    return {"notebook": notebook, "error": error, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every notebook executed: name -> {notebook, error, seconds}."""
    root = tmp_path_factory.mktemp("notebooks")
    env = kernel_environment(root / "jupyter")
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    (root / "work").mkdir()
    before = sorted(COLABS.rglob("*"))
    with pytest.MonkeyPatch.context() as patch:  # this process looks the kernelspec up too
        patch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])
        patch.setenv("JUPYTER_RUNTIME_DIR", env["JUPYTER_RUNTIME_DIR"])
        results = {path.name: run_notebook(path.name, env, root / "work") for path in NOTEBOOKS}
    assert sorted(COLABS.rglob("*")) == before, "a notebook wrote next to the notebooks"
    return results


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, executed: dict[str, dict]):
    result = executed[path.name]
    if result["error"] is not None:
        pytest.fail(f"{path.name} failed after {result['seconds']:.0f} s:\n{result['error']}")
    code = [c for c in result["notebook"].cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if {"image/png", "text/html"} & set(o.get("data", {}))]
    assert shown, f"{path.name} displayed no figure or table"
    print(f"{path.name}: {result['seconds']:.1f} s")
