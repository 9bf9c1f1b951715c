"""Random access over webdataset / img2dataset tar shards of image–caption samples.

A shard is a plain (uncompressed) tar whose members are grouped into samples by KEY, the member
name up to the first dot of its base name: ``KEY.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` (the
image), ``KEY.txt`` (one caption) and optionally ``KEY.json`` (metadata; its ``captions`` list,
when present, holds all references). Other members are ignored.

Grain shuffles globally only over a random-access source, and a tar has no table of contents. So
:class:`TarShardSource` scans each shard's headers once and keeps a member index (for every sample:
the byte offset and size of its image, txt and json members), cached as JSON next to the shard
(``00000.tar.index.json``) or, when that folder is read-only, in a cache directory. The cache is
keyed by the shard's path, size, mtime and content fingerprint (a hash of its first and last
64 KiB, which hold its first and last tar headers), so a changed shard is re-indexed, even one
replaced by another of the same size and mtime. Reading a sample then reads only its byte ranges,
together with the tar header just before them: when that is no longer the indexed member's and
the shard's fingerprint has changed, the shard was rewritten under the running job, and
:class:`ShardChangedError` names it instead of garbage being read as bad samples.

Bad data is never fatal and never silent. Structural problems are found while indexing and kept in
the index (so they are counted again on every open, without a rescan):

* ``truncated_shard``: a sample with a member in a damaged or cut-off part of the tar. The scan
  resumes at the next valid header after damage (tars joined end to end read as one), so only
  the samples the damage touches are lost: a sample next to it is kept only when it has every
  member kind (image, txt, json) the shard's other samples have, and damage with no incomplete
  neighbour counts as one sample lost;
* ``unreadable_shard``: a shard that is not a readable tar at all, or cannot be opened (one per
  shard; a warning names it every time the source is opened);
* ``missing_image``: captions but no image member; ``missing_caption``: an image but neither
  ``.txt`` nor ``.json``; ``duplicate_member`` (dropped part): a repeated KEY.ext, first one kept.

Content problems are found when a sample is read, which returns either a good record or a skip
marker (see :mod:`refine_jax.data.records`): bad captions (``empty_caption``,
``whitespace_caption``, ``non_utf8_caption``, ``bad_json``, ``missing_caption`` when a json has
no captions and there is no txt) are checked first, then the image is fully decoded
(``corrupt_image``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, SupportsIndex

import numpy as np
from absl import logging
from etils import epath

from refine_jax.data.caption_source import CaptionSource, ReadsCaptions, structural_counts_of
from refine_jax.data.records import (
    TEACHER_CAPTIONS_FIELD,
    CorruptImageError,
    Record,
    SkipCounter,
    Skipped,
    SkipReason,
    captions_from_members,
    checked_index,
    decode_image,
    skipped,
    teacher_captions,
)
from refine_jax.errors import DataError
from refine_jax.paths import glob_paths, is_glob, is_uri, write_atomically

PathsArg = str | os.PathLike | Sequence[str | os.PathLike]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
INDEX_SUFFIX = ".index.json"
# A KEY.json sidecar larger than this is not read (a caption file is kilobytes; a huge one would
# be parsed whole for every sample): the sample uses its .txt caption, or is skipped.
MAX_JSON_BYTES = 1 << 20
# 2: indexes record a content fingerprint; indexes of version 1 are rebuilt.
# 3: the scan reads past damaged headers and joined tars; older indexes are rebuilt.
INDEX_VERSION = 3
# Bytes hashed at each end of a shard for its fingerprint.
FINGERPRINT_BYTES = 64 * 1024
_BLOCK = 512
# Member ranges of one sample closer together than this are fetched with a single read.
_MERGE_GAP = 64 * 1024


class NoSamplesError(ValueError):
    """Raised when a source holds no readable sample at all."""


class IndexVersionError(ValueError):
    """A cached index written in another format version (it is rebuilt)."""


class ShardChangedError(DataError):
    """A shard no longer holds what its index says: it was rewritten while a job was reading it."""


# ---------------------------------------------------------------------------------------------
# Paths


def expand_paths(paths: PathsArg, suffix: str) -> list[str]:
    """Turns a directory, a glob, a file, or a list of them into a list of file paths.

    A directory yields its ``*{suffix}`` files. Raises FileNotFoundError naming the path for a
    missing path, an empty glob or a directory without such files.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise FileNotFoundError("no shard paths given (empty list)")
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        if not is_uri(s):
            s = os.path.abspath(os.path.expanduser(s))
        if is_glob(s):
            matches = glob_paths(s)
            if not matches:
                raise FileNotFoundError(f"no files match the glob {s!r}")
            out.extend(matches)
        elif epath.Path(s).is_dir():
            folder = s.rstrip("/")  # listed, not globbed: its name may hold [ or *
            matches = sorted(
                f"{folder}/{p.name}"
                for p in epath.Path(folder).iterdir()
                if p.name.endswith(suffix) and not p.name.startswith(".")
            )
            if not matches:
                raise FileNotFoundError(f"no *{suffix} files in directory {s!r}")
            out.extend(matches)
        elif epath.Path(s).exists():
            out.append(s)
        else:
            raise FileNotFoundError(f"shard path does not exist: {s!r}")
    return out


def _stat(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of a shard."""
    if is_uri(path):
        st = epath.Path(path).stat()
        return int(st.length), int(st.mtime) * 1_000_000_000
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def shard_fingerprint(path: str, size: int) -> str:
    """sha256 of a shard's size and its first and last :data:`FINGERPRINT_BYTES`: cheap to take,
    and it changes when a shard is replaced by another, even of the same size and mtime."""
    digest = hashlib.sha256(str(size).encode())
    with _open_binary(path) as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def split_member_name(name: str) -> tuple[str, str] | None:
    """Splits a member name into (KEY, lower-case extension) at the base name's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


# ---------------------------------------------------------------------------------------------
# Member index


@dataclass
class ShardIndex:
    """Where every sample of one shard lies, and what was wrong with the shard's structure.

    ``spans[i]`` is ``(image_offset, image_size, txt_offset, txt_size, json_offset, json_size)``
    of sample ``keys[i]`` (offset -1 when the member is absent). ``size``, ``mtime_ns`` and
    ``fingerprint`` (:func:`shard_fingerprint`) describe the file the index was built from.
    """

    path: str
    size: int
    mtime_ns: int
    keys: list[str]
    spans: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    fingerprint: str = ""

    def to_json(self) -> str:
        samples = [[k, *map(int, s)] for k, s in zip(self.keys, self.spans, strict=True)]
        return json.dumps(
            {
                "version": INDEX_VERSION,
                "shard": self.path,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "fingerprint": self.fingerprint,
                "skipped": self.skipped,
                "dropped": self.dropped,
                "error": self.error,
                "samples": samples,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        d = json.loads(text)
        if d.get("version") != INDEX_VERSION:
            raise IndexVersionError(f"index version {d.get('version')} != {INDEX_VERSION}")
        samples = d["samples"]
        spans = np.array([s[1:] for s in samples], dtype=np.int64).reshape(len(samples), 6)
        return cls(
            path=d["shard"],
            size=int(d["size"]),
            mtime_ns=int(d["mtime_ns"]),
            keys=[s[0] for s in samples],
            spans=spans,
            skipped={k: int(v) for k, v in d["skipped"].items()},
            dropped={k: int(v) for k, v in d["dropped"].items()},
            error=d["error"],
            fingerprint=str(d["fingerprint"]),
        )

    def describes(self, size: int, mtime_ns: int, fingerprint: str) -> bool:
        """Whether this index was built from a file of this size, mtime and fingerprint."""
        return (self.size, self.mtime_ns, self.fingerprint) == (size, mtime_ns, fingerprint)


def _open_binary(path: str) -> BinaryIO:
    return epath.Path(path).open("rb") if is_uri(path) else open(path, "rb")


def _first_nonzero(f: BinaryIO, start: int, end: int) -> int | None:
    """Offset of the first non-zero byte in [start, end), or None."""
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(1 << 20, end - pos))
        if not chunk:
            break
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += len(chunk)
    return None


def _partial_header_name(f: BinaryIO, offset: int, end: int) -> tuple[str, bool]:
    """Name field of the (possibly cut) header at ``offset`` and whether the name is complete."""
    f.seek(offset)
    raw = f.read(min(100, end - offset))  # the ustar name field
    complete = b"\0" in raw or len(raw) == 100
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), complete


def _data_end(member: tarfile.TarInfo) -> int:
    """Where a member's data ends, padded to whole blocks: where the next header starts."""
    return member.offset_data + -(-member.size // _BLOCK) * _BLOCK


def _member_kind(name: str) -> tuple[str, str] | None:
    """(KEY, 'image' / 'txt' / 'json') of a sample's member; None for members that are ignored."""
    parts = split_member_name(name)
    if parts is None:
        return None
    key, ext = parts
    if ext in IMAGE_EXTENSIONS:
        return key, "image"
    return (key, ext) if ext in (CAPTION_EXTENSION, META_EXTENSION) else None


def _usual_kinds(kinds: dict[str, set[str]], suspects: set[str]) -> set[str] | None:
    """The member kinds most samples away from the damage have (the larger set on a tie); None
    when every sample is next to it, and nothing tells a complete sample."""
    sets = Counter(frozenset(v) for k, v in kinds.items() if k not in suspects)
    if not sets:
        return None
    return set(max(sets, key=lambda s: (sets[s], len(s))))


def scan_tar(path: str) -> ShardIndex:
    """Builds a shard's member index by reading its tar headers (not the member data).

    Past a damaged header the scan resynchronises at the next valid one, so a damaged or cut
    region loses only the samples it touches; tars joined end to end read as one. The samples
    next to the damage are kept only when they have every member kind the shard's other samples
    have; the rest are counted as ``truncated_shard`` (see the module docstring).
    """
    size, mtime_ns = _stat(path)
    fingerprint = shard_fingerprint(path, size)
    members: list[tarfile.TarInfo] = []
    error: str | None = None
    with _open_binary(path) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, ValueError) as e:
            return ShardIndex(
                path,
                size,
                mtime_ns,
                [],
                np.zeros((0, 6), np.int64),
                skipped={str(SkipReason.UNREADABLE_SHARD): 1},
                error=f"not a readable tar file: {e}",
                fingerprint=fingerprint,
            )
        # The first header is valid: from here on skip unreadable blocks and end-of-archive
        # markers one block at a time, to the next valid header.
        tar.ignore_zeros = True
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, ValueError) as e:
                error = f"unreadable tar data: {e}"
                break
            if info is None:
                break
            members.append(info)

        def key_of(i: int) -> str | None:
            parts = split_member_name(members[i].name)
            return parts[0] if parts else None

        lost: set[str] = set()  # samples with a member certainly in the damage
        suspects: set[str] = set()  # samples next to the damage: kept only if complete
        damaged_regions = 0  # each lost at least one member, of a known sample or not
        errors: list[str] = []
        for i in range(len(members) - 1):
            bad = _first_nonzero(f, _data_end(members[i]), members[i + 1].offset)
            if bad is not None:  # not only end-of-archive zeros between the two members
                errors.append(f"unreadable tar data at bytes {bad}-{members[i + 1].offset}")
                damaged_regions += 1
                suspects |= {k for k in (key_of(i), key_of(i + 1)) if k is not None}
        last = key_of(len(members) - 1) if members else None
        if members and members[-1].offset_data + members[-1].size > size:
            # Only the last member can be cut: its whole sample is lost.
            errors.append(f"truncated: member data runs past the end of the file ({size} bytes)")
            if last is not None:
                lost.add(last)
            else:
                damaged_regions += 1
        elif error is not None:  # a header tarfile could not skip: the rest is unread
            errors.append(error)
            damaged_regions += 1
            suspects |= {last} - {None}
        else:
            tail_start = _data_end(members[-1]) if members else 0
            bad = _first_nonzero(f, tail_start, size) if tail_start < size else None
            if bad is not None:
                # A cut header, or unreadable data after the last valid header.
                errors.append(f"truncated or unreadable tar data from byte {bad} of {size}")
                name, complete = _partial_header_name(f, bad, size)
                parts = split_member_name(name) if complete else None
                if last is not None and (
                    (parts is not None and parts[0] == last)
                    or (not complete and name.startswith(last + "."))
                ):
                    lost.add(last)  # the cut member belongs to the last sample: incomplete
                else:
                    damaged_regions += 1
                    if parts is None:  # an unknown member: perhaps the last sample's
                        suspects |= {last} - {None}
            elif size - tail_start < 2 * _BLOCK:
                # All data present but the end-of-archive marker is cut or missing: the file
                # may have been cut cleanly between two members of the last sample.
                errors.append(f"truncated: no end-of-archive marker ({size} bytes)")
                suspects |= {last} - {None}
        error = "; ".join(errors) or None

    member_kinds = [_member_kind(m.name) if m.isreg() else None for m in members]
    kinds: dict[str, set[str]] = {}
    for kind in filter(None, member_kinds):
        kinds.setdefault(kind[0], set()).add(kind[1])
    suspects -= lost
    usual = _usual_kinds(kinds, suspects | lost)
    incomplete = {k for k in suspects if k in kinds and usual is not None and not usual <= kinds[k]}
    # A damaged region whose neighbours are both complete lost a whole sample of its own (or an
    # ignored extra member): one unknown sample each.
    unknown_lost = max(0, damaged_regions - len(incomplete))
    lost |= incomplete

    groups: dict[str, dict[str, tuple[int, int]]] = {}
    dropped: Counter[str] = Counter()
    for m, kind in zip(members, member_kinds, strict=True):
        if kind is None or kind[0] in lost:
            continue
        key, ext = kind
        group = groups.setdefault(key, {})
        if ext in group:
            dropped[SkipReason.DUPLICATE_MEMBER] += 1
            continue
        group[ext] = (m.offset_data, m.size)

    skipped_counts: Counter[str] = Counter()
    skipped_counts[SkipReason.TRUNCATED_SHARD] += len(lost) + unknown_lost
    keys: list[str] = []
    rows: list[tuple[int, ...]] = []
    absent = (-1, 0)
    for key, group in groups.items():
        if "image" not in group:
            skipped_counts[SkipReason.MISSING_IMAGE] += 1
        elif CAPTION_EXTENSION not in group and META_EXTENSION not in group:
            skipped_counts[SkipReason.MISSING_CAPTION] += 1
        else:
            keys.append(key)
            rows.append(
                (
                    *group["image"],
                    *group.get(CAPTION_EXTENSION, absent),
                    *group.get(META_EXTENSION, absent),
                )
            )
    spans = np.array(rows, dtype=np.int64).reshape(len(rows), 6)
    return ShardIndex(
        path=path,
        size=size,
        mtime_ns=mtime_ns,
        keys=keys,
        spans=spans,
        skipped={str(k): v for k, v in sorted(skipped_counts.items()) if v},
        dropped={str(k): v for k, v in sorted(dropped.items()) if v},
        error=error,
        fingerprint=fingerprint,
    )


def default_cache_dir() -> str:
    """Where indexes of read-only shards go by default (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "refine_jax", "tar_index")


def sidecar_index_path(shard: str) -> str:
    """The index file next to a shard: ``00000.tar.index.json``."""
    return shard + INDEX_SUFFIX


def cache_index_path(shard: str, cache_dir: str) -> str:
    """The index file of a shard in a cache directory, named after a hash of the shard's path."""
    digest = hashlib.sha1(shard.encode("utf-8")).hexdigest()[:16]
    base = shard.rstrip("/").rsplit("/", 1)[-1]
    return os.path.join(cache_dir, f"{base}.{digest}{INDEX_SUFFIX}")


def _dir_is_writable(directory: str) -> bool:
    """False for a folder marked read-only (no write bit, even for root) or not writable."""
    if is_uri(directory):
        return True  # tried, and a failure falls back to the cache directory
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(
        directory, os.W_OK
    )


def _read_text(path: str) -> str | None:
    try:
        if is_uri(path):
            return epath.Path(path).read_text()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:  # present but unreadable: rebuilt, not trusted
        logging.warning("Ignoring unreadable index %s: %s", path, e)
        return None


def load_or_build_index(shard: str, cache_dir: str | None = None) -> tuple[ShardIndex, bool]:
    """Returns ``(index, built)``: a valid cached index, or a fresh scan (then cached).

    A cached index is valid when its version, shard size, mtime and fingerprint match. It is
    looked for next to the shard and in the cache directory. A new one is written to
    ``cache_dir`` when given, otherwise next to the shard when that folder is writable, otherwise
    to :func:`default_cache_dir`. A shard that cannot be read at all gets an index (not cached)
    with no sample, counted ``unreadable_shard``.
    """
    try:
        size, mtime_ns = _stat(shard)
        fingerprint = shard_fingerprint(shard, size)
    except OSError as e:
        return _unreadable_index(shard, e), True
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    sidecar = sidecar_index_path(shard)
    cached = cache_index_path(shard, cache)
    for candidate, check_path in ((sidecar, False), (cached, True)):
        text = _read_text(candidate)
        if text is None:
            continue
        try:
            index = ShardIndex.from_json(text)
        except IndexVersionError as e:
            logging.info("Rebuilding index %s (%s)", candidate, e)
            continue
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            logging.warning("Ignoring unreadable index %s: %s", candidate, e)
            continue
        same_shard = index.path == shard if check_path else True
        if same_shard and index.describes(size, mtime_ns, fingerprint):
            index.path = shard
            return index, False

    try:
        index = scan_tar(shard)
    except OSError as e:
        return _unreadable_index(shard, e), True
    text = index.to_json()
    targets = [cached] if cache_dir is not None else []
    if cache_dir is None:
        if _dir_is_writable(os.path.dirname(shard)):
            targets.append(sidecar)
        targets.append(cached)
    for target in targets:
        try:
            write_atomically(target, text)
            break
        except OSError as e:
            logging.warning("Cannot write index %s (%s); trying the next place.", target, e)
    else:
        logging.warning("Index of %s could not be cached; it will be rebuilt next time.", shard)
    return index, True


def _unreadable_index(shard: str, error: OSError) -> ShardIndex:
    """The index of a shard that cannot be opened or read: no sample, one unreadable_shard."""
    return ShardIndex(
        shard,
        -1,
        -1,
        [],
        np.zeros((0, 6), np.int64),
        skipped={str(SkipReason.UNREADABLE_SHARD): 1},
        error=f"cannot be read: {error}",
    )


def _header_matches(block: bytes, key: str, size: int) -> bool:
    """Whether a tar header block names a member of sample ``key`` holding ``size`` bytes, read
    from its raw fields (a few microseconds: it runs on every read). A name cut to the header's
    100 bytes, as GNU tar cuts long names, matches as far as it goes. False for headers that
    hold the name or size elsewhere (PAX records, sizes over 8 GiB): those are checked the slow
    way, see :meth:`TarShardSource._check_unusual_header`."""
    size_field = block[124:136]
    if len(block) != _BLOCK or size_field[0] & 0x80:  # cut block, or a base-256 size
        return False
    try:
        stored_size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: the folders of a long name are its prefix
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    want = key.encode("utf-8", "surrogateescape") + b"."
    return stored_size == size and bool(name) and (name.startswith(want) or want.startswith(name))


# ---------------------------------------------------------------------------------------------
# The source


class TarShardSource:
    """Grain ``RandomAccessDataSource`` over image–caption tar shards.

    ``source[i]`` returns a :class:`~refine_jax.data.records.Record`, or a skip marker
    ``{"key", "skip_reason"}`` for a sample whose content is bad (filter with
    :func:`~refine_jax.data.records.is_record`, count with ``SkipCounter.observe``). Samples with
    structural problems are not in the index at all; :meth:`structural_counts` reports them.

    Args:
      paths: a directory of ``*.tar`` shards, a glob, a shard path, or a list of these; local or
        any ``etils.epath`` location (``gs://...``).
      cache_dir: where to write member indexes; default: next to the shards when writable, else
        ``~/.cache/refine_jax/tar_index``.
      verify_images: fully decode each image when read, so corrupt ones become skip markers.
      max_json_bytes: KEY.json members larger than this are not read, counted `json_too_large`.
    """

    def __init__(
        self,
        paths: PathsArg,
        cache_dir: str | os.PathLike | None = None,
        verify_images: bool = True,
        max_json_bytes: int = MAX_JSON_BYTES,
    ) -> None:
        self.max_json_bytes = max_json_bytes
        self._shards = expand_paths(paths, ".tar")
        self._cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.verify_images = verify_images
        workers = min(16, len(self._shards))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                results = list(
                    pool.map(lambda s: load_or_build_index(s, self._cache_dir), self._shards)
                )
        else:
            results = [load_or_build_index(s, self._cache_dir) for s in self._shards]
        indexes = [r[0] for r in results]
        #: Shards whose index was (re)built by this open, rather than loaded from the cache.
        self.rebuilt_shards = [
            s for s, (_, built) in zip(self._shards, results, strict=True) if built
        ]
        self._structural = SkipCounter()
        for index in indexes:
            for reason, n in index.skipped.items():
                self._structural.skip(reason, n)
            for reason, n in index.dropped.items():
                self._structural.drop(reason, n)
            if index.error:
                self._structural.shard_errors[index.path] = index.error
                # On every open, not only when indexed: what is left out is never silent.
                logging.warning(
                    "Shard %s: %s; left out: %s", index.path, index.error, index.skipped
                )
        #: (size, mtime_ns, fingerprint) of each shard as indexed, to tell a rewritten shard.
        self._indexed = [(i.size, i.mtime_ns, i.fingerprint) for i in indexes]
        #: CRC-32 of headers that do not name their member plainly, by (shard, byte), accepted
        #: after a check that the shard is unchanged.
        self._accepted_headers: dict[tuple[int, int], int] = {}
        self._keys = [k for index in indexes for k in index.keys]
        self._spans = (
            np.concatenate([index.spans for index in indexes])
            if indexes
            else np.zeros((0, 6), np.int64)
        )
        self._starts = [0]
        for index in indexes:
            self._starts.append(self._starts[-1] + len(index.keys))
        if not self._keys:
            raise NoSamplesError(
                f"no readable image-caption samples in {paths!r} "
                f"({len(self._shards)} shard(s): {', '.join(self._shards[:5])}"
                f"{' ...' if len(self._shards) > 5 else ''}); "
                f"problems: {self._structural.to_json()}"
            )
        self._init_handles()

    # -- per-process file handles ---------------------------------------------------------------

    def _init_handles(self) -> None:
        self._handles: dict[int, Any] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_handles", "_locks", "_lock", "_pid"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def _handle(self, shard: int) -> tuple[Any, threading.Lock]:
        if self._pid != os.getpid():  # forked: never share the parent's descriptors
            for inherited in self._handles.values():
                if isinstance(inherited, int):
                    try:
                        os.close(inherited)  # the child's copy only; the parent's stays open
                    except OSError:
                        pass
            self._init_handles()
        handle = self._handles.get(shard)
        if handle is None:
            with self._lock:
                handle = self._handles.get(shard)
                if handle is None:
                    path = self._shards[shard]
                    if is_uri(path):
                        handle = epath.Path(path).open("rb")
                    else:
                        handle = os.open(path, os.O_RDONLY)
                    self._locks[shard] = threading.Lock()
                    self._handles[shard] = handle
        return handle, self._locks[shard]

    def _read_range(self, shard: int, offset: int, size: int) -> bytes:
        handle, lock = self._handle(shard)
        if isinstance(handle, int):
            data = os.pread(handle, size, offset)
            while len(data) < size:
                more = os.pread(handle, size - len(data), offset + len(data))
                if not more:
                    break
                data += more
        else:
            with lock:
                handle.seek(offset)
                data = handle.read(size)
        if len(data) != size:
            raise self._changed(shard, f"a short read at byte {offset}")
        return data

    def _changed(self, shard: int, evidence: str) -> ShardChangedError:
        path = self._shards[shard]
        return ShardChangedError(
            f"shard {path} changed since it was indexed ({evidence}): it was rewritten while "
            "this job read it. Re-run once it is complete: a changed shard is indexed again"
        )

    def _read_member(self, shard: int, key: str, offset: int, size: int, length: int) -> bytes:
        """``length`` bytes from the data of member ``offset``/``size`` of sample ``key``, read
        with the member's tar header; raises ShardChangedError when the header is no longer
        that member's and the shard's size, mtime or fingerprint has changed."""
        data = self._read_range(shard, offset - _BLOCK, length + _BLOCK)
        if not _header_matches(data[:_BLOCK], key, size):
            self._check_unusual_header(shard, key, offset - _BLOCK, data[:_BLOCK])
        return data[_BLOCK:]

    def _check_unusual_header(self, shard: int, key: str, at: int, header: bytes) -> None:
        """A header that does not name its member plainly (a PAX-extended name, ...) is accepted
        once the shard is found unchanged, and from then on while its bytes stay the same (so
        the shard is hashed again only when they change); else ShardChangedError."""
        crc = zlib.crc32(header)
        if self._accepted_headers.get((shard, at)) == crc:
            return
        if self._fingerprint_changed(shard):
            raise self._changed(shard, f"the tar header at byte {at} is not {key}'s")
        self._accepted_headers[(shard, at)] = crc

    def _fingerprint_changed(self, shard: int) -> bool:
        """Whether the shard's size, mtime or fingerprint differs from when it was indexed."""
        path = self._shards[shard]
        try:
            size, mtime_ns = _stat(path)
            now = (size, mtime_ns, shard_fingerprint(path, size))
        except OSError:
            return True
        return now != self._indexed[shard]

    def _read_members(
        self, shard: int, key: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        """Reads several members of sample ``key``, in one read when they lie close together;
        the first member's header is checked (see :meth:`_read_member`)."""
        present = [(o, n) for o, n in ranges if o >= 0]
        if not present:
            return [None] * len(ranges)
        lo, first_size = min(present)
        hi = max(o + n for o, n in present)
        if hi - lo <= sum(n for _, n in present) + _MERGE_GAP:
            blob = self._read_member(shard, key, lo, first_size, hi - lo)
            return [blob[o - lo : o - lo + n] if o >= 0 else None for o, n in ranges]
        return [self._read_member(shard, key, o, n, n) if o >= 0 else None for o, n in ranges]

    def close(self) -> None:
        """Closes this process's open shard files (they reopen lazily on the next read)."""
        handles, self._handles = getattr(self, "_handles", {}), {}
        if getattr(self, "_pid", None) != os.getpid():
            return
        for handle in handles.values():
            try:
                os.close(handle) if isinstance(handle, int) else handle.close()
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finaliser
            pass

    def __enter__(self) -> TarShardSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- random access ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def _locate(self, index: SupportsIndex) -> tuple[int, int]:
        i = checked_index(index, len(self._keys))
        return bisect.bisect_right(self._starts, i) - 1, i

    def key(self, index: SupportsIndex) -> str:
        """The KEY of sample ``index``."""
        return self._keys[self._locate(index)[1]]

    def read(self, index: SupportsIndex, verify_image: bool | None = None) -> Record | Skipped:
        """The record of sample ``index``, or a skip marker naming what is wrong with it."""
        shard, i = self._locate(index)
        key = self._keys[i]
        io_, isz, to, ts, jo, js = (int(v) for v in self._spans[i])
        oversized = js > self.max_json_bytes
        if oversized:
            jo, js = -1, 0  # not read
        image, txt, meta = self._read_members(shard, key, [(io_, isz), (to, ts), (jo, js)])
        captions, dropped, reason = self._with_oversized_json(
            captions_from_members(txt, meta), oversized
        )
        if reason is not None:
            return skipped(key, reason)
        assert image is not None
        verify = self.verify_images if verify_image is None else verify_image
        if not image:
            return skipped(key, SkipReason.CORRUPT_IMAGE)
        if verify:
            try:
                decode_image(image)
            except CorruptImageError:
                return skipped(key, SkipReason.CORRUPT_IMAGE)
        record: Record = {"key": key, "image_bytes": image, "captions": captions}
        if dropped:
            record["dropped"] = [str(r) for r in dropped]
        teachers = teacher_captions(meta)
        if teachers:
            record[TEACHER_CAPTIONS_FIELD] = teachers
        return record

    def __getitem__(self, index: SupportsIndex) -> Record | Skipped:
        return self.read(index)

    @staticmethod
    def _with_oversized_json(gathered: tuple, oversized: bool) -> tuple:
        """`captions_from_members`'s result, with a KEY.json left unread for its size counted:
        as the skip reason when no caption remains, else as a dropped part."""
        captions, dropped, reason = gathered
        if not oversized:
            return gathered
        if reason is not None:
            return captions, dropped, SkipReason.JSON_TOO_LARGE
        return captions, [*dropped, SkipReason.JSON_TOO_LARGE], None

    def read_captions(self, index: SupportsIndex) -> tuple[list[str], list[str], str | None]:
        """Captions of sample ``index``, image not read: ``(captions, dropped, reason)``."""
        shard, i = self._locate(index)
        _, _, to, ts, jo, js = (int(v) for v in self._spans[i])
        oversized = js > self.max_json_bytes
        if oversized:
            jo, js = -1, 0  # not read
        txt, meta = self._read_members(shard, self._keys[i], [(to, ts), (jo, js)])
        captions, dropped, reason = self._with_oversized_json(
            captions_from_members(txt, meta), oversized
        )
        return captions, [str(r) for r in dropped], (str(reason) if reason else None)

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def shard_paths(self) -> list[str]:
        """The shard files of this source, in order."""
        return list(self._shards)

    def structural_counts(self) -> SkipCounter:
        """Samples (and parts) left out while indexing, with shard-level errors. A fresh copy."""
        return SkipCounter().merge(self._structural)

    def __repr__(self) -> str:
        first = self._shards[0] if self._shards else ""
        return f"TarShardSource({len(self._shards)} shards from {first!r}, {len(self)} samples)"


# ---------------------------------------------------------------------------------------------
# Helpers


def iter_records(source: CaptionSource, counter: SkipCounter | None = None) -> Iterator[Record]:
    """Yields every good record of a source in order, counting everything into ``counter``.

    The counter first receives the source's structural counts (when it has any), then one count
    per element, so after a full pass it holds the exact totals.
    """
    counter = counter if counter is not None else SkipCounter()
    counter.merge(structural_counts_of(source))
    for i in range(len(source)):
        element = source[i]
        if counter.observe(element):
            yield element


def iter_captions(source: CaptionSource, counter: SkipCounter | None = None) -> Iterator[str]:
    """Yields every caption of every sample, e.g. to train the tokenizer.

    On a :class:`TarShardSource` only caption members are read (images are neither read nor
    checked, so ``corrupt_image`` is not counted by this pass).
    """
    counter = counter if counter is not None else SkipCounter()
    counter.merge(structural_counts_of(source))
    if isinstance(source, ReadsCaptions):
        for i in range(len(source)):
            captions, dropped, reason = source.read_captions(i)
            if reason is not None:
                counter.skip(reason)
                continue
            counter.good += 1
            for r in dropped:
                counter.drop(r)
            yield from captions
    else:
        for i in range(len(source)):
            element = source[i]
            if counter.observe(element):
                yield from element["captions"]


def load_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """A split's COCO-style references: ``{image id as str: [captions in file order]}``.

    ``path`` is the ``references.json`` file, the split folder holding it beside the shards, or a
    shard file / glob in that folder. Images listed without annotations map to ``[]``.
    """
    s = os.fspath(path)
    if s.endswith(".json"):
        ref_path = s
    elif is_glob(s) or not epath.Path(s).is_dir():
        ref_path = os.path.join(os.path.dirname(s), "references.json")
    else:
        ref_path = os.path.join(s, "references.json")
    p = epath.Path(ref_path)
    if not p.exists():
        raise FileNotFoundError(f"references file does not exist: {ref_path!r}")
    try:
        data = json.loads(p.read_text())
        refs: dict[str, list[str]] = {}
        for image in data.get("images", []):
            refs.setdefault(str(image["id"]), [])
        for ann in data.get("annotations", []):
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"cannot read the references file {ref_path}: {type(error).__name__}: {error} "
            "(expected COCO caption JSON: images [{id}], annotations [{image_id, caption}])"
        ) from error
    return refs
