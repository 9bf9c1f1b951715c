"""The autoregressive baseline: teacher forcing, greedy and beam decoding with a KV cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from refine_jax.decoding import beam_decode, decode_batch, greedy_decode
from refine_jax.models import build_model
from refine_jax.models.autoregressive import (
    AutoregressiveCaptioner,
    next_token_logits,
    shift_right,
    with_eos,
)
from refine_jax.special_tokens import BOS_ID, EOS_ID, PAD_ID
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


@pytest.fixture(scope="module")
def tiny_search_problem():
    """A model small enough to score every caption: 7 ids (5 a caption may use), 2 words."""
    config = load_config("shapes", "tiny,autoregressive")
    config.model.canvas_length = 2
    vocab = 7
    model = build_model(config, vocab)
    params = init_variables(model, config, vocab)
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)
    # A less likely eos gives captions of 0, 1 and 2 words among the best.
    bias = params["decoder"]["logits"]["bias"]
    params["decoder"]["logits"]["bias"] = bias.replace_boxed(bias.value.at[EOS_ID].add(-2.0))
    images = jax.random.uniform(jax.random.key(1), (64, 48, 48, 3), minval=-1, maxval=1)
    return model, params, images


def exhaustive_search(model, params, images, length_penalty):
    """The caption beam search is documented to find, by scoring every token sequence of
    canvas_length + 1 steps: log-probability through the first eos / length**penalty, where
    length counts the tokens before eos plus one."""
    steps = model.canvas_length + 1
    allowed = [t for t in range(model.vocab_size) if t not in (PAD_ID, BOS_ID)]
    sequences = set()
    for tokens in itertools.product(allowed, repeat=steps):
        end = tokens.index(EOS_ID) + 1 if EOS_ID in tokens else steps
        sequences.add(tokens[:end] + (PAD_ID,) * (steps - end))  # pad after eos, at no cost
    sequences = jnp.asarray(sorted(sequences))
    scored = jnp.cumsum(sequences == EOS_ID, -1) - (sequences == EOS_ID) == 0
    lengths = jnp.sum(jnp.cumsum(sequences == EOS_ID, -1) == 0, -1) + 1
    image_tokens = model.apply({"params": params}, images, method=AutoregressiveCaptioner.encode)
    count = len(sequences)
    logits = model.apply(
        {"params": params},
        jnp.repeat(image_tokens, count, 0),  # every sequence for every image: [B * S, ...]
        shift_right(jnp.tile(sequences, (len(images), 1))),
        method=AutoregressiveCaptioner.logits,
    ).reshape(len(images), count, steps, -1)
    log_probs = jax.nn.log_softmax(next_token_logits(logits))
    picked = jnp.take_along_axis(log_probs, sequences[None, ..., None], -1)[..., 0]
    score = jnp.sum(jnp.where(scored, picked, 0.0), -1) / lengths**length_penalty  # [B, S]
    best = np.array(sequences[jnp.argmax(score, -1)])
    best[:, -1] = EOS_ID  # a caption that never ends is cut at the canvas length
    return np.where(np.cumsum(best == EOS_ID, -1) > 0, PAD_ID, best)[:, :-1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_beam_wide_enough_to_be_exhaustive_finds_the_best_caption(
    tiny_search_problem, length_penalty
):
    model, params, images = tiny_search_problem
    expected = exhaustive_search(model, params, images, length_penalty)
    # 85 beams hold every distinct sequence of 3 steps over 5 ids (1 + 4 + 16 + 64).
    found = np.asarray(beam_decode(model, params, images, 85, length_penalty))
    np.testing.assert_array_equal(found, expected)
    # The problem is not trivial: greedy misses the best caption of some image, and the
    # length penalty changes the answer for others.
    if length_penalty == 0.0:
        assert np.any(expected != np.asarray(greedy_decode(model, params, images)))
        words = np.sum(expected != PAD_ID, -1)  # finished beams are among the best, too
        assert words.min() < model.canvas_length == words.max()
    else:
        assert np.any(expected != exhaustive_search(model, params, images, 0.0))


def test_decode_batch_dispatches_to_beam_search(tiny_search_problem):
    model, params, images = tiny_search_problem
    beam = np.asarray(beam_decode(model, params, images, 4))
    greedy = np.asarray(greedy_decode(model, params, images))
    assert np.any(beam != greedy)  # so a dispatch that ignores the method would show
    np.testing.assert_array_equal(
        decode_batch(model, params, images, None, "beam", 4), beam[:, None]
    )
    np.testing.assert_array_equal(
        decode_batch(model, params, images, None, "greedy", 4), greedy[:, None]
    )
    np.testing.assert_array_equal(
        decode_batch(model, params, images, None, "beam", 1), greedy[:, None]
    )


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
