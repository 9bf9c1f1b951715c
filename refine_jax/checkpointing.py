"""Orbax checkpoints of the whole run: train state, data-iterator position and model signature.

One `CheckpointManager` holds, per saved step: `state` (params, optimizer state, step), the
grain iterator state of every process (`data`), and `signature` (the model config and every
parameter's shape). Restoring reads the signature first, so a checkpoint of another model
shape fails with a message naming what differs instead of an obscure shape error; arrays are
restored straight into the target shardings, which may belong to a different mesh.

Every save also gets a checksum file (`N/checksums.json`: size and sha256 of each file of its
items), written by process 0 once the save's files are complete and before orbax commits the
step. Resuming verifies a checkpoint against it first; a damaged checkpoint (a changed, truncated
or missing file, or one orbax cannot read) is skipped with a warning naming what is wrong, the
newest intact one is restored, and the damaged ones newer than it are moved to
`checkpoints_damaged/` so retention never counts them in place of intact ones.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store  # no public path in 0.12

from refine_jax.config import base_config
from refine_jax.errors import CheckpointError, CheckpointMismatchError

CHECKSUMS_FILE = "checksums.json"
Restored = TypeVar("Restored")

# Orbax warnings about what this module does on purpose: steps saved between evaluations carry
# no metrics, and the jax.Array handler is replaced (use_replica_parallel_saving_only_across_
# processes).
_INTENDED = ("did not provide metrics", "overriding jax.Array")
logging.getLogger("absl").addFilter(
    lambda record: not any(text in record.getMessage() for text in _INTENDED)
)

# Keys of config.model that change no parameter shape and may differ on restore.
SHAPE_NEUTRAL_MODEL_KEYS = (
    "dropout_rate",
    "dropout_bits",
    "dtype",
    "remat",
    "scan_detailer",
    "unroll_scans",
    "pretrained_encoder",
    "freeze_encoder",
)

# Replica-parallel saving splits a replicated array into one slice per replica so that several
# hosts write it together. In one process every replica is local, so the split only adds a
# device slice per replica and array (a 3-step tiny run with three saves on 8 CPU devices:
# 30 s with it, 23 s without); across processes it pays only for slices big enough to be
# worth a write of their own.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def use_replica_parallel_saving_only_across_processes() -> None:
    """Sets orbax's jax.Array handler (a process-wide registry) to this project's policy."""
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            use_replica_parallel=jax.process_count() > 1,
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
            # As orbax's default handler: the per-array metadata that typed PRNG keys need.
            array_metadata_store=array_metadata_store.Store(),
        ),
        override=True,
    )


def model_signature(config: ml_collections.ConfigDict, params: Any) -> dict:
    """What a checkpoint must match: the shape-bearing model config and every param's shape."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in SHAPE_NEUTRAL_MODEL_KEYS}
    shapes = {
        jax.tree_util.keystr(path): list(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    return {"model": model, "param_shapes": shapes}


def signature_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two model signatures (empty when compatible). A model
    key the checkpoint predates counts as its `base_config` default, with which it was trained."""
    differences = []
    defaults = base_config().model
    for key in sorted(set(saved["model"]) | set(current["model"])):
        old, new = saved["model"].get(key, defaults.get(key)), current["model"].get(key)
        if old != new:
            differences.append(f"model.{key}: checkpoint has {old!r}, config has {new!r}")
    for key in sorted(set(saved["param_shapes"]) | set(current["param_shapes"])):
        old, new = saved["param_shapes"].get(key), current["param_shapes"].get(key)
        if old != new:
            differences.append(f"parameter {key}: checkpoint shape {old}, model shape {new}")
    return differences


def data_order_differences(saved: dict | None, signature: dict) -> list[str]:
    """What changed in how the training stream is cut into batches (the signature's
    ``data_order``: batch size, shuffle seed, blocks of rows read by processes). The saved data
    position is a batch count in that stream, so any change moves it. A checkpoint that predates
    the record (None) is not checked."""
    current = signature.get("data_order")
    if saved is None or current is None:
        return []
    return [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def _item_files(step_dir: epath.Path) -> list[epath.Path]:
    """The files of a step's items (state/, data/, signature/): all but the step-level files
    orbax still writes when it commits the step."""

    def files_under(folder: epath.Path) -> list[epath.Path]:
        found = []
        for path in folder.iterdir():
            found.extend(files_under(path) if path.is_dir() else [path])
        return found

    items = [item for item in step_dir.iterdir() if item.is_dir()]
    return sorted(path for item in items for path in files_under(item))


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(step_dir: epath.Path) -> None:
    """Records the size and sha256 of every item file of a finished save in `checksums.json`."""
    files = {
        str(path.relative_to(step_dir)): {"size": path.stat().length, "sha256": _sha256(path)}
        for path in _item_files(step_dir)
    }
    (step_dir / CHECKSUMS_FILE).write_text(json.dumps({"version": 1, "files": files}))


def checkpoint_damage(step_dir: epath.Path) -> str | None:
    """What is wrong with a checkpoint's files ("state/_METADATA is missing", ...), or None when
    they match its checksum file. A checkpoint without one (written before checksums were kept)
    cannot be verified here; None too, and restoring it is the test."""
    checksums = step_dir / CHECKSUMS_FILE
    if not checksums.exists():
        return None
    try:
        expected = json.loads(checksums.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{CHECKSUMS_FILE} is unreadable ({error})"
    problems = []
    for name, want in sorted(expected.items()):
        path = step_dir / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif (size := path.stat().length) != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were saved")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} has changed since it was saved (checksum mismatch)")
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def probe_writable(directory: str | epath.PathLike, needed_bytes: int = 0) -> None:
    """Fails at once, with CheckpointError naming the directory, when checkpoints cannot be
    written there: not creatable, read-only, or (local disks) less free space than
    `needed_bytes`. Orbax would otherwise fail in a background thread much later."""
    directory = epath.Path(directory)
    probe = directory / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {error.strerror or error}; "
            "choose a writable --workdir"
        ) from error
    if not str(directory).startswith("gs://"):
        free = shutil.disk_usage(os.fspath(directory)).free
        if free < needed_bytes:
            raise CheckpointError(
                f"only {free / 2**20:.0f} MiB free in {directory}; a checkpoint needs about "
                f"{needed_bytes / 2**20:.0f} MiB: free space or choose another --workdir"
            )


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
        use_replica_parallel_saving_only_across_processes()
        # Steps saved and not yet given their checksum file, oldest first (saves run in order).
        self._awaiting_checksums: collections.deque[int] = collections.deque()
        self._checksums_lock = threading.Lock()
        self._async_save = async_save
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
        self._make_manager = lambda: ocp.CheckpointManager(
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
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=self._write_pending_checksums
                )
                if async_save
                else None,
            ),
            item_names=("state", "data", "signature"),
        )
        self.manager = self._make_manager()

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
        with self._checksums_lock:  # queued first: an async save may finish before save returns
            self._awaiting_checksums.append(step)
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                signature=ocp.args.JsonSave(signature),
            ),
            metrics=metrics,
            force=force,
        )
        if not saved:
            with self._checksums_lock:
                self._awaiting_checksums.remove(step)
        elif not self._async_save:
            self._write_pending_checksums()
        return saved

    def _write_pending_checksums(self) -> None:
        """Writes the checksum file of the oldest save awaiting one (orbax calls this once a
        save's files are complete, before the step directory is committed)."""
        with self._checksums_lock:
            if not self._awaiting_checksums:
                return
            step = self._awaiting_checksums.popleft()
        if jax.process_index() != 0:
            return
        # Before the commit the files are in a temporary folder (local disks); on object
        # stores orbax writes in place.
        pending = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        step_dir = pending[0] if pending else self.directory / str(step)
        try:
            write_checksums(step_dir)
        except Exception as error:  # the checkpoint is still usable, only unverified
            logging.warning("could not write checksums of checkpoint %s: %s", step_dir, error)

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
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written by a different model:\n  "
                + "\n  ".join(differences)
            )
        order_changes = data_order_differences(saved.get("data_order"), signature)
        if data_iterator is not None and order_changes:  # before reading any array
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step}: its data position counts batches read "
                "in another order, so resuming would silently skip or repeat examples:\n  "
                + "\n  ".join(order_changes)
                + "\nResume with the checkpoint's settings (WORKDIR/config.json records "
                "them), or train in a new workdir."
            )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
            target_state,
            target_shardings,
        )
        state = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        if data_iterator is not None:
            # Restored on its own: the files verified (`checkpoint_damage`), so a failure here
            # is a pipeline that cannot take this position, not damage to set aside.
            try:
                self.manager.restore(
                    step,
                    args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)),
                )
            except Exception as error:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step}: its data-iterator position cannot be "
                    "restored into this input pipeline; data.num_workers, the number of "
                    "processes or the data sources differ from the run that saved it. Resume "
                    "with its settings (WORKDIR/config.json records them). Grain said: "
                    f"{type(error).__name__}: {error}"
                ) from error
        return state

    def _verified_restore(
        self, step: int, restore: Callable[[int], Restored]
    ) -> tuple[Restored | None, str | None]:
        """`(restore(step), None)` when checkpoint `step` verifies and restores, else `(None,
        what is wrong)`. A checkpoint of another model shape is an error, not damage. A restore
        that fails is tried once more before the checkpoint counts as damaged: a passing fault
        (a storage hiccup) must not set aside the newest checkpoint and lose its progress."""
        problem = checkpoint_damage(self.directory / str(step))
        if problem is not None:
            return None, problem
        failure = ""
        for attempt in range(2):
            try:
                return restore(step), None
            except CheckpointMismatchError:
                raise
            except Exception as error:  # orbax's errors for unreadable files vary
                reason = str(error).splitlines()[0] if str(error) else ""
                failure = f"{type(error).__name__}: {reason[:500]}"
                self._reopen()  # a failed restore can leave the manager unusable
                if attempt == 0:
                    logging.warning(
                        "restoring %s/%d failed (%s); trying once more",
                        self.directory,
                        step,
                        failure,
                    )
        return None, f"orbax cannot restore it: {failure}"

    def restore_step(self, step: int, restore: Callable[[int], Restored]) -> Restored:
        """`restore(step)` of a checkpoint asked for by its step, once it verifies; a damaged
        one is a CheckpointError naming what is wrong (nothing else is tried)."""
        restored, problem = self._verified_restore(step, restore)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} is damaged ({problem}); ask for another "
                "step, or for none to use the newest intact checkpoint"
            )
        return restored

    def restore_newest_intact(
        self, restore: Callable[[int], Restored], set_aside: bool = True
    ) -> tuple[int, Restored] | None:
        """`(step, restore(step))` for the newest checkpoint that verifies and restores, or None
        when there is none at all. Damaged ones newer than it are named in a warning and, with
        `set_aside` (training: retention must not count them), moved to `<directory>_damaged/`;
        readers (eval, caption) leave them in place. When every checkpoint is damaged,
        CheckpointError names them all (and nothing is moved). A checkpoint of another model
        shape is an error, not damage.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            restored, problem = self._verified_restore(step, restore)
            if problem is None:
                if set_aside:
                    self._set_aside(damaged, step)
                else:
                    for skipped, what in damaged:
                        logging.warning(
                            "checkpoint %s/%d is damaged (%s); skipped, using step %d",
                            self.directory,
                            skipped,
                            what,
                            step,
                        )
                return step, restored
            damaged.append((step, problem))
        if not damaged:
            return None
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {step}: {problem}" for step, problem in damaged)
            + ". Move the checkpoints away to start afresh, or restore them from a copy."
        )

    def _set_aside(self, damaged: list[tuple[int, str]], restored_step: int) -> None:
        """Warns about the damaged checkpoints skipped for `restored_step` and moves them out of
        the managed directory (process 0), so that retention never counts them."""
        if not damaged:
            return
        aside = self.directory.parent / f"{self.directory.name}_damaged"
        for step, problem in damaged:
            logging.warning(
                "checkpoint %s/%d is damaged (%s); skipped, resuming from step %d; it is moved "
                "to %s",
                self.directory,
                step,
                problem,
                restored_step,
                aside,
            )
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step, _ in damaged:
                target = aside / str(step)
                if target.exists():
                    target = aside / f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("refine_jax checkpoints set aside")
        self._reopen()  # the manager caches the steps it has seen

    def _reopen(self) -> None:
        """A fresh manager of the same directory (after a failed restore, or steps moved)."""
        try:
            self.manager.close()
        except Exception as error:
            logging.warning("closing the checkpoint manager failed: %s", error)
        self.manager = self._make_manager()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
