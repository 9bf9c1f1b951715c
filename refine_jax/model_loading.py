"""Checkpoint -> model: the one loader evaluation, captioning (and distillation) share.

Every path (workdir, checkpoints, tokenizer) is an `epath.Path`, so a `gs://` workdir works as a
local one. The parameters are restored into the sharded train-state layout of
`refine_jax.train_state`, the layout the trainer saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer, model_signature
from refine_jax.config import validate_config
from refine_jax.data.pipeline import CaptionFeatures
from refine_jax.model_kinds import build_model
from refine_jax.models.pretrained import load_pretrained_encoder, replace_encoder
from refine_jax.targets import schedule_fractions
from refine_jax.tokenizer import Tokenizer
from refine_jax.train_state import abstract_state, create_params, restore_state
from refine_jax.workdir_config import config_for_workdir


@dataclass
class LoadedModel:
    """A model with its parameters on the mesh, and what describing a split needs."""

    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    features: CaptionFeatures
    fractions: np.ndarray
    mesh: Mesh
    rules: tuple
    step: int | None  # the checkpoint step; None for freshly initialised parameters

    def put_batch(self, batch: dict) -> dict:
        """A host batch every process holds whole -> global arrays on the mesh."""
        return sharding.global_batch_from_full(batch, self.mesh, self.rules)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical axis rules the model runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> Tokenizer:
    """The configured tokenizer (config.tokenizer.path), else the one training kept in workdir."""
    path = config.tokenizer.path or epath.Path(workdir) / "tokenizer"
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; train first (--mode=train) or set --config.tokenizer.path"
        ) from None


def restore_params(
    config: ml_collections.ConfigDict,
    checkpoint_dir: str | epath.PathLike,
    model: nn.Module,
    vocab_size: int,
    mesh: Mesh,
    rules: tuple,
    step: int | None = None,
) -> tuple[Any, int]:
    """(params, step) of checkpoint `step` (default: the newest intact one) in `checkpoint_dir`,
    restored into the sharded train-state layout of this config and mesh. Checkpoints are
    verified against their checksums: a damaged one asked for by step is a CheckpointError, and
    by default damaged newer ones are skipped with a warning naming them (and left in place). A
    checkpoint of another model shape fails naming what differs."""
    checkpoint_dir = epath.Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints at {checkpoint_dir}")
    target, shardings = abstract_state(model, config, vocab_size, mesh, rules)
    checkpointer = Checkpointer(checkpoint_dir, save_every=1, keep=1_000_000, async_save=False)
    signature = model_signature(config, target.params)
    restore = lambda s: restore_state(checkpointer, s, target, shardings, signature)
    try:
        available = sorted(checkpointer.manager.all_steps())
        if not available:
            raise FileNotFoundError(f"no checkpoints at {checkpoint_dir}")
        if step is None:
            restored = checkpointer.restore_newest_intact(restore, set_aside=False)
            assert restored is not None  # there are checkpoints; none intact raises
            step, state = restored
        else:
            step = int(step)
            if step not in available:
                raise ValueError(
                    f"no checkpoint of step {step} in {checkpoint_dir}; available: {available}"
                )
            state = checkpointer.restore_step(step, restore)
    finally:
        checkpointer.close()
    return state.params, step


def load_model(
    config: ml_collections.ConfigDict | None,
    workdir: str | epath.PathLike,
    checkpoint_step: int | None = None,
    random_init: bool = False,
    tokenizer: Tokenizer | None = None,
) -> LoadedModel:
    """The model with the parameters of checkpoint `checkpoint_step` (default: the newest intact
    one, see `restore_params`) in workdir/checkpoints, or freshly initialised ones with
    `random_init` (benchmarks). `config` None: the config recorded in workdir at training."""
    workdir = epath.Path(workdir)
    config = config if random_init and config is not None else config_for_workdir(config, workdir)
    validate_config(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(map(tuple, config.mesh.axis_rules))
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_shards:  # other devices than training had: pad the batches
        rounded = -(-config.batch_size // batch_shards) * batch_shards
        logging.info(
            "describing in batches of %d, not %d: a multiple of the %d batch shards of mesh %s",
            rounded,
            config.batch_size,
            batch_shards,
            dict(mesh.shape),
        )
        config = config.copy_and_resolve_references()  # the caller's config is left as it is
        config.batch_size = rounded
    tokenizer = tokenizer or load_tokenizer(config, workdir)
    m, t = config.model, config.targets
    model = build_model(config, tokenizer.vocab_size)
    features = CaptionFeatures.from_config(config, tokenizer)  # evaluation uses its `map`
    fractions = schedule_fractions(m.num_refine_steps, t.schedule, t.log_a).astype(np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if random_init:
            params = create_params(model, config, tokenizer.vocab_size, mesh, rules)
            step = None
        else:
            params, step = restore_params(
                config,
                workdir / "checkpoints",
                model,
                tokenizer.vocab_size,
                mesh,
                rules,
                checkpoint_step,
            )
    return LoadedModel(config, model, params, tokenizer, features, fractions, mesh, rules, step)


def load_encoder(params: Any, source: str) -> Any:
    """`params` with the image encoder of `source` (config.model.pretrained_encoder): a
    refine_jax workdir, whose newest intact checkpoint (of any model kind with this encoder
    shape) gives it, or a big_vision ViT .npz."""
    if not epath.Path(source).is_dir():
        return load_pretrained_encoder(params, source)
    trained = load_model(None, source)
    return replace_encoder(
        params, jax.device_get(trained.params["encoder"]), f"the run in {source}"
    )


__all__ = ["LoadedModel", "load_encoder", "load_model", "load_tokenizer", "restore_params"]
