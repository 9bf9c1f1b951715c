"""A run's image encoder started from another run's checkpoint and kept frozen (the cheaper
experiment mode): the encoder is loaded exactly, stays bit-identical through training while the
rest learns, and an encoder of another shape is an error naming the parameter."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config
from test_evaluate import run_main, trained_workdir

from refine_jax import train
from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.model_kinds import build_model
from refine_jax.model_loading import load_model
from refine_jax.models.pretrained import replace_encoder
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import initial_state


def leaves_by_name(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def test_a_frozen_encoder_stays_bit_identical_through_training_while_the_rest_learns():
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 300)), 300)
    config = load_config("shapes", "tiny")
    config.model.freeze_encoder = True
    config.model.pretrained_encoder = "unused here: the state is built directly"
    config.model.dropout_rate = 0.1  # a frozen encoder runs without dropout
    config.weight_decay = 0.1  # and is not decayed
    features = CaptionFeatures.from_config(config, tokenizer)
    batch, _ = next(eval_batches(ShapesSource("train", 8), features, 8))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = build_model(config, tokenizer.vocab_size)
    optimizer, schedule = train.make_optimizer(config)
    state = initial_state(model, config, tokenizer.vocab_size, optimizer)
    before = leaves_by_name(jax.tree.map(np.asarray, state.params))
    step = jax.jit(train.bind_train_step(config, model, optimizer, schedule))
    for _ in range(3):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    after = leaves_by_name(state.params)
    assert before.keys() == after.keys()
    encoder = [name for name in before if name.startswith("['encoder']")]
    rest = [name for name in before if not name.startswith("['encoder']")]
    assert encoder and rest
    for name in encoder:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    changed = [name for name in rest if not np.array_equal(after[name], before[name])]
    assert len(changed) == len(rest), sorted(set(rest) - set(changed))


def test_freezing_keeps_the_optimizer_state_layout_so_checkpoints_move_between_the_modes():
    config = load_config("shapes", "tiny")
    params = nn.unbox(init_params(build_model(config, 50), config, 50))
    trained_state = train.make_optimizer(config)[0].init(params)
    config.model.freeze_encoder = True
    frozen_state = train.make_optimizer(config)[0].init(params)
    assert jax.tree.structure(frozen_state) == jax.tree.structure(trained_state)
    shapes = lambda tree: [np.shape(x) for x in jax.tree.leaves(tree)]
    assert shapes(frozen_state) == shapes(trained_state)


def test_an_encoder_of_another_shape_is_an_error_naming_the_parameter():
    config = load_config("shapes", "tiny")
    params = nn.unbox(init_params(build_model(config, 50), config, 50))
    wider = config.copy_and_resolve_references()
    wider.model.mlp_dim = config.model.mlp_dim * 2
    other = nn.unbox(init_params(build_model(wider, 50), wider, 50))
    expected = r"mlp/wi/bias of the run in X has shape \(1, 128\), the model expects \(1, 64\)"
    with pytest.raises(ValueError, match=expected):
        replace_encoder(params, other["encoder"], "the run in X")


@pytest.mark.slow
def test_a_run_starts_from_another_runs_trained_encoder_and_keeps_it_frozen(
    tmp_path_factory, tmp_path
):
    """The README's cheaper-experiment mode end to end: a refinement run whose encoder is the
    autoregressive baseline's, frozen; after training its encoder is still the baseline's."""
    baseline = trained_workdir(tmp_path_factory, "tiny,autoregressive")
    result = run_main(
        "--config=configs/shapes.py:tiny",
        f"--workdir={tmp_path}",
        "--config.total_steps=3",
        f"--config.model.pretrained_encoder={baseline}",
        "--config.model.freeze_encoder=True",
    )
    assert f"encoder initialised from {baseline}" in result.stdout
    teacher = leaves_by_name(load_model(None, baseline).params["encoder"])
    student = load_model(None, tmp_path)
    assert student.step == 3
    trained = leaves_by_name(student.params["encoder"])
    assert teacher.keys() == trained.keys()
    for name, value in teacher.items():
        np.testing.assert_array_equal(trained[name], value, err_msg=name)
