"""Model construction from a config: the kind `config.model.kind` names (see models/kinds.py)."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from refine_jax.models.kinds import model_kind


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None = None
) -> nn.Module:
    """The model `config.model.kind` names; `scan=False` gives the unscanned refinement oracle."""
    return model_kind(config.model.kind).build(config, vocab_size, scan)
