"""The refinement model: weight sharing across steps, scanned == unscanned, remat, decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from refine_jax.models import build_model
from refine_jax.models.refine import clean_canvas, write_scheduled
from refine_jax.special_tokens import BLANK_ID, PAD_ID
from refine_jax.targets import schedule_fractions
from refine_jax.train import init_variables

VOCAB = 40


def tiny_config(num_steps=3, **model):
    config = load_config("shapes", "tiny")
    config.model.num_refine_steps = num_steps
    for key, value in model.items():
        config.model[key] = value
    return config


def inputs(config, batch=3, seed=0):
    m = config.model
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, m.image_size, m.image_size, 3)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (batch, m.num_refine_steps, m.canvas_length)))
    fractions = jnp.asarray(schedule_fractions(m.num_refine_steps), jnp.float32)
    self_condition = jnp.asarray([True, False, True][:batch])
    return images, targets, fractions, self_condition


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def test_parameter_count_does_not_depend_on_k():
    counts = {
        k: count(init_variables(build_model(tiny_config(k), VOCAB), tiny_config(k), VOCAB))
        for k in (1, 2, 4, 8)
    }
    assert len(set(counts.values())) == 1, counts


def test_detailer_parameters_are_shared_not_stacked_per_step():
    config = tiny_config(5)
    params = init_variables(build_model(config, VOCAB), config, VOCAB)
    leaves = jax.tree.leaves(
        jax.tree.map(jnp.shape, params["detailer"]), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert all(5 not in shape[:1] for shape in leaves if len(shape) > 1)


def test_scanned_and_unscanned_give_same_logits_and_gradients():
    config = tiny_config(3)
    scanned = build_model(config, VOCAB, scan=True).clone(keep_logits=True)
    unscanned = build_model(config, VOCAB, scan=False).clone(keep_logits=True)
    params = init_variables(scanned, config, VOCAB)
    assert jax.tree.structure(params) == jax.tree.structure(
        init_variables(unscanned, config, VOCAB)
    )
    args = inputs(config)

    def run(model):
        def loss(p):
            out = model.apply({"params": p}, *args)
            return jnp.sum(out["cross_entropy"] * jnp.arange(1, 4)[:, None]), out

        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads

    out_s, grads_s = run(scanned)
    out_u, grads_u = run(unscanned)
    assert out_s["logits"].shape == (3, 3, config.model.canvas_length, VOCAB)
    np.testing.assert_allclose(out_s["logits"], out_u["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out_s["cross_entropy"], out_u["cross_entropy"], atol=1e-5)
    for g_s, g_u in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_u), strict=True):
        np.testing.assert_allclose(g_s, g_u, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_results(remat):
    config = tiny_config(3)
    plain = build_model(config, VOCAB)
    config.model.remat = remat
    rematted = build_model(config, VOCAB)
    params = init_variables(plain, config, VOCAB)
    args = inputs(config)
    grad = lambda model: jax.grad(
        lambda p: jnp.sum(model.apply({"params": p}, *args)["cross_entropy"])
    )(params)
    for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(rematted)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)  # recomputation reorders sums


def test_training_outputs_are_per_step_scalars_without_logits():
    config = tiny_config(4)
    model = build_model(config, VOCAB)
    params = init_variables(model, config, VOCAB)
    out = model.apply({"params": params}, *inputs(config))
    assert "logits" not in out
    assert out["cross_entropy"].shape == (4, 3)
    assert out["expected_length"].shape == (4, 3)


def test_self_conditioning_feeds_the_prediction_to_the_next_step():
    config = tiny_config(2)
    model = build_model(config, VOCAB)
    params = init_variables(model, config, VOCAB)
    images, targets, fractions, _ = inputs(config, batch=2)
    with_target = model.apply(
        {"params": params}, images, targets, fractions, jnp.asarray([False, False])
    )
    with_own = model.apply(
        {"params": params}, images, targets, fractions, jnp.asarray([True, False])
    )
    # Step 1 reads the blank canvas either way; step 2 differs only for the first example.
    np.testing.assert_allclose(with_target["cross_entropy"][0], with_own["cross_entropy"][0])
    assert with_target["cross_entropy"][1, 0] != with_own["cross_entropy"][1, 0]
    assert with_target["cross_entropy"][1, 1] == with_own["cross_entropy"][1, 1]


def test_describe_writes_k_canvases_that_end_at_their_first_pad():
    config = tiny_config(3)
    model = build_model(config, VOCAB)
    params = init_variables(model, config, VOCAB)
    images, _, fractions, _ = inputs(config)
    out = model.apply({"params": params}, images, fractions, method=model.describe)
    assert out["canvas"].shape == (3, 3, config.model.canvas_length)
    np.testing.assert_array_equal(out["canvas"], clean_canvas(out["canvas"]))


def test_clean_canvas_blanks_everything_after_the_first_pad():
    tokens = jnp.asarray([[5, 6, 0, 7, 8], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(clean_canvas(tokens), [[5, 6, 0, 0, 0], [5, 6, 7, 8, 9]])


def test_an_aligned_step_writes_its_share_of_the_description_most_confident_words_first():
    # 6 positions, vocabulary of 8 (ids 5..7 are words). Positions 0-3 hold the description
    # (pad is unlikely there), 4-5 are more likely pad than not.
    probabilities = np.full((1, 6, 8), 0.01)
    probabilities[0, :4, PAD_ID] = 0.05
    probabilities[0, 4:, PAD_ID] = 0.9
    probabilities[0, :4, BLANK_ID] = 0.6  # every position is more likely blank than a word...
    best = {0: (5, 0.30), 1: (6, 0.10), 2: (7, 0.25), 3: (5, 0.20)}
    for position, (word, p) in best.items():  # ...but positions 0 and 2 are surest of a word
        probabilities[0, position, word] = p
    logits = jnp.log(jnp.asarray(probabilities / probabilities.sum(-1, keepdims=True)))
    half = write_scheduled(logits, jnp.asarray(0.5))
    np.testing.assert_array_equal(half, [[5, BLANK_ID, 7, BLANK_ID, PAD_ID, PAD_ID]])
    first = write_scheduled(logits, jnp.asarray(0.1))  # at least one word
    np.testing.assert_array_equal(first, [[5, BLANK_ID, BLANK_ID, BLANK_ID, PAD_ID, PAD_ID]])
    full = write_scheduled(logits, jnp.asarray(1.0))  # the last step leaves no blank
    np.testing.assert_array_equal(full, [[5, 6, 7, 5, PAD_ID, PAD_ID]])
