"""One run per workdir: a second run refuses while the first finishes intact; stale locks of
dead runs are taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_resume import command, saved_steps, wait_for

from refine_jax.errors import WorkdirLockedError
from refine_jax.workdir_lock import LOCK_FILE, WorkdirLock


def write_lock(workdir, **record):
    workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = {"pid": 1, "hostname": socket.gethostname(), "started": now, "heartbeat": now}
    (workdir / LOCK_FILE).write_text(json.dumps({**holder, **record}))


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_holder_is_refused_naming_the_workdir_and_the_holder(tmp_path):
    write_lock(tmp_path, pid=4242, hostname="tpu-worker-7")
    with pytest.raises(WorkdirLockedError) as error:
        WorkdirLock(tmp_path).acquire()
    message = str(error.value)
    assert str(tmp_path) in message and "pid 4242 on host tpu-worker-7" in message
    assert str(tmp_path / LOCK_FILE) in message  # what to delete if the holder is gone


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    with WorkdirLock(tmp_path) as lock:
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == lock.owner["pid"]
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit


def test_a_lock_naming_this_process_that_it_does_not_hold_is_taken_over(tmp_path):
    # A restarted container often runs the trainer under the dead run's pid (pid 1, say).
    write_lock(tmp_path, pid=os.getpid(), started=time.time() - 100)
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["started"] > time.time() - 100
        with pytest.raises(WorkdirLockedError):  # held by this process: not stale
            WorkdirLock(tmp_path).acquire()


def test_a_lock_whose_heartbeat_stopped_is_taken_over_from_any_host(tmp_path):
    write_lock(tmp_path, pid=4242, hostname="elsewhere", heartbeat=time.time() - 3600)
    with WorkdirLock(tmp_path, stale_after_s=600):
        pass


def test_the_heartbeat_keeps_a_long_run_lock_fresh(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        wait = time.time() + 10
        while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.time() < wait, "no heartbeat"
            time.sleep(0.05)
        with pytest.raises(WorkdirLockedError):
            WorkdirLock(tmp_path, stale_after_s=600).acquire()
        assert lock.owner["pid"] == json.loads((tmp_path / LOCK_FILE).read_text())["pid"]


def test_a_second_run_on_a_locked_workdir_exits_non_zero_while_the_first_finishes_intact(
    tmp_path,
):
    first = subprocess.Popen(
        command(tmp_path, steps=100_000),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, first)
    second = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True)
    assert second.returncode != 0
    assert f"workdir {tmp_path} is in use by another run (pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # no step written twice
    assert max(saved_steps(tmp_path)) >= steps[-1]
    assert not (tmp_path / LOCK_FILE).exists()
