"""Encoder initialisation from a big_vision-layout ViT .npz, checked against a reference ViT
built from Flax's own Conv and MultiHeadDotProductAttention with big_vision's parameter names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config

from refine_jax.model_kinds import build_model
from refine_jax.models.pretrained import load_pretrained_encoder
from refine_jax.models.vit import ViTEncoder

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE = 32, 2, 2, 64, 12, 48


class ReferenceBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="MultiHeadDotProductAttention_1")(
            y, y
        )
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_2")(x)
        y = nn.Dense(WIDTH, name="Dense_1")(nn.gelu(nn.Dense(MLP, name="Dense_0")(y)))
        return x + y


class ReferenceViT(nn.Module):
    """big_vision's ViT computation with its parameter names (no class token, no head)."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(
            WIDTH, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID", name="embedding"
        )(images)
        x = x.reshape(x.shape[0], -1, WIDTH)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], WIDTH))
        for i in range(DEPTH):
            x = ReferenceBlock(name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


def big_vision_arrays(reference_params):
    """Flatten the reference params to big_vision npz keys (blocks under Transformer/)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(reference_params):
        names = [str(k.key) for k in path]
        if names[0].startswith("encoderblock") or names[0] == "encoder_norm":
            names.insert(0, "Transformer")
        if len(names) > 2 and names[-2] in ("Dense_0", "Dense_1"):
            names.insert(-2, "MlpBlock_3")
        flat["/".join(names)] = np.asarray(leaf)
    return flat


def encoder_config():
    config = load_config("shapes", "tiny")
    m = config.model
    m.width, m.encoder_depth, m.num_heads, m.mlp_dim, m.patch_size, m.image_size = (
        WIDTH,
        DEPTH,
        HEADS,
        MLP,
        PATCH,
        SIZE,
    )
    return config


def test_loaded_encoder_computes_what_the_big_vision_vit_computes(tmp_path):
    images = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
    reference = ReferenceViT()
    reference_params = reference.init(jax.random.key(1), images)["params"]
    arrays = big_vision_arrays(reference_params)
    np.savez(tmp_path / "vit.npz", **{f"params/{k}": v for k, v in arrays.items()})

    config = encoder_config()
    params = nn.unbox(init_params(build_model(config, 50), config, 50))
    loaded = load_pretrained_encoder(params, str(tmp_path / "vit.npz"))
    encoder = ViTEncoder(PATCH, WIDTH, DEPTH, HEADS, MLP, position_bias=config.model.position_bias)
    assert config.model.position_bias == "relative"  # loaded as zeros: the ViT has no bias
    ours = encoder.apply({"params": loaded["encoder"]}, images)
    expected = reference.apply({"params": reference_params}, images)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=2e-5)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)


def test_stacked_layout_and_resized_positions(tmp_path):
    config = encoder_config()
    params = nn.unbox(init_params(build_model(config, 50), config, 50))
    arrays = {
        "embedding/kernel": np.ones((PATCH, PATCH, 3, WIDTH), np.float32),
        "embedding/bias": np.zeros(WIDTH, np.float32),
        "pos_embedding": np.random.default_rng(0).normal(size=(1, 36, WIDTH)).astype(np.float32),
        "Transformer/encoder_norm/scale": np.ones(WIDTH, np.float32),
        "Transformer/encoder_norm/bias": np.zeros(WIDTH, np.float32),
    }
    block = {
        "LayerNorm_0/scale": (WIDTH,),
        "LayerNorm_0/bias": (WIDTH,),
        "LayerNorm_2/scale": (WIDTH,),
        "LayerNorm_2/bias": (WIDTH,),
        "MlpBlock_3/Dense_0/kernel": (WIDTH, MLP),
        "MlpBlock_3/Dense_0/bias": (MLP,),
        "MlpBlock_3/Dense_1/kernel": (MLP, WIDTH),
        "MlpBlock_3/Dense_1/bias": (WIDTH,),
        **{
            f"MultiHeadDotProductAttention_1/{p}/kernel": (WIDTH, HEADS, WIDTH // HEADS)
            for p in ("query", "key", "value")
        },
        **{
            f"MultiHeadDotProductAttention_1/{p}/bias": (HEADS, WIDTH // HEADS)
            for p in ("query", "key", "value")
        },
        "MultiHeadDotProductAttention_1/out/kernel": (HEADS, WIDTH // HEADS, WIDTH),
        "MultiHeadDotProductAttention_1/out/bias": (WIDTH,),
    }
    for name, shape in block.items():
        arrays[f"Transformer/encoderblock/{name}"] = np.full((DEPTH, *shape), 0.5, np.float32)
    np.savez(tmp_path / "stacked.npz", **arrays)
    loaded = load_pretrained_encoder(params, str(tmp_path / "stacked.npz"))
    assert loaded["encoder"]["pos_embedding"].shape == (16, WIDTH)  # 6x6 grid resized to 4x4
    np.testing.assert_array_equal(loaded["encoder"]["encoderblock"]["mlp"]["wi"]["kernel"], 0.5)


def test_a_vit_of_another_width_is_a_clear_error(tmp_path):
    images = jnp.zeros((1, SIZE, SIZE, 3))
    reference_params = ReferenceViT().init(jax.random.key(1), images)["params"]
    np.savez(tmp_path / "vit.npz", **big_vision_arrays(reference_params))
    config = encoder_config()
    config.model.width, config.model.num_heads = 64, 2
    params = nn.unbox(init_params(build_model(config, 50), config, 50))
    with pytest.raises(
        ValueError, match=r"embedding/bias has shape \(32,\), the model expects \(64,\)"
    ):
        load_pretrained_encoder(params, str(tmp_path / "vit.npz"))
