"""Analytic model FLOPs (DESIGN §7): matmul FLOPs counted from the config, 2 per multiply-add.

Each model kind describes its text passes (`model_kinds.TextPass`); the detailer is counted K
times (it runs K times), its cross-attention's image key/value projections once (they are
computed once per image, before the steps); a training step is counted as three forward
passes (forward, and a backward pass of twice its cost), a frozen encoder's as one. Layer norms,
softmaxes and other elementwise work are left out, as is usual for utilisation figures.
"""

from __future__ import annotations

import ml_collections

from refine_jax.model_kinds import TextPass, model_kind


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


def image_keys_values_flops(config: ml_collections.ConfigDict, text_pass: TextPass) -> float:
    """Forward FLOPs of projecting one image's tokens to the keys and values of every
    cross-attention of `text_pass`'s stack (0 without cross-attention)."""
    if not text_pass.cross_attention:
        return 0.0
    m = config.model
    patches = (m.image_size // m.patch_size) ** 2
    return float(text_pass.depth * 2 * patches * 2 * m.width**2)


def text_pass_flops(
    config: ml_collections.ConfigDict, vocab_size: int, text_pass: TextPass
) -> float:
    """Forward FLOPs of one pass of a text stack (a detailer step, the causal decoder, a text
    tower): its layers, with or without cross-attention to the image tokens, its vocabulary
    logits if it has them, and its small heads. The image key/value projections are in it
    unless the pass shares them (`keys_values_once`; `text_stack_flops` counts them once)."""
    m = config.model
    patches = (m.image_size // m.patch_size) ** 2
    d, length = m.width, text_pass.length
    per_layer = (
        2 * length * 4 * d**2
        + 2 * 2 * length**2 * d  # self-attention
        + 2 * 2 * length * d * m.mlp_dim  # MLP
    )
    if text_pass.cross_attention:
        per_layer += (
            2 * length * 2 * d**2  # query and output projections
            + 2 * 2 * length * patches * d  # scores and weighted sum
        )
    logits = 2 * length * d * vocab_size if text_pass.vocab_logits else 0
    keys_values = 0.0 if text_pass.keys_values_once else image_keys_values_flops(config, text_pass)
    return float(text_pass.depth * per_layer + logits + text_pass.head_flops + keys_values)


def forward_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    """One image's forward pass: the encoder, then the model kind's text passes (K detailer
    steps, one decoder pass, or the matching model's text tower and matching head)."""
    return encoder_flops(config) + text_stack_flops(config, vocab_size)


def text_stack_flops(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    """Forward FLOPs of all text passes of one image, as its model kind runs them."""
    return sum(
        p.count * text_pass_flops(config, vocab_size, p)
        + (image_keys_values_flops(config, p) if p.keys_values_once else 0.0)
        for p in model_kind(config.model.kind).text_passes(config)
    )


def training_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
    """One image's training step: forward and backward (twice the forward) of everything that
    trains. With a frozen encoder (`model.freeze_encoder`) the encoder runs forward only, and
    the image key/value projections' backward computes their weights' gradient only (no
    gradient flows on to the image tokens): twice their forward, not three times."""
    total = 3.0 * forward_flops_per_example(config, vocab_size)
    if config.model.freeze_encoder:
        keys_values = sum(
            (1 if p.keys_values_once else p.count) * image_keys_values_flops(config, p)
            for p in model_kind(config.model.kind).text_passes(config)
        )
        total -= 2.0 * encoder_flops(config) + keys_values
    return total
