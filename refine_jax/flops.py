"""Analytic model FLOPs (DESIGN §7): matmul FLOPs counted from the config, 2 per multiply-add.

The detailer is counted K times (it runs K times); a training step is counted as three
forward passes (forward, and a backward pass of twice its cost). Layer norms, softmaxes and
other elementwise work are left out, as is usual for utilisation figures.
"""

from __future__ import annotations

import ml_collections

from refine_jax.models.kinds import model_kind


def encoder_flops(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of the ViT encoder for one image."""
    m = config.model
    patches = (m.image_size // m.patch_size) ** 2
    embed = 2 * patches * (m.patch_size**2 * 3) * m.width
    per_layer = (
        2 * patches * 4 * m.width**2  # q, k, v, out projections
        + 2 * 2 * patches**2 * m.width  # scores and weighted sum
        + 2 * 2 * patches * m.width * m.mlp_dim  # MLP
    )
    return float(embed + m.encoder_depth * per_layer)


def text_pass_flops(config: ml_collections.ConfigDict, vocab_size: int, length: int) -> float:
    """Forward FLOPs of one pass of the text stack (a detailer step, or the causal decoder)."""
    m = config.model
    patches = (m.image_size // m.patch_size) ** 2
    d = m.width
    per_layer = (
        2 * length * 4 * d**2
        + 2 * 2 * length**2 * d  # self-attention
        + 2 * length * 2 * d**2
        + 2 * patches * 2 * d**2  # cross-attention projections
        + 2 * 2 * length * patches * d  # cross-attention scores and weighted sum
        + 2 * 2 * length * d * m.mlp_dim  # MLP
    )
    return float(m.detailer_depth * per_layer + 2 * length * d * vocab_size)


def forward_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    """One image's forward pass: the encoder, then the model kind's text-stack passes (K
    detailer steps, or one decoder pass)."""
    return encoder_flops(config) + text_stack_flops(config, vocab_size)


def text_stack_flops(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    """Forward FLOPs of all text-stack passes of one image, as its model kind runs them."""
    kind = model_kind(config.model.kind)
    passes, length = kind.text_passes(config)
    return passes * (text_pass_flops(config, vocab_size, length) + kind.pass_head_flops(config))


def training_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    return 3.0 * forward_flops_per_example(config, vocab_size)
