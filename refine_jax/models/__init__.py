"""Model construction from a config: the refinement captioner or the autoregressive baseline."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from refine_jax.models.autoregressive import AutoregressiveCaptioner
from refine_jax.models.refine import RefineCaptioner


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None = None
) -> RefineCaptioner | AutoregressiveCaptioner:
    """The model `config.model.kind` names; `scan=False` gives the unscanned refinement oracle."""
    m = config.model
    shared = dict(
        vocab_size=vocab_size,
        canvas_length=m.canvas_length,
        image_size=m.image_size,
        patch_size=m.patch_size,
        width=m.width,
        encoder_depth=m.encoder_depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dtype=jnp.dtype(m.dtype),
        dropout_rate=m.dropout_rate,
        remat=m.remat,
    )
    if m.kind == "refine":
        return RefineCaptioner(
            num_refine_steps=m.num_refine_steps,
            detailer_depth=m.detailer_depth,
            scan=m.scan_detailer if scan is None else scan,
            layout=config.targets.layout,
            **shared,
        )
    if m.kind == "autoregressive":
        return AutoregressiveCaptioner(decoder_depth=m.detailer_depth, **shared)
    raise ValueError(f"unknown model.kind {m.kind!r}")
