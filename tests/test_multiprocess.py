"""Two local processes coordinated through jax.distributed on loopback train exactly like one
process with all their devices: 4 CPU devices each with the batch split across the processes,
and 1 each with the model split across them (the batch replicated, so both read the same rows)."""

import json
import os
import subprocess
import sys

import portpicker
import pytest
from conftest import REPO, TEST_XLA_FLAGS

pytestmark = pytest.mark.slow

COMMON = [
    "--config=configs/shapes.py:tiny",
    "--config.total_steps=3",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
    "--config.data.eval_size=8",
]
# The batch split over every device. A tuple flag given twice is concatenated, so each run
# names its mesh once.
BATCH_SPLIT = "--config.mesh.shape=(-1,1,1)"


def environment(devices):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=TEST_XLA_FLAGS,  # without a device-count flag of the caller's
    )
    return env


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def start_two_processes(workdir, flags, devices=4):
    """Two local processes of one run (`devices` CPU devices each), coordinated on loopback."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refine_jax.main",
                *flags,
                f"--workdir={workdir}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=environment(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    """The losses of the run on one process with 8 devices, the batch split over them."""
    single = tmp_path_factory.mktemp("single")
    subprocess.run(
        [sys.executable, "-m", "refine_jax.main", *COMMON, BATCH_SPLIT, f"--workdir={single}"],
        cwd=REPO,
        env=environment(8),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return losses(single)


@pytest.mark.parametrize("devices,mesh", [(4, "(-1,1,1)"), (1, "(1,1,-1)")])
def test_two_processes_train_like_one_process_with_all_their_devices(
    tmp_path, single_process_losses, devices, mesh
):
    multi = tmp_path / "multi"
    processes = start_two_processes(multi, [*COMMON, f"--config.mesh.shape={mesh}"], devices)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    assert f"'data': {8 if devices == 4 else 1}" in outputs[0][0]
    observed = losses(multi)
    assert sorted(observed) == [1, 2, 3]
    for step, loss in single_process_losses.items():
        assert abs(observed[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (
            step,
            observed,
            single_process_losses,
        )
    samples = (multi / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    import signal
    import time

    overrides = [o for o in COMMON if "total_steps" not in o and "log_every" not in o]
    overrides.append(BATCH_SPLIT)
    processes = start_two_processes(
        tmp_path, [*overrides, "--config.total_steps=100000", "--config.log_every_steps=2"]
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)  # only one worker is told
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in outputs[0][0]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) >= 4
