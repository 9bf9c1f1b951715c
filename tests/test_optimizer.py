"""The optimizer: the warm-up's offset (no update is wasted at rate 0) and the weight-decay mask
that exempts 1-D parameters (biases, norm scales)."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import init_params, load_config

from refine_jax.model_kinds import build_model
from refine_jax.train_state import make_optimizer


def test_the_first_update_has_a_nonzero_rate_and_the_peak_comes_at_update_warmup_steps():
    config = load_config("shapes", "tiny")
    _, schedule = make_optimizer(config)
    peak, warmup = config.learning_rate, config.warmup_steps
    rates = np.asarray([float(schedule(n)) for n in range(config.total_steps)])
    # Update n (from 0) warms up at (n + 1) / warmup_steps of the peak.
    np.testing.assert_allclose(rates[:warmup], peak * np.arange(1, warmup + 1) / warmup, rtol=1e-6)
    assert np.all(np.diff(rates[warmup - 1 :]) < 0)  # then decays


def test_lr_decay_fraction_holds_the_peak_until_the_last_updates_then_decays_to_zero():
    config = load_config("shapes", "tiny")  # 60 steps, 10 of warm-up
    config.lr_decay_fraction = 1 / 3  # the last 20 updates
    _, schedule = make_optimizer(config)
    peak, warmup = config.learning_rate, config.warmup_steps
    rates = np.asarray([float(schedule(n)) for n in range(config.total_steps)])
    np.testing.assert_allclose(rates[:warmup], peak * np.arange(1, warmup + 1) / warmup, rtol=1e-6)
    np.testing.assert_allclose(rates[warmup - 1 : 40], peak, rtol=1e-6)  # updates 9..39
    # Updates 40..59 follow a cosine over the last 20: update n at 0.5 (1 + cos(pi (n-39)/20)).
    expected = peak * 0.5 * (1 + np.cos(np.pi * np.arange(1, 21) / 20))
    np.testing.assert_allclose(rates[40:], expected, rtol=1e-5, atol=1e-9)
    assert rates[-1] == 0.0
    config.lr_decay_fraction = 0.0  # never decays
    _, schedule = make_optimizer(config)
    rates = np.asarray([float(schedule(n)) for n in range(config.total_steps)])
    np.testing.assert_allclose(rates[warmup - 1 :], peak, rtol=1e-6)


def test_weight_decay_shrinks_matrices_and_spares_one_dimensional_parameters():
    config = load_config("shapes", "tiny")
    model = build_model(config, 40)
    params = init_params(model, config, 40)
    optimizer, schedule = make_optimizer(config)
    # With a zero gradient Adam's step is zero, so the update is the decoupled decay alone.
    # (Jitted: op by op, the update compiles a few hundred tiny programs.)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, jax.jit(optimizer.init)(params), params)
    decay = float(schedule(0)) * config.weight_decay
    assert decay > 0
    dims = set()
    for (path, param), update in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updates), strict=True
    ):
        name = jax.tree_util.keystr(path)
        dims.add(min(param.ndim, 2))
        if param.ndim > 1:
            np.testing.assert_allclose(update, -decay * param, rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(update, 0.0, err_msg=name)
    assert dims == {1, 2}  # both kinds were checked
