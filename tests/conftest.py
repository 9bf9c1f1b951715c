"""Shared test setup: the JAX CPU backend, 8 fake devices, fast compiles, and tiny configs."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models compile for longer than they run: skip most XLA optimisation passes, here and
# in the subprocesses the tests start (they inherit the environment).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_config(name: str, arg: str = ""):
    """`configs/NAME.py`'s get_config(arg) (locked, as the command line sees it)."""
    from refine_jax.config import load_config_file

    return load_config_file(f"{REPO / 'configs' / name}.py:{arg}")


@pytest.fixture
def flickr8k_dir() -> Path:
    path = SHARED_DATA / "flickr8k"
    if not path.exists():
        pytest.skip(f"Flickr8k shards not found at {path} (shared data is not checked out)")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: end-to-end runs (notebooks, benchmark --quick runs, multi-process training, full "
        "trainings); the README's test command runs them, `-m 'not slow'` is the fast loop",
    )
