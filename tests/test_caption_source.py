"""Each source declares what it can do beyond random access through the capability protocols of
data/caption_source.py, and the readers use exactly those capabilities."""

from __future__ import annotations

import pytest

from refine_jax.data.array_records import ArrayRecordCaptionSource
from refine_jax.data.caption_source import (
    HasKeys,
    HasLongestCaption,
    HasStructuralCounts,
    HasTrainingDataset,
    ReadsCaptions,
    structural_counts_of,
)
from refine_jax.data.mixture import MixtureSource
from refine_jax.data.pipeline import structural_skip_counts
from refine_jax.data.records import SkipCounter
from refine_jax.data.shapes import ShapesSource
from refine_jax.data.shards import TarShardSource, iter_records


@pytest.mark.parametrize(
    "source_class,capabilities",
    [
        (TarShardSource, {HasStructuralCounts, ReadsCaptions, HasKeys}),
        (ArrayRecordCaptionSource, {HasStructuralCounts}),
        (MixtureSource, {HasStructuralCounts, ReadsCaptions, HasTrainingDataset}),
        (ShapesSource, {HasLongestCaption, ReadsCaptions}),
    ],
)
def test_sources_declare_their_capabilities(source_class, capabilities):
    every = {HasKeys, HasLongestCaption, HasStructuralCounts, HasTrainingDataset, ReadsCaptions}
    declared = {protocol for protocol in every if issubclass(source_class, protocol)}
    assert declared == capabilities


def test_shapes_captions_read_without_drawing_are_the_generated_ones():
    source = ShapesSource("train", 50, seed=3)
    for index in range(50):
        assert source.read_captions(index) == (source[index]["captions"], [], None)
    with pytest.raises(IndexError, match="out of range"):
        source.read_captions(50)


class CountsIndexingSkips:
    """Two samples, of which the first is a skip marker; one more left out while indexing."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        if index == 0:
            return {"skip_reason": "corrupt_image"}
        return {"key": "b", "image_bytes": b"", "captions": ["a cat"]}

    def structural_counts(self) -> SkipCounter:
        counter = SkipCounter()
        counter.skip("unreadable_shard")
        return counter


def test_indexing_skips_are_reported_once_and_only_by_sources_that_count_them():
    source = CountsIndexingSkips()
    assert structural_skip_counts(source) == {"unreadable_shard": 1}
    counter = SkipCounter()
    assert [r["key"] for r in iter_records(source, counter)] == ["b"]
    assert dict(counter.skipped) == {"unreadable_shard": 1, "corrupt_image": 1}
    assert counter.good == 1
    assert structural_counts_of(ShapesSource("train", 3)) == SkipCounter()
