"""ViT image encoder: patchify, learned positions (2-D sin-cos initialised), optionally a learned
2-D relative position bias in every self-attention, pre-LN blocks stacked with `nn.scan`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refine_jax.models.layers import (
    Attention,
    Dropout,
    Dtype,
    Mlp,
    constrain,
    dense,
    layer_norm,
    learned_positions,
    sincos2d_init,
)


def relative_offsets(grid_height: int, grid_width: int) -> np.ndarray:
    """[N, N] int: entry (i, j) numbers the 2-D offset of patch j from patch i (row-major
    patches), one of (2·grid_height − 1)·(2·grid_width − 1); equal offsets share a number."""
    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = rows[None, :] - rows[:, None] + grid_height - 1  # [N, N], in [0, 2·gh − 2]
    d_col = cols[None, :] - cols[:, None] + grid_width - 1
    return d_row * (2 * grid_width - 1) + d_col


class EncoderBlock(nn.Module):
    """One pre-LN ViT block; written as a scan body (carry in, carry out). With `grid` (patch
    rows, columns) its self-attention adds a learned bias per head and 2-D offset between
    patches (zero at init), so a head can look "one row down" or "later in the same column"
    wherever it is, which absolute positions alone make hard to learn."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    grid: tuple[int, int] | None = None
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)

    @nn.compact
    def __call__(self, x: jax.Array, _, deterministic: bool = True):
        drop = lambda y: Dropout(self.dropout_rate, self.dropout_bits)(y, deterministic)
        bias = None
        if self.grid is not None:
            offsets = relative_offsets(*self.grid)
            num_offsets = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1)
            table = self.param(
                "relative_position_bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("offsets", None)),
                (num_offsets, self.num_heads),
            )
            bias = jnp.transpose(table[offsets], (2, 0, 1))[None]  # [1, H, N, N]
        h = layer_norm(self.dtype, "pre_attention_norm")(x)
        h = Attention(
            self.num_heads,
            self.dtype,
            self.dropout_rate,
            dropout_bits=self.dropout_bits,
            name="self_attention",
        )(h, h, None, deterministic, bias)
        x = constrain(x + drop(h), ("batch", "patches", "embed"))
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        h = Mlp(self.mlp_dim, self.dtype, self.dropout_rate, self.dropout_bits, name="mlp")(
            h, deterministic
        )
        return constrain(x + drop(h), ("batch", "patches", "embed")), None


class ViTEncoder(nn.Module):
    """Images [B, H, W, 3] in [-1, 1] -> image tokens [B, N, D]."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    remat: bool = False
    position_init: str = "sincos2d"  # of the learned position table: "sincos2d" or "normal"
    position_bias: str = "none"  # "relative": a learned 2-D relative bias in each self-attention
    unroll: bool = False  # the layer scan as straight-line code (same parameters and results)
    # A fixed feature extractor: no dropout, and no gradient reaches its parameters, so the
    # backward pass skips it (the optimizer leaves it alone: train_state.make_optimizer).
    frozen: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        deterministic = deterministic or self.frozen
        b, h, w, c = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c)  # [B, N, p*p*3]
        x = dense(self.width, ("pixels", "embed"), self.dtype, "embedding")(
            patches.astype(self.dtype)
        )
        grid = (h // p, w // p)
        init = sincos2d_init(*grid) if self.position_init == "sincos2d" else None
        x = x + learned_positions(
            self,
            "pos_embedding",
            x.shape[1],
            self.width,
            "patches",
            **({"init": init} if init else {}),
        )
        x = constrain(x, ("batch", "patches", "embed"))
        x = Dropout(self.dropout_rate, self.dropout_bits)(x, deterministic)
        block = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
        block_grid = grid if self.position_bias == "relative" else None
        x, _ = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.depth,
            unroll=self.unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.dropout_rate,
            block_grid,
            self.dropout_bits,
            name="encoderblock",
        )(x, None, deterministic)
        x = layer_norm(self.dtype, "encoder_norm")(x)
        return jax.lax.stop_gradient(x) if self.frozen else x


def encoder_for(model: nn.Module) -> ViTEncoder:
    """The ViT encoder of a model with the shared image-tower fields (patch_size, width,
    encoder_depth, num_heads, mlp_dim, dtype, dropout_rate, dropout_bits, remat, position_bias,
    unroll_scans, freeze_encoder): every model kind's."""
    return ViTEncoder(
        model.patch_size,
        model.width,
        model.encoder_depth,
        model.num_heads,
        model.mlp_dim,
        model.dtype,
        model.dropout_rate,
        model.dropout_bits,
        remat=model.remat != "none",
        position_bias=model.position_bias,
        unroll=model.unroll_scans,
        frozen=model.freeze_encoder,
    )
