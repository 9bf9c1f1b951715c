"""Analytic FLOP counts: the detailer is counted K times, its image key/value projections once;
the count equals the matmul FLOPs of the program JAX traces, and is close to XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, init_params, load_config
from jax.extend import core as jax_core

from refine_jax.flops import (
    encoder_flops,
    forward_flops_per_example,
    image_keys_values_flops,
    text_pass_flops,
    training_flops_per_example,
)
from refine_jax.model_kinds import build_model, model_kind
from refine_jax.models.refine import STEP_FEATURES
from refine_jax.targets import schedule_fractions

VOCAB = 400


def traced_matmul_flops(jaxpr: jax_core.Jaxpr) -> float:
    """2 x (output elements) x (contracted size) summed over every dot_general in `jaxpr` and
    the sub-programs it calls; a scan body counts once per iteration, a cond once (its
    branches must agree). An independent route to the analytic count: it reads the traced
    program, not the config."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = np.prod([lhs_shape[i] for i in contract_lhs])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * contracted
            continue
        if eqn.primitive.name == "while":
            raise ValueError("while: trip count unknown to a static count")
        if eqn.primitive.name == "cond":  # one branch runs: its count, when all agree
            counts = {traced_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"]}
            if len(counts) != 1:
                raise ValueError(f"cond: branches of different counts {sorted(counts)}")
            total += counts.pop()
            continue
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            if isinstance(value, jax_core.ClosedJaxpr):
                total += repeat * traced_matmul_flops(value.jaxpr)
            elif isinstance(value, jax_core.Jaxpr):
                total += repeat * traced_matmul_flops(value)
    return total


def test_detailer_is_counted_once_per_step_and_its_image_keys_values_once_per_image():
    config = load_config("shapes", "tiny")
    (step,) = model_kind("refine").text_passes(config)
    one = text_pass_flops(config, VOCAB, step)
    keys_values = image_keys_values_flops(config, step)
    m = config.model
    patches = (m.image_size // m.patch_size) ** 2
    assert keys_values == m.detailer_depth * 2 * patches * 2 * m.width**2
    for k in (1, 4, 8):
        config.model.num_refine_steps = k
        assert forward_flops_per_example(config, VOCAB) == pytest.approx(
            encoder_flops(config) + keys_values + k * one
        )


@pytest.mark.parametrize(
    "variant, num_steps, objective",
    [
        ("", 1, "final"),
        ("", 3, "final"),
        ("", 3, "step"),
        ("autoregressive", 1, None),
        ("match", 1, None),
    ],
)
def test_analytic_count_equals_the_traced_programs_matmuls(variant, num_steps, objective):
    # The training forward pass of the unscanned model (a Python loop over the K steps), so
    # every step, layer, projection and head appears in the traced program. Dropping a
    # cross-attention projection, the logits or a step from the formula breaks the equality.
    config = load_config("shapes", variant)
    config.model.num_refine_steps = num_steps
    if objective:
        config.targets.objective = objective
    model = build_model(config, VOCAB, scan=False)
    params = init_params(model, config, VOCAB)
    inputs = model_kind(config.model.kind).init_inputs(config)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params)
    traced = traced_matmul_flops(jaxpr.jaxpr)
    if config.model.kind == "match":  # its similarity matrix grows with the batch: 1 x 1 here
        traced -= 2 * config.match.embed_dim
    assert forward_flops_per_example(config, VOCAB) == pytest.approx(traced, rel=1e-12)


@pytest.mark.parametrize("variant", ["", "autoregressive"])
@pytest.mark.parametrize("frozen", [False, True])
def test_training_count_equals_the_traced_train_steps_matmuls(monkeypatch, variant, frozen):
    # The whole jitted train step, backward pass included. A frozen encoder runs forward only,
    # and no gradient flows from the image keys/values on into it.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    config = load_config("shapes", variant)
    config.model.freeze_encoder = frozen
    config.batch_size = 1
    _, step, state = common.abstract_train_state(config)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in common.synthetic_batch(config).items()
    }
    traced = traced_matmul_flops(jax.make_jaxpr(step)(state, batch).jaxpr)
    analytic = training_flops_per_example(config, config.tokenizer.vocab_size)
    m = config.model
    # Two inputs get no gradient, which the count's "backward = 2 x forward" includes: the
    # pixels (the patch embedding's input) and the step features of s(k) (the step
    # embedding's, a constant of the schedule).
    patches = (m.image_size // m.patch_size) ** 2
    no_gradient = 0 if frozen else 2 * patches * m.patch_size**2 * 3 * m.width
    if not variant:
        no_gradient += m.num_refine_steps * 2 * STEP_FEATURES * m.width
    assert analytic - no_gradient == pytest.approx(traced, rel=1e-9)


def test_scanned_detailer_projects_the_image_keys_values_once_outside_the_scan():
    # The scanned program's matmuls (a scan body counted once per step) equal the count with
    # the image key/value projections once; were they in the scan body, the program would have
    # (K - 1) x image_keys_values_flops more.
    config = load_config("shapes", "")
    config.model.num_refine_steps = 4
    model = build_model(config, VOCAB, scan=True)
    params = init_params(model, config, VOCAB)
    inputs = model_kind("refine").init_inputs(config)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params)
    traced = traced_matmul_flops(jaxpr.jaxpr)
    assert forward_flops_per_example(config, VOCAB) == pytest.approx(traced, rel=1e-12)


def test_analytic_count_is_close_to_the_compilers_count():
    config = load_config("shapes", "")
    # XLA's cost analysis counts a loop body once, so compare with no loops: one encoder
    # layer and one detailer step.
    config.model.encoder_depth = 1
    config.model.num_refine_steps = 1
    model = build_model(config, VOCAB, scan=False)
    params = init_params(model, config, VOCAB)
    m = config.model
    images = jnp.zeros((1, m.image_size, m.image_size, 3))
    fractions = jnp.asarray(schedule_fractions(m.num_refine_steps), jnp.float32)
    compiled = (
        jax.jit(lambda p, x: model.apply({"params": p}, x, fractions, method=model.describe))
        .lower(params, images)
        .compile()
    )
    xla = compiled.cost_analysis()["flops"]
    # XLA also counts softmax, norms and elementwise work, which the analytic count leaves out.
    assert 0.8 < forward_flops_per_example(config, VOCAB) / xla < 1.05
