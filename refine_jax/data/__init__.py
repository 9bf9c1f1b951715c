"""Data sources by config name; every source yields records for `data.pipeline`."""

from __future__ import annotations

import ml_collections

from refine_jax.data.shapes import ShapesSource

DATASETS = ("shapes",)


def make_sources(config: ml_collections.ConfigDict) -> tuple[object, object]:
    """(train source, held-out source) for `config.data.name`."""
    data = config.data
    if data.name == "shapes":
        size = config.model.image_size
        return (
            ShapesSource("train", data.train_size, config.seed, size),
            ShapesSource("eval", data.eval_size, config.seed, size),
        )
    raise ValueError(f"config.data.name = {data.name!r} is not one of {list(DATASETS)}")


def training_captions(source, limit: int = 20_000) -> list[str]:
    """Up to `limit` training captions (every reference), to fit a tokenizer and salience."""
    captions: list[str] = []
    for i in range(min(len(source), limit)):
        captions.extend(source[i]["captions"])
    return captions
