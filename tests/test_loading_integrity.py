"""Eval and caption load only verified checkpoints: by default the newest intact one, with a
warning naming the damaged ones skipped (left in place: a reader moves nothing), and a damaged
checkpoint asked for by step is a clear error."""

from __future__ import annotations

import logging

import flax.linen as nn
import grain
import jax
import numpy as np
import pytest
from conftest import load_config
from test_checkpoint_integrity import overwrite_4_kib

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer, model_signature
from refine_jax.errors import CheckpointError
from refine_jax.model_kinds import build_model
from refine_jax.model_loading import restore_params
from refine_jax.train_state import create_state

VOCAB = 60


@pytest.fixture
def loader_inputs(tmp_path):
    """Checkpoints of steps 1 and 2 (parameters shifted by the step) of a tiny model, the latest
    with 4 KiB of its array data overwritten; returns what `restore_params` needs and the
    parameters of step 1."""
    config = load_config("shapes", "tiny")
    model = build_model(config, VOCAB)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(map(tuple, config.mesh.axis_rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, _ = create_state(model, config, VOCAB, mesh, rules)
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, save_every=1, async_save=False)
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    signature = model_signature(config, state.params)
    for step in (1, 2):
        shifted = state.replace(params=jax.tree.map(lambda x, s=step: x + s, state.params))
        checkpointer.save(step, shifted, data, signature)
    checkpointer.close()
    overwrite_4_kib(directory / "2")
    step_1_params = jax.tree.map(lambda x: np.asarray(x) + 1, state.params)
    return (config, directory, model, VOCAB, mesh, rules), step_1_params


def test_by_default_the_newest_intact_checkpoint_is_loaded_and_the_damaged_one_named(
    loader_inputs, caplog
):
    args, step_1_params = loader_inputs
    config, directory, model, vocab, mesh, rules = args
    with caplog.at_level(logging.WARNING), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, step = restore_params(*args)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), step_1_params)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "checkpoints/2 is damaged" in warning and "using step 1" in warning
    assert (directory / "2" / "state").is_dir()  # a reader leaves it where it is
    assert not (directory.parent / "checkpoints_damaged").exists()


def test_a_damaged_checkpoint_asked_for_by_step_is_an_error(loader_inputs):
    args, step_1_params = loader_inputs
    _, _, _, _, mesh, rules = args
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        with pytest.raises(CheckpointError, match=r"checkpoints/2 is damaged .*checksum mismatch"):
            restore_params(*args, step=2)
        params, step = restore_params(*args, step=1)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), step_1_params)
