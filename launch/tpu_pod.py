"""Create, set up, run on, watch, stop and delete a Cloud TPU VM (pod) for refine_jax training.

Every subcommand only builds `gcloud` (and one local `tar`) command lines and runs them one after
another; with --dry_run it prints each command, one per line, and runs nothing. See
launch/README.md for a walk-through.

    python launch/tpu_pod.py up --name=my-pod --zone=us-central2-b --accelerator_type=v4-32 \\
        --config=configs/shapes.py --workdir=gs://my-bucket/runs/shapes --dry_run

Subcommands: create, setup, run, logs, stop, delete, up (= create + setup + run).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]

# Default TPU runtime (the VM image) per accelerator family; --runtime_version overrides it.
RUNTIME_VERSIONS: dict[str, str] = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Slices larger than this (cores for v2/v3/v4/v5p, chips for v5litepod/v6e) span several hosts.
MAX_SINGLE_HOST_SIZE = 8

# What `setup` ships to the workers: enough to `pip install` the package and to find configs/.
SHIPPED_PATHS = ("setup.py", "README.md", "refine_jax", "configs")
CONFIG_DIRS = ("configs", "refine_jax")

# Paths on every worker, relative to the login user's home directory (where ssh commands start).
REMOTE_TARBALL = "refine_jax.tar.gz"
REMOTE_SRC = "refine_jax"
REMOTE_VENV = "refine_jax_venv"
REMOTE_LOG = '"$HOME/refine_jax.log"'
REMOTE_PID = '"$HOME/refine_jax.pid"'  # holds the job's process-group id

# etils.epath reads and writes gs:// through fsspec when TensorFlow is absent, which needs gcsfs.
DEFAULT_EXTRA_PACKAGES = "gcsfs"
DEFAULT_PYTHON = "python3.11"  # setup.py needs >= 3.11; Ubuntu 22.04 images ship 3.10
NAME_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
ACCELERATOR_RE = re.compile(r"([a-z0-9]+)-([0-9]+)")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)
JAX_REQUIREMENT_RE = re.compile(r"""["']jax\s*([<>=!~][^"']*)["']""")
QUEUED_FAILED_STATES = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")


class LaunchError(Exception):
    """A bad flag or a failed command; main() prints it as `error: ...` and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# Validation helpers.


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    """Splits e.g. 'v4-32' into ('v4', 32); rejects families we have no runtime default for."""
    match = ACCELERATOR_RE.fullmatch(accelerator_type or "")
    if not match:
        raise LaunchError(
            f"--accelerator_type={accelerator_type!r} is not of the form FAMILY-SIZE "
            f"(e.g. v4-32, v5litepod-16)"
        )
    family, size = match.group(1), int(match.group(2))
    if family not in RUNTIME_VERSIONS:
        raise LaunchError(
            f"unknown accelerator family {family!r} in --accelerator_type={accelerator_type}; "
            f"known families: {', '.join(RUNTIME_VERSIONS)}"
        )
    if size < 1:
        raise LaunchError(f"--accelerator_type={accelerator_type}: size must be positive")
    return family, size


def is_multi_host(accelerator_type: str) -> bool:
    """Whether the slice has several TPU VM workers (each runs its own copy of the program)."""
    return parse_accelerator(accelerator_type)[1] > MAX_SINGLE_HOST_SIZE


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU VM image recommended for the accelerator's family."""
    return RUNTIME_VERSIONS[parse_accelerator(accelerator_type)[0]]


def jax_tpu_requirement(setup_py: Path) -> str:
    """'jax[tpu]' pinned to the jax range setup.py allows, so setup installs a matching libtpu."""
    try:
        text = setup_py.read_text(encoding="utf-8")
    except OSError as e:
        raise LaunchError(f"cannot read {setup_py}: {e}") from e
    match = JAX_REQUIREMENT_RE.search(text)
    if not match:
        raise LaunchError(f"no 'jax' requirement with a version range found in {setup_py}")
    return "jax[tpu]" + re.sub(r"\s+", "", match.group(1))


def check_name_and_zone(args: argparse.Namespace) -> None:
    """TPU names are lowercase DNS labels; zones look like us-central2-b."""
    if not args.name:
        raise LaunchError("--name is required (the TPU VM's name, e.g. --name=my-pod)")
    if not NAME_RE.fullmatch(args.name):
        raise LaunchError(
            f"--name={args.name!r}: use lowercase letters, digits and hyphens, starting with a "
            f"letter and not ending with a hyphen (at most 63 characters)"
        )
    if not args.zone:
        raise LaunchError("--zone is required (e.g. --zone=us-central2-b)")
    if not ZONE_RE.fullmatch(args.zone):
        raise LaunchError(f"--zone={args.zone!r} does not look like a zone (e.g. us-central2-b)")


def check_config_file(config: str, repo: Path) -> None:
    """The config must be a file inside the shipped tree, since workers run from a copy of it."""
    file_part = config.split(":", 1)[0]
    path = Path(file_part)
    top = path.parts[0] if path.parts else ""
    if path.is_absolute() or ".." in path.parts or top not in CONFIG_DIRS:
        dirs = " or ".join(d + "/" for d in CONFIG_DIRS)
        raise LaunchError(
            f"--config={config}: give a path relative to the repository under {dirs} (e.g. "
            f"configs/shapes.py); the workers run from the copy that `setup` ships"
        )
    if not (repo / path).is_file():
        raise LaunchError(f"--config={config}: {repo / path} does not exist")


def check_workdir(args: argparse.Namespace) -> None:
    """Requires gs:// unless --allow_local_workdir: VM disks die with the VM and are per worker."""
    workdir = args.workdir
    if workdir.startswith("gs://"):
        if len(workdir) <= len("gs://") or workdir.startswith("gs:///"):
            raise LaunchError(f"--workdir={workdir!r}: missing bucket name (gs://BUCKET/PATH)")
        return
    multi = bool(args.accelerator_type) and is_multi_host(args.accelerator_type)
    if args.allow_local_workdir and not workdir.startswith("/"):
        raise LaunchError(
            f"--workdir={workdir!r} is not an absolute path: jobs run in ~/{REMOTE_SRC}, which "
            "`setup` replaces with every code re-ship, checkpoints and all. Give an absolute "
            "path on the workers' disks"
        )
    if not args.allow_local_workdir:
        raise LaunchError(
            f"--workdir={workdir!r} is not a gs:// path. On a pod every worker needs the same "
            f"workdir (checkpoints are written jointly and resumed from there), and a VM's disk "
            f"is lost when it is deleted or preempted. Use gs://BUCKET/PATH, or pass "
            f"--allow_local_workdir to use a path on each worker's own disk anyway"
        )
    consequence = (
        "each of the pod's workers will write its own, partial checkpoints"
        if multi
        else "checkpoints stay on the VM's disk and are lost with the VM"
    )
    print(f"warning: --workdir={workdir} is not on GCS: {consequence}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Command builders: pure functions from flags to argv lists.


def gcloud_tpu(
    group: str, verb: str, positional: Sequence[str], args: argparse.Namespace, *flags: str
) -> list[str]:
    """`gcloud compute tpus GROUP VERB POSITIONAL --zone=Z [--project=P] FLAGS...`."""
    argv = ["gcloud", "compute", "tpus", group, verb, *positional, f"--zone={args.zone}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv + list(flags)


def ssh(args: argparse.Namespace, worker: str, script: str) -> list[str]:
    """Runs the shell SCRIPT on one worker (or 'all', in parallel) of the TPU VM."""
    return gcloud_tpu(
        "tpu-vm", "ssh", [args.name], args, f"--worker={worker}", f"--command={script}"
    )


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """`tpu-vm create` (blocks until READY), or `queued-resources create` (polled separately)."""
    runtime = args.runtime_version or default_runtime_version(args.accelerator_type)
    if args.queued:
        flags = [
            f"--node-id={args.name}",
            f"--accelerator-type={args.accelerator_type}",
            f"--runtime-version={runtime}",
        ]
        if args.spot:
            flags.append("--spot")
        return [gcloud_tpu("queued-resources", "create", [args.name], args, *flags)]
    flags = [f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
    if args.spot:
        flags.append("--spot")
    if args.preemptible:
        flags.append("--preemptible")
    return [gcloud_tpu("tpu-vm", "create", [args.name], args, *flags)]


def queued_state_command(args: argparse.Namespace) -> list[str]:
    """Prints just the queued resource's state (WAITING_FOR_RESOURCES, ..., ACTIVE)."""
    return gcloud_tpu(
        "queued-resources", "describe", [args.name], args, "--format=value(state.state)"
    )


def default_tarball(name: str) -> str:
    """Local path of the package tarball that `setup` builds for pod NAME."""
    return str(Path(tempfile.gettempdir()) / f"refine_jax-{name}.tar.gz")


def running_guard() -> str:
    """Shell snippet that fails when a job started by `run` is still alive on this worker."""
    return (
        f'if [ -f {REMOTE_PID} ] && kill -0 -- "-$(cat {REMOTE_PID})" 2>/dev/null; then '
        f'echo "a refine_jax job is still running on $(hostname); stop it first" >&2; '
        f"exit 1; fi"
    )


def install_script(
    jax_requirement: str, python: str, fresh_venv: bool, extra_packages: Sequence[str] = ()
) -> str:
    """Unpacks the tarball, makes a venv and pip-installs jax[tpu] and the package into it."""
    py = shlex.quote(python)
    steps = ["set -e", running_guard()]
    if re.fullmatch(r"python3\.[0-9]+", python):
        # Ubuntu images may lack this Python or its venv module: install them from apt.
        apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q"
        steps.append(
            f"if ! {py} -c 'import ensurepip, venv' >/dev/null 2>&1; then "
            f"{apt} update && {apt} install -y {py} {py}-venv; fi"
        )
    if fresh_venv:
        steps.append(f"rm -rf {REMOTE_VENV}")
    pip = f"{REMOTE_VENV}/bin/python -m pip install -q"
    steps += [
        f"rm -rf {REMOTE_SRC} && mkdir {REMOTE_SRC} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_SRC}",
        f"[ -x {REMOTE_VENV}/bin/python ] || {py} -m venv {REMOTE_VENV}",
        f"{pip} --upgrade pip",
        f"{pip} {shlex.quote(jax_requirement)}",
        f"{pip} {shlex.join([f'./{REMOTE_SRC}', *extra_packages])}",
    ]
    return "; ".join(steps)


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Tar the package locally, scp it to every worker, install it on every worker."""
    repo = Path(args.repo)
    missing = [p for p in SHIPPED_PATHS if not (repo / p).exists()]
    if missing:
        raise LaunchError(f"--repo={repo} is not a refine_jax checkout: missing {missing}")
    requirement = jax_tpu_requirement(repo / "setup.py")
    tarball = args.tarball or default_tarball(args.name)
    return [
        [
            "tar",
            "-czf",
            tarball,
            "--exclude=__pycache__",
            "--exclude=*.pyc",
            "-C",
            str(repo),
            *SHIPPED_PATHS,
        ],
        gcloud_tpu(
            "tpu-vm", "scp", [tarball, f"{args.name}:{REMOTE_TARBALL}"], args, "--worker=all"
        ),
        ssh(
            args,
            "all",
            install_script(
                requirement, args.python, args.fresh_venv, shlex.split(args.extra_packages)
            ),
        ),
    ]


def train_command(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The one simple command each worker runs: the refine_jax trainer, or `bash -c COMMAND`."""
    if args.command:
        return shlex.join(["bash", "-c", args.command])
    return shlex.join(
        [
            "python",
            "-m",
            "refine_jax.main",
            f"--config={args.config}",
            f"--workdir={args.workdir}",
            *overrides,
        ]
    )


def run_script(command: str) -> str:
    """Starts the simple COMMAND detached (new session, nohup), appending to the worker's log.

    Started in the background by a non-interactive shell, `setsid` does not fork, so `$!` is the
    job's pid and also its process-group id: `stop` signals that group, i.e. the whole job.
    """
    return (
        f'cd {REMOTE_SRC} || {{ echo "no ~/{REMOTE_SRC} on $(hostname); run setup first" >&2; '
        f"exit 1; }}; "
        f"{running_guard()}; "
        f'export PATH="$HOME/{REMOTE_VENV}/bin:$PATH"; '
        f'echo "[launch] $(date -u +%Y-%m-%dT%H:%M:%SZ) starting" >> {REMOTE_LOG}; '
        f"setsid nohup {command} >> {REMOTE_LOG} 2>&1 < /dev/null & "
        f"echo $! > {REMOTE_PID}; "
        f'echo "started on $(hostname), log in ~/refine_jax.log"'
    )


def run_commands(args: argparse.Namespace, overrides: Sequence[str]) -> list[list[str]]:
    """One ssh that starts the same command on all workers."""
    return [ssh(args, "all", run_script(train_command(args, overrides)))]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    """Tails (and by default follows) one worker's log."""
    follow = " -F" if args.follow else ""
    return [ssh(args, str(args.worker), f"tail -n {args.lines}{follow} {REMOTE_LOG}")]


def stop_script(grace_s: int) -> str:
    """SIGTERM to the job's process group (the trainer checkpoints), SIGKILL after GRACE_S."""
    alive = 'kill -0 -- "-$g" 2>/dev/null'
    return (
        f"if [ -f {REMOTE_PID} ] && g=$(cat {REMOTE_PID}) && {alive}; then "
        f'kill -TERM -- "-$g"; i=0; '
        f"while {alive} && [ $i -lt {grace_s} ]; do sleep 1; i=$((i+1)); done; "
        f'if {alive}; then echo "still running after {grace_s}s on $(hostname): SIGKILL" >&2; '
        f'kill -KILL -- "-$g"; sleep 1; fi; rm -f /tmp/libtpu_lockfile; '
        f'echo "stopped on $(hostname)"; '
        f'else echo "nothing running on $(hostname)"; fi; rm -f {REMOTE_PID}'
    )


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    """Stops the job on every worker."""
    return [ssh(args, "all", stop_script(args.grace_s))]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    """Deletes the TPU VM (with --queued: the queued resource and its TPU)."""
    if args.queued:
        return [gcloud_tpu("queued-resources", "delete", [args.name], args, "--force", "--quiet")]
    return [gcloud_tpu("tpu-vm", "delete", [args.name], args, "--quiet")]


# ----------------------------------------------------------------------------------------------
# Execution.


class Runner:
    """Runs commands in order, stopping at the first failure; with dry_run only prints them."""

    def __init__(
        self, dry_run: bool, out: TextIO | None = None, sleep: Callable[[float], None] | None = None
    ):
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.sleep = sleep or time.sleep
        if not dry_run and shutil.which("gcloud") is None:
            raise LaunchError(
                "the gcloud CLI is not on PATH: install the Google Cloud CLI "
                "(https://cloud.google.com/sdk), or pass --dry_run to only print "
                "the commands",
                exit_code=1,
            )

    def run(self, argv: Sequence[str]) -> None:
        """Prints (dry run) or runs ARGV, raising LaunchError when it fails."""
        line = shlex.join(argv)
        if self.dry_run:
            print(line, file=self.out, flush=True)
            return
        print(f"+ {line}", file=sys.stderr, flush=True)
        try:
            subprocess.run(list(argv), check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise LaunchError(f"command failed ({e}): {line}", exit_code=1) from e

    def capture(self, argv: Sequence[str]) -> str:
        """Runs ARGV and returns its stdout; a dry run prints it and pretends it said ACTIVE."""
        line = shlex.join(argv)
        if self.dry_run:
            print(line, file=self.out, flush=True)
            return "ACTIVE"
        try:
            result = subprocess.run(list(argv), check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"command failed ({e}): {line}\n{e.stderr}", exit_code=1) from e
        except OSError as e:
            raise LaunchError(f"command failed ({e}): {line}", exit_code=1) from e
        return result.stdout.strip()


def wait_until_active(args: argparse.Namespace, runner: Runner, poll_s: float = 30.0) -> None:
    """Polls a queued resource until its TPU is ACTIVE (capacity can take hours to arrive)."""
    deadline = time.monotonic() + args.wait_timeout_s
    while True:
        state = runner.capture(queued_state_command(args))
        if state == "ACTIVE":
            return
        if state in QUEUED_FAILED_STATES:
            raise LaunchError(f"queued resource {args.name} is {state}", exit_code=1)
        if time.monotonic() > deadline:
            raise LaunchError(
                f"queued resource {args.name} still {state or 'unknown'} after "
                f"{args.wait_timeout_s}s; re-run with --use_existing once it is "
                f"ACTIVE",
                exit_code=1,
            )
        print(f"queued resource {args.name}: {state}; waiting", file=sys.stderr, flush=True)
        runner.sleep(poll_s)


# ----------------------------------------------------------------------------------------------
# Subcommands: validate, then run the built commands.


def check_create(args: argparse.Namespace) -> None:
    """Flags `create` needs (unless --use_existing)."""
    if args.use_existing:
        return
    if not args.accelerator_type:
        raise LaunchError(
            "--accelerator_type is required to create a TPU VM (e.g. v4-32, "
            "v5litepod-16), or pass --use_existing"
        )
    parse_accelerator(args.accelerator_type)
    if args.spot and args.preemptible:
        raise LaunchError("--spot and --preemptible are exclusive (spot is the newer kind)")
    if args.queued and args.preemptible:
        raise LaunchError("queued resources take --spot, not --preemptible")


def check_run(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    """Flags `run` needs: --config and a (gs://) --workdir, or a custom --command alone."""
    if args.accelerator_type:
        parse_accelerator(args.accelerator_type)
    if args.command:
        if args.config or args.workdir or overrides:
            raise LaunchError(
                "--command replaces the training command: put --config, --workdir "
                "and --config.x=y overrides inside it instead"
            )
        return
    if not args.config:
        raise LaunchError("--config is required (e.g. --config=configs/shapes.py)")
    if not args.workdir:
        raise LaunchError("--workdir is required (e.g. --workdir=gs://my-bucket/runs/shapes)")
    check_config_file(args.config, Path(args.repo))
    check_workdir(args)


def do_create(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Creates the TPU VM; with --use_existing does nothing."""
    check_create(args)
    if args.use_existing:
        print(f"--use_existing: not creating {args.name}", file=sys.stderr)
        return
    for argv in create_commands(args):
        runner.run(argv)
    if args.queued:
        wait_until_active(args, runner)


def do_setup(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Ships and installs the package on every worker."""
    for argv in setup_commands(args):
        runner.run(argv)


def do_run(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Starts the training command on every worker, detached."""
    check_run(args, overrides)
    for argv in run_commands(args, overrides):
        runner.run(argv)
    if not runner.dry_run:
        logs = ["python", "launch/tpu_pod.py", "logs", f"--name={args.name}", f"--zone={args.zone}"]
        if args.project:
            logs.append(f"--project={args.project}")
        print(f"follow worker 0's log: {shlex.join(logs)}", file=sys.stderr)


def do_logs(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Streams one worker's log."""
    if args.worker < 0:
        raise LaunchError(f"--worker={args.worker}: must be >= 0")
    if args.lines < 0:
        raise LaunchError(f"--lines={args.lines}: must be >= 0")
    for argv in logs_commands(args):
        runner.run(argv)


def do_stop(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Stops the job on every worker."""
    if args.grace_s < 0:
        raise LaunchError(f"--grace_s={args.grace_s}: must be >= 0")
    for argv in stop_commands(args):
        runner.run(argv)


def do_delete(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """Deletes the TPU VM."""
    for argv in delete_commands(args):
        runner.run(argv)


def do_up(args: argparse.Namespace, runner: Runner, overrides: Sequence[str]) -> None:
    """create + setup + run; every flag is checked before anything runs."""
    check_create(args)
    check_run(args, overrides)
    setup_commands(args)  # validates --repo and setup.py before creating anything
    do_create(args, runner, overrides)
    do_setup(args, runner, overrides)
    do_run(args, runner, overrides)


SUBCOMMANDS: dict[str, Callable[[argparse.Namespace, Runner, Sequence[str]], None]] = {
    "create": do_create,
    "setup": do_setup,
    "run": do_run,
    "logs": do_logs,
    "stop": do_stop,
    "delete": do_delete,
    "up": do_up,
}
TAKES_OVERRIDES = ("run", "up")


# ----------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one subparser per subcommand, sharing groups of flags."""

    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    base = parent()
    base.add_argument("--name", help="TPU VM name (and queued resource id), e.g. my-pod")
    base.add_argument("--zone", help="e.g. us-central2-b")
    base.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    base.add_argument(
        "--accelerator_type",
        help=f"FAMILY-SIZE, e.g. v4-32 or v5litepod-16; families: {', '.join(RUNTIME_VERSIONS)}",
    )
    base.add_argument("--repo", default=str(REPO), help="refine_jax checkout to ship and check")
    base.add_argument(
        "--dry_run", action="store_true", help="print every command, one per line, and run nothing"
    )

    queued = parent()
    queued.add_argument(
        "--queued",
        action="store_true",
        help="use a queued resource (waits for capacity) instead of a plain VM",
    )

    create = parent()
    create.add_argument(
        "--runtime_version",
        help="TPU VM image (default per family: "
        + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items())
        + ")",
    )
    create.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    create.add_argument(
        "--preemptible", action="store_true", help="legacy preemptible capacity (plain VMs only)"
    )
    create.add_argument(
        "--use_existing", action="store_true", help="the TPU VM already exists: skip creating it"
    )
    create.add_argument(
        "--wait_timeout_s",
        type=int,
        default=6 * 3600,
        help="with --queued: how long to wait for the TPU to become ACTIVE",
    )

    setup = parent()
    setup.add_argument(
        "--tarball",
        help="local path for the package tarball (default: TMPDIR/refine_jax-NAME.tar.gz)",
    )
    setup.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help="Python on the workers for the venv (python3.X is apt-installed when missing)",
    )
    setup.add_argument(
        "--extra_packages",
        default=DEFAULT_EXTRA_PACKAGES,
        help="space-separated pip requirements installed with the package "
        "(default: gcsfs, which gs:// file access without TensorFlow needs; "
        "'' for none)",
    )
    setup.add_argument(
        "--fresh_venv",
        action="store_true",
        help="delete and recreate ~/refine_jax_venv on the workers",
    )

    run = parent()
    run.add_argument("--config", help="config file in the repo, e.g. configs/shapes.py[:variant]")
    run.add_argument("--workdir", help="gs://BUCKET/PATH shared by all workers")
    run.add_argument("--command", help="run this shell command instead of the trainer")
    run.add_argument(
        "--allow_local_workdir",
        action="store_true",
        help="allow a --workdir that is not gs:// (warns)",
    )

    logs = parent()
    logs.add_argument("--worker", type=int, default=0, help="which worker's log")
    logs.add_argument("--lines", type=int, default=100, help="lines of history to show first")
    logs.add_argument(
        "--no_follow",
        dest="follow",
        action="store_false",
        help="print the last lines and return instead of streaming",
    )

    stop = parent()
    stop.add_argument(
        "--grace_s",
        type=int,
        default=120,
        help="seconds between SIGTERM (checkpoint and exit) and SIGKILL",
    )

    parser = argparse.ArgumentParser(
        prog="tpu_pod.py",
        allow_abbrev=False,
        description="Cloud TPU VM launcher for refine_jax. Extra --config.KEY=VALUE arguments to "
        "run/up are passed to the trainer.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    helps = {
        "create": ("create the TPU VM", [base, queued, create]),
        "setup": ("copy the package to every worker and install it", [base, setup]),
        "run": ("start training on every worker, detached", [base, run]),
        "logs": ("stream one worker's log", [base, logs]),
        "stop": ("stop the job on every worker", [base, stop]),
        "delete": ("delete the TPU VM", [base, queued]),
        "up": ("create + setup + run", [base, queued, create, setup, run]),
    }
    for name, (text, parents) in helps.items():
        sub.add_parser(name, help=text, description=text, parents=parents, allow_abbrev=False)
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses ARGV; returns the flags and the --config.KEY=VALUE overrides, in order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    if args.subcommand in TAKES_OVERRIDES:
        bad = [a for a in extra if not OVERRIDE_RE.fullmatch(a)]
        if bad:
            parser.error(
                f"unrecognized arguments: {shlex.join(bad)} (config overrides must be "
                f"written as one argument --config.KEY=VALUE)"
            )
        return args, extra
    if extra:
        parser.error(f"unrecognized arguments: {shlex.join(extra)}")
    return args, []


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a command failed, 2 bad flags)."""
    try:
        args, overrides = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        check_name_and_zone(args)
        runner = Runner(args.dry_run, out)
        SUBCOMMANDS[args.subcommand](args, runner, overrides)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
