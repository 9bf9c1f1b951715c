"""Mixtures of sources: frequencies match the weights, deterministic and resumable, sliced over
processes like any source, and the laion_coco_mix config builds its three-way mixture."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import load_config
from test_pipeline import concat, jpeg, take, write_good_split

from refine_jax.data import make_sources, parse_mixture, training_captions
from refine_jax.data.mixture import MixtureSource
from refine_jax.data.pipeline import CaptionFeatures, train_batches
from refine_jax.evaluation.matching import retrieval_recall
from refine_jax.model_kinds import build_model, model_kind
from refine_jax.tokenizer import train_tokenizer

WEIGHTS = {"coco": 0.6, "laion": 0.35, "labels": 0.05}


class MemorySource:
    """``size`` records with a 4x4 image (no decoding) and a caption naming the source."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        image = np.full((4, 4, 3), index % 256, np.uint8)
        return {
            "key": f"{self.name}{index}",
            "image": image,
            "captions": [f"a {self.name} photo number {index % 7}"],
        }


@pytest.fixture(scope="module")
def features() -> CaptionFeatures:
    captions = [f"a {n} photo number {i}" for n in WEIGHTS for i in range(7)] * 4
    return CaptionFeatures(train_tokenizer(captions, 300), 2, 8, 4)


def memory_mixture() -> MixtureSource:
    sizes = {"coco": 50, "laion": 31, "labels": 7}
    return MixtureSource([(n, MemorySource(n, sizes[n]), w) for n, w in WEIGHTS.items()])


def test_source_frequencies_match_the_weights(features):
    mixture = memory_mixture()
    batches = concat(take(train_batches(mixture, features, 100, seed=0), 30))
    seen = np.arange(1, len(batches["source"]) + 1)  # 3,000 examples
    for c, (name, weight) in enumerate(WEIGHTS.items()):
        # The mixture interleaves by weight (no sampling): after every m examples, each
        # component has given its m * weight examples to within one (sampling independently by
        # weight would stray by tens).
        counts = np.cumsum(batches["source"] == c)
        assert np.max(np.abs(counts - seen * weight)) < 1, name
        assert counts[-1] == round(len(seen) * weight), name
        # Every element of a component comes from that component, in its own shuffled epochs.
        rows = batches["source"] == c
        assert batches["index"][rows].max() < len(mixture.components[c].source)
    # The smallest component cycles through all of its 7 elements, each epoch reshuffled.
    labels = batches["index"][batches["source"] == 2]
    assert sorted(labels[:7].tolist()) == list(range(7))
    assert batches["mask"].all()


def test_mixture_is_deterministic_resumable_and_sliced_over_processes(features):
    mixture = memory_mixture()
    single = take(train_batches(mixture, features, 8, seed=4), 10)
    again = take(train_batches(mixture, features, 8, seed=4), 10)
    other = take(train_batches(mixture, features, 8, seed=5), 10)
    for key in single[0]:
        np.testing.assert_array_equal(concat(single)[key], concat(again)[key], err_msg=key)
    assert not np.array_equal(concat(single)["index"], concat(other)["index"])
    # Resume from a saved state.
    iterator = train_batches(mixture, features, 8, seed=4)
    take(iterator, 6)
    state = iterator.get_state()
    fresh = train_batches(memory_mixture(), features, 8, seed=4)
    fresh.set_state(state)
    for expected, got in zip(single[6:], take(fresh, 4), strict=True):
        np.testing.assert_array_equal(expected["index"], got["index"])
        np.testing.assert_array_equal(expected["source"], got["source"])
    # Two processes: their halves assemble the global batch.
    halves = [take(train_batches(mixture, features, 8, 4, 1, p, 2), 10) for p in range(2)]
    for step in range(10):
        for key in ("index", "source", "image"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), single[step][key]
            )


def test_training_captions_follow_the_weights():
    captions = training_captions(memory_mixture(), limit=40)
    by_source = {n: sum(n in c for c in captions) for n in WEIGHTS}
    assert by_source == {"coco": 24, "laion": 14, "labels": 2}


def test_mixture_config_errors():
    with pytest.raises(ValueError, match="mixture is empty"):
        parse_mixture(())
    with pytest.raises(ValueError, match=r"must be \(name, weight, kind, path\)"):
        parse_mixture((("coco", 0.5, "coco"),))
    with pytest.raises(ValueError, match="kind 'webdataset' is not one of"):
        parse_mixture((("coco", 0.5, "webdataset", "x"),))
    with pytest.raises(ValueError, match="weight of 'b' must be a positive number"):
        MixtureSource([("a", MemorySource("a", 2), 1.0), ("b", MemorySource("b", 2), 0.0)])
    with pytest.raises(ValueError, match="names must be unique"):
        MixtureSource([("a", MemorySource("a", 2), 1.0), ("a", MemorySource("b", 2), 1.0)])


def make_mixture_root(root: Path) -> None:
    """coco/{train,val}/ shards, laion/ shards (no split folders), labels/ class tree."""
    write_good_split(root / "coco" / "train", 2, 5)
    write_good_split(root / "coco" / "val", 1, 4, first=100)
    write_good_split(root / "laion", 1, 6, first=200)
    for label in ("tabby_cat", "golden_retriever"):
        (root / "labels" / label).mkdir(parents=True)
        for i in range(2):
            (root / "labels" / label / f"{i}.jpg").write_bytes(jpeg(300 + i))


def test_laion_coco_mix_tiny_config_builds_its_mixture(tmp_path, monkeypatch):
    make_mixture_root(tmp_path)
    config = load_config("laion_coco_mix", "tiny")
    config.data.path = str(tmp_path)
    train, held_out = make_sources(config)
    assert isinstance(train, MixtureSource)
    assert train.names == ["coco", "laion", "labels"]
    assert [len(c.source) for c in train.components] == [10, 6, 4]
    np.testing.assert_allclose(train.weights, [0.6, 0.35, 0.05])
    assert len(held_out) == 4 and held_out[0]["key"] == "s00100"  # coco's val split
    captions = training_captions(train)
    assert any("tabby cat" in c for c in captions)
    tokenizer = train_tokenizer(captions, 300)
    features = CaptionFeatures.from_config(config, tokenizer)
    batch = next(train_batches(train, features, config.batch_size, config.seed))
    assert batch["image"].shape == (8, 32, 32, 3) and set(batch["source"]) <= {0, 1, 2}
    # Every item of a comma-separated component path lies under data.path, wherever the
    # process runs.
    write_good_split(tmp_path / "laion_b", 1, 3, first=400)
    config.data.mixture = (
        ("coco", 0.6, "shards", "coco"),
        ("laion", 0.4, "shards", "laion,laion_b"),
    )
    monkeypatch.chdir(tmp_path / "coco")
    train, _ = make_sources(config)
    assert len(train.components[1].source) == 9
    # A component path that does not exist is named.
    config.data.mixture = (("coco", 0.6, "shards", "coco"), ("laion", 0.4, "shards", "nope"))
    with pytest.raises(FileNotFoundError, match=r"mixture\['laion'\] path = '.*nope' does not"):
        make_sources(config)
    config.data.mixture = (("coco", 0.6, "shards", "coco"),)
    config.data.mixture_eval = "laion"
    with pytest.raises(ValueError, match="mixture_eval = 'laion' is not one of"):
        make_sources(config)


def test_a_class_folder_tree_holding_only_the_held_out_split_is_refused(tmp_path):
    # Read whole, as a component without a train/ folder is, 'val' would be a class and its
    # images training data.
    make_mixture_root(tmp_path)
    (tmp_path / "labels" / "tabby_cat").rename(tmp_path / "labels" / "val")
    config = load_config("laion_coco_mix", "tiny")
    config.data.path = str(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"mixture\['labels'\] path = '.*labels' has a 'val' folder"
    ):
        make_sources(config)
    (tmp_path / "labels" / "train").mkdir()  # with a train split beside it, that is read
    (tmp_path / "labels" / "golden_retriever").rename(tmp_path / "labels/train/golden_retriever")
    train, _ = make_sources(config)
    assert train.components[2].source.classes == ["golden_retriever"]


@pytest.mark.parametrize("name", ["coco", "laion_coco_mix"])
def test_the_pod_matching_configs_build_a_clip_b_sized_model(name):
    """The pod-sized `:match` variants: a ViT-B/16 image tower and a 12-layer text tower in a
    512-d space (shapes only: nothing is allocated)."""
    config = load_config(name, "match")
    model = build_model(config, config.tokenizer.vocab_size)
    inputs = model_kind("match").init_inputs(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert 150e6 < count < 250e6
    assert config.match.embed_dim == 512 and config.match.text_depth == 12
    assert config.batch_size >= 4096
    # The best checkpoint is ranked by a metric the matching model's evaluation writes.
    recall = retrieval_recall(np.eye(3), np.eye(3), np.arange(3))
    assert config.best_checkpoint_metric.removeprefix("eval/") in recall
    assert load_config(name, "tiny,match").best_checkpoint_metric == config.best_checkpoint_metric
