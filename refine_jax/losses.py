"""The training objective (DESIGN §3): Σ_k w_k·CE_k plus a length term, in one jitted function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def contrastive_loss(
    logits: jax.Array,  # [B, B]: scaled similarity of image i and text j
    positives: jax.Array,  # [B, B] bool: text j describes image i
    valid: jax.Array,  # [B] bool: real examples
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric contrastive loss over the whole batch: each image against every valid text, and
    each text against every valid image, with all of an example's positives counted as right
    (-log of the softmax mass on them). Returns (loss, metrics)."""
    mask = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    pair_valid = valid[:, None] & valid[None, :]
    right = positives & pair_valid

    def one_way(scores: jax.Array, right: jax.Array, candidates: jax.Array) -> jax.Array:
        everything = jax.nn.logsumexp(jnp.where(candidates, scores, -jnp.inf), axis=-1)
        on_right = jax.nn.logsumexp(jnp.where(right, scores, -jnp.inf), axis=-1)
        return jnp.sum(jnp.where(valid, everything - on_right, 0.0)) / count

    image_to_text = one_way(logits, right, pair_valid)
    text_to_image = one_way(logits.T, right.T, pair_valid)
    loss = 0.5 * (image_to_text + text_to_image)
    best_text = jnp.argmax(jnp.where(pair_valid, logits, -jnp.inf), axis=1)
    best_image = jnp.argmax(jnp.where(pair_valid, logits, -jnp.inf), axis=0)
    rows = jnp.arange(logits.shape[0])
    return loss, {
        "contrastive_loss": loss,
        "image_to_text_top1": jnp.sum(right[rows, best_text] * mask) / count,
        "text_to_image_top1": jnp.sum(right[best_image, rows] * mask) / count,
    }


def match_head_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted binary cross-entropy of the matching head's logits [P] against labels [P] in
    {0, 1}; returns (loss, metrics)."""
    count = jnp.maximum(jnp.sum(weights), 1.0)
    per_pair = optax.sigmoid_binary_cross_entropy(logits, labels)
    loss = jnp.sum(per_pair * weights) / count
    correct = (logits > 0) == (labels > 0.5)
    return loss, {"match_loss": loss, "match_accuracy": jnp.sum(correct * weights) / count}
