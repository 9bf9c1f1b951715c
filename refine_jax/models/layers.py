"""Transformer building blocks with logical axis names on every parameter and main activation.

Attention is built from 2-D `nn.Dense` kernels ('embed' x 'heads') rather than
`nn.MultiHeadDotProductAttention`, whose 3-D kernels do not shard cleanly (DESIGN §9).
Logical names used here: batch, length (text positions), patches (image tokens), embed,
heads (all heads' features, merged), mlp, vocab, pixels (flattened patch pixels), layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refine_jax.config import DROPOUT_BITS

Dtype = jnp.dtype | str
KeysValues = tuple[jax.Array, jax.Array]  # an attention's projected memory: [B, M, H, Dh] each

default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str) -> nn.Dense:
    """A Dense layer whose kernel and bias carry logical axis names."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


_UINT = {8: jnp.uint8, 16: jnp.uint16}


class Dropout(nn.Module):
    """Dropout whose keep-or-drop decisions cost `bits` random bits each.

    32 draws exactly what flax's `nn.Dropout` draws (same key, same mask), so recorded runs
    reproduce. 16 or 8 cut each 32-bit draw into 2 or 4 decisions: the rate is rounded to a
    multiple of 2**-bits (0.1 becomes 26/256 at 8 bits) and the kept values are scaled by the
    rounded keep probability, so the expectation is kept exactly. On a CPU, threefry's bits are
    most of dropout's cost (BENCHMARKS.md), and packing makes them 2-6x cheaper.
    """

    rate: float
    bits: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.bits not in DROPOUT_BITS:
            raise ValueError(f"model.dropout_bits = {self.bits} is not one of {list(DROPOUT_BITS)}")
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:  # as nn.Dropout: no division by a zero keep probability
            return jnp.zeros_like(x)
        if self.bits == 32:  # nn.Dropout's own draw
            keep_prob = 1.0 - self.rate
            keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=x.shape)
        else:
            levels = 2**self.bits
            threshold = round(self.rate * levels)
            if not 0 < threshold < levels:
                raise ValueError(
                    f"model.dropout_rate {self.rate} rounds to {threshold}/{levels} at "
                    f"model.dropout_bits={self.bits}: use more bits or a rate in "
                    f"[{0.5 / levels:.2g}, {1 - 0.5 / levels:.6g}]"
                )
            keep_prob = 1.0 - threshold / levels
            per_word = 32 // self.bits
            size = math.prod(x.shape)
            words = jax.random.bits(self.make_rng("dropout"), (-(-size // per_word),), jnp.uint32)
            draws = jax.lax.bitcast_convert_type(words, _UINT[self.bits])  # [W, per_word]
            draws = draws.reshape(-1)[:size].reshape(x.shape)
            keep = draws >= threshold
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head attention; with `decode=True` it keeps a key/value cache for one-token steps.

    The cache is sized by the first (initialising) call, which must see the full length.
    Cross-attention weights are sown into 'intermediates' as `attention_weights` [B, H, Q, K]
    so interpretability tools can show where a step looked.

    A memory read many times (the image tokens, by every refinement step) can be projected
    once: `project_memory` gives its (keys, values), which `__call__` takes as `memory`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    decode: bool = False
    sow_weights: bool = False
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)

    @nn.compact
    def __call__(
        self,
        queries: jax.Array | None,  # [B, Q, D]; None: only project `memory` (project_memory)
        memory: jax.Array | KeysValues,  # [B, M, D], or its projection by project_memory
        mask: jax.Array | None = None,  # broadcastable to [B, H, Q, M]
        deterministic: bool = True,
        bias: jax.Array | None = None,  # added to the logits, broadcastable to [B, H, Q, M]
    ) -> jax.Array | KeysValues:
        features = (memory if queries is None else queries).shape[-1]
        if features % self.num_heads:
            raise ValueError(f"width {features} is not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads

        def project(x: jax.Array, name: str) -> jax.Array:
            y = dense(features, ("embed", "heads"), self.dtype, name)(x)
            return y.reshape(*y.shape[:2], self.num_heads, head_dim)  # [B, T, H, Dh]

        if isinstance(memory, tuple):
            k, v = memory
        else:
            k, v = project(memory, "key"), project(memory, "value")
        if queries is None:
            return k, v
        q = project(queries, "query")
        if self.decode:
            k, v, mask = self._update_cache(k, v, mask)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(self.dtype)
        if bias is not None:
            logits = logits + bias.astype(logits.dtype)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        if self.sow_weights:
            self.sow("intermediates", "attention_weights", weights)
        weights = Dropout(self.dropout_rate, self.dropout_bits)(weights, deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape(*out.shape[:2], features)  # [B, Q, D]
        return dense(features, ("heads", "embed"), self.dtype, "out")(out)

    def project_memory(self, memory: jax.Array) -> KeysValues:
        """(keys, values) of `memory` [B, M, D], each [B, M, H, Dh], with this attention's
        parameters: what `__call__` computes from `memory` before reading it."""
        return self(None, memory)

    def _update_cache(self, k: jax.Array, v: jax.Array, mask: jax.Array | None):
        """Writes this step's key/value at the cache index; attends to positions written so far."""
        initialising = not self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if initialising:
            return k, v, mask
        max_length = cached_k.value.shape[1]
        position = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, position, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, position, 0, 0))
        index.value = position + k.shape[1]
        written = (jnp.arange(max_length) < position + k.shape[1])[None, None, None, :]
        return cached_k.value, cached_v.value, written


class Mlp(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        features = x.shape[-1]
        h = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "wi")(x))
        h = constrain(h, ("batch", "length", "mlp"))
        h = Dropout(self.dropout_rate, self.dropout_bits)(h, deterministic)
        return dense(features, ("mlp", "embed"), self.dtype, "wo")(h)


class TextLayer(nn.Module):
    """Pre-LN text block: self-attention (bidirectional or causal), cross-attention to the image
    tokens (left out when they are None: a text-only block), MLP. `key_mask` [B, L] (bool, True =
    a token to attend to) hides padding from the self-attention.

    The image tokens may come as their cross-attention keys and values (`image_keys_values`), so
    a layer applied many times to one image projects it once. The cross-attention is defined in
    `setup` for that method to reach it; the rest is compact."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    causal: bool = False
    decode: bool = False
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)

    def setup(self):
        self.cross_attention = Attention(
            self.num_heads,
            self.dtype,
            self.dropout_rate,
            sow_weights=True,
            dropout_bits=self.dropout_bits,
        )

    def image_keys_values(self, image_tokens: jax.Array) -> KeysValues:
        """The cross-attention's (keys, values) of `image_tokens` [B, N, D], [B, N, H, Dh] each."""
        return self.cross_attention.project_memory(image_tokens)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        image_tokens: jax.Array | KeysValues | None,  # [B, N, D], or image_keys_values of it
        deterministic: bool = True,
        key_mask: jax.Array | None = None,
    ) -> jax.Array:
        drop = lambda y: Dropout(self.dropout_rate, self.dropout_bits)(y, deterministic)
        mask = None
        if self.causal and not self.decode:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32), dtype=jnp.bool_)
        if key_mask is not None:
            keys = key_mask[:, None, None, :]  # [B, 1, 1, L]
            mask = keys if mask is None else mask & keys
        h = layer_norm(self.dtype, "pre_self_attention_norm")(x)
        h = Attention(
            self.num_heads,
            self.dtype,
            self.dropout_rate,
            decode=self.decode,
            dropout_bits=self.dropout_bits,
            name="self_attention",
        )(h, h, mask, deterministic)
        x = constrain(x + drop(h), ("batch", "length", "embed"))
        if image_tokens is not None:
            h = layer_norm(self.dtype, "pre_cross_attention_norm")(x)
            h = self.cross_attention(h, image_tokens, None, deterministic)
            x = constrain(x + drop(h), ("batch", "length", "embed"))
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        h = Mlp(self.mlp_dim, self.dtype, self.dropout_rate, self.dropout_bits, name="mlp")(
            h, deterministic
        )
        return constrain(x + drop(h), ("batch", "length", "embed"))


def token_embedding(vocab_size: int, width: int, dtype: Dtype, name: str) -> nn.Embed:
    return nn.Embed(
        vocab_size,
        width,
        dtype=dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), ("vocab", "embed")
        ),
        name=name,
    )


def learned_positions(
    module: nn.Module,
    name: str,
    length: int,
    width: int,
    axis: str,
    init: Callable | None = None,
) -> jax.Array:
    """A [1, length, width] learned position table registered as a parameter of `module`,
    initialised by `init` (default: normal, stddev 0.02)."""
    init = init or nn.initializers.normal(stddev=0.02)
    partitioned = nn.with_logical_partitioning(init, (axis, "embed"))
    return module.param(name, partitioned, (length, width))[None]


def sincos2d_init(grid_height: int, grid_width: int) -> Callable:
    """An initialiser of a [grid_height * grid_width, width] position table with 2-D sine-cosine
    features: a quarter of the channels each for sin and cos of the row and of the column, so
    patches in the same row (or column) start out alike along those channels."""

    def init(key, shape, dtype=jnp.float32):
        del key
        length, width = shape
        if length != grid_height * grid_width or width % 4:
            raise ValueError(
                f"sincos2d positions need {grid_height}x{grid_width} patches and a "
                f"width divisible by 4, got table shape {shape}"
            )
        rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
        omega = 1.0 / 10_000 ** (np.arange(width // 4) / max(width // 4 - 1, 1))
        angles_y = rows.reshape(-1, 1) * omega[None]  # [N, width/4]
        angles_x = cols.reshape(-1, 1) * omega[None]
        table = np.concatenate(
            [np.sin(angles_x), np.cos(angles_x), np.sin(angles_y), np.cos(angles_y)], axis=1
        )
        return jnp.asarray(table, dtype)

    return init


def sinusoid(values: jax.Array, features: int) -> jax.Array:
    """Sinusoidal features of scalars in [0, 1] (e.g. the scheduled progress of a step)."""
    frequencies = jnp.exp(jnp.linspace(0.0, np.log(1000.0), features // 2))
    angles = values[..., None] * frequencies * np.pi
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
