"""The autoregressive baseline (DESIGN §2): the same ViT encoder and a causal text decoder.

It has about the parameter count of the refinement model (the same number of text layers,
width and vocabulary), trains with teacher forcing, and decodes greedily or with beam
search using a key/value cache, one token per call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from refine_jax.models.layers import (
    Dropout,
    Dtype,
    TextLayer,
    constrain,
    dense,
    layer_norm,
    learned_positions,
    token_embedding,
)
from refine_jax.models.vit import encoder_for
from refine_jax.special_tokens import BOS_ID, EOS_ID, PAD_ID


class CausalDecoder(nn.Module):
    """Tokens [B, T] -> next-token logits [B, T, V]; with `decode=True`, T = 1 per call."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_length: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    decode: bool = False

    @nn.compact
    def __call__(
        self, tokens: jax.Array, image_tokens: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        x = token_embedding(self.vocab_size, self.width, self.dtype, "token_embedding")(tokens)
        positions = learned_positions(self, "pos_embedding", self.max_length, self.width, "length")
        if self.decode:
            index = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            if self.is_initializing():
                x = x + positions[:, : tokens.shape[1]]
            else:
                x = x + jax.lax.dynamic_slice_in_dim(positions, index.value, 1, axis=1)
                index.value = index.value + 1
        else:
            x = x + positions[:, : tokens.shape[1]]
        x = constrain(x, ("batch", "length", "embed"))
        x = Dropout(self.dropout_rate, self.dropout_bits)(x, deterministic)
        for i in range(self.depth):
            x = TextLayer(
                self.num_heads,
                self.mlp_dim,
                self.dtype,
                self.dropout_rate,
                causal=True,
                dropout_bits=self.dropout_bits,
                decode=self.decode,
                name=f"layer_{i}",
            )(x, image_tokens, deterministic)
        x = layer_norm(self.dtype, "final_norm")(x)
        logits = dense(self.vocab_size, ("embed", "vocab"), jnp.float32, "logits")(x)
        return constrain(logits, ("batch", "length", "vocab"))


def next_token_logits(logits: jax.Array) -> jax.Array:
    """Logits over the tokens a caption may continue with: never pad or bos."""
    return logits.at[..., PAD_ID].set(-jnp.inf).at[..., BOS_ID].set(-jnp.inf)


def shift_right(tokens: jax.Array) -> jax.Array:
    """Teacher-forcing inputs: bos followed by the tokens, dropping the last position."""
    bos = jnp.full_like(tokens[:, :1], BOS_ID)
    return jnp.concatenate([bos, tokens[:, :-1]], axis=1)


def with_eos(tokens: jax.Array) -> jax.Array:
    """Puts eos at the first pad of each canvas (the caption must leave room for it)."""
    length = jnp.sum(jnp.cumsum(tokens == PAD_ID, axis=-1) == 0, axis=-1)
    at_end = jnp.arange(tokens.shape[1])[None, :] == length[:, None]
    return jnp.where(at_end, EOS_ID, tokens)


class AutoregressiveCaptioner(nn.Module):
    """ViT encoder + causal decoder over a caption of at most `canvas_length` tokens + eos."""

    vocab_size: int
    canvas_length: int
    image_size: int
    patch_size: int
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    remat: str = "none"
    position_bias: str = "none"  # of the encoder's self-attention (models.vit)
    unroll_scans: bool = False  # the encoder's layer scan as straight-line code
    freeze_encoder: bool = False  # a fixed, pretrained image encoder (models.vit)
    decode: bool = False

    def setup(self):
        self.encoder = encoder_for(self)
        self.decoder = CausalDecoder(
            self.vocab_size,
            self.width,
            self.decoder_depth,
            self.num_heads,
            self.mlp_dim,
            self.canvas_length + 1,
            self.dtype,
            self.dropout_rate,
            self.dropout_bits,
            decode=self.decode,
        )

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(images, deterministic)

    def logits(
        self, image_tokens: jax.Array, inputs: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        return self.decoder(inputs, image_tokens, deterministic)

    def __call__(
        self, images: jax.Array, caption: jax.Array, deterministic: bool = True
    ) -> dict[str, jax.Array]:
        """Teacher-forced pass over caption [B, L] (padded): per-example loss terms, each [B]."""
        target = with_eos(jnp.pad(caption, ((0, 0), (0, 1))))  # [B, L+1]
        logits = self.logits(self.encode(images, deterministic), shift_right(target), deterministic)
        # Positions up to and including eos are scored; the pads after it are not.
        scored = jnp.cumsum(target == EOS_ID, axis=-1) - (target == EOS_ID) == 0
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        prediction = jnp.argmax(logits, axis=-1)
        correct = jnp.where(scored, prediction == target, True)
        return {
            "cross_entropy": jnp.sum(cross_entropy * scored, -1) / jnp.sum(scored, -1),
            "exact_match": jnp.all(correct, axis=-1),
            "token_accuracy": jnp.sum(correct & scored, -1) / jnp.sum(scored, -1),
        }
