"""The project's own error types: problems a user can fix, reported by the entry point as one line.

Each also derives from the built-in type code used to raise for it (ValueError, RuntimeError),
so existing `except ValueError` handlers and tests keep working.
"""

from __future__ import annotations


class RefineJaxError(Exception):
    """A problem with the run's input or environment that a user can fix; its message says how."""


class ConfigError(RefineJaxError, ValueError):
    """A config value no run could succeed with."""


class DataError(RefineJaxError, ValueError):
    """Input data that cannot be read or used as given (shards, references, annotations)."""


class CheckpointError(RefineJaxError, RuntimeError):
    """No intact checkpoint to resume from, or a checkpoint location that cannot be written."""


class CheckpointMismatchError(RefineJaxError, ValueError):
    """A checkpoint written by a model of another shape than the config's, or whose data
    position another input pipeline (data.num_workers, process count) cannot take."""


class WorkdirLockedError(RefineJaxError, RuntimeError):
    """Another live run holds the workdir."""
