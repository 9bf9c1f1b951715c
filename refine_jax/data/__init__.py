"""The data package's public names: sources by config name (`make_sources`, documented in
`refine_jax.data.sources`), the caption-source interface, and caption helpers."""

from refine_jax.data.caption_source import FirstN, sample_captions, training_captions
from refine_jax.data.sources import (
    DATASETS,
    SOURCE_KINDS,
    make_sources,
    open_labels,
    open_shards,
    open_source,
    open_tfds_coco,
    parse_mixture,
    require_data_path,
)

__all__ = [
    "DATASETS",
    "SOURCE_KINDS",
    "FirstN",
    "make_sources",
    "open_labels",
    "open_shards",
    "open_source",
    "open_tfds_coco",
    "parse_mixture",
    "require_data_path",
    "sample_captions",
    "training_captions",
]
