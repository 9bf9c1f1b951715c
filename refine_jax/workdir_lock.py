"""One training run per workdir: a lock file naming its holder (pid, host), kept fresh by a
heartbeat, so that a second run refuses to start instead of deleting the first one's checkpoints.

A lock left behind by a dead run is taken over: on the same host when its pid is gone (or is
this process's own, which holds no such lock: a restarted container often reuses the dead run's
pid), from any host when its heartbeat is older than `stale_after_s`. On a local disk the lock
file is created atomically; on an object store (gs://) two runs started in the same second may
both get it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from etils import epath

from refine_jax.errors import WorkdirLockedError

LOCK_FILE = "run.lock"
# The lock files this process holds, so that a record of its own pid is known for a live lock.
_HELD_HERE: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WorkdirLock:
    """The lock file `WORKDIR/run.lock`; `acquire` raises WorkdirLockedError naming the holder."""

    def __init__(
        self,
        workdir: str | epath.PathLike,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 60.0,
    ):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.owner = {"pid": os.getpid(), "hostname": socket.gethostname()}
        self._held = False
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self, started: float) -> str:
        return json.dumps({**self.owner, "started": started, "heartbeat": time.time()})

    def _read_holder(self) -> dict | None:
        """The holder's record; None when there is no lock file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:  # being written, or left unreadable by a crash
            return {"heartbeat": self.path.stat().mtime}

    def _is_stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s:
            return True
        same_host = holder.get("hostname") == self.owner["hostname"]
        if not same_host or "pid" not in holder:
            return False
        if int(holder["pid"]) == os.getpid():  # a dead run's, unless this process holds it
            return str(self.path) not in _HELD_HERE
        return not _pid_alive(int(holder["pid"]))

    def _create(self) -> bool:
        """Creates the lock file if there is none; whether this call created it."""
        record = self._record(started=time.time())
        if str(self.path).startswith("gs://"):
            if self.path.exists():
                return False
            self.path.write_text(record)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return True

    def acquire(self) -> None:
        """Takes the lock, replacing a stale one; raises WorkdirLockedError when a live run
        holds it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._held = True
                _HELD_HERE.add(str(self.path))
                self._started = time.time()
                self._start_heartbeat()
                return
            holder = self._read_holder()
            if holder is None:
                continue  # released meanwhile
            if not self._is_stale(holder):
                raise WorkdirLockedError(self._held_message(holder))
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise WorkdirLockedError(f"could not lock {self.workdir}: {self.path} keeps reappearing")

    def _held_message(self, holder: dict) -> str:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('hostname', '?')}"
        started = holder.get("started")
        since = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
        return (
            f"workdir {self.workdir} is in use by another run ({who}"
            f"{since if started else ''}). Wait for it to finish or use another --workdir; if "
            f"no such run is alive, delete {self.path}."
        )

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop_heartbeat.wait(self.heartbeat_s):
                try:
                    temporary = self.path.parent / f".{LOCK_FILE}.{os.getpid()}"
                    temporary.write_text(self._record(self._started))
                    temporary.replace(self.path)
                except OSError:
                    pass  # a missed beat only makes the lock look older

        self._heartbeat = threading.Thread(target=beat, name="workdir-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Removes the lock file if this process holds it (safe to call more than once)."""
        if not self._held:
            return
        self._held = False
        _HELD_HERE.discard(str(self.path))
        self._stop_heartbeat.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        holder = self._read_holder()
        if holder and all(holder.get(k) == v for k, v in self.owner.items()):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
