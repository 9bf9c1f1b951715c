"""The autoregressive baseline: teacher forcing, greedy and beam decoding with a KV cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config, param_shapes

from refine_jax import decoding
from refine_jax.decoding import (
    beam_decode,
    beam_decode_with_steps,
    greedy_decode,
    greedy_decode_with_steps,
)
from refine_jax.model_kinds import build_model, decode_batch
from refine_jax.models.autoregressive import (
    AutoregressiveCaptioner,
    next_token_logits,
    shift_right,
    with_eos,
)
from refine_jax.special_tokens import BOS_ID, EOS_ID, PAD_ID

VOCAB = 30


@pytest.fixture(scope="module")
def model_and_params():
    config = load_config("shapes", "tiny,autoregressive")
    config.model.canvas_length = 8
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
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
    params = init_params(model, config, vocab)
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


def with_eos_bias(params, bias: float):
    """`params` with `bias` added to the eos logit: the random model ends its captions sooner."""
    logits = params["decoder"]["logits"]
    boxed = logits["bias"]
    return {
        **params,
        "decoder": {
            **params["decoder"],
            "logits": {**logits, "bias": boxed.replace_boxed(boxed.value.at[EOS_ID].add(bias))},
        },
    }


@pytest.fixture(scope="module")
def short_captions(model_and_params):
    """The random model made to end every caption of a batch early, at different steps."""
    model, params, _ = model_and_params
    images = jax.random.uniform(jax.random.key(2), (16, 48, 48, 3), minval=-1, maxval=1)
    return model, with_eos_bias(params, 10.0), images


def caption_lengths(captions) -> np.ndarray:
    return np.sum(np.asarray(captions) != PAD_ID, axis=-1)


def test_greedy_early_stop_writes_the_fixed_length_captions(model_and_params, short_captions):
    for model, params, images in (model_and_params, short_captions):
        fixed, fixed_calls = greedy_decode_with_steps(model, params, images, early_stop=False)
        early, early_calls = greedy_decode_with_steps(model, params, images, early_stop=True)
        np.testing.assert_array_equal(early, fixed)
        assert int(fixed_calls) == model.canvas_length + 1
    # The second batch's captions end at different steps, all before the canvas is full.
    lengths = caption_lengths(early)
    assert len(set(lengths.tolist())) >= 3 and lengths.max() < model.canvas_length, lengths


def test_greedy_early_stop_calls_the_decoder_until_the_last_caption_ends(short_captions):
    model, params, images = short_captions
    captions, calls = greedy_decode_with_steps(model, params, images)
    # Call t writes token t: the longest caption's eos is token max(lengths), so the loop
    # stops after max(lengths) + 1 calls, well short of the canvas_length + 1 of a full pass.
    assert int(calls) == caption_lengths(captions).max() + 1 < model.canvas_length + 1
    _, fixed_calls = greedy_decode_with_steps(model, params, images, early_stop=False)
    assert int(fixed_calls) == model.canvas_length + 1


def test_beam_early_stop_writes_the_fixed_length_captions(short_captions, tiny_search_problem):
    model, params, images = short_captions
    for length_penalty in (0.0, 1.0):
        early, calls = beam_decode_with_steps(model, params, images, 3, length_penalty)
        fixed, fixed_calls = beam_decode_with_steps(
            model, params, images, 3, length_penalty, early_stop=False
        )
        np.testing.assert_array_equal(early, fixed)
        assert int(calls) < int(fixed_calls) == model.canvas_length + 1
    # Wide beams with many finished ones, some of equal score (the exhaustive problem).
    model, params, images = tiny_search_problem
    np.testing.assert_array_equal(
        beam_decode(model, params, images, 85, early_stop=True),
        beam_decode(model, params, images, 85, early_stop=False),
    )


def test_decode_batch_passes_early_stop_to_the_baseline(short_captions, monkeypatch):
    model, params, images = short_captions
    seen = []

    def spy(name):
        original = getattr(decoding, name)

        def wrapped(*args, **kwargs):
            seen.append((name, kwargs.get("early_stop", args[-1])))
            return original(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(decoding, "greedy_decode", spy("greedy_decode"))
    monkeypatch.setattr(decoding, "beam_decode", spy("beam_decode"))
    decode_batch.clear_cache()  # so that every call below is traced (and seen)
    expected = {
        "greedy": np.asarray(greedy_decode(model, params, images))[:, None],
        "beam": np.asarray(beam_decode(model, params, images, 3))[:, None],
    }
    seen.clear()
    for method in ("greedy", "beam"):
        for early_stop in (True, False):
            out = decode_batch(model, params, images, None, method, 3, early_stop=early_stop)
            np.testing.assert_array_equal(out, expected[method])
    out = decode_batch(model, params, images, None, "greedy", 1)  # the default
    assert seen == [
        ("greedy_decode", True),
        ("greedy_decode", False),
        ("beam_decode", True),
        ("beam_decode", False),
        ("greedy_decode", True),
    ]


def test_teacher_forcing_scores_tokens_through_eos_only():
    caption = jnp.asarray([[5, 6, PAD_ID, PAD_ID]])
    target = with_eos(jnp.pad(caption, ((0, 0), (0, 1))))
    np.testing.assert_array_equal(target, [[5, 6, EOS_ID, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(shift_right(target)[0, :3], [2, 5, 6])


def test_baseline_has_about_the_refinement_models_parameter_count():
    config = load_config("shapes", "")
    count = lambda c: sum(x.size for x in jax.tree.leaves(param_shapes(c, 320)))
    refine = count(config)
    config.model.kind = "autoregressive"
    baseline = count(config)
    assert abs(refine - baseline) / refine < 0.05, (refine, baseline)
