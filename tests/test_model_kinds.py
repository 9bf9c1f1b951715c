"""Model kinds are added by registering: the trainer's loss and the analytic FLOPs come from the
kind's hooks, and each registered kind's loss scores its model's outputs."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config

from refine_jax import model_kinds as kinds
from refine_jax import train
from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.flops import encoder_flops, forward_flops_per_example, text_pass_flops
from refine_jax.losses import autoregressive_loss, refine_loss
from refine_jax.models.refine import RefineCaptioner
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import initial_state


@pytest.fixture(scope="module")
def tokenizer_and_batch():
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 500)), 400)
    config = load_config("shapes", "tiny")
    batch, _ = next(
        eval_batches(ShapesSource("train", 4), CaptionFeatures.from_config(config, tokenizer), 4)
    )
    return tokenizer, {k: jnp.asarray(v) for k, v in batch.items()}


def register_for_test(monkeypatch, name: str, **hooks) -> None:
    """Registers a copy of the refinement kind named `name`, with `hooks` replaced."""
    monkeypatch.setitem(
        kinds._KINDS, name, dataclasses.replace(kinds.model_kind("refine"), name=name, **hooks)
    )


def test_train_step_takes_its_loss_from_the_registered_kind(monkeypatch, tokenizer_and_batch):
    tokenizer, batch = tokenizer_and_batch
    seen = {}

    def constant_loss(model, params, batch, rng, config, weights, fractions):
        seen["weights"], seen["fractions"] = weights, fractions
        leaf = jax.tree.leaves(params)[0]
        loss = 7.0 + 0.0 * jnp.sum(leaf)
        return loss, {"loss": loss}

    register_for_test(monkeypatch, "constant", loss=constant_loss)
    config = load_config("shapes", "tiny")
    config.model.kind = "constant"
    model = kinds.build_model(config, tokenizer.vocab_size)
    optimizer, schedule = train.make_optimizer(config)
    state = initial_state(model, config, tokenizer.vocab_size, optimizer)
    step = jax.jit(train.bind_train_step(config, model, optimizer, schedule))
    _, metrics = step(state, batch)
    assert float(metrics["loss"]) == 7.0
    fractions, weights = kinds.model_kind("refine").step_schedule(config)
    np.testing.assert_allclose(seen["fractions"], fractions, rtol=1e-6)
    np.testing.assert_allclose(seen["weights"], weights, rtol=1e-6)


def test_forward_flops_count_the_kinds_text_passes(monkeypatch):
    passes = (kinds.TextPass(3, 5, 1, head_flops=1000.0), kinds.TextPass(2, 7, 2, False, False))
    register_for_test(monkeypatch, "two_stacks", text_passes=lambda config: passes)
    config = load_config("shapes", "tiny")
    config.model.kind = "two_stacks"
    assert forward_flops_per_example(config, 400) == pytest.approx(
        encoder_flops(config)
        + 3 * text_pass_flops(config, 400, passes[0])
        + 2 * text_pass_flops(config, 400, passes[1])
    )
    # The one-pass forms: a layer without cross-attention or logits costs less than with.
    with_all = text_pass_flops(config, 400, kinds.TextPass(1, 7, 2))
    assert text_pass_flops(config, 400, passes[1]) < with_all
    config = load_config("shapes", "tiny,autoregressive")
    decoder = kinds.TextPass(1, config.model.canvas_length + 1, config.model.detailer_depth)
    assert forward_flops_per_example(config, 400) == pytest.approx(
        encoder_flops(config) + text_pass_flops(config, 400, decoder)
    )


@pytest.mark.parametrize("variant", ["tiny", "tiny,autoregressive"])
def test_each_kinds_loss_scores_its_models_outputs(tokenizer_and_batch, variant):
    """Without dropout or self-conditioning the loss is deterministic: the kind's loss equals
    its model's training pass scored by the loss function of that kind."""
    tokenizer, batch = tokenizer_and_batch
    batch = {**batch, "mask": batch["mask"].at[-1].set(False)}  # a padding example is not scored
    config = load_config("shapes", variant)
    config.model.dropout_rate = 0.0
    config.targets.self_condition_rate = 0.0
    config.targets.length_loss_weight = 0.5  # the length term counts too
    model = kinds.build_model(config, tokenizer.vocab_size)
    params = init_params(model, config, tokenizer.vocab_size)
    fractions, weights = (
        jnp.asarray(a, jnp.float32)
        for a in kinds.model_kind(config.model.kind).step_schedule(config)
    )
    loss, metrics = kinds.model_kind(config.model.kind).loss(
        model, params, batch, jax.random.key(0), config, weights, fractions
    )
    if config.model.kind == "refine":
        no_self_condition = jnp.zeros((4, config.model.num_refine_steps), bool)
        outputs = model.apply(
            {"params": params}, batch["image"], batch["targets"], fractions, no_self_condition
        )
        expected, expected_metrics = refine_loss(
            outputs,
            weights,
            batch["scheduled_lengths"],
            batch["mask"],
            config.model.canvas_length,
            config.targets.length_loss_weight,
        )
    else:
        outputs = model.apply({"params": params}, batch["image"], batch["caption"])
        expected, expected_metrics = autoregressive_loss(outputs, batch["mask"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert set(metrics) == set(expected_metrics)


def test_training_randomness_comes_from_the_configured_prng(tokenizer_and_batch):
    # A step's key is of the configured implementation, the same for the same seed and step,
    # and its dropout masks differ between implementations (so does the loss they give).
    tokenizer, batch = tokenizer_and_batch
    config = load_config("shapes", "tiny")
    config.model.dropout_rate = 0.3
    model = kinds.build_model(config, tokenizer.vocab_size)
    params = initial_state(model, config, tokenizer.vocab_size, train.make_optimizer(config)[0])
    fractions, weights = kinds.model_kind("refine").step_schedule(config)
    loss = jax.jit(
        lambda rng: kinds.model_kind("refine").loss(
            model, params.params, batch, rng, config, weights, fractions
        )[0]
    )
    losses = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        config.rng_impl = impl
        rng = train.step_rng(config, jnp.asarray(5))
        assert jax.random.key_impl(rng) == impl
        assert jnp.array_equal(
            jax.random.key_data(rng), jax.random.key_data(train.step_rng(config, jnp.asarray(5)))
        )
        losses[impl] = float(loss(rng))
    assert len(set(losses.values())) == 3, losses


class EchoCaptioner(RefineCaptioner):
    """A refinement module registered as a kind of its own (its describe hook differs)."""


def test_decoding_dispatches_on_the_kind_registered_for_the_models_class(monkeypatch):
    config = load_config("shapes", "tiny")
    images = jnp.zeros((2, config.model.image_size, config.model.image_size, 3))
    fractions = jnp.asarray(kinds.model_kind("refine").step_schedule(config)[0], jnp.float32)

    def echo(model, params, images, fractions, start, method, beam, early_stop):
        """The start canvas at every step: the hook, not the refinement decoder, ran."""
        return jnp.repeat(start[:, None], fractions.shape[0], axis=1)

    refine = kinds.model_kind("refine")
    register_for_test(monkeypatch, "echo", module_type=EchoCaptioner, describe=echo)
    model = kinds.build_model(config, 50)
    echo_model = EchoCaptioner(
        **{f: getattr(model, f) for f in model.__dataclass_fields__ if f not in ("parent", "name")}
    )
    assert kinds.kind_of_model(echo_model).name == "echo"  # its own class wins over the base's
    assert kinds.kind_of_model(model) is refine
    params = init_params(model, config, 50)
    start = jnp.arange(2 * config.model.canvas_length, dtype=jnp.int32).reshape(2, -1) % 50
    np.testing.assert_array_equal(
        kinds.decode_batch(echo_model, params, images, fractions, start=start),
        jnp.repeat(start[:, None], config.model.num_refine_steps, axis=1),
    )
    written = kinds.decode_batch(model, params, images, fractions, start=start)
    assert written.shape == (2, config.model.num_refine_steps, config.model.canvas_length)
    assert not np.array_equal(written[:, 0], start)  # the detailer wrote on it


def test_a_kind_that_writes_no_descriptions_cannot_be_decoded():
    config = load_config("shapes", "tiny,match")
    model = kinds.build_model(config, 50)
    assert not kinds.kind_of_model(model).describes
    images = jnp.zeros((1, config.model.image_size, config.model.image_size, 3))
    with pytest.raises(ValueError, match="kind 'match' writes no descriptions"):
        kinds.decode_batch(model, {}, images, jnp.ones(1))
    with pytest.raises(TypeError, match="Dense is not the module of any registered model kind"):
        kinds.kind_of_model(nn.Dense(3))
