"""The benchmarks run on the backend JAX picks (the accelerator when there is one): no script
or shared helper forces a platform, and each records the device it ran on."""

import re

from conftest import REPO

FORCES_A_PLATFORM = re.compile(r"environ\b.*\bJAX_PLATFORMS|jax_platforms?\b.*[\"']cpu")


def test_no_benchmark_forces_a_jax_platform():
    forcing = [
        path.name
        for path in sorted((REPO / "benchmarks").glob("*.py"))
        if FORCES_A_PLATFORM.search(path.read_text())
    ]
    assert forcing == []


def test_every_benchmark_records_its_device():
    """Each script writes the backend and device kind into its result (directly, or through
    common.machine_info)."""
    unrecorded = [
        path.name
        for path in sorted((REPO / "benchmarks").glob("*.py"))
        if path.name not in ("common.py", "profile_table.py", "quality_runs.py")  # helpers
        and "machine_info()" not in (text := path.read_text())
        and not ("default_backend()" in text and "device_kind" in text)
    ]
    assert unrecorded == []
