"""The refinement model: weight sharing across steps, scanned == unscanned, remat, decoding,
image keys/values projected once per image."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config, param_shapes

from refine_jax.model_kinds import build_model
from refine_jax.models.refine import STEP_FEATURES, clean_canvas, write_scheduled
from refine_jax.models.vit import relative_offsets
from refine_jax.special_tokens import BLANK_ID, EOS_ID, PAD_ID, UNK_ID
from refine_jax.targets import schedule_fractions

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
    counts = {k: count(param_shapes(tiny_config(k), VOCAB)) for k in (1, 2, 4, 8)}
    assert len(set(counts.values())) == 1, counts


def test_detailer_parameters_are_shared_not_stacked_per_step():
    params = param_shapes(tiny_config(5), VOCAB)
    leaves = jax.tree.leaves(
        jax.tree.map(jnp.shape, params["detailer"]), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert all(5 not in shape[:1] for shape in leaves if len(shape) > 1)


def test_scanned_unscanned_and_unrolled_give_same_logits_and_gradients():
    config = tiny_config(3, encoder_depth=2, unroll_scans=False)
    unrolled_config = tiny_config(3, encoder_depth=2, unroll_scans=True)
    scanned = build_model(config, VOCAB, scan=True).clone(keep_logits=True)
    models = {
        "unscanned": build_model(config, VOCAB, scan=False).clone(keep_logits=True),
        # The encoder's layer scan and the detailer's step scan, both laid out as straight code.
        "unrolled": build_model(unrolled_config, VOCAB, scan=True).clone(keep_logits=True),
    }
    params = init_params(scanned, config, VOCAB)
    for name, model in models.items():
        other = init_params(model, unrolled_config, VOCAB)
        assert jax.tree.structure(params) == jax.tree.structure(other), name
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, other), name
    args = inputs(config)

    def run(model):
        def loss(p):
            out = model.apply({"params": p}, *args)
            return jnp.sum(out["cross_entropy"] * jnp.arange(1, 4)[:, None]), out

        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads

    def has_loop(model) -> bool:
        forward = jax.jit(lambda p: model.apply({"params": p}, *args)["cross_entropy"])
        return "stablehlo.while" in forward.lower(params).as_text()

    assert has_loop(scanned) and not has_loop(models["unrolled"])
    out_s, grads_s = run(scanned)
    assert out_s["logits"].shape == (3, 3, config.model.canvas_length, VOCAB)
    for name, model in models.items():
        out, grads = run(model)
        np.testing.assert_allclose(out_s["logits"], out["logits"], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out_s["cross_entropy"], out["cross_entropy"], atol=1e-5)
        for g_s, g in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(g_s, g, atol=1e-5, rtol=1e-4, err_msg=name)


def test_detailer_parameters_keep_the_layout_of_existing_checkpoints():
    # The image keys/values are projected outside the scan with the cross-attention's own
    # parameters: every parameter keeps the path and shape checkpoints written before have.
    config = tiny_config(3)
    m = config.model
    params = param_shapes(config, VOCAB)
    d = m.width
    attention = {
        f"{projection}/{w}": (d, d) if w == "kernel" else (d,)
        for projection in ("query", "key", "value", "out")
        for w in ("kernel", "bias")
    }
    norms = ("pre_self_attention_norm", "pre_cross_attention_norm", "pre_mlp_norm")
    layer = {
        **{
            f"{a}/{k}": v
            for a in ("self_attention", "cross_attention")
            for k, v in attention.items()
        },
        **{f"{n}/{w}": (d,) for n in norms for w in ("scale", "bias")},
        "mlp/wi/kernel": (d, m.mlp_dim),
        "mlp/wi/bias": (m.mlp_dim,),
        "mlp/wo/kernel": (m.mlp_dim, d),
        "mlp/wo/bias": (d,),
    }
    expected = {
        **{f"layer_{i}/{k}": v for i in range(m.detailer_depth) for k, v in layer.items()},
        "token_embedding/embedding": (VOCAB, d),
        "pos_embedding": (m.canvas_length, d),
        "step_embedding/kernel": (STEP_FEATURES, d),
        "step_embedding/bias": (d,),
        "final_norm/scale": (d,),
        "final_norm/bias": (d,),
        "logits/kernel": (d, VOCAB),
        "logits/bias": (VOCAB,),
        "due/kernel": (d, 1),
        "due/bias": (1,),
    }
    shapes = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(params["detailer"])
    }
    assert shapes == expected


def per_step_projection(model, params, images, steps, final):
    """The reference: the K steps of the unscanned `model`, every step projecting the image
    tokens to its layers' cross-attention keys and values itself (as before they were
    projected once per image). Returns (per-step outputs stacked, the 'intermediates')."""

    def run(m, images):
        image_tokens = m.encode(images)
        canvas = jnp.full((images.shape[0], m.canvas_length), BLANK_ID, jnp.int32)
        per_step = []
        for k in range(steps["fraction"].shape[0]):
            step_k = jax.tree.map(lambda a, k=k: a[k], steps)
            memory = (image_tokens,) * m.detailer_depth  # the tokens: the step projects them
            canvas, out = m.detailer(canvas, step_k, memory, final, True)
            per_step.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)

    return model.apply({"params": params}, images, method=run, mutable=["intermediates"])


def sown_cross_attention(state):
    """Each detailer layer's sown cross-attention weights as one [K, B, H, L, N] array: the
    scan sows one stacked array, a Python loop one array per step."""
    weights = {
        name: layer["cross_attention"]["attention_weights"]
        for name, layer in state["intermediates"]["detailer"].items()
        if name.startswith("layer_")
    }
    return {name: w[0] if len(w) == 1 else jnp.stack(w) for name, w in weights.items()}


@pytest.mark.parametrize("scan", [True, False])
def test_keys_values_projected_once_give_the_outputs_of_projecting_them_every_step(scan):
    config = tiny_config(3)
    model = build_model(config, VOCAB, scan=scan).clone(keep_logits=True)
    reference = build_model(config, VOCAB, scan=False).clone(keep_logits=True)
    params = init_params(model, config, VOCAB)
    images, targets, fractions, self_condition = inputs(config)

    # Training: the per-step loss terms and logits (own predictions read after some steps).
    out, state = model.apply(
        {"params": params}, images, targets, fractions, self_condition, mutable=["intermediates"]
    )
    steps = {
        "fraction": fractions,
        "target": jnp.swapaxes(targets, 0, 1),
        "self_condition": jnp.repeat(self_condition[None], 3, axis=0),
    }
    expected, expected_state = per_step_projection(reference, params, images, steps, targets[:, -1])
    for key in ("cross_entropy", "expected_length", "token_accuracy", "logits"):
        np.testing.assert_allclose(out[key], expected[key], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(out["exact_match"], expected["exact_match"])
    # The cross-attention weights are still sown, one map per step and layer.
    attention = sown_cross_attention(state)
    expected_attention = sown_cross_attention(expected_state)
    patches = (config.model.image_size // config.model.patch_size) ** 2
    assert attention.keys() == expected_attention.keys() == {"layer_0"}
    assert attention["layer_0"].shape == (3, 3, 2, config.model.canvas_length, patches)
    np.testing.assert_allclose(attention["layer_0"], expected_attention["layer_0"], atol=1e-6)

    # Decoding: the same canvas at every step.
    described = model.apply({"params": params}, images, fractions, method=model.describe)
    expected, _ = per_step_projection(reference, params, images, {"fraction": fractions}, None)
    np.testing.assert_array_equal(described["canvas"], expected["canvas"])
    np.testing.assert_allclose(described["pooled"], expected["pooled"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_results(remat):
    config = tiny_config(3)
    plain = build_model(config, VOCAB)
    config.model.remat = remat
    rematted = build_model(config, VOCAB)
    params = init_params(plain, config, VOCAB)
    args = inputs(config)
    grad = lambda model: jax.grad(
        lambda p: jnp.sum(model.apply({"params": p}, *args)["cross_entropy"])
    )(params)
    for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(rematted)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)  # recomputation reorders sums


def test_training_outputs_are_per_step_scalars_without_logits():
    config = tiny_config(4)
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
    out = model.apply({"params": params}, *inputs(config))
    assert "logits" not in out
    assert out["cross_entropy"].shape == (4, 3)
    assert out["expected_length"].shape == (4, 3)


@pytest.mark.parametrize("layout", ["own", "written"])
def test_self_conditioning_feeds_the_step_1_written_canvas_to_step_2(layout):
    config = tiny_config(2)
    config.targets.self_condition_layout = layout
    config.targets.objective = "step"  # step 1 writes half the description, leaving blanks
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
    images, targets, fractions, _ = inputs(config, batch=2)
    # Step 1 starts from the blank canvas in training as in decoding: describe's step-1
    # canvas is what step 1 writes.
    written = model.apply({"params": params}, images, fractions, method=model.describe)["canvas"][0]
    assert np.any(written == BLANK_ID)
    # "written" feeds it where its length is the target's: give the targets that length.
    targets = targets.at[:, 0].set(jnp.where(written == PAD_ID, PAD_ID, targets[:, 0] % 30 + 5))
    with_own = model.apply(
        {"params": params}, images, targets, fractions, jnp.asarray([True, False])
    )
    with_target = model.apply(
        {"params": params}, images, targets, fractions, jnp.asarray([False, False])
    )

    def step_2_from(canvas):
        """Step 2 alone, applied to `canvas` (the detailer of the same parameters)."""
        steps = {
            "fraction": fractions[1:],
            "target": targets[:, 1][None],
            "self_condition": jnp.zeros((1, 2), bool),
        }
        return model.apply(
            {"params": params},
            images,
            method=lambda m, x: m._refine(m.encode(x), steps, targets[:, -1], True, canvas),
        )["cross_entropy"][0]

    from_written = step_2_from(written)
    from_target = step_2_from(targets[:, 0])
    assert not np.allclose(from_written[0], from_target[0])  # the two inputs are told apart
    np.testing.assert_allclose(with_own["cross_entropy"][1, 0], from_written[0], rtol=1e-5)
    np.testing.assert_allclose(with_own["cross_entropy"][1, 1], from_target[1], rtol=1e-5)
    np.testing.assert_allclose(with_target["cross_entropy"][1], from_target, rtol=1e-5)
    np.testing.assert_allclose(with_target["cross_entropy"][0], with_own["cross_entropy"][0])


def test_describe_writes_each_steps_scheduled_share_and_no_blank_at_the_last_step():
    config = tiny_config(3)
    config.targets.objective = "step"  # aligned steps write their scheduled share
    model = build_model(config, VOCAB)
    params = init_params(model, config, VOCAB)
    images, _, fractions, _ = inputs(config)
    canvas = np.asarray(
        model.apply({"params": params}, images, fractions, method=model.describe)["canvas"]
    )
    assert canvas.shape == (3, 3, config.model.canvas_length)
    for k, fraction in enumerate(np.asarray(fractions)):
        step = canvas[k]
        length = np.argmax(np.append(step == PAD_ID, np.ones((3, 1), bool), axis=1), axis=1)
        assert length.min() > 0  # the test needs descriptions to count words of
        after_end = np.arange(step.shape[1]) >= length[:, None]
        np.testing.assert_array_equal(step[after_end], PAD_ID)  # ends at its first pad
        words = np.sum(~after_end & (step != BLANK_ID), axis=1)
        np.testing.assert_array_equal(words, np.maximum(np.floor(length * fraction + 0.5), 1))
        inside = step[~after_end]
        assert np.all((inside == BLANK_ID) | (inside > BLANK_ID))  # a blank or a word, no special
    last = canvas[-1]
    assert not np.any(last == BLANK_ID)  # the last step leaves no blank


def test_clean_canvas_blanks_everything_after_the_first_pad():
    tokens = jnp.asarray([[5, 6, 0, 7, 8], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(clean_canvas(tokens), [[5, 6, 0, 0, 0], [5, 6, 7, 8, 9]])


def test_an_aligned_step_writes_its_share_of_the_description_most_confident_words_first():
    # Two rows of 8 positions, ids 0..4 special, 5..8 words; unlisted ids get 0.01.
    # Row 0: a description of 3 positions: position 3 is more likely pad than not, so the
    # description ends there although positions 4-5 look like words again. At position 1 unk,
    # at position 2 eos, is more likely than any word. Row 1: a description of 5 positions.
    rows = [
        [
            {5: 0.30, BLANK_ID: 0.5},
            {8: 0.20, UNK_ID: 0.5},
            {6: 0.15, EOS_ID: 0.6},
            {PAD_ID: 0.9},
            {7: 0.9},
            {7: 0.9},
            {PAD_ID: 0.9},
            {PAD_ID: 0.9},
        ],
        [
            {5: 0.12, BLANK_ID: 0.6},
            {6: 0.35, BLANK_ID: 0.6},
            {7: 0.20, BLANK_ID: 0.6},
            {8: 0.30, BLANK_ID: 0.6},
            {5: 0.10, BLANK_ID: 0.6},
            {PAD_ID: 0.9},
            {PAD_ID: 0.9},
            {PAD_ID: 0.9},
        ],
    ]
    probabilities = np.full((2, 8, 9), 0.01)
    for row, positions in enumerate(rows):
        for position, chances in enumerate(positions):
            for token, p in chances.items():
                probabilities[row, position, token] = p
    logits = jnp.log(jnp.asarray(probabilities / probabilities.sum(-1, keepdims=True)))
    B, P = BLANK_ID, PAD_ID
    # Each row's count is its own: round(3 * 0.5) = 2 and round(5 * 0.5) = 3 words.
    np.testing.assert_array_equal(
        write_scheduled(logits, jnp.asarray(0.5)),
        [[5, 8, B, P, P, P, P, P], [B, 6, 7, 8, B, P, P, P]],
    )
    np.testing.assert_array_equal(  # at least one word each
        write_scheduled(logits, jnp.asarray(0.1)),
        [[5, B, B, P, P, P, P, P], [B, 6, B, B, B, P, P, P]],
    )
    np.testing.assert_array_equal(  # the last step leaves no blank
        write_scheduled(logits, jnp.asarray(1.0)),
        [[5, 8, 6, P, P, P, P, P], [5, 6, 7, 8, 5, P, P, P]],
    )


def test_relative_offsets_number_each_2d_offset_once_and_share_equal_offsets():
    offsets = relative_offsets(2, 3)  # patches (row, col) in row-major order
    assert offsets.shape == (6, 6)
    # 3 rows x 5 columns of offsets, numbered row-major from (-1, -2): (0, 0) is 1*5 + 2 = 7.
    assert set(np.diag(offsets)) == {7}
    assert offsets[0, 5] == (1 + 1) * 5 + (2 + 2)  # (0,0) -> (1,2): one row down, two right
    assert offsets[5, 0] == 0  # (1,2) -> (0,0): one row up, two left
    assert offsets[0, 3] == offsets[1, 4] == offsets[2, 5]  # "one row down" from each column
    assert len(np.unique(offsets)) == 15


def test_relative_position_bias_starts_at_zero_and_then_changes_what_the_encoder_sees():
    config = tiny_config(2, position_bias="none")
    plain = build_model(config, VOCAB)
    config.model.position_bias = "relative"
    biased = build_model(config, VOCAB)
    params = nn.unbox(init_params(biased, config, VOCAB))
    table = params["encoder"]["encoderblock"]["relative_position_bias"]
    grid = config.model.image_size // config.model.patch_size
    # One table per encoder layer (stacked by the scan), one column per head.
    assert table.shape == (
        config.model.encoder_depth,
        (2 * grid - 1) ** 2,
        config.model.num_heads,
    )
    images = inputs(config)[0]
    without_bias = jax.tree.map(lambda x: x, params)
    del without_bias["encoder"]["encoderblock"]["relative_position_bias"]
    encoded = lambda model, p: model.apply({"params": p}, images, method="encode")
    np.testing.assert_allclose(
        encoded(biased, params), encoded(plain, without_bias), rtol=1e-6, atol=1e-6
    )
    params["encoder"]["encoderblock"]["relative_position_bias"] = jnp.linspace(
        -2.0, 2.0, table.size
    ).reshape(table.shape)
    assert not np.allclose(encoded(biased, params), encoded(plain, without_bias), atol=1e-3)
