"""Data sources by config name (the factory behind `refine_jax.data.make_sources`); every
source yields records for `data.pipeline`.

``config.data.name`` selects:

* ``shapes``: the embedded generated data (no files);
* ``shards``: image–caption shards: tar (webdataset / img2dataset) or ArrayRecord (read by
  ``data.array_records``), chosen by the files found. ``data.path`` is a folder with one
  sub-folder per split (``data.train_split``, ``data.eval_split``: ``train/``, ``val/``), or
  ``data.train_path`` / ``data.eval_path`` give a folder, glob, file or comma-separated list;
* ``tfds_coco``: the COCO Karpathy TFDS builder of ``data.coco`` (``data.path``: its TFDS
  data_dir, or the builder's version folder; ``data.tfds_config``: builder config name);
* ``labels``: classification images captioned from their labels (``data.labels``):
  ``data.path`` is a folder-per-class tree (with split sub-folders when it has them) or
  ``tfds:NAME`` (a TFDS dataset such as ``tfds:imagenet2012``, prepared in TFDS's data_dir:
  ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``);
* ``mixture``: ``data.mixture`` = ((name, weight, kind, path), ...) with kind one of the three
  above; a relative path is taken under ``data.path``. A component trains on its
  ``data.train_split`` folder, or on the whole folder when it has none (a class-folder tree
  with only the held-out split's folder is refused). ``data.mixture_eval`` names the component
  whose held-out split evaluates (default: the first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from refine_jax.data.caption_source import CaptionSource, FirstN
from refine_jax.data.shapes import ShapesSource
from refine_jax.paths import is_glob

DATASETS = ("shapes", "shards", "tfds_coco", "labels", "mixture")
SOURCE_KINDS = ("shards", "tfds_coco", "labels")  # what a mixture component can be


# ---------------------------------------------------------------------------------------------
# Paths


def _exists(path: str) -> bool:
    return any(is_glob(p) or epath.Path(p).exists() for p in path.split(",") if p)


def _is_relative(path: str) -> bool:
    """Not absolute, remote, ``~``-based or a ``tfds:`` name."""
    return not path.startswith(("/", "~", "tfds:")) and "://" not in path


def _join(root: str, path: str) -> str:
    """``path`` under ``root`` where it is relative (``~`` expanded), each item of a
    comma-separated list."""
    return ",".join(
        root.rstrip("/") + "/" + item if root and _is_relative(item) else os.path.expanduser(item)
        for item in (part.strip() for part in path.split(","))
        if item
    )


def require_data_path(data: ml_collections.ConfigDict, what: str) -> str:
    """``config.data.path``, or a clear error when it is empty or does not exist."""
    path = data.path
    if not path:
        raise ValueError(
            f"config.data.path is empty, but {what} needs it; pass --config.data.path=PATH"
        )
    if not path.startswith("tfds:") and not _exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"config.data.path = {path!r} does not exist ({what})")
    return os.path.expanduser(path) if path.startswith("~") else path


def _split_path(root: str, split: str) -> str:
    return root.rstrip("/") + "/" + split


def _split_location(root: str, split: str, key: str, required: bool = True) -> str:
    """``root/split`` when that exists; else ``root`` itself unless ``required``."""
    location = _split_path(root, split)
    if epath.Path(location).exists():
        return location
    if required:
        raise FileNotFoundError(
            f"{key} = {root!r} has no {split!r} split folder (expected {location!r})"
        )
    return root


# ---------------------------------------------------------------------------------------------
# Source kinds


def open_shards(location: str, cache_dir: str = "", key: str = "config.data.path") -> CaptionSource:
    """Tar or ArrayRecord caption shards at ``location`` (folder, glob, file, or comma-separated
    list), the format chosen by the files found; errors name ``key`` and the path."""
    from refine_jax.data.array_records import SUFFIX, ArrayRecordCaptionSource
    from refine_jax.data.shards import NoSamplesError, TarShardSource, expand_paths

    items = [p.strip() for p in location.split(",") if p.strip()]
    try:
        files: list[str] = []
        for item in items:
            if not is_glob(item) and epath.Path(item).is_dir():
                try:
                    files += expand_paths(item, ".tar")
                except FileNotFoundError:
                    try:
                        files += expand_paths(item, SUFFIX)
                    except FileNotFoundError:
                        raise FileNotFoundError(
                            f"no .tar or {SUFFIX} shards in folder {item!r}"
                        ) from None
            else:
                files += expand_paths(item, ".tar")
        if not files:
            raise FileNotFoundError("no shard paths given")
        formats = {
            SUFFIX if f.endswith(SUFFIX) else ".tar" if f.endswith(".tar") else f for f in files
        }
        if formats == {".tar"}:
            return TarShardSource(files, cache_dir=cache_dir or None, verify_images=False)
        if formats == {SUFFIX}:
            return ArrayRecordCaptionSource(files)
        raise ValueError(f"expected only .tar or only {SUFFIX} files, found {sorted(formats)}")
    except (FileNotFoundError, NoSamplesError, ValueError) as e:
        raise type(e)(f"{key} = {location!r}: {e}") from e


def open_tfds_coco(location: str, split: str, config_name: str = "") -> CaptionSource:
    """The prepared COCO Karpathy TFDS dataset: a TFDS data_dir, or its version folder."""
    from refine_jax.data.tfds_source import TfdsCaptionSource

    if epath.Path(location, "dataset_info.json").exists():
        return TfdsCaptionSource(split, builder_dir=location)
    return TfdsCaptionSource(split, data_dir=location, config=config_name or None)


def open_labels(
    data: ml_collections.ConfigDict, location: str, split: str, seed: int
) -> CaptionSource:
    """Label-captioned images: a folder-per-class tree, or ``tfds:NAME`` (prepared TFDS)."""
    from refine_jax.data.labels import FolderLabelSource, TfdsLabelSource

    options = dict(
        templates=tuple(data.label_templates),
        mode=data.label_mode,
        seed=seed,
        label_names=data.label_names or None,
        verify_images=False,  # the pipeline decodes (and counts) every image anyway
    )
    if location.startswith("tfds:"):
        tfds_split = "validation" if split == "val" else split
        return TfdsLabelSource(location.removeprefix("tfds:"), tfds_split, **options)
    return FolderLabelSource(location, **options)


def open_source(
    kind: str, location: str, split: str, config: ml_collections.ConfigDict, key: str
) -> CaptionSource:
    """One split of a source of ``kind`` at ``location`` (already the split's own location for
    shards and labels; the TFDS data_dir for ``tfds_coco``)."""
    data = config.data
    if kind == "shards":
        return open_shards(location, data.index_cache_dir, key)
    if kind == "tfds_coco":
        return open_tfds_coco(location, split, data.tfds_config)
    if kind == "labels":
        return open_labels(data, location, split, config.seed)
    raise ValueError(f"{key}: source kind {kind!r} is not one of {list(SOURCE_KINDS)}")


def _kind_split(
    config: ml_collections.ConfigDict,
    kind: str,
    root: str,
    split: str,
    key: str,
    explicit: str = "",
    explicit_key: str = "",
    required: bool = True,
) -> CaptionSource:
    """The source of one split: ``explicit`` when given, else the split under ``root``."""
    if explicit:
        return open_source(kind, os.path.expanduser(explicit), split, config, explicit_key)
    if kind == "tfds_coco" or root.startswith("tfds:"):
        return open_source(kind, root, split, config, key)
    return open_source(kind, _split_location(root, split, key, required), split, config, key)


def parse_mixture(spec: Sequence[Sequence[Any]]) -> list[tuple[str, float, str, str]]:
    """``config.data.mixture`` checked: a non-empty sequence of (name, weight, kind, path)."""
    if not spec:
        raise ValueError("config.data.mixture is empty: give ((name, weight, kind, path), ...)")
    out = []
    for entry in spec:
        if len(entry) != 4:
            raise ValueError(
                f"config.data.mixture entry {tuple(entry)!r} must be (name, weight, kind, path)"
            )
        name, weight, kind, path = entry
        if kind not in SOURCE_KINDS:
            raise ValueError(
                f"config.data.mixture entry {name!r}: kind {kind!r} is not one of "
                f"{list(SOURCE_KINDS)}"
            )
        if not path:
            raise ValueError(f"config.data.mixture entry {name!r} has an empty path")
        out.append((str(name), float(weight), str(kind), str(path)))
    return out


def _holds_only_the_held_out_split(location: str, data: ml_collections.ConfigDict) -> bool:
    """A class-folder tree with the eval split's folder and not the train split's."""
    if location.startswith("tfds:"):
        return False
    has = lambda split: epath.Path(_split_path(location, split)).exists()
    return not has(data.train_split) and has(data.eval_split)


def _mixture_sources(
    config: ml_collections.ConfigDict,
) -> tuple[CaptionSource, CaptionSource]:
    from refine_jax.data.mixture import MixtureSource

    data = config.data
    entries = parse_mixture(data.mixture)
    if any(_is_relative(path) for _, _, _, path in entries):
        root = require_data_path(data, "config.data.mixture (relative paths)")
    else:
        root = data.path
    components = []
    for name, weight, kind, path in entries:
        location = _join(root, path)
        key = f"config.data.mixture[{name!r}] path"
        if kind != "tfds_coco" and not location.startswith("tfds:") and not _exists(location):
            raise FileNotFoundError(f"{key} = {location!r} does not exist")
        if kind == "labels" and _holds_only_the_held_out_split(location, data):
            raise FileNotFoundError(
                f"{key} = {location!r} has a {data.eval_split!r} folder but no "
                f"{data.train_split!r} one; read whole, its held-out images would train as a "
                f"class named {data.eval_split!r}: give the path of the class folders to train on"
            )
        source = _kind_split(config, kind, location, data.train_split, key, required=False)
        components.append((name, source, weight))
    eval_name = data.mixture_eval or entries[0][0]
    chosen = [e for e in entries if e[0] == eval_name]
    if not chosen:
        raise ValueError(
            f"config.data.mixture_eval = {eval_name!r} is not one of {[e[0] for e in entries]}"
        )
    _, _, kind, path = chosen[0]
    key = f"config.data.mixture[{eval_name!r}] path"
    eval_source = _kind_split(
        config,
        kind,
        _join(root, path),
        data.eval_split,
        key,
        data.eval_path,
        "config.data.eval_path",
    )
    return MixtureSource(components), eval_source


# ---------------------------------------------------------------------------------------------
# Entry points


def make_sources(config: ml_collections.ConfigDict) -> tuple[CaptionSource, CaptionSource]:
    """(train source, held-out source) for ``config.data.name``."""
    data = config.data
    if data.name == "shapes":
        size = config.model.image_size
        return (
            ShapesSource("train", data.train_size, config.seed, size),
            ShapesSource("eval", data.eval_size, config.seed, size),
        )
    if data.name in SOURCE_KINDS:
        needs_root = not (data.train_path and data.eval_path)
        what = f"config.data.name = {data.name!r}"
        root = require_data_path(data, what) if needs_root else data.path
        key = "config.data.path"
        train = _kind_split(
            config,
            data.name,
            root,
            data.train_split,
            key,
            data.train_path,
            "config.data.train_path",
        )
        held_out = _kind_split(
            config, data.name, root, data.eval_split, key, data.eval_path, "config.data.eval_path"
        )
    elif data.name == "mixture":
        train, held_out = _mixture_sources(config)
    else:
        raise ValueError(f"config.data.name = {data.name!r} is not one of {list(DATASETS)}")
    if data.max_eval_examples > 0:
        held_out = FirstN(held_out, data.max_eval_examples)
    return train, held_out


__all__ = [
    "DATASETS",
    "SOURCE_KINDS",
    "make_sources",
    "open_labels",
    "open_shards",
    "open_source",
    "open_tfds_coco",
    "parse_mixture",
    "require_data_path",
]
