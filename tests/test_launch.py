"""launch/tpu_pod.py: the exact gcloud lines of each subcommand, flag errors, and the dry run.

Nothing here talks to Google Cloud: commands are checked as printed by --dry_run, executed against
a fake `gcloud` that records its arguments, and the worker-side shell scripts are run in a local
bash with a fake home directory.
"""

import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "launch" / "tpu_pod.py"
_spec = importlib.util.spec_from_file_location("tpu_pod", SCRIPT)
tpu_pod = importlib.util.module_from_spec(_spec)
sys.modules["tpu_pod"] = tpu_pod
_spec.loader.exec_module(tpu_pod)

POD = ["--name=my-pod", "--zone=us-central2-b"]
V4 = [*POD, "--accelerator_type=v4-32"]
TRAIN = ["--config=configs/shapes.py", "--workdir=gs://my-bucket/runs/shapes"]
SPACED = "--config.data.path=gs://my-bucket/my data/train-*.tar"
SSH = "gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b"
GUARD = (
    'if [ -f "$HOME/refine_jax.pid" ] && kill -0 -- "-$(cat "$HOME/refine_jax.pid")" '
    '2>/dev/null; then echo "a refine_jax job is still running on $(hostname); stop it first" '
    ">&2; exit 1; fi"
)


def dry(*argv: str) -> list[str]:
    """Runs the CLI in-process with --dry_run; returns the printed lines (asserting exit 0)."""
    out = io.StringIO()
    assert tpu_pod.main([*argv, "--dry_run"], out=out) == 0
    return out.getvalue().splitlines()


def remote_script(line: str) -> str:
    """The --command=... value of a printed gcloud ssh line."""
    (arg,) = [a for a in shlex.split(line) if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def expected_run_line(train: str) -> str:
    script = (
        'cd refine_jax || { echo "no ~/refine_jax on $(hostname); run setup first" >&2; exit 1; }; '
        f'{GUARD}; export PATH="$HOME/refine_jax_venv/bin:$PATH"; '
        'echo "[launch] $(date -u +%Y-%m-%dT%H:%M:%SZ) starting" >> "$HOME/refine_jax.log"; '
        f'setsid nohup {train} >> "$HOME/refine_jax.log" 2>&1 < /dev/null & '
        'echo $! > "$HOME/refine_jax.pid"; echo "started on $(hostname), log in ~/refine_jax.log"'
    )
    return f"{SSH} --worker=all " + shlex.quote(f"--command={script}")


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A minimal checkout: setup.py with a known jax range, the package and a config."""
    repo = tmp_path / "repo"
    (repo / "refine_jax" / "__pycache__").mkdir(parents=True)
    (repo / "configs").mkdir()
    (repo / "setup.py").write_text('install_requires=["jax>=0.10.2,<0.11", "jaxlib>=0.10.2,<0.11"]')
    (repo / "README.md").write_text("# refine_jax\n")
    (repo / "refine_jax" / "__init__.py").write_text("")
    (repo / "refine_jax" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (repo / "configs" / "shapes.py").write_text("")
    return repo


def expected_setup_lines(repo: Path, tarball: str, extra: str = "gcsfs") -> list[str]:
    install = (
        f"set -e; {GUARD}; "
        "if ! python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1; then "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q update && "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y "
        "python3.11 python3.11-venv; fi; "
        "rm -rf refine_jax && mkdir refine_jax && tar -xzf refine_jax.tar.gz -C refine_jax; "
        "[ -x refine_jax_venv/bin/python ] || python3.11 -m venv refine_jax_venv; "
        "refine_jax_venv/bin/python -m pip install -q --upgrade pip; "
        "refine_jax_venv/bin/python -m pip install -q 'jax[tpu]>=0.10.2,<0.11'; "
        f"refine_jax_venv/bin/python -m pip install -q ./refine_jax {extra}"
    ).rstrip()
    return [
        f"tar -czf {tarball} --exclude=__pycache__ '--exclude=*.pyc' -C {repo} "
        "setup.py README.md refine_jax configs",
        f"gcloud compute tpus tpu-vm scp {tarball} my-pod:refine_jax.tar.gz --zone=us-central2-b "
        "--worker=all",
        f"{SSH} --worker=all " + shlex.quote(f"--command={install}"),
    ]


# ---------------------------------------------------------------------------------------------
# Exact command lines.


def test_create_plain_tpu_vm():
    assert dry("create", *V4) == [
        "gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"
    ]


@pytest.mark.parametrize(
    "flags,tail",
    [
        (["--spot"], "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"),
        (["--preemptible"], "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --preemptible"),
        (["--runtime_version=tpu-vm-v4-base"], "--accelerator-type=v4-32 --version=tpu-vm-v4-base"),
    ],
)
def test_create_flags(flags, tail):
    assert dry("create", *V4, *flags) == [
        f"gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b {tail}"
    ]


@pytest.mark.parametrize(
    "accelerator,runtime",
    [
        ("v2-8", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_default_runtime_per_family(accelerator, runtime):
    (line,) = dry("create", *POD, f"--accelerator_type={accelerator}")
    assert line.endswith(f"--accelerator-type={accelerator} --version={runtime}")


def test_create_queued_spot_with_project_waits_for_active():
    assert dry(
        "create", *POD, "--accelerator_type=v5litepod-16", "--queued", "--spot", "--project=my-proj"
    ) == [
        "gcloud compute tpus queued-resources create my-pod --zone=us-central2-b "
        "--project=my-proj --node-id=my-pod --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --spot",
        "gcloud compute tpus queued-resources describe my-pod --zone=us-central2-b "
        "--project=my-proj '--format=value(state.state)'",
    ]


def test_setup_ships_tarball_and_installs_jax_range_from_setup_py(fake_repo):
    tarball = str(Path(tempfile.gettempdir()) / "refine_jax-my-pod.tar.gz")
    assert dry("setup", *POD, f"--repo={fake_repo}") == expected_setup_lines(fake_repo, tarball)


def test_setup_options(fake_repo):
    assert dry(
        "setup", *POD, f"--repo={fake_repo}", "--tarball=/tmp/p.tar.gz", "--extra_packages="
    ) == expected_setup_lines(fake_repo, "/tmp/p.tar.gz", extra="")
    (*_, line) = dry(
        "setup",
        *POD,
        f"--repo={fake_repo}",
        "--python=python3",
        "--fresh_venv",
        "--extra_packages=gcsfs foo>=1,<2",
    )
    script = remote_script(line)
    assert "apt-get" not in script  # only a python3.X can be apt-installed by name
    assert "; rm -rf refine_jax_venv; " in script and "|| python3 -m venv refine_jax_venv" in script
    assert script.endswith("pip install -q ./refine_jax gcsfs 'foo>=1,<2'")


def test_setup_rejects_a_directory_that_is_not_a_checkout(tmp_path, capsys):
    assert tpu_pod.main(["setup", *POD, f"--repo={tmp_path}", "--dry_run"]) == 2
    assert "is not a refine_jax checkout" in capsys.readouterr().err


def test_jax_range_comes_from_the_real_setup_py():
    text = (REPO / "setup.py").read_text()
    requirement = tpu_pod.jax_tpu_requirement(REPO / "setup.py")
    assert requirement.startswith("jax[tpu]") and f'"jax{requirement[8:]}"' in text
    assert any(c in requirement for c in "<=~")


def test_run_quotes_overrides_with_spaces():
    lines = dry("run", *POD, *TRAIN, SPACED, "--config.batch_size=8")
    train = (
        "python -m refine_jax.main --config=configs/shapes.py "
        "--workdir=gs://my-bucket/runs/shapes "
        "'--config.data.path=gs://my-bucket/my data/train-*.tar' --config.batch_size=8"
    )
    assert lines == [expected_run_line(train)]
    # Two shell parses (local line, then the worker's shell) give back the override intact.
    assert SPACED in shlex.split(remote_script(lines[0]))


def test_run_config_variant_and_project():
    config = "--config=configs/shapes.py:tiny,autoregressive"
    (line,) = dry("run", *POD, "--project=my-proj", config, "--workdir=gs://b/w")
    assert line.startswith(f"{SSH} --project=my-proj --worker=all '--command=cd refine_jax ")
    assert f" setsid nohup python -m refine_jax.main {config} --workdir=gs://b/w >> " in line


def test_run_custom_command():
    (line,) = dry("run", *POD, "--command=echo hi && sleep 5")
    assert line == expected_run_line("bash -c 'echo hi && sleep 5'")


def test_logs_stop_delete():
    assert dry("logs", *POD) == [
        f"""{SSH} --worker=0 '--command=tail -n 100 -F "$HOME/refine_jax.log"'"""
    ]
    assert dry("logs", *POD, "--worker=3", "--lines=20", "--no_follow") == [
        f"""{SSH} --worker=3 '--command=tail -n 20 "$HOME/refine_jax.log"'"""
    ]
    (stop,) = dry("stop", *POD, "--grace_s=30")
    assert stop.startswith(f"{SSH} --worker=all '--command=if [ -f ")
    assert 'kill -TERM -- "-$g"' in stop and "[ $i -lt 30 ]" in stop
    assert dry("delete", *POD) == [
        "gcloud compute tpus tpu-vm delete my-pod --zone=us-central2-b --quiet"
    ]
    assert dry("delete", *POD, "--queued", "--project=p") == [
        "gcloud compute tpus queued-resources delete my-pod --zone=us-central2-b --project=p "
        "--force --quiet"
    ]


def test_up_is_create_then_setup_then_run(fake_repo):
    lines = dry("up", *V4, *TRAIN, SPACED, f"--repo={fake_repo}", "--tarball=/tmp/pkg.tar.gz")
    assert len(lines) == 5
    assert lines[0] == dry("create", *V4)[0]
    assert lines[1:4] == expected_setup_lines(fake_repo, "/tmp/pkg.tar.gz")
    assert lines[4] == dry("run", *POD, *TRAIN, SPACED)[0]
    kinds = [line.split()[4] for line in lines[:1] + lines[2:]]
    assert lines[1].startswith("tar ") and kinds == ["create", "scp", "ssh", "ssh"]
    assert "pip install" in lines[3] and "setsid nohup python -m refine_jax.main" in lines[4]


def test_use_existing_skips_create(fake_repo):
    lines = dry("up", *POD, *TRAIN, "--use_existing", f"--repo={fake_repo}")
    assert len(lines) == 4 and not any(" create " in line for line in lines)
    assert lines[0].startswith("tar ") and lines[3] == dry("run", *POD, *TRAIN)[0]
    assert dry("create", *POD, "--use_existing") == []


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, a clear message, nothing printed on stdout.


@pytest.mark.parametrize(
    "argv,message",
    [
        (["create", "--zone=us-central2-b", "--accelerator_type=v4-32"], "--name is required"),
        (["create", "--name=my-pod", "--accelerator_type=v4-32"], "--zone is required"),
        (["create", "--name=My_Pod", "--zone=us-central2-b"], "lowercase letters"),
        (["create", *POD, "--accelerator_type=v9-8"], "unknown accelerator family 'v9'"),
        (["create", *POD, "--accelerator_type=v4"], "FAMILY-SIZE"),
        (["create", *POD], "--accelerator_type is required"),
        (["create", *V4, "--spot", "--preemptible"], "exclusive"),
        (["create", *V4, "--queued", "--preemptible"], "--spot, not --preemptible"),
        (["run", *POD, "--workdir=gs://b/w"], "--config is required"),
        (["run", *POD, "--config=configs/shapes.py"], "--workdir is required"),
        (["run", *POD, "--config=configs/shapes.py", "--workdir=/tmp/w"], "not a gs:// path"),
        (["run", *POD, "--config=configs/missing.py", "--workdir=gs://b/w"], "does not exist"),
        (["run", *POD, "--config=/abs/shapes.py", "--workdir=gs://b/w"], "relative to the repo"),
        (["run", *POD, "--command=ls", "--config=configs/shapes.py"], "--command replaces"),
        (["run", *POD, *TRAIN, "--config.batch_size", "8"], "--config.KEY=VALUE"),
        (["stop", *POD, "--config.batch_size=8"], "unrecognized arguments"),
        (["logs", *POD, "--worker=-1"], "--worker=-1"),
        (["up", *POD, *TRAIN], "--accelerator_type is required"),
        (["up", *V4, "--config=configs/shapes.py", "--workdir=out"], "not a gs:// path"),
        (
            ["run", *V4, "--config=configs/shapes.py", "--workdir=runs/w", "--allow_local_workdir"],
            "not an absolute path: jobs run in ~/refine_jax, which `setup` replaces",
        ),
        (["frobnicate", *POD], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert tpu_pod.main([*argv, "--dry_run"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_local_workdir_allowed_with_warning_on_multi_host(capsys):
    lines = dry(
        "run", *V4, "--config=configs/shapes.py", "--workdir=/tmp/w", "--allow_local_workdir"
    )
    assert len(lines) == 1 and "--workdir=/tmp/w" in lines[0]
    assert "each of the pod's workers will write its own" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Dry runs execute nothing; real runs execute exactly the printed commands.


def test_dry_run_executes_nothing(monkeypatch, fake_repo):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"executed during a dry run: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    for argv in (
        ["up", *V4, *TRAIN, "--queued", f"--repo={fake_repo}"],
        ["logs", *POD],
        ["stop", *POD],
        ["delete", *POD],
    ):
        assert dry(*argv)


def test_dry_run_without_gcloud_on_path(tmp_path, fake_repo):
    empty = tmp_path / "bin"
    empty.mkdir()
    argv = [
        sys.executable,
        str(SCRIPT),
        "up",
        *V4,
        *TRAIN,
        f"--repo={fake_repo}",
        f"--tarball={tmp_path / 'pkg.tar.gz'}",
        "--dry_run",
    ]
    result = subprocess.run(
        argv, env={"PATH": str(empty)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5
    assert not (tmp_path / "pkg.tar.gz").exists()  # not even the local tar ran
    # Without --dry_run the missing gcloud is reported before anything runs.
    result = subprocess.run(
        argv[:-1], env={"PATH": str(empty)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "gcloud CLI is not on PATH" in result.stderr
    assert result.stdout == ""


FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print("ACTIVE")
sys.exit(1 if os.environ.get("FAKE_GCLOUD_FAIL") in sys.argv[1:5] else 0)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch) -> Path:
    """A `gcloud` on PATH that records each call's argv (one JSON list per line) and succeeds."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    return log


def test_real_run_executes_exactly_the_dry_run_commands(fake_gcloud, fake_repo, tmp_path):
    tarball = tmp_path / "pkg.tar.gz"
    argv = ["up", *V4, *TRAIN, SPACED, "--queued", f"--repo={fake_repo}", f"--tarball={tarball}"]
    expected = [shlex.split(line) for line in dry(*argv)]
    assert tpu_pod.main(argv) == 0
    calls = [json.loads(line) for line in fake_gcloud.read_text().splitlines()]
    assert [["gcloud", *c] for c in calls] == [e for e in expected if e[0] == "gcloud"]
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "README.md", "refine_jax/__init__.py", "configs/shapes.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_the_log_hint_after_run_names_the_project(fake_gcloud, capsys):
    assert tpu_pod.main(["run", *POD, *TRAIN, "--project=other-proj"]) == 0
    hint = capsys.readouterr().err.splitlines()[-1]
    assert hint == (
        "follow worker 0's log: python launch/tpu_pod.py logs --name=my-pod "
        "--zone=us-central2-b --project=other-proj"
    )


def test_a_failing_command_stops_the_sequence(
    fake_gcloud, fake_repo, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FAKE_GCLOUD_FAIL", "scp")
    argv = ["up", *V4, *TRAIN, f"--repo={fake_repo}", f"--tarball={tmp_path / 'p.tar.gz'}"]
    assert tpu_pod.main(argv) == 1
    verbs = [json.loads(line)[3] for line in fake_gcloud.read_text().splitlines()]
    assert verbs == ["create", "scp"]  # neither install nor run after the failed copy
    assert "command failed" in capsys.readouterr().err


def test_wait_until_active_polls_and_fails_on_bad_state():
    args = tpu_pod.parse(["create", *V4, "--queued"])[0]
    for states, ok in (
        (["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], True),
        (["PROVISIONING", "FAILED"], False),
    ):
        runner = tpu_pod.Runner(dry_run=True, out=io.StringIO(), sleep=lambda s: None)
        replies = iter(states)
        runner.capture = lambda argv, replies=replies: next(replies)
        if ok:
            tpu_pod.wait_until_active(args, runner)
        else:
            with pytest.raises(tpu_pod.LaunchError, match="FAILED"):
                tpu_pod.wait_until_active(args, runner)


# ---------------------------------------------------------------------------------------------
# The worker-side scripts, run by a local bash as sshd would run them.


def test_worker_scripts_are_valid_shell(fake_repo):
    lines = (
        dry("up", *V4, *TRAIN, SPACED, f"--repo={fake_repo}")
        + dry("logs", *POD)
        + dry("stop", *POD)
        + dry("run", *POD, "--command=cd x && ls")
    )
    for line in lines:
        if line.startswith(SSH):
            check = subprocess.run(
                ["bash", "-n", "-c", remote_script(line)], capture_output=True, text=True
            )
            assert check.returncode == 0, (line, check.stderr)


@pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("setsid")), reason="needs bash and setsid"
)
def test_run_detaches_passes_arguments_and_stop_sends_sigterm(tmp_path):
    home = tmp_path / "home"
    (home / "refine_jax").mkdir(parents=True)
    venv_bin = home / "refine_jax_venv" / "bin"
    venv_bin.mkdir(parents=True)
    # Stands in for the trainer: records its argv, checkpoints (says so) on SIGTERM.
    (venv_bin / "python").write_text(
        # Written aside and renamed, so the test never reads a half-written file.
        '#!/bin/bash\nprintf "%s\\n" "$PWD" "$@" > "$HOME/argv.tmp"\n'
        'mv "$HOME/argv.tmp" "$HOME/argv.txt"\n'
        "trap 'echo saved on SIGTERM; exit 0' TERM\n"
        "echo training\nwhile true; do sleep 0.05; done\n"
    )
    (venv_bin / "python").chmod(0o755)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    quoted = '--config.model.name=it\'s "quoted"'
    (run_line,) = dry("run", *POD, *TRAIN, SPACED, quoted)
    (stop_line,) = dry("stop", *POD, "--grace_s=10")

    def worker(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", remote_script(line)],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    pid_file, log = home / "refine_jax.pid", home / "refine_jax.log"
    try:
        started = worker(run_line)  # returns although the job keeps running: it is detached
        assert started.returncode == 0 and "started on" in started.stdout, started.stderr
        deadline = time.monotonic() + 120  # a loaded 2-core machine starts it late
        while not (home / "argv.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (home / "argv.txt").read_text().splitlines() == [
            str(home / "refine_jax"),
            "-m",
            "refine_jax.main",
            *TRAIN,
            SPACED,
            quoted,
        ]
        pid = int(pid_file.read_text())
        assert os.getpgid(pid) == pid  # its own process group, which stop signals

        again = worker(run_line)
        assert again.returncode == 1 and "still running" in again.stderr

        stopped = worker(stop_line)
        assert stopped.returncode == 0 and "stopped on" in stopped.stdout, stopped.stderr
        assert "saved on SIGTERM" in log.read_text() and not pid_file.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert "nothing running" in worker(stop_line).stdout
    finally:
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
