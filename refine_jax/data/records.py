"""The image–caption record format, caption cleaning, image decoding and skip counting.

Every data source of the package yields the same plain-dict record::

    {"key": str, "image_bytes": bytes, "captions": list[str]}

``captions`` holds every reference caption of the sample (at least one), already cleaned by
:func:`clean_caption`. The image stays encoded; :func:`decode_image` turns it into pixels.

Sources never crash on bad data and never drop it silently. A sample that cannot be used is
returned as a *skip marker* ``{"key": str, "skip_reason": str}`` (see :class:`SkipReason`) so a
random-access source keeps a fixed length, and a good sample from which something was dropped (say
one empty caption out of five) carries ``"dropped": [reason, ...]``. :class:`SkipCounter` tallies
both kinds, exactly, and can be merged across workers and written to JSON for the trainer's log.
"""

from __future__ import annotations

import enum
import io
import json
import operator
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, SupportsIndex, TypedDict

import numpy as np
from PIL import Image, ImageOps


class Record(TypedDict):
    """One usable image–caption sample."""

    key: str
    image_bytes: bytes
    captions: list[str]
    # Reasons of parts dropped from this otherwise good sample (absent when nothing was dropped).
    dropped: NotRequired[list[str]]


class Skipped(TypedDict):
    """Marker returned in place of a sample that cannot be used."""

    key: str
    skip_reason: str


class SkipReason(enum.StrEnum):
    """Why a sample (or part of one) was skipped. Values are the names used in logs and JSON."""

    CORRUPT_IMAGE = "corrupt_image"  # image bytes Pillow cannot fully decode
    MISSING_IMAGE = "missing_image"  # captions but no KEY.jpg/.jpeg/.png/.webp member
    MISSING_CAPTION = "missing_caption"  # no KEY.txt and no usable KEY.json captions
    EMPTY_CAPTION = "empty_caption"  # zero-length caption
    WHITESPACE_CAPTION = "whitespace_caption"  # caption of whitespace only
    NON_UTF8_CAPTION = "non_utf8_caption"  # caption bytes that are not valid UTF-8
    BAD_JSON = "bad_json"  # KEY.json that is not valid JSON or has a malformed `captions`
    JSON_TOO_LARGE = "json_too_large"  # KEY.json over the size limit: not read at all
    TRUNCATED_SHARD = "truncated_shard"  # sample cut off (or unreadable) at a shard's end
    UNREADABLE_SHARD = "unreadable_shard"  # a whole shard that cannot be read as a tar (one)
    DUPLICATE_MEMBER = "duplicate_member"  # second member with the same KEY.ext (ignored)
    CORRUPT_RECORD = "corrupt_record"  # serialised record that does not decode
    UNUSABLE_NAME = "unusable_name"  # a converter's image name outside its folder or without a KEY


CAPTION_REASONS = (
    SkipReason.EMPTY_CAPTION,
    SkipReason.WHITESPACE_CAPTION,
    SkipReason.NON_UTF8_CAPTION,
)


class CorruptImageError(ValueError):
    """Raised by :func:`decode_image` when the bytes are not a fully decodable image."""


# ---------------------------------------------------------------------------------------------
# Captions


def check_caption(raw: bytes | str) -> tuple[str | None, SkipReason | None]:
    """Cleans one caption; returns ``(caption, None)`` or ``(None, reason)`` when rejected.

    Cleaning only strips surrounding whitespace: inner spacing is kept exactly, so captions match
    their reference files. Over-long captions are left to the tokenising transform.
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw)
        if not raw:
            return None, SkipReason.EMPTY_CAPTION
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, SkipReason.NON_UTF8_CAPTION
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the text
    elif isinstance(raw, str):
        if not raw:
            return None, SkipReason.EMPTY_CAPTION
        try:  # lone surrogates (e.g. from JSON "\ud800") cannot be encoded: not valid text
            raw.encode("utf-8")
        except UnicodeEncodeError:
            return None, SkipReason.NON_UTF8_CAPTION
        text = raw
    else:
        raise TypeError(f"caption must be bytes or str, got {type(raw).__name__}")
    text = text.strip()
    if not text:
        return None, SkipReason.WHITESPACE_CAPTION
    return text, None


def clean_caption(raw: bytes | str) -> str | None:
    """Returns the cleaned caption, or None when it is rejected (see :func:`check_caption`)."""
    return check_caption(raw)[0]


def captions_from_members(
    txt: bytes | None, json_bytes: bytes | None
) -> tuple[list[str], list[SkipReason], SkipReason | None]:
    """Gathers a sample's captions from its ``.txt`` and ``.json`` members.

    The json ``captions`` list is used when present and it yields at least one good caption;
    otherwise the ``.txt`` caption. Returns ``(captions, dropped, skip_reason)``: ``dropped`` lists
    the reasons of rejected parts of a sample that is still usable; when no caption survives,
    ``captions`` is empty and ``skip_reason`` says why (the first problem met).
    """
    problems: list[SkipReason] = []
    captions: list[str] = []
    if json_bytes is not None:
        json_captions = _json_captions(json_bytes)
        if json_captions is None:
            problems.append(SkipReason.BAD_JSON)
        else:
            for raw in json_captions:
                text, reason = check_caption(raw)
                if reason is None:
                    captions.append(text)
                else:
                    problems.append(reason)
    if not captions and txt is not None:
        text, reason = check_caption(txt)
        if reason is None:
            captions.append(text)
        else:
            problems.append(reason)
    if not captions:
        return [], [], (problems[0] if problems else SkipReason.MISSING_CAPTION)
    return captions, problems, None


# The KEY.json field of captions a teacher model wrote (see refine_jax.caption_shards); training
# draws from it at config.data.teacher_caption_rate.
TEACHER_CAPTIONS_FIELD = "teacher_captions"


def teacher_captions(json_bytes: bytes | None) -> list[str]:
    """The good captions of a KEY.json member's teacher field ([] when absent or malformed)."""
    if json_bytes is None:
        return []
    found = _json_captions(json_bytes, TEACHER_CAPTIONS_FIELD) or []
    return [text for text, reason in map(check_caption, found) if reason is None]


def _json_captions(json_bytes: bytes, field: str = "captions") -> list[str] | None:
    """The ``field`` list of a KEY.json member: [] when absent, None when malformed."""
    try:
        meta = json.loads(json_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    captions = meta.get(field)
    if captions is None:
        return []
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    return captions


# ---------------------------------------------------------------------------------------------
# Images

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


def decode_image(image_bytes: bytes) -> np.ndarray:
    """Decodes JPEG/PNG/WebP bytes to a uint8 HxWx3 RGB array.

    The image is fully decoded (``load``), so truncated or corrupt data raises
    :class:`CorruptImageError` here rather than producing grey pixels later. Grayscale, palette,
    CMYK and 16-bit images are converted; transparency is composited over white; the EXIF
    orientation is applied.
    """
    try:
        with Image.open(io.BytesIO(image_bytes), formats=IMAGE_FORMATS) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb_array(im)
    except CorruptImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...).
        raise CorruptImageError(f"cannot decode image ({len(image_bytes)} bytes): {e}") from e


def rgb_image(image: np.ndarray) -> np.ndarray:
    """A decoded uint8 image a source gives (HxW grey, HxWx1, HxWx3 or HxWx4 with alpha) as
    uint8 HxWx3, as :func:`decode_image` would give it; CorruptImageError for anything else."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        return image
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 4))
    ):
        raise CorruptImageError(
            f"an image array must be uint8 HxW, HxWx1, HxWx3 or HxWx4, got {image.dtype} "
            f"{image.shape}"
        )
    return _to_rgb_array(
        Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    )


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Converts a loaded Pillow image of any mode to a contiguous uint8 HxWx3 array."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode != "F":  # 16-bit samples (PNG), whatever this image's own range
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise CorruptImageError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------------
# Skip markers and counting


def checked_index(index: SupportsIndex, length: int) -> int:
    """A random-access index as a non-negative int (negative counts from the end), or IndexError."""
    i = operator.index(index)
    j = i + length if i < 0 else i
    if not 0 <= j < length:
        raise IndexError(f"index {i} out of range [0, {length})")
    return j


def skipped(key: str, reason: str) -> Skipped:
    """Builds the marker a source returns for an unusable sample."""
    return {"key": key, "skip_reason": str(reason)}


def skip_reason(element: Mapping[str, Any]) -> str | None:
    """The skip reason of a source element, or None for a good record."""
    return element.get("skip_reason")


def is_record(element: Mapping[str, Any]) -> bool:
    """True for a good record (use it to filter skip markers out of a pipeline)."""
    return "skip_reason" not in element


@dataclass
class SkipCounter:
    """Exact counts of good samples and of skipped samples/parts per reason.

    ``skipped`` counts whole samples that were not delivered; ``dropped`` counts parts removed
    from samples that were delivered (a bad caption among several, a duplicate member);
    ``shard_errors`` maps a shard path to a description of a shard-level problem (truncation,
    unreadable file). Counters add up with :meth:`merge` (e.g. across grain workers) and round-trip
    through :meth:`to_dict` / :meth:`from_dict` (JSON-safe).
    """

    good: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    shard_errors: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        """Counts ``n`` skipped samples for ``reason``."""
        if n:
            self.skipped[str(reason)] += n

    def drop(self, reason: str, n: int = 1) -> None:
        """Counts ``n`` parts dropped from delivered samples for ``reason``."""
        if n:
            self.dropped[str(reason)] += n

    def observe(self, element: Mapping[str, Any]) -> bool:
        """Counts one source element; returns True when it is a good record."""
        reason = skip_reason(element)
        if reason is not None:
            self.skip(reason)
            return False
        self.good += 1
        for r in element.get("dropped", ()):
            self.drop(r)
        return True

    def observe_all(self, elements: Iterable[Mapping[str, Any]]) -> SkipCounter:
        """Counts every element of an iterable; returns self."""
        for element in elements:
            self.observe(element)
        return self

    def merge(self, other: SkipCounter) -> SkipCounter:
        """Adds ``other``'s counts into this counter; returns self."""
        self.good += other.good
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        self.shard_errors.update(other.shard_errors)
        return self

    def __add__(self, other: SkipCounter) -> SkipCounter:
        return SkipCounter().merge(self).merge(other)

    @property
    def total_skipped(self) -> int:
        """Number of samples not delivered, over all reasons."""
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (reasons sorted, zero counts left out)."""
        return {
            "good": self.good,
            "skipped": {k: v for k, v in sorted(self.skipped.items()) if v},
            "dropped": {k: v for k, v in sorted(self.dropped.items()) if v},
            "shard_errors": dict(sorted(self.shard_errors.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SkipCounter:
        """Inverse of :meth:`to_dict`."""
        return cls(
            good=int(d.get("good", 0)),
            skipped=Counter({str(k): int(v) for k, v in d.get("skipped", {}).items()}),
            dropped=Counter({str(k): int(v) for k, v in d.get("dropped", {}).items()}),
            shard_errors={str(k): str(v) for k, v in d.get("shard_errors", {}).items()},
        )

    def to_json(self) -> str:
        """The counts as a compact JSON string for logs."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        return self.to_json()
