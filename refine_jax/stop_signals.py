"""SIGTERM (preemption) and SIGINT (Ctrl-C) ask a training run to stop: it saves a checkpoint
at the next step and exits cleanly. A second Ctrl-C exits at once, without saving."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records stop signals while installed; `received` lists their names in arrival order."""

    def __init__(
        self,
        before_forced_exit: Callable[[], None] | None = None,
        exit_now: Callable[[int], object] = os._exit,
    ):
        self.received: list[str] = []
        self._before_forced_exit = before_forced_exit
        self._exit_now = exit_now
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Handles the stop signals from now on (only possible in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and "SIGINT" in self.received:
            print("second SIGINT: exiting at once, without a checkpoint", file=sys.stderr)
            sys.stderr.flush()
            if self._before_forced_exit is not None:
                self._before_forced_exit()
            self._exit_now(128 + signum)
            return
        self.received.append(name)
        if signum == signal.SIGINT:
            print(
                "SIGINT: saving a checkpoint at the next step, then exiting "
                "(press Ctrl-C again to exit at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    @property
    def requested(self) -> str | None:
        """The name of the first stop signal received, or None."""
        return self.received[0] if self.received else None
