"""Where the model looked: cross-attention of the words a step added, as heatmaps over the image.

The detailer (and the baseline's decoder) sow every cross-attention map into the 'intermediates'
collection as `attention_weights` [B, H, Q, N] per text layer; the refinement model's scan stacks
them over the K steps. Query position j of step k is the position that writes token j of that
step's canvas, so the attention of the tokens of the words step k added tells where the step
looked when it added them. Here: the last text layer's map averaged over heads, the word-level
diff between consecutive steps, the token -> word alignment, and the overlay on the image.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from refine_jax.decoding import greedy_decode
from refine_jax.models.autoregressive import AutoregressiveCaptioner, shift_right, with_eos
from refine_jax.models.refine import RefineCaptioner
from refine_jax.special_tokens import NOT_TEXT_IDS
from refine_jax.tokenizer import Tokenizer

_LAYER = re.compile(r"layer_(\d+)$")


def last_layer_attention(intermediates: Mapping[str, Any]) -> jax.Array:
    """The sown cross-attention of the last text layer, [K, B, H, Q, N] (K = 1 when unstacked).

    Accepts the 'intermediates' collection (or the dict holding it) of a scanned refinement
    model ([K, B, H, Q, N] in a 1-tuple), of an unscanned one (K arrays [B, H, Q, N]) or of the
    baseline's decoder (one [B, H, Q, N])."""
    found: list[tuple[int, Any]] = []

    def visit(node: Any, layer: int | None) -> None:
        if not isinstance(node, Mapping):
            return
        for key, value in node.items():
            match = _LAYER.match(str(key))
            if (
                key == "cross_attention"
                and isinstance(value, Mapping)
                and "attention_weights" in value
            ):
                found.append((-1 if layer is None else layer, value["attention_weights"]))
            else:
                visit(value, int(match.group(1)) if match else layer)

    visit(intermediates, None)
    if not found:
        raise ValueError(
            "no sown cross-attention weights: apply the model with mutable=['intermediates']"
        )
    weights = max(found, key=lambda item: item[0])[1]
    arrays = list(weights) if isinstance(weights, tuple | list) else [weights]
    if len(arrays) == 1:
        array = arrays[0]
        return array if array.ndim == 5 else array[None]
    return jnp.stack(arrays)  # an unscanned loop sows once per step


def describe_with_attention(
    model, params, images: jax.Array, fractions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Canvases [B, K, L] and the last layer's head-averaged cross-attention [B, K, L, N] of
    every step (jit-able). For the baseline (K = 1) the attention comes from a teacher-forced
    pass over its own greedy caption."""
    if isinstance(model, RefineCaptioner):
        out, state = model.apply(
            {"params": params},
            images,
            fractions,
            method=RefineCaptioner.describe,
            mutable=["intermediates"],
        )
        weights = last_layer_attention(state["intermediates"])  # [K, B, H, L, N]
        return jnp.swapaxes(out["canvas"], 0, 1), jnp.swapaxes(weights.mean(axis=2), 0, 1)
    if isinstance(model, AutoregressiveCaptioner):
        caption = greedy_decode(model, params, images)  # [B, L]
        image_tokens = model.apply(
            {"params": params}, images, method=AutoregressiveCaptioner.encode
        )
        inputs = shift_right(with_eos(jnp.pad(caption, ((0, 0), (0, 1)))))
        _, state = model.apply(
            {"params": params},
            image_tokens,
            inputs,
            method=AutoregressiveCaptioner.logits,
            mutable=["intermediates"],
        )
        weights = last_layer_attention(state["intermediates"])[0]  # [B, H, L+1, N]
        attention = weights.mean(axis=1)[:, : caption.shape[1]]
        return caption[:, None], attention[:, None]
    raise TypeError(f"no attention extraction for {type(model).__name__}")


def token_word_indices(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[int]:
    """For each canvas position, the index of the whitespace-separated word of the decoded text
    its token falls in; -1 for pad / bos / eos positions."""
    ids = [int(t) for t in tokens]
    out = []
    for j, token in enumerate(ids):
        if token in NOT_TEXT_IDS:
            out.append(-1)
            continue
        words = tokenizer.decode(ids[: j + 1]).split()
        out.append(max(len(words) - 1, 0) if words else -1)
    return out


def word_diff(previous: str, current: str) -> list[tuple[str, str]]:
    """Word-level diff of two descriptions: (kind, word) with kind 'same', 'add' or 'drop', in
    reading order (dropped words before the words that replace them)."""
    old, new = previous.split(), current.split()
    ops: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops.extend(("same", w) for w in new[j1:j2])
            continue
        ops.extend(("drop", w) for w in old[i1:i2])
        ops.extend(("add", w) for w in new[j1:j2])
    return ops


def added_word_indices(previous: str, current: str) -> list[int]:
    """Indices (in current.split()) of the words `current` adds to `previous`."""
    matcher = difflib.SequenceMatcher(None, previous.split(), current.split(), autojunk=False)
    return [
        j
        for tag, _, _, j1, j2 in matcher.get_opcodes()
        if tag in ("insert", "replace")
        for j in range(j1, j2)
    ]


def added_words_attention(
    attention: np.ndarray, word_of_token: Sequence[int], added: Sequence[int]
) -> np.ndarray | None:
    """Mean attention [N] of the canvas positions whose token belongs to an added word, from one
    step's attention [L, N]; None when no token of an added word is on the canvas."""
    wanted = set(added)
    rows = [j for j, w in enumerate(word_of_token) if w in wanted and j < attention.shape[0]]
    if not rows:
        return None
    return np.asarray(attention, np.float64)[rows].mean(axis=0)


def upsample_attention(attention: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Attention over the N = g*g patches (row-major, as the ViT flattens them) -> a [H, W] map
    in [0, 1] (min-max scaled; all zeros when flat), bilinearly upsampled."""
    flat = np.asarray(attention, np.float64).reshape(-1)
    grid = int(round(np.sqrt(flat.size)))
    if grid * grid != flat.size:
        raise ValueError(f"{flat.size} patches do not form a square grid")
    height, width = (size, size) if isinstance(size, int) else size
    low, high = flat.min(), flat.max()
    scaled = (flat - low) / (high - low) if high > low else np.zeros_like(flat)
    image = Image.fromarray(scaled.reshape(grid, grid).astype(np.float32))  # mode F
    # Pixel centres of the upsampled map line up with patch centres (PIL's bilinear does that).
    resized = np.asarray(image.resize((width, height), Image.BILINEAR), np.float64)
    return np.clip(resized, 0.0, 1.0)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour ramp for values in [0, 1]: [..., 3] floats in [0, 1]."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)[..., None]
    return np.clip(3.0 * v - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)


def attention_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """The uint8 image [H, W, 3] with the attention over its patches drawn on it: each pixel
    blends towards the heat colour in proportion to its (scaled) attention."""
    image = np.asarray(image)
    heat = upsample_attention(attention, image.shape[:2])[..., None]
    blend = alpha * heat
    out = image.astype(np.float64) * (1.0 - blend) + 255.0 * heat_colors(heat[..., 0]) * blend
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A model input in [-1, 1] back to uint8 pixels."""
    return np.clip(np.round((np.asarray(image, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


__all__ = [
    "added_word_indices",
    "added_words_attention",
    "attention_overlay",
    "describe_with_attention",
    "last_layer_attention",
    "to_uint8",
    "token_word_indices",
    "upsample_attention",
    "word_diff",
]
