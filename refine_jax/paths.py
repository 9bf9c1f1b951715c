"""User paths that may be local or URIs (`gs://bucket/run`): made absolute without losing `//`."""

from __future__ import annotations

import glob
import os
import uuid

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    """A `scheme://...` location (gs://, s3://, ...), not a local path."""
    return "://" in os.fspath(path)


def is_glob(path: str | os.PathLike) -> bool:
    """A wildcard pattern: holds `*`, `?` or `[` and is not itself an existing file or folder
    (a real name such as `trip [2024]` means that folder, not a character class)."""
    text = os.fspath(path)
    return any(c in text for c in "*?[") and not epath.Path(text).exists()


def glob_paths(pattern: str) -> list[str]:
    """Sorted matches of a local (`**` recursive) or URI (`gs://bucket/*.tar`) glob pattern."""
    if not is_uri(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
    return sorted(os.fspath(p) for p in base.glob("/".join(parts[first:])))


def absolute(path: str | os.PathLike) -> str:
    """A local path with `~` expanded, made absolute; a URI unchanged."""
    text = os.fspath(path)
    return text if is_uri(text) else os.path.abspath(os.path.expanduser(text))


def folder_name(spec: str | os.PathLike, default: str) -> str:
    """The name of the folder `spec` (a folder, a file in it, or a glob) points into: the folder
    itself, a file's folder, or the folder the glob's first pattern part lies in."""
    text = absolute(spec)
    if is_glob(text):
        wildcard = min(text.index(c) for c in "*?[" if c in text)
        text = text[:wildcard].rsplit("/", 1)[0]
    elif not epath.Path(text).is_dir():
        text = text.rstrip("/").rsplit("/", 1)[0]
    name = text.rstrip("/").rsplit("/", 1)[-1]
    return name if name and not name.endswith(":") else default


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes a file via a temporary name and a rename, so readers never see it partial and a
    failed write leaves nothing behind. (A URI is written directly: an object store's upload
    appears whole or not at all.)"""
    path = os.fspath(path)
    if is_uri(path):
        epath.Path(path).write_bytes(data.encode() if isinstance(data, str) else data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["absolute", "folder_name", "is_uri", "write_atomically"]
