"""Data sources by config name; every source yields records for `data.pipeline`.

``config.data.name`` selects:

* ``shapes``: the embedded generated data (no files);
* ``shards``: image–caption shards: tar (webdataset / img2dataset) or ArrayRecord (from
  ``data.array_record_convert``), chosen by the files found. ``data.path`` is a folder with one
  sub-folder per split (``data.train_split``, ``data.eval_split``: ``train/``, ``val/``), or
  ``data.train_path`` / ``data.eval_path`` give a folder, glob, file or comma-separated list;
* ``tfds_coco``: the COCO Karpathy TFDS builder of ``data.coco`` (``data.path``: its TFDS
  data_dir, or the builder's version folder; ``data.tfds_config``: builder config name);
* ``labels``: classification images captioned from their labels (``data.labels``):
  ``data.path`` is a folder-per-class tree (with split sub-folders when it has them) or
  ``tfds:NAME`` (a prepared TFDS dataset such as ``tfds:imagenet2012``);
* ``mixture``: ``data.mixture`` = ((name, weight, kind, path), ...) with kind one of the three
  above; a relative path is taken under ``data.path``. ``data.mixture_eval`` names the component
  whose held-out split evaluates (default: the first).
"""

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
