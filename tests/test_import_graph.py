"""The import graph of refine_jax stays layered and acyclic (the contracts in .importlinter, run
by import-linter), and loading a config imports no JAX, Flax or PIL."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "lint-imports is not installed: pip install -e '.[test]'"
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_loading_a_config_imports_no_jax_flax_or_pil():
    code = (
        "import sys; from refine_jax.config import load_config_file; "
        "load_config_file('configs/shapes.py:tiny'); "
        "print(sorted(m for m in ('jax', 'flax', 'PIL', 'optax') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
