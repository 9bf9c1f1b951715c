"""ViT image encoder: patchify, learned positions (2-D sin-cos initialised), pre-LN blocks stacked
with `nn.scan`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from refine_jax.models.layers import (
    Attention,
    Dtype,
    Mlp,
    constrain,
    dense,
    layer_norm,
    learned_positions,
    sincos2d_init,
)


class EncoderBlock(nn.Module):
    """One pre-LN ViT block; written as a scan body (carry in, carry out)."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, _, deterministic: bool = True):
        drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        h = layer_norm(self.dtype, "pre_attention_norm")(x)
        h = Attention(self.num_heads, self.dtype, self.dropout_rate, name="self_attention")(
            h, h, None, deterministic
        )
        x = constrain(x + drop(h), ("batch", "patches", "embed"))
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        h = Mlp(self.mlp_dim, self.dtype, self.dropout_rate, name="mlp")(h, deterministic)
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
    remat: bool = False
    position_init: str = "sincos2d"  # of the learned position table: "sincos2d" or "normal"

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
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
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        block = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
        x, _ = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            self.num_heads, self.mlp_dim, self.dtype, self.dropout_rate, name="encoderblock"
        )(x, None, deterministic)
        return layer_norm(self.dtype, "encoder_norm")(x)


def encoder_for(model: nn.Module) -> ViTEncoder:
    """The ViT encoder of a model with the shared image-tower fields (patch_size, width,
    encoder_depth, num_heads, mlp_dim, dtype, dropout_rate, remat): every model kind's."""
    return ViTEncoder(
        model.patch_size,
        model.width,
        model.encoder_depth,
        model.num_heads,
        model.mlp_dim,
        model.dtype,
        model.dropout_rate,
        remat=model.remat != "none",
    )
