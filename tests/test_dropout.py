"""layers.Dropout: 32 bits per decision is flax's nn.Dropout; 16 and 8 pack decisions into each
32-bit draw, drop the rounded rate and keep the mean; every model kind uses the configured bits."""

from __future__ import annotations

import re
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from refine_jax import model_kinds as kinds
from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.models.layers import Dropout
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import init_variables


class Twice(nn.Module):
    """Two dropouts of one kind in one scope, as a layer applies them."""

    dropout: type
    rate: float
    bits: int | None = None

    @nn.compact
    def __call__(self, x):
        extra = {} if self.bits is None else {"bits": self.bits}
        return [self.dropout(self.rate, **extra)(x, deterministic=False) for _ in range(2)]


def apply(module: nn.Module, x: jax.Array, seed: int = 0):
    return module.apply({}, x, rngs={"dropout": jax.random.key(seed)})


def test_32_bits_draw_the_masks_of_flax_dropout():
    x = jax.random.normal(jax.random.key(1), (4, 7, 33))
    ours = apply(Twice(Dropout, 0.3, 32), x)
    flax = apply(Twice(nn.Dropout, 0.3), x)
    for a, b in zip(ours, flax, strict=True):
        assert jnp.array_equal(a, b)
    assert not jnp.array_equal(ours[0], ours[1])  # each call draws its own mask


@pytest.mark.parametrize("bits", [8, 16])
def test_packed_bits_drop_the_rounded_rate_and_keep_the_mean(bits):
    rate, levels = 0.1, 2**bits
    keep_prob = 1 - round(rate * levels) / levels  # 230/256 at 8 bits
    x = jnp.ones((999, 1001))  # not a multiple of the decisions per 32-bit word
    y, other = apply(Twice(Dropout, rate, bits), x)
    dropped = np.asarray(y == 0)
    n = dropped.size
    sigma = np.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(dropped.mean() - (1 - keep_prob)) < 5 * sigma
    np.testing.assert_array_equal(np.asarray(y)[~dropped], np.float32(1 / keep_prob))
    assert abs(float(y.mean()) - 1.0) < 5 * sigma / keep_prob
    # Decisions that share a 32-bit word are independent: neighbours both dropped at rate**2.
    both = (dropped[:, :-1] & dropped[:, 1:]).mean()
    both_rate = (1 - keep_prob) ** 2
    assert abs(both - both_rate) < 5 * np.sqrt(both_rate / dropped[:, 1:].size)
    assert not jnp.array_equal(y, other)
    again, _ = apply(Twice(Dropout, rate, bits), x)
    assert jnp.array_equal(y, again)  # the same key, the same mask


def test_deterministic_and_the_edge_rates():
    x = jnp.arange(12.0).reshape(3, 4)
    assert jnp.array_equal(Dropout(0.5, 8).apply({}, x, deterministic=True), x)
    assert jnp.array_equal(apply(Twice(Dropout, 0.0, 8), x)[0], x)
    assert jnp.array_equal(apply(Twice(Dropout, 1.0, 8), x)[0], jnp.zeros_like(x))


@pytest.mark.parametrize(
    "rate, bits, message",
    [
        (0.1, 12, "model.dropout_bits = 12 is not one of [32, 16, 8]"),
        (0.001, 8, "model.dropout_rate 0.001 rounds to 0/256 at model.dropout_bits=8"),
        (0.999, 8, "model.dropout_rate 0.999 rounds to 256/256 at model.dropout_bits=8"),
    ],
)
def test_bits_that_cannot_express_the_rate_are_an_error(rate, bits, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply(Twice(Dropout, rate, bits), jnp.ones((8, 8)))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(training_captions(ShapesSource("train", 500)), 400)


def draw_shapes(tokenizer, variant: str, bits: int, rate: float = 0.1) -> Counter:
    """The shapes of the random bits a kind's training loss draws, counted."""
    config = load_config("shapes", variant)
    config.model.dropout_rate = rate
    config.model.dropout_bits = bits
    features = CaptionFeatures.from_config(config, tokenizer)
    batch, _ = next(eval_batches(ShapesSource("train", 2), features, 2))
    model = kinds.build_model(config, tokenizer.vocab_size)
    kind = kinds.model_kind(config.model.kind)
    fractions, weights = kind.step_schedule(config)

    def loss(params, rng, batch):
        return kind.loss(model, params, batch, rng, config, weights, fractions)[0]

    params = jax.eval_shape(lambda: init_variables(model, config, tokenizer.vocab_size))
    text = str(jax.make_jaxpr(loss)(params, jax.random.key(0), batch))
    return Counter(
        tuple(int(d) for d in dims.split(",") if d.strip())
        for dims in re.findall(r"random_bits\[[^\]]*shape=\(([^)]*)\)", text)
    )


@pytest.mark.parametrize("variant", ["tiny", "tiny,autoregressive", "tiny,match"])
def test_every_kinds_dropout_draws_the_configured_bits(tokenizer, variant):
    # At 32 bits, masks are drawn in the activations' shapes; at 8 bits every dropout draws one
    # flat row of 32-bit words, so a module left at 32 bits would show as a shaped draw. (Draws
    # that are not dropout's, such as self-conditioning's, are those made at rate 0.)
    others = draw_shapes(tokenizer, variant, 32, rate=0.0)
    full = draw_shapes(tokenizer, variant, 32) - others
    packed = draw_shapes(tokenizer, variant, 8) - others
    assert full and any(len(shape) > 1 for shape in full)
    assert packed and all(len(shape) == 1 for shape in packed), packed
