"""The autoregressive baseline: teacher forcing, greedy and beam decoding with a KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from refine_jax.decoding import beam_decode, greedy_decode
from refine_jax.models import build_model
from refine_jax.models.autoregressive import (
    AutoregressiveCaptioner,
    next_token_logits,
    shift_right,
    with_eos,
)
from refine_jax.special_tokens import EOS_ID, PAD_ID
from refine_jax.train import init_variables

VOCAB = 30


@pytest.fixture(scope="module")
def model_and_params():
    config = load_config("shapes", "tiny,autoregressive")
    config.model.canvas_length = 8
    model = build_model(config, VOCAB)
    params = init_variables(model, config, VOCAB)
    # Sharpen the random model so its greedy outputs have varied lengths and tokens.
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)
    images = jax.random.uniform(jax.random.key(1), (5, 48, 48, 3), minval=-1, maxval=1)
    return model, params, images


def teacher_forced_logits(model, params, images, caption):
    target = with_eos(jnp.pad(caption, ((0, 0), (0, 1))))
    image_tokens = model.apply({"params": params}, images, method=AutoregressiveCaptioner.encode)
    return model.apply(
        {"params": params}, image_tokens, shift_right(target), method=AutoregressiveCaptioner.logits
    ), target


def test_greedy_decode_agrees_with_teacher_forced_argmax_on_its_own_output(model_and_params):
    model, params, images = model_and_params
    caption = greedy_decode(model, params, images)  # [B, L]
    logits, target = teacher_forced_logits(model, params, images, caption)
    argmax = np.asarray(jnp.argmax(next_token_logits(logits), -1))
    target = np.asarray(target)
    for b in range(caption.shape[0]):
        n = int(np.sum(np.cumsum(target[b] == EOS_ID) == 0))  # tokens before eos
        ends_on_canvas = n < caption.shape[1]
        upto = n + 1 if ends_on_canvas else n  # eos included when the model emitted it
        np.testing.assert_array_equal(argmax[b, :upto], target[b, :upto])


def test_beam_of_one_is_greedy(model_and_params):
    model, params, images = model_and_params
    np.testing.assert_array_equal(
        beam_decode(model, params, images, 1), greedy_decode(model, params, images)
    )


def sequence_log_prob(model, params, images, caption):
    logits, target = teacher_forced_logits(model, params, images, caption)
    scored = jnp.cumsum(target == EOS_ID, -1) - (target == EOS_ID) == 0
    nll = optax.softmax_cross_entropy_with_integer_labels(next_token_logits(logits), target)
    return -jnp.sum(nll * scored, -1)


def test_beam_search_finds_captions_at_least_as_likely_as_greedy(model_and_params):
    model, params, images = model_and_params
    greedy = sequence_log_prob(model, params, images, greedy_decode(model, params, images))
    beam = sequence_log_prob(model, params, images, beam_decode(model, params, images, 4))
    assert np.all(np.asarray(beam) >= np.asarray(greedy) - 1e-4)


def test_teacher_forcing_scores_tokens_through_eos_only():
    caption = jnp.asarray([[5, 6, PAD_ID, PAD_ID]])
    target = with_eos(jnp.pad(caption, ((0, 0), (0, 1))))
    np.testing.assert_array_equal(target, [[5, 6, EOS_ID, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(shift_right(target)[0, :3], [2, 5, 6])


def test_baseline_has_about_the_refinement_models_parameter_count():
    config = load_config("shapes", "")
    count = lambda c: sum(
        x.size for x in jax.tree.leaves(init_variables(build_model(c, 320), c, 320))
    )
    refine = count(config)
    config.model.kind = "autoregressive"
    baseline = count(config)
    assert abs(refine - baseline) / refine < 0.05, (refine, baseline)
