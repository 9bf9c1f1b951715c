"""Loss weights and the weighted per-step objective."""

import jax.numpy as jnp
import numpy as np
import pytest

from refine_jax.losses import refine_loss, step_weights


@pytest.mark.parametrize("weighting", ["linear", "geometric"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_weights_increase_and_sum_to_one(weighting, num_steps):
    w = step_weights(num_steps, weighting, ratio=1.5)
    assert w.sum() == pytest.approx(1.0)
    assert np.all(np.diff(w) > 0)


def test_linear_and_geometric_weights_have_known_values():
    assert np.allclose(step_weights(4, "linear"), [0.1, 0.2, 0.3, 0.4])
    assert np.allclose(step_weights(3, "geometric", 2.0), [1 / 7, 2 / 7, 4 / 7])


def test_final_only_weighting_reduces_to_final_step_cross_entropy():
    rng = np.random.default_rng(0)
    ce = jnp.asarray(rng.uniform(0.5, 3.0, size=(4, 6)), jnp.float32)  # [K, B]
    outputs = {
        "cross_entropy": ce,
        "expected_length": jnp.zeros((4, 6)),
        "exact_match": jnp.zeros((4, 6), bool),
    }
    weights = jnp.asarray(step_weights(4, "final_only"))
    loss, metrics = refine_loss(
        outputs, weights, jnp.zeros((6, 4)), jnp.ones((6,)), 16, length_weight=0.0
    )
    assert float(loss) == pytest.approx(float(jnp.mean(ce[-1])), rel=1e-6)
    assert float(metrics["loss_step_2"]) == pytest.approx(float(jnp.mean(ce[1])), rel=1e-6)


def test_padding_examples_do_not_count():
    ce = jnp.asarray([[1.0, 5.0]])
    outputs = {
        "cross_entropy": ce,
        "expected_length": jnp.zeros((1, 2)),
        "exact_match": jnp.zeros((1, 2), bool),
    }
    loss, _ = refine_loss(outputs, jnp.ones((1,)), jnp.zeros((2, 1)), jnp.asarray([1, 0]), 8, 0.0)
    assert float(loss) == pytest.approx(1.0)


def test_length_term_penalises_distance_from_schedule():
    outputs = {
        "cross_entropy": jnp.zeros((2, 1)),
        "expected_length": jnp.asarray([[2.0], [8.0]]),
        "exact_match": jnp.zeros((2, 1), bool),
    }
    scheduled = jnp.asarray([[4.0, 8.0]])  # [B, K]
    loss, _ = refine_loss(outputs, jnp.asarray([0.5, 0.5]), scheduled, jnp.ones((1,)), 10, 1.0)
    assert float(loss) == pytest.approx(0.5 * (0.2**2) + 0.5 * 0.0)


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="unknown loss weighting"):
        step_weights(4, "cubic")
