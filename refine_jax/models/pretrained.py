"""Initialising the image encoder from a pretrained ViT saved in the big_vision `.npz` layout.

big_vision names (keys joined by '/', optionally under 'params/'):
  embedding/kernel [p, p, 3, D] (a conv), embedding/bias, pos_embedding [1, N, D],
  Transformer/encoder_norm/{scale,bias}, and per block either stacked over layers
  (Transformer/encoderblock/..., leading axis = depth) or one per layer
  (Transformer/encoderblock_{i}/...): LayerNorm_0, MultiHeadDotProductAttention_1/
  {query,key,value} (kernel [D, H, Dh], bias [H, Dh]) and out (kernel [H, Dh, D]),
  LayerNorm_2, MlpBlock_3/Dense_0 and Dense_1.
Our encoder uses 2-D kernels, so head axes are merged; a position table of another grid
size is resized bilinearly. Any other mismatch is an error naming the parameter.
`replace_encoder` puts encoder parameters in place, from here or from a trained run's
checkpoint (`model_loading.load_encoder`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from etils import epath

BLOCK_NAMES = {
    "LayerNorm_0": "pre_attention_norm",
    "MultiHeadDotProductAttention_1": "self_attention",
    "LayerNorm_2": "pre_mlp_norm",
    "MlpBlock_3/Dense_0": "mlp/wi",
    "MlpBlock_3/Dense_1": "mlp/wo",
}


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with epath.Path(path).open("rb") as f:
        arrays = dict(np.load(f))
    return {k.removeprefix("params/"): v for k, v in arrays.items()}


def _block_tensor(arrays: Mapping[str, np.ndarray], name: str, depth: int) -> np.ndarray:
    """One block parameter stacked over layers, from either big_vision block layout."""
    stacked = f"Transformer/encoderblock/{name}"
    if stacked in arrays:
        return arrays[stacked]
    per_layer = [f"Transformer/encoderblock_{i}/{name}" for i in range(depth)]
    missing = [k for k in per_layer if k not in arrays]
    if missing:
        raise KeyError(f"pretrained ViT has no {stacked} nor {missing[0]}")
    return np.stack([arrays[k] for k in per_layer])


def _merge_heads(name: str, value: np.ndarray) -> np.ndarray:
    """[L, D, H, Dh] -> [L, D, H·Dh]; out [L, H, Dh, D] -> [L, H·Dh, D]; biases likewise."""
    if name.endswith("out/kernel"):
        return value.reshape(value.shape[0], -1, value.shape[-1])
    if name.endswith("kernel") and value.ndim == 4:
        return value.reshape(*value.shape[:2], -1)
    if name.endswith("bias") and value.ndim == 3:
        return value.reshape(value.shape[0], -1)
    return value


def _resize_positions(table: np.ndarray, num_patches: int) -> np.ndarray:
    """[N_old, D] -> [N_new, D] by bilinear resizing over the square patch grid."""
    old, new = int(round(np.sqrt(table.shape[0]))), int(round(np.sqrt(num_patches)))
    grid = table.reshape(old, old, -1)
    resized = jax.image.resize(grid, (new, new, grid.shape[-1]), "bilinear")
    return np.asarray(resized).reshape(new * new, -1)


def convert_big_vision_encoder(arrays: Mapping[str, np.ndarray], encoder: Mapping) -> dict:
    """big_vision arrays -> a params tree shaped like `encoder` (our ViTEncoder params)."""
    depth = jax.tree.leaves(encoder["encoderblock"])[0].shape[0]
    patch_kernel = arrays["embedding/kernel"]  # [p, p, 3, D] -> [p·p·3, D], our patch order
    flat: dict[str, np.ndarray] = {
        "embedding/kernel": patch_kernel.reshape(-1, patch_kernel.shape[-1]),
        "embedding/bias": arrays["embedding/bias"],
        "encoder_norm/scale": arrays["Transformer/encoder_norm/scale"],
        "encoder_norm/bias": arrays["Transformer/encoder_norm/bias"],
    }
    positions = arrays["pos_embedding"].reshape(-1, arrays["pos_embedding"].shape[-1])
    num_patches = encoder["pos_embedding"].shape[0]
    flat["pos_embedding"] = (
        positions
        if positions.shape[0] == num_patches
        else _resize_positions(positions, num_patches)
    )
    for theirs, ours in BLOCK_NAMES.items():
        parts = ("query", "key", "value", "out") if ours == "self_attention" else ("",)
        leaves = ("scale", "bias") if theirs.startswith("LayerNorm") else ("kernel", "bias")
        for part in parts:
            for leaf in leaves:
                source = "/".join(p for p in (theirs, part, leaf) if p)
                target = "/".join(p for p in ("encoderblock", ours, part, leaf) if p)
                flat[target] = _merge_heads(target, _block_tensor(arrays, source, depth))
    relative = encoder["encoderblock"].get("relative_position_bias")
    if relative is not None:  # a ViT has none: zero keeps the pretrained encoder's function
        flat["encoderblock/relative_position_bias"] = np.zeros(np.shape(relative), np.float32)
    converted = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(encoder):
        key = _path_key(path)
        if key not in flat:
            raise KeyError(f"no pretrained value for encoder parameter {key}")
        if tuple(flat[key].shape) != tuple(np.shape(leaf)):
            raise ValueError(
                f"pretrained encoder parameter {key} has shape {tuple(flat[key].shape)}, the model "
                f"expects {tuple(np.shape(leaf))} (check width, depth, heads, mlp_dim, patch_size)"
            )
        converted[key] = flat[key].astype(np.asarray(leaf).dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: converted[_path_key(path)], dict(encoder)
    )


def _path_key(path) -> str:
    """A parameter's name from its tree path: 'encoderblock/mlp/wi/kernel'."""
    return "/".join(str(k.key) for k in path)


def replace_encoder(params: dict, encoder: Mapping, source: str) -> dict:
    """`params` with its 'encoder' subtree replaced by `encoder` (host arrays of the same
    parameters and shapes, else an error naming the first that differs), placed with the
    shardings of the parameters it replaces."""
    ours = {_path_key(path): leaf for path, leaf in jax.tree.leaves_with_path(params["encoder"])}
    theirs = {
        _path_key(path): np.asarray(leaf) for path, leaf in jax.tree.leaves_with_path(encoder)
    }
    hint = "(check width, encoder_depth, num_heads, mlp_dim, patch_size, image_size, position_bias)"
    if unknown := sorted(set(theirs) - set(ours)):
        raise ValueError(f"{source} has encoder parameter {unknown[0]}, the model has not {hint}")
    for key, leaf in ours.items():
        if key not in theirs:
            raise ValueError(f"{source} has no encoder parameter {key} {hint}")
        if theirs[key].shape != tuple(np.shape(leaf)):
            raise ValueError(
                f"encoder parameter {key} of {source} has shape {theirs[key].shape}, the model "
                f"expects {tuple(np.shape(leaf))} {hint}"
            )
    placed = jax.tree.map_with_path(
        lambda path, old: jax.device_put(theirs[_path_key(path)].astype(old.dtype), old.sharding),
        params["encoder"],
    )
    return {**params, "encoder": placed}


def load_pretrained_encoder(params: dict, path: str) -> dict:
    """`params` with its 'encoder' subtree replaced by the big_vision ViT at `path`."""
    return replace_encoder(
        params, convert_big_vision_encoder(_read_npz(path), params["encoder"]), path
    )
