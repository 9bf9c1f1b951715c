"""The config a workdir was trained with, recorded in WORKDIR/config.json by the trainer, so that
evaluation and captioning need only `--workdir` (a given `--config` still wins)."""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from etils import epath

from refine_jax.checkpointing import SHAPE_NEUTRAL_MODEL_KEYS
from refine_jax.config import base_config
from refine_jax.paths import absolute

CONFIG_FILE = "config.json"
# Locations a config names (each may be a comma-separated list): recorded absolute, so that
# `--workdir` alone reads the same data from any directory.
LOCATION_KEYS = (
    "data.path",
    "data.train_path",
    "data.eval_path",
    "data.index_cache_dir",
    "tokenizer.path",
    "model.pretrained_encoder",
)


def _absolute_locations(text: str) -> str:
    """Each comma-separated location made absolute; a `tfds:` name or a URI stays as it is."""
    return ",".join(
        item if not item or item.startswith("tfds:") else absolute(item)
        for item in (part.strip() for part in text.split(","))
    )


def record_config(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> epath.Path:
    """Writes the whole config as JSON to WORKDIR/config.json (renamed into place), its
    locations made absolute; call it on one process only."""
    path = epath.Path(workdir) / CONFIG_FILE
    config = config.copy_and_resolve_references()  # the caller's config is left as it is
    for key in LOCATION_KEYS:
        section, name = key.split(".")
        if config[section].get(name):
            config[section][name] = _absolute_locations(config[section][name])
    partial = path.parent / f".{CONFIG_FILE}.partial"
    partial.write_text(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
    partial.replace(path)
    return path


def _as_config_value(value: Any) -> Any:
    """JSON lists back to the tuples configs hold."""
    if isinstance(value, list):
        return tuple(_as_config_value(v) for v in value)
    return value


def _merge(node: ml_collections.ConfigDict, recorded: dict, prefix: str, unknown: list) -> None:
    for key, value in recorded.items():
        name = f"{prefix}{key}"
        if key not in node:
            unknown.append(name)
        elif isinstance(node[key], ml_collections.ConfigDict):
            _merge(node[key], value, f"{name}.", unknown)
        else:
            try:
                node[key] = _as_config_value(value)
            except TypeError as e:
                raise ValueError(f"recorded config key {name} = {value!r}: {e}") from None


def _recorded_json(workdir: str | epath.PathLike) -> dict | None:
    """WORKDIR/config.json as written, or None when the workdir has none."""
    path = epath.Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_recorded_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict | None:
    """The locked config recorded in WORKDIR/config.json (the defaults of `base_config` for keys
    it predates), or None when the workdir has none (trained before configs were recorded)."""
    recorded = _recorded_json(workdir)
    if recorded is None:
        return None
    config = base_config()
    unknown: list[str] = []
    _merge(config, recorded, "", unknown)
    if unknown:
        raise ValueError(
            f"{epath.Path(workdir) / CONFIG_FILE} has keys this version does not know: "
            f"{', '.join(unknown)}; it was written "
            "by another version of refine_jax: pass --config explicitly"
        )
    config.lock()
    return config


def recorded_setting(workdir: str | epath.PathLike, key: str) -> Any:
    """One setting ("section.name") as WORKDIR/config.json records it, or None when the workdir
    has no config or the config lacks it. Read from the JSON alone, so a config written by
    another version (keys this one does not know) still answers."""
    value: Any = _recorded_json(workdir)
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def model_shape_differences(
    recorded: ml_collections.ConfigDict, given: ml_collections.ConfigDict
) -> list[str]:
    """'model.KEY: recorded X, given Y' for every shape-bearing model key that differs."""
    old, new = recorded.model.to_dict(), given.model.to_dict()
    return [
        f"model.{key}: recorded {old.get(key)!r}, given {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in SHAPE_NEUTRAL_MODEL_KEYS and old.get(key) != new.get(key)
    ]


def config_for_workdir(
    config: ml_collections.ConfigDict | None, workdir: str | epath.PathLike
) -> ml_collections.ConfigDict:
    """The config to evaluate or caption WORKDIR's checkpoints with: `config` when given (it must
    agree with the recorded model shape), else the one recorded at training."""
    recorded = read_recorded_config(workdir)
    if config is None:
        if recorded is None:
            raise FileNotFoundError(
                f"{epath.Path(workdir) / CONFIG_FILE} does not exist (the workdir was not "
                "trained by this version, or not at all): pass --config=FILE.py[:VARIANT] and "
                "the overrides it was trained with"
            )
        return recorded
    if recorded is not None:
        differences = model_shape_differences(recorded, config)
        if differences:
            raise ValueError(
                f"--config does not match the model {epath.Path(workdir) / CONFIG_FILE} was "
                "trained with:\n  "
                + "\n  ".join(differences)
                + "\nDrop --config to use the recorded one, or fix the differing keys."
            )
    return config


__all__ = [
    "CONFIG_FILE",
    "config_for_workdir",
    "model_shape_differences",
    "read_recorded_config",
    "record_config",
    "recorded_setting",
]
