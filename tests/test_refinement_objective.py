"""The `final` refinement objective: known-answer decoding rule and loss terms, self-conditioning
on the target's layout, polish passes, and scanned == unscanned for every objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_params, load_config

from refine_jax.model_kinds import build_model
from refine_jax.models.refine import final_objective_terms, word_distribution, write_due
from refine_jax.special_tokens import BLANK_ID, BOS_ID, EOS_ID, PAD_ID, UNK_ID
from refine_jax.targets import schedule_fractions

VOCAB = 12
A, B, C, D = 6, 7, 8, 9  # word ids


def one_hot_logits(rows):
    """logits [B, L, V] with 4.0 on the given id of each position (a dict {id: value} mixes)."""
    out = np.zeros((len(rows), len(rows[0]), VOCAB), np.float32)
    for b, row in enumerate(rows):
        for i, spec in enumerate(row):
            for token, value in spec.items() if isinstance(spec, dict) else [(spec, 4.0)]:
                out[b, i, token] = value
    return jnp.asarray(out)


def test_write_due_writes_due_words_ends_at_the_first_pad_and_never_writes_special_ids():
    logits = one_hot_logits(
        [
            # a special id (eos) beats every word at position 1: the best word is written
            [A, {EOS_ID: 9.0, B: 3.0}, C, PAD_ID, D, PAD_ID],
            [{BLANK_ID: 9.0, D: 1.0}, A, {UNK_ID: 8.0, BOS_ID: 8.0, C: 2.0}, B, D, A],
        ]
    )
    due = jnp.asarray([[1.0, 1.0, -1.0, 1.0, 1.0, 1.0], [-2.0, 3.0, 0.5, -1.0, 1.0, 2.0]])
    canvas = jnp.full((2, 6), BLANK_ID)
    written = write_due(word_distribution(logits), due, canvas)
    # row 0 ends at position 3 (pad likely) although position 4 is due and a word follows
    assert written[0].tolist() == [A, B, BLANK_ID, PAD_ID, PAD_ID, PAD_ID]
    # row 1 has no likely pad: its length is the canvas; blank is never written as a word
    assert written[1].tolist() == [BLANK_ID, A, C, BLANK_ID, D, A]


def test_write_due_ends_where_the_length_probabilities_add_up_to_one_half():
    # No position is more likely pad than not (P(pad) ~ 0.46 at positions 1 and 2), but the
    # description is 1 or 2 tokens long with probability ~0.92: it ends at position 2.
    logits = one_hot_logits([[B, {PAD_ID: 4.0, A: 4.0}, {PAD_ID: 4.0, C: 4.0}, D, A, B]])
    written = write_due(word_distribution(logits), jnp.ones((1, 6)), jnp.full((1, 6), BLANK_ID))
    assert written[0].tolist() == [B, A, PAD_ID, PAD_ID, PAD_ID, PAD_ID]


def test_write_due_writes_the_most_due_position_when_none_is_due():
    logits = one_hot_logits([[A, B, C, D]])
    due = jnp.asarray([[-3.0, -0.5, -1.0, -2.0]])
    written = write_due(word_distribution(logits), due, jnp.full((1, 4), BLANK_ID))
    assert written[0].tolist() == [BLANK_ID, B, BLANK_ID, BLANK_ID]


def test_write_due_revises_written_words_only_when_asked():
    logits = one_hot_logits([[A, B, C]])
    due = jnp.ones((1, 3))
    canvas = jnp.asarray([[D, BLANK_ID, D]])
    assert write_due(word_distribution(logits), due, canvas, revise=True)[0].tolist() == [A, B, C]
    assert write_due(word_distribution(logits), due, canvas, revise=False)[0].tolist() == [D, B, D]


def test_without_revise_written_words_stay_where_the_step_would_blank_or_end_them():
    logits = one_hot_logits([[A, B, C, PAD_ID, PAD_ID]])  # the step would end after 3 words
    due = jnp.asarray([[-1.0, 1.0, -1.0, -1.0, -1.0]])  # and write position 1 only
    canvas = jnp.asarray([[D, BLANK_ID, BLANK_ID, BLANK_ID, D]])
    revised = write_due(word_distribution(logits), due, canvas, revise=True)[0].tolist()
    assert revised == [BLANK_ID, B, BLANK_ID, PAD_ID, PAD_ID]
    kept = write_due(word_distribution(logits), due, canvas, revise=False)[0].tolist()
    # The D at 0 stays though not due, and the end moves past the D at 4.
    assert kept == [D, B, BLANK_ID, BLANK_ID, D]


def test_final_objective_terms_on_a_known_case():
    final = jnp.asarray([[A, B, PAD_ID, PAD_ID]])
    target = jnp.asarray([[A, BLANK_ID, PAD_ID, PAD_ID]])
    logits = jnp.zeros((1, 4, VOCAB))  # uniform: every position costs log V
    due_logits = jnp.asarray([[0.0, 0.0, 5.0, 5.0]])
    word_ce, due_ce, expected_length = final_objective_terms(
        logits, word_distribution(logits), due_logits, target, final
    )
    # Scored: the two caption positions and the first pad, each log V; later pads are not.
    np.testing.assert_allclose(word_ce, [np.log(VOCAB)], rtol=1e-6)
    # Due over the caption's positions only: sigmoid(0) against 1 and 0, both log 2.
    np.testing.assert_allclose(due_ce, [np.log(2.0)], rtol=1e-6)
    # sigmoid(due) times P(not pad) = (1 - 1/V), summed over all positions.
    expected = (0.5 + 0.5 + 2 * jax.nn.sigmoid(5.0)) * (1 - 1 / VOCAB)
    np.testing.assert_allclose(expected_length, [expected], rtol=1e-6)


def test_the_word_distribution_gives_the_softmax_quantities_and_their_gradients():
    """One logsumexp per step stands in for the full softmax: the cross-entropy of a label,
    P(pad) and the best word agree with the softmax's, and so do their gradients."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, VOCAB)) * 3.0
    labels = jax.random.randint(jax.random.key(1), (2, 5), 0, VOCAB)
    words = word_distribution(logits)
    probabilities = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(words.pad_probability, probabilities[..., PAD_ID], rtol=1e-5)
    masked = probabilities.at[..., jnp.asarray((PAD_ID, BLANK_ID, BOS_ID, EOS_ID, UNK_ID))]
    np.testing.assert_array_equal(words.best_word, jnp.argmax(masked.set(0.0), axis=-1))

    def shared(logits):
        words = word_distribution(logits)
        label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(words.log_normalizer - label_logit) + jnp.sum(words.pad_probability)

    def full(logits):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce) + jnp.sum(jax.nn.softmax(logits, axis=-1)[..., PAD_ID])

    np.testing.assert_allclose(shared(logits), full(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(shared)(logits), jax.grad(full)(logits), atol=1e-6)


def tiny_config(objective="final", **targets):
    config = load_config("shapes", "tiny")
    config.targets.objective = objective
    for key, value in targets.items():
        config.targets[key] = value
    return config


def inputs(config, batch=3, seed=0):
    m = config.model
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, m.image_size, m.image_size, 3)), jnp.float32)
    words = rng.integers(5, VOCAB, (batch, m.canvas_length))
    # Aligned nested targets: step k writes the first k/K of the words, the rest blank, pad
    # after a caption of 8 tokens.
    length, k = 8, m.num_refine_steps
    targets = np.full((batch, k, m.canvas_length), PAD_ID)
    for step in range(k):
        written = (step + 1) * length // k
        targets[:, step, :length] = BLANK_ID
        targets[:, step, :written] = words[:, :written]
    fractions = jnp.asarray(schedule_fractions(k), jnp.float32)
    return images, jnp.asarray(targets), fractions


@pytest.mark.parametrize("objective", ["final", "step"])
def test_scanned_and_unscanned_agree_for_each_objective(objective):
    config = tiny_config(objective)
    scanned = build_model(config, VOCAB, scan=True).clone(keep_logits=True)
    unscanned = build_model(config, VOCAB, scan=False).clone(keep_logits=True)
    params = init_params(scanned, config, VOCAB)
    images, targets, fractions = inputs(config)
    self_condition = jnp.asarray(np.random.default_rng(1).random((3, 4)) < 0.5)

    def loss(model, p):
        out = model.apply({"params": p}, images, targets, fractions, self_condition)
        return jnp.sum(out["cross_entropy"]), out

    (loss_a, out_a), grads_a = jax.value_and_grad(loss, argnums=1, has_aux=True)(scanned, params)
    (loss_b, out_b), grads_b = jax.value_and_grad(loss, argnums=1, has_aux=True)(unscanned, params)
    np.testing.assert_allclose(out_a["logits"], out_b["logits"], atol=1e-5)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_self_conditioning_reads_own_words_on_the_targets_layout():
    """Step 2 of a self-conditioned example reads step 1's best words at the positions step
    1's target writes, and the target elsewhere: the same logits as feeding that canvas."""
    config = tiny_config("final", self_condition_layout="target")
    model = build_model(config, VOCAB, scan=False).clone(keep_logits=True)
    params = init_params(model, config, VOCAB)
    images, targets, fractions = inputs(config)
    on = jnp.ones((3, 4), bool).at[:, 1:].set(False)  # only after step 1
    out = model.apply({"params": params}, images, targets, fractions, on)
    step1_logits = out["logits"][0]
    best = jnp.argmax(step1_logits.at[..., :5].set(-jnp.inf), axis=-1)
    written = targets[:, 0] > 4
    expected_canvas = jnp.where(written, best, targets[:, 0])
    # Feed that canvas as step 1's target with self-conditioning off: step 2 must match.
    fed = targets.at[:, 0].set(expected_canvas)
    off = jnp.zeros((3, 4), bool)
    again = model.apply({"params": params}, images, fed, fractions, off)
    np.testing.assert_allclose(out["logits"][1], again["logits"][1], atol=1e-5)
    # and it differs from reading the target itself (the words were not all right)
    plain = model.apply({"params": params}, images, targets, fractions, off)
    assert not np.allclose(out["logits"][1], plain["logits"][1], atol=1e-4)


def test_polish_passes_apply_the_final_step_again_and_keep_k_canvases():
    config = tiny_config("final")
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
    images, _, fractions = inputs(config)
    plain = model.apply({"params": params}, images, fractions, method=model.describe)
    polished_model = model.clone(polish_steps=2)
    polished = polished_model.apply({"params": params}, images, fractions, method=model.describe)
    assert polished["canvas"].shape == plain["canvas"].shape  # [K, B, L]
    np.testing.assert_array_equal(polished["canvas"][:-1], plain["canvas"][:-1])
    # Two more final steps from step K's canvas, by hand with a K + 2 step schedule.
    longer = jnp.concatenate([fractions, fractions[-1:], fractions[-1:]])
    by_hand = model.apply({"params": params}, images, longer, method=model.describe)
    np.testing.assert_array_equal(polished["canvas"][-1], by_hand["canvas"][-1])


def test_a_given_start_stays_at_every_step_though_the_model_would_rewrite_it():
    config = tiny_config("final")
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
    images, _, fractions = inputs(config)
    start = jnp.full((3, config.model.canvas_length), BLANK_ID).at[:, :3].set(jnp.array([5, 6, 7]))
    out = model.apply({"params": params}, images, fractions, start, method=model.describe)
    np.testing.assert_array_equal(out["canvas"][:, :, :3], np.broadcast_to([5, 6, 7], (4, 3, 3)))

    def unpinned(m, images):  # the same start canvas, without keeping its words
        return m._refine(m.encode(images), {"fraction": fractions}, None, True, start)

    free = model.apply({"params": params}, images, method=unpinned)
    assert not np.array_equal(free["canvas"][:, :, :3], out["canvas"][:, :, :3])


def test_written_self_conditioning_reads_what_the_step_wrote_when_its_length_is_right():
    """With the 'written' layout, step 2 reads step 1's written canvas (write_due) where its
    pads are the target's, else step 1's words on the target's positions."""
    config = tiny_config("final", self_condition_layout="written")
    model = build_model(config, VOCAB, scan=False).clone(keep_logits=True)
    params = init_params(model, config, VOCAB)
    images, targets, fractions = inputs(config)
    on = jnp.ones((3, 4), bool).at[:, 1:].set(False)
    out = model.apply({"params": params}, images, targets, fractions, on)

    def step_one(m, images):  # the canvas decoding writes at step 1, and step 1's due logits
        return m.describe(images, fractions)

    written = model.apply({"params": params}, images, method=step_one)["canvas"][0]  # [B, L]
    best = jnp.argmax(out["logits"][0].at[..., :5].set(-jnp.inf), axis=-1)
    on_target = jnp.where(targets[:, 0] > 4, best, targets[:, 0])
    same_length = jnp.all((written == PAD_ID) == (targets[:, 0] == PAD_ID), axis=-1)
    expected = jnp.where(same_length[:, None], written, on_target)
    fed = targets.at[:, 0].set(expected)
    again = model.apply({"params": params}, images, fed, fractions, jnp.zeros((3, 4), bool))
    np.testing.assert_allclose(out["logits"][1], again["logits"][1], atol=1e-5)
