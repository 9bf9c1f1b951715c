"""Weighted mixtures of caption sources: deterministic, checkpointable, globally shuffled.

A mixture is named sources with weights. Training draws from them through grain's
``MapDataset.mix``: each component is shuffled on its own (reshuffled every epoch, so a small
source repeats while a large one is still in its first epoch), and the components are
interleaved in a fixed pattern whose counts follow the weights in every window, so a batch's
composition is close to the weights and the stream is a pure function of (seed, position):
the same on every process, and restored exactly from the iterator's state.

Config (see ``configs/laion_coco_mix.py``)::

    config.data.name = "mixture"
    config.data.mixture = (("coco", 0.6, "shards", "coco"),       # (name, weight, kind, path)
                           ("laion", 0.35, "shards", "laion"),
                           ("labels", 0.05, "labels", "imagenet"))
    config.data.mixture_eval = "coco"   # whose held-out split evaluates

Every example carries ``source`` (the component's position in that tuple), so the trainer can
report what it was fed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex

import grain
import numpy as np

from refine_jax.data.caption_source import sample_captions, structural_counts_of
from refine_jax.data.pipeline import epoch_dataset
from refine_jax.data.records import SkipCounter


@dataclass(frozen=True)
class Component:
    """One source of a mixture and its (normalised) weight."""

    name: str
    source: Any
    weight: float


class MixtureSource:
    """Named sources with weights (normalised to sum 1).

    For training, :meth:`training_dataset` is the endless weighted stream (what
    ``pipeline.train_batches`` uses). As a plain random-access source it is the concatenation of
    its components (``len`` is their total), which is what caption sampling and counting need.
    """

    def __init__(self, components: Sequence[tuple[str, Any, float]]) -> None:
        if not components:
            raise ValueError("a mixture needs at least one source")
        names = [name for name, _, _ in components]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture source names must be unique, got {names}")
        weights = [float(w) for _, _, w in components]
        for name, w in zip(names, weights, strict=True):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"mixture weight of {name!r} must be a positive number, got {w}")
        total = sum(weights)
        self.components = [
            Component(name, source, w / total)
            for (name, source, _), w in zip(components, weights, strict=True)
        ]
        for c in self.components:
            if len(c.source) == 0:
                raise ValueError(f"mixture source {c.name!r} ({c.source!r}) is empty")
        self._starts = np.cumsum([0] + [len(c.source) for c in self.components])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def weights(self) -> np.ndarray:
        return np.asarray([c.weight for c in self.components])

    def training_dataset(self, seed: int) -> grain.MapDataset:
        """Endless elements tagged with their component: each component shuffled with its own
        seed, interleaved by weight."""
        parts = [
            epoch_dataset(c.source, seed * 1009 + i + 1, source_id=i)
            for i, c in enumerate(self.components)
        ]
        if len(parts) == 1:
            return parts[0]
        return grain.MapDataset.mix(parts, list(self.weights)).seed(seed)

    # -- random access over the concatenation -------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: SupportsIndex) -> tuple[int, int]:
        """(component, index in it) of concatenated index ``index``."""
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range [0, {len(self)})")
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        return c, i - int(self._starts[c])

    def __getitem__(self, index: SupportsIndex) -> dict:
        c, i = self.locate(index)
        return self.components[c].source[i]

    def read_captions(self, index: SupportsIndex) -> tuple[list[str], list[str], str | None]:
        """Captions of one sample, without reading the image where the component can."""
        c, i = self.locate(index)
        return sample_captions(self.components[c].source, i)

    def caption_indices(self, limit: int) -> list[int]:
        """About ``limit`` concatenated indices spread over the components by weight (each
        component evenly strided), so a tokenizer sees the mixture's text in its proportions."""
        out: list[int] = []
        for c, component in enumerate(self.components):
            n = len(component.source)
            take = min(n, max(1, round(limit * component.weight)))
            out.extend(int(self._starts[c]) + j for j in _strided(n, take))
        return out

    def structural_counts(self) -> SkipCounter:
        """The components' indexing-time counts, added up."""
        total = SkipCounter()
        for c in self.components:
            total.merge(structural_counts_of(c.source))
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.name}={c.weight:.3g}: {c.source!r}" for c in self.components)
        return f"MixtureSource({parts})"


def _strided(n: int, take: int) -> list[int]:
    """``take`` indices spread evenly over [0, n)."""
    if take >= n:
        return list(range(n))
    return [int(j) for j in np.linspace(0, n, take, endpoint=False).astype(np.int64)]
