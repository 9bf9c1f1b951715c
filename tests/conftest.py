"""Shared test setup: the JAX CPU backend, 8 fake devices, fast compiles, and tiny configs."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models compile for longer than they run: skip most XLA optimisation passes, here and
# in the subprocesses the tests start (they inherit the environment).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# XLA:CPU's older loop fusion emitters compile the tests' programs in half the time (a tiny
# training step: 7.7 s -> 3.7 s) and run them as fast; and one LLVM module per program instead
# of a split for parallel code generation saves the split's CPU time (a tiny 3-step training:
# 14.2-15.0 -> 13.3-13.5 CPU s), which the two test workers would otherwise spend on both cores.
# The tests compare programs compiled alike. Subprocesses that replace XLA_FLAGS (to drop a
# user's device-count flag) pass these on.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# One persistent XLA compilation cache for the whole session: this process, the test workers
# it starts (they inherit the environment) and the trainings the tests launch, so the same tiny
# models compile once. A fresh folder per session, removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="refine_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_config(name: str, arg: str = ""):
    """`configs/NAME.py`'s get_config(arg) (locked, as the command line sees it)."""
    from refine_jax.config import load_config_file

    return load_config_file(f"{REPO / 'configs' / name}.py:{arg}")


def init_params(model, config, vocab_size: int):
    """`train_state.init_variables` compiled into one program: the eager op-by-op init takes
    seconds per model on the CPU. The same boxed parameters, deterministic in config.seed."""
    from refine_jax.train_state import init_variables

    return jax.jit(lambda: init_variables(model, config, vocab_size))()


def param_shapes(config, vocab_size: int):
    """The parameters' shapes and dtypes, unboxed: the init traced, never computed."""
    from flax import linen as nn

    from refine_jax.model_kinds import build_model
    from refine_jax.train_state import init_variables

    model = build_model(config, vocab_size)
    return jax.eval_shape(lambda: nn.unbox(init_variables(model, config, vocab_size)))


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
