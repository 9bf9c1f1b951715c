"""The train state is built one way: the loader's abstract state is the trainer's state, shape
for shape and sharding for sharding (optimizer moments shard like their parameters), and every
model kind the config allows is registered."""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import load_config

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer
from refine_jax.config import MODEL_KINDS
from refine_jax.model_kinds import build_model, model_kind, registered_model_kinds
from refine_jax.train_state import TrainState, abstract_state, create_state, restore_state


def specs(tree) -> dict[str, object]:
    return {
        jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("variant", ["tiny", "tiny,autoregressive"])
def test_loader_abstract_state_is_the_trainers_state(variant):
    config = load_config("shapes", variant)
    model = build_model(config, 60)
    mesh = sharding.make_mesh((2, 2, 2))
    rules = tuple(map(tuple, config.mesh.axis_rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, trainer_shardings = create_state(model, config, 60, mesh, rules)
        abstract, loader_shardings = abstract_state(model, config, 60, mesh, rules)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
    assert shapes(abstract) == shapes(state)
    assert specs(loader_shardings) == specs(trainer_shardings)
    adam = loader_shardings.opt_state[1][0]
    assert specs(adam.mu) == specs(loader_shardings.params)  # moments inherit the axis names
    assert any(spec != jax.sharding.PartitionSpec() for spec in specs(adam.mu).values())


def test_every_configurable_model_kind_is_registered():
    assert set(registered_model_kinds()) == set(MODEL_KINDS)
    with pytest.raises(ValueError, match="unknown model.kind 'diffusion'.*registered kinds"):
        model_kind("diffusion")


def test_a_checkpoint_of_another_state_layout_fails_saying_what_to_do(tmp_path):
    """Same parameters, another optimizer state (as a trainer version with another optimizer
    would write): refused with the layout message, not orbax's tree error."""
    params = {"dense": {"kernel": jnp.ones((4, 8))}}
    signature = {"model": {}, "param_shapes": {}}
    data = iter(grain.MapDataset.range(10).batch(2).to_iter_dataset())
    written = TrainState(step=jnp.asarray(3), params=params, opt_state=optax.sgd(0.1).init(params))
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(3, written, data, signature, force=True)
    target = TrainState(step=jnp.asarray(0), params=params, opt_state=optax.adam(0.1).init(params))
    shardings = jax.tree.map(lambda _: None, target)
    with pytest.raises(ValueError, match="state layout differs.*Restore it with the version"):
        restore_state(checkpointer, 3, target, shardings, signature)
    checkpointer.close()
