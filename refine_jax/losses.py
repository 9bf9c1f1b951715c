"""The training objective (DESIGN §3): Σ_k w_k·CE_k plus a length term, in one jitted function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from refine_jax.config import WEIGHTINGS


def step_weights(num_steps: int, weighting: str = "linear", ratio: float = 2.0) -> np.ndarray:
    """w_k for k = 1..K, normalised to sum 1; increasing in k except for the 'uniform' ablation."""
    k = np.arange(1, num_steps + 1, dtype=np.float64)
    if weighting == "linear":
        w = k
    elif weighting == "geometric":
        if ratio <= 1.0:
            raise ValueError(f"geometric loss weights need ratio > 1, got {ratio}")
        w = ratio ** (k - 1)
    elif weighting == "final_only":
        w = (k == num_steps).astype(np.float64)
    elif weighting == "uniform":
        w = np.ones_like(k)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return w / w.sum()


def refine_loss(
    outputs: dict[str, jax.Array],
    weights: jax.Array,  # [K]
    scheduled_lengths: jax.Array,  # [B, K]: s(k) times the full caption's token count
    example_mask: jax.Array,  # [B]: 1 for real examples, 0 for padding
    canvas_length: int,
    length_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted per-step cross-entropy plus the length term; returns (loss, metrics)."""
    mask = example_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean_over_batch = lambda per_example: jnp.sum(per_example * mask, axis=-1) / count  # [K]
    ce_per_step = mean_over_batch(outputs["cross_entropy"])
    relative_error = (outputs["expected_length"] - scheduled_lengths.T) / canvas_length
    length_per_step = mean_over_batch(jnp.square(relative_error))
    loss = jnp.sum(weights * ce_per_step) + length_weight * jnp.sum(weights * length_per_step)
    metrics = {"loss": loss, "cross_entropy": jnp.sum(weights * ce_per_step)}
    for k in range(ce_per_step.shape[0]):
        metrics[f"loss_step_{k + 1}"] = ce_per_step[k]
        metrics[f"length_error_step_{k + 1}"] = length_per_step[k]
        metrics[f"exact_match_step_{k + 1}"] = mean_over_batch(outputs["exact_match"][k])
    return loss, metrics


def autoregressive_loss(
    outputs: dict[str, jax.Array], example_mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean teacher-forced cross-entropy over the real examples."""
    mask = example_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(outputs["cross_entropy"] * mask) / count
    exact = jnp.sum(outputs["exact_match"] * mask) / count
    return loss, {"loss": loss, "loss_step_1": loss, "exact_match_step_1": exact}
