"""What every caption source offers, and reading captions through it without reading images.

A source is random access (`CaptionSource`: `len`, `[i]` -> a record or a skip marker). What
some sources can do besides is a capability of its own (`ReadsCaptions`, `HasKeys`,
`HasLongestCaption`, `HasStructuralCounts`, `HasTrainingDataset`), checked with `isinstance`,
not by probing attribute names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, SupportsIndex, runtime_checkable

from refine_jax.data.records import SkipCounter

if TYPE_CHECKING:
    import grain


@runtime_checkable
class CaptionSource(Protocol):
    """Random access to samples: a record dict (image_bytes, captions, key, ...) or a skip
    marker ({"skip_reason": ...}) per index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: SupportsIndex) -> dict[str, Any]: ...


@runtime_checkable
class ReadsCaptions(Protocol):
    """A source that reads one sample's captions without its image."""

    def read_captions(self, index: SupportsIndex) -> tuple[list[str], list[str], str | None]: ...


@runtime_checkable
class ChoosesCaptionIndices(Protocol):
    """A source that picks which samples a tokenizer should see (a mixture: by weight)."""

    def caption_indices(self, limit: int) -> Sequence[int]: ...


@runtime_checkable
class HasKeys(Protocol):
    """A source that names a sample without reading it."""

    def key(self, index: SupportsIndex) -> str: ...


@runtime_checkable
class HasLongestCaption(Protocol):
    """A closed source that knows its longest caption (the canvas must fit its target)."""

    def longest_caption(self) -> str: ...


@runtime_checkable
class HasStructuralCounts(Protocol):
    """A source that leaves samples out while indexing (an unreadable shard, a sample missing a
    member) and counts them by reason; they never reach a batch as skip markers."""

    def structural_counts(self) -> SkipCounter: ...


@runtime_checkable
class HasTrainingDataset(Protocol):
    """A source that builds its own endless shuffled training stream (a mixture: by weight)."""

    def training_dataset(self, seed: int) -> grain.MapDataset: ...


def structural_counts_of(source: CaptionSource) -> SkipCounter:
    """What `source` left out while indexing, by reason; empty for a source that counts none."""
    if isinstance(source, HasStructuralCounts):
        return source.structural_counts()
    return SkipCounter()


class FirstN:
    """The first ``n`` elements of a source (e.g. a quicker held-out set)."""

    def __init__(self, source: CaptionSource, n: int) -> None:
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: SupportsIndex) -> Any:
        i = int(index)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range [0, {self.n})")
        return self.source[i]

    def __getattr__(self, name: str) -> Any:  # structural_counts, key, ...
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"FirstN({self.source!r}, {self.n})"


def sample_captions(source: CaptionSource, index: int) -> tuple[list[str], list[str], str | None]:
    """``(captions, dropped, skip reason)`` of one sample, without reading its image when the
    source can (``read_captions``); a skip marker gives no captions and its reason."""
    if isinstance(source, ReadsCaptions):
        return source.read_captions(index)
    element = source[index]
    if "skip_reason" in element:
        return [], [], str(element["skip_reason"])
    return list(element["captions"]), [str(r) for r in element.get("dropped", ())], None


def training_captions(source: CaptionSource, limit: int = 20_000) -> list[str]:
    """Every reference caption of up to ``limit`` training samples, to fit a tokenizer and the
    salience statistics: all samples when there are few, else spread evenly over the source (a
    mixture: over its components by weight). Images are not read where the source allows."""
    if isinstance(source, ChoosesCaptionIndices):
        indices = source.caption_indices(limit)
    elif len(source) <= limit:
        indices = range(len(source))
    else:
        indices = [len(source) * j // limit for j in range(limit)]
    captions: list[str] = []
    for i in indices:
        captions.extend(sample_captions(source, i)[0])
    return captions


__all__ = [
    "CaptionSource",
    "ChoosesCaptionIndices",
    "FirstN",
    "HasKeys",
    "HasLongestCaption",
    "HasStructuralCounts",
    "HasTrainingDataset",
    "ReadsCaptions",
    "sample_captions",
    "structural_counts_of",
    "training_captions",
]
