"""Orbax checkpoints of the whole run: train state, data-iterator position and model signature.

One `CheckpointManager` holds, per saved step: `state` (params, optimizer state, step), the
grain iterator state of every process (`data`), and `signature` (the model config and every
parameter's shape). Restoring reads the signature first, so a checkpoint of another model
shape fails with a message naming what differs instead of an obscure shape error; arrays are
restored straight into the target shardings, which may belong to a different mesh.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

# Keys of config.model that change no parameter shape and may differ on restore.
# Steps saved between evaluations carry no metrics by design; orbax warns about each one.
logging.getLogger("absl").addFilter(
    lambda record: "did not provide metrics" not in record.getMessage()
)

SHAPE_NEUTRAL_MODEL_KEYS = ("dropout_rate", "dtype", "remat", "scan_detailer", "pretrained_encoder")


def model_signature(config: ml_collections.ConfigDict, params: Any) -> dict:
    """What a checkpoint must match: the shape-bearing model config and every param's shape."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in SHAPE_NEUTRAL_MODEL_KEYS}
    shapes = {
        jax.tree_util.keystr(path): list(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    return {"model": model, "param_shapes": shapes}


def signature_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two model signatures (empty when compatible)."""
    differences = []
    for key in sorted(set(saved["model"]) | set(current["model"])):
        old, new = saved["model"].get(key), current["model"].get(key)
        if old != new:
            differences.append(f"model.{key}: checkpoint has {old!r}, config has {new!r}")
    for key in sorted(set(saved["param_shapes"]) | set(current["param_shapes"])):
        old, new = saved["param_shapes"].get(key), current["param_shapes"].get(key)
        if old != new:
            differences.append(f"parameter {key}: checkpoint shape {old}, model shape {new}")
    return differences


class Checkpointer:
    """Saves every `save_every` steps (async), keeps the last `keep` and optionally the best."""

    def __init__(
        self,
        directory: str | epath.PathLike,
        save_every: int,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = epath.Path(directory)
        policies = [checkpoint_managers.LatestN(keep)]
        rank = (lambda metrics: metrics[best_metric]) if best_metric else None
        if best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=rank,
                    reverse=best_mode == "min",
                    n=1,
                    # A step saved without an evaluation is kept only as one of the last `keep`.
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.manager = ocp.CheckpointManager(
            self.directory
            if str(self.directory).startswith("gs://")
            else self.directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every,
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
                # Only with best_fn set does orbax write each step's metrics beside it, so the
                # ranking survives a restart (retention is still the policy above).
                best_fn=rank,
                best_mode=best_mode,
                enable_async_checkpointing=async_save,
            ),
            item_names=("state", "data", "signature"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator,
        signature: dict,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves when due (or `force`); a step already on disk is left as it is."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                signature=ocp.args.JsonSave(signature),
            ),
            metrics=metrics,
            force=force,
        )

    def restore(
        self,
        step: int,
        target_state: Any,
        target_shardings: Any,
        data_iterator: grain.DatasetIterator | None,
        signature: dict,
    ) -> Any:
        """The state saved at `step`, placed with `target_shardings`; also repositions the
        data iterator in place when one is given."""
        saved = self.manager.restore(
            step, args=ocp.args.Composite(signature=ocp.args.JsonRestore())
        )["signature"]
        differences = signature_differences(saved, signature)
        if differences:
            raise ValueError(
                f"checkpoint {self.directory}/{step} was written by a different model:\n  "
                + "\n  ".join(differences)
            )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
            target_state,
            target_shardings,
        )
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
