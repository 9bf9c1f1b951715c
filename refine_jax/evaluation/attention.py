"""Where the model looked: cross-attention of the words a step added, as heatmaps over the image.

The detailer (and the baseline's decoder) sow every cross-attention map into the 'intermediates'
collection as `attention_weights` [B, H, Q, N] per text layer; the refinement model's scan stacks
them over the K steps. Query position j of step k is the position that writes token j of that
step's canvas, so the attention of the tokens of the words step k added tells where the step
looked when it added them. The maps (the last text layer's, averaged over heads) come from each
model kind's `describe_with_attention` (`model_kinds`); here, on the host: the word-level diff
between consecutive steps, the token -> word alignment, and the overlay on the image.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from refine_jax.special_tokens import NOT_TEXT_IDS
from refine_jax.tokenizer import Tokenizer


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
    "to_uint8",
    "token_word_indices",
    "upsample_attention",
    "word_diff",
]
