"""User paths that may be local or URIs (`gs://bucket/run`): made absolute without losing `//`."""

from __future__ import annotations

import os

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    """A `scheme://...` location (gs://, s3://, ...), not a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path with `~` expanded, made absolute; a URI unchanged."""
    text = os.fspath(path)
    return text if is_uri(text) else os.path.abspath(os.path.expanduser(text))


def folder_name(spec: str | os.PathLike, default: str) -> str:
    """The name of the folder `spec` (a folder, a file in it, or a glob) points into: the folder
    itself, a file's folder, or the folder the glob's first pattern part lies in."""
    text = absolute(spec)
    wildcard = min((text.index(c) for c in "*?[" if c in text), default=None)
    if wildcard is not None:
        text = text[:wildcard].rsplit("/", 1)[0]
    elif not epath.Path(text).is_dir():
        text = text.rstrip("/").rsplit("/", 1)[0]
    name = text.rstrip("/").rsplit("/", 1)[-1]
    return name if name and not name.endswith(":") else default


__all__ = ["absolute", "folder_name", "is_uri"]
