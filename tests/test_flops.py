"""Analytic FLOP counts: the detailer is counted K times, and matches XLA's own count."""

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config

from refine_jax.flops import encoder_flops, forward_flops_per_example, text_pass_flops
from refine_jax.models import build_model
from refine_jax.targets import schedule_fractions
from refine_jax.train import init_variables


def test_detailer_is_counted_once_per_step():
    config = load_config("shapes", "tiny")
    one = text_pass_flops(config, 400, config.model.canvas_length)
    for k in (1, 4, 8):
        config.model.num_refine_steps = k
        assert forward_flops_per_example(config, 400) == pytest.approx(
            encoder_flops(config) + k * one
        )


def test_analytic_count_is_close_to_the_compilers_count():
    config = load_config("shapes", "")
    # XLA's cost analysis counts a loop body once, so compare with no loops: one encoder
    # layer and one detailer step (several unrolled steps would let XLA share their identical
    # image key/value projections).
    config.model.encoder_depth = 1
    config.model.num_refine_steps = 1
    model = build_model(config, 400, scan=False)
    params = init_variables(model, config, 400)
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
    assert 0.8 < forward_flops_per_example(config, 400) / xla < 1.05
