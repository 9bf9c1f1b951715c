"""The refinement captioner (DESIGN §2): one weight-shared detailer applied K times.

Each step reads the image tokens and the current description (a canvas of L token ids;
the blank description is all <blank>) and writes the whole next description in parallel.
Positions after the description's end hold pad; with the `aligned` target layout a position
whose word is still to come holds <blank> (see refine_jax.targets.canvas_targets).
The description carried from step k to step k+1 is tokens, so what a person reads at step
k is exactly what the model carries. In training, step k+1 reads the ground-truth target of
step k or, per example with the self-conditioning probability, the model's own step-k
prediction (no gradient flows through it). Each step's loss terms are computed inside the
scan body, so no [K, B, L, V] tensor is ever built.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from refine_jax.models.layers import (
    Dtype,
    TextLayer,
    constrain,
    dense,
    layer_norm,
    learned_positions,
    sinusoid,
    token_embedding,
)
from refine_jax.models.vit import ViTEncoder
from refine_jax.special_tokens import BLANK_ID, NOT_TEXT_IDS, PAD_ID, UNK_ID

REMAT_POLICIES = ("none", "full", "dots")


def clean_canvas(tokens: jax.Array) -> jax.Array:
    """Blanks every position after the first pad: a description ends at its first pad."""
    ended = jnp.cumsum(tokens == PAD_ID, axis=-1) > 0
    return jnp.where(ended, PAD_ID, tokens)


def write_scheduled(logits: jax.Array, fraction: jax.Array) -> jax.Array:
    """The canvas an `aligned` step writes: its s(k) share of the description, most confident
    words first. logits [B, L, V], fraction s(k) (scalar) -> token ids [B, L].

    The description ends at the first position more likely pad than not; its length n is the
    count of positions before that. Each position's candidate is its most likely word (never
    pad, blank or another special id); the ⌊n·s(k) + ½⌋ positions (at least one) whose
    candidate is most probable are written and the rest of the description stays blank. Taking
    the argmax per position instead would leave an early step all blank, since there every
    position is more likely blank than any single word.
    """
    probabilities = jax.nn.softmax(logits, axis=-1)
    ended = jnp.cumsum(probabilities[..., PAD_ID] >= 0.5, axis=-1) > 0  # [B, L]
    length = jnp.sum(~ended, axis=-1)  # [B]
    not_words = jnp.asarray((*NOT_TEXT_IDS, UNK_ID))
    word_probabilities = probabilities.at[..., not_words].set(0.0)
    words = jnp.argmax(word_probabilities, axis=-1)  # [B, L]
    confidence = jnp.where(ended, -1.0, jnp.max(word_probabilities, axis=-1))
    rank = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)  # 0 = most confident
    due = jnp.maximum(jnp.floor(length * fraction + 0.5), 1)  # [B], rounded as the targets are
    written = (rank < due[:, None]) & ~ended
    return jnp.where(ended, PAD_ID, jnp.where(written, words, BLANK_ID))


class DetailerStep(nn.Module):
    """One refinement step; the scan body. carry: canvas [B, L] -> next canvas [B, L].

    `step` carries, per step: `fraction` (s(k), the scheduled share of the final description,
    which tells the detailer how much detail is due), and in training `target` [B, L].
    With the `aligned` layout a step writes its scheduled share of the description
    (`write_scheduled`); with `left` it writes each position's most likely token.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    canvas_length: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    layout: str = "aligned"
    keep_logits: bool = False

    @nn.compact
    def __call__(
        self,
        canvas: jax.Array,  # [B, L] int
        step: dict[str, jax.Array],
        image_tokens: jax.Array,  # [B, N, D]
        self_condition: jax.Array | None,  # [B] bool: read own prediction at the next step
        deterministic: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = token_embedding(self.vocab_size, self.width, self.dtype, "token_embedding")(canvas)
        x = x + learned_positions(self, "pos_embedding", self.canvas_length, self.width, "length")
        step_features = sinusoid(step["fraction"], 64).astype(self.dtype)
        x = x + dense(self.width, ("step", "embed"), self.dtype, "step_embedding")(step_features)
        x = constrain(x, ("batch", "length", "embed"))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        for i in range(self.depth):
            x = TextLayer(
                self.num_heads, self.mlp_dim, self.dtype, self.dropout_rate, name=f"layer_{i}"
            )(x, image_tokens, deterministic)
        x = layer_norm(self.dtype, "final_norm")(x)
        logits = dense(self.vocab_size, ("embed", "vocab"), jnp.float32, "logits")(x)
        logits = constrain(logits, ("batch", "length", "vocab"))  # [B, L, V]
        if self.layout == "aligned":
            prediction = write_scheduled(jax.lax.stop_gradient(logits), step["fraction"])
        else:
            prediction = clean_canvas(jnp.argmax(jax.lax.stop_gradient(logits), axis=-1))
        if "target" not in step:  # decoding: carry the prediction
            return prediction, {"canvas": prediction, "pooled": jnp.mean(x, axis=1)}

        target = step["target"]  # [B, L]
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        # Expected number of written (neither pad nor blank) positions: what the length term
        # ties to the schedule.
        probabilities = jax.nn.softmax(logits, axis=-1)
        p_unwritten = probabilities[..., PAD_ID] + probabilities[..., BLANK_ID]
        outputs = {
            "cross_entropy": jnp.mean(cross_entropy, axis=-1),  # [B]
            "expected_length": jnp.sum(1.0 - p_unwritten, axis=-1),  # [B]
            "exact_match": jnp.all(prediction == target, axis=-1),  # [B]
            "token_accuracy": jnp.mean(prediction == target, axis=-1),  # [B]
        }
        if self.keep_logits:  # inspection and tests only: this is the [K, B, L, V] tensor
            outputs["logits"] = logits
        next_canvas = jnp.where(self_condition[:, None], prediction, target)
        return next_canvas, outputs


class RefineCaptioner(nn.Module):
    """ViT encoder + K applications of one DetailerStep (scanned, or a Python loop as oracle)."""

    vocab_size: int
    num_refine_steps: int
    canvas_length: int
    image_size: int
    patch_size: int
    width: int
    encoder_depth: int
    detailer_depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    remat: str = "none"
    scan: bool = True
    layout: str = "aligned"  # of the targets: how a step writes its canvas (see DetailerStep)
    keep_logits: bool = False  # also return every step's logits (tests and inspection only)

    def setup(self):
        self.encoder = ViTEncoder(
            self.patch_size,
            self.width,
            self.encoder_depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.dropout_rate,
            remat=self.remat != "none",
        )
        step_cls = DetailerStep
        if self.remat != "none":
            policy = (
                jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if self.remat == "dots"
                else None
            )
            step_cls = nn.remat(DetailerStep, policy=policy, static_argnums=(5,))
        kwargs = dict(
            vocab_size=self.vocab_size,
            width=self.width,
            depth=self.detailer_depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            canvas_length=self.canvas_length,
            dtype=self.dtype,
            dropout_rate=self.dropout_rate,
            layout=self.layout,
            keep_logits=self.keep_logits,
        )
        if self.scan:
            step_cls = nn.scan(
                step_cls,
                variable_broadcast="params",
                variable_axes={"intermediates": 0},
                split_rngs={"params": False, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.num_refine_steps,
            )
        self.detailer = step_cls(**kwargs)

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(images, deterministic)

    def _refine(self, image_tokens, steps, self_condition, deterministic):
        batch = image_tokens.shape[0]
        blank = jnp.full((batch, self.canvas_length), BLANK_ID, jnp.int32)
        if self.scan:
            _, outputs = self.detailer(blank, steps, image_tokens, self_condition, deterministic)
            return outputs
        canvas, per_step = blank, []
        for k in range(self.num_refine_steps):
            step_k = jax.tree.map(lambda a, k=k: a[k], steps)
            canvas, out = self.detailer(canvas, step_k, image_tokens, self_condition, deterministic)
            per_step.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)

    def __call__(
        self,
        images: jax.Array,  # [B, H, W, 3]
        targets: jax.Array,  # [B, K, L] int
        fractions: jax.Array,  # [K] scheduled fractions s(k)
        self_condition: jax.Array,  # [B] bool
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Training pass: per-step loss terms, each [K, B]."""
        image_tokens = self.encode(images, deterministic)
        steps = {"fraction": fractions, "target": jnp.swapaxes(targets, 0, 1)}  # [K, B, L]
        return self._refine(image_tokens, steps, self_condition, deterministic)

    def describe(self, images: jax.Array, fractions: jax.Array) -> dict[str, Any]:
        """Decoding: `canvas` [K, B, L] token ids written at each step, `pooled` [K, B, D]."""
        image_tokens = self.encode(images, True)
        batch = images.shape[0]
        no_self_condition = jnp.zeros((batch,), jnp.bool_)
        return self._refine(image_tokens, {"fraction": fractions}, no_self_condition, True)
