"""Training metrics to `metrics.jsonl` and TensorBoard event files, from process 0 only.

`metrics.jsonl` is strict JSON: a non-finite value (the loss of a skipped update) is written as
`null`, never as the bare `NaN`/`Infinity` tokens strict readers reject.
"""

from __future__ import annotations

import json
import math

from absl import logging
from etils import epath


def strict_json_values(metrics: dict) -> dict:
    """The metrics with every non-finite float replaced by None (JSON null)."""
    return {
        name: None if isinstance(value, float) and not math.isfinite(value) else value
        for name, value in metrics.items()
    }


class MetricWriter:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, workdir: epath.Path, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        self.path = workdir / "metrics.jsonl"
        try:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=str(workdir / "tensorboard"))
        except Exception as error:  # e.g. a remote workdir tensorboardX cannot write to
            logging.warning("TensorBoard events are not written: %s", error)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **strict_json_values(metrics)}, allow_nan=False))
            f.write("\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if math.isfinite(value):  # a skipped non-finite step is in metrics.jsonl
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
