"""Preemption in real processes: SIGKILL then resume is exact; SIGTERM saves and exits 0."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO


def command(workdir, steps=8):
    return [
        sys.executable,
        "-m",
        "refine_jax.main",
        "--config=configs/shapes.py:tiny",
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=1000",
        "--config.data.eval_size=8",
    ]


def step_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}  # a re-run step's last record wins


def saved_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError("the training process did not reach the expected point")


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "uninterrupted"
    subprocess.run(command(reference), cwd=REPO, check=True, capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(interrupted), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    reached = wait_for(lambda: len([s for s in saved_steps(interrupted) if s >= 2]) >= 2, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert reached, "the run finished before it could be killed"
    killed_at = max(saved_steps(interrupted))
    assert killed_at < 8

    rerun = subprocess.run(
        command(interrupted), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from step" in rerun.stdout
    expected, resumed = step_losses(reference), step_losses(interrupted)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(killed_at + 1, 9):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    process = subprocess.Popen(
        command(tmp_path, steps=100_000),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: (
            (tmp_path / "metrics.jsonl").exists()
            and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3
        ),
        process,
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved a checkpoint at step" in stdout
    last_logged = max(step_losses(tmp_path))
    assert max(saved_steps(tmp_path)) >= last_logged


def test_sigint_saves_a_checkpoint_and_exits_zero_without_a_traceback(tmp_path):
    process = subprocess.Popen(
        command(tmp_path, steps=100_000),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGINT: saved a checkpoint at step" in stdout
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    assert max(saved_steps(tmp_path)) >= max(step_losses(tmp_path))


def in_process_config(steps):
    """The config `command` gives the trainer, for runs inside the test process."""
    from conftest import load_config

    config = load_config("shapes", "tiny")
    config.total_steps = steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 1000
    config.data.eval_size = 8
    return config


def test_sigint_saves_a_checkpoint_that_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    from refine_jax import sharding, train

    reference = tmp_path / "uninterrupted"
    train.train_and_evaluate(in_process_config(8), str(reference))

    real_global_batch, calls = sharding.global_batch, []

    def ctrl_c_during_step_three(batch, mesh, rules, global_rows):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_global_batch(batch, mesh, rules, global_rows)

    handler_before = signal.getsignal(signal.SIGINT)
    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(sharding, "global_batch", ctrl_c_during_step_three)
    assert train.train_and_evaluate(in_process_config(8), str(interrupted)) == {
        "stopped_at_step": 3
    }
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C is the caller's again
    assert max(saved_steps(interrupted)) == 3
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    capsys.readouterr()
    train.train_and_evaluate(in_process_config(8), str(interrupted))
    assert "resumed from step 3" in capsys.readouterr().out
    expected, resumed = step_losses(reference), step_losses(interrupted)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_a_second_sigint_exits_at_once_after_releasing_the_workdir(tmp_path):
    from refine_jax.stop_signals import StopSignals

    exits, released = [], []
    stop = StopSignals(before_forced_exit=lambda: released.append(True), exit_now=exits.append)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == ["SIGTERM", "SIGINT"] and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT] and released == [True]
    finally:
        stop.uninstall()
