"""The matching model: its losses on hand-computed cases, the hard-negative sampler, negatives
from the whole global batch on a sharded mesh, word subsets, and retrieval recall."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, load_config
from jax.sharding import NamedSharding, PartitionSpec

from refine_jax import model_kinds, sharding
from refine_jax.data.caption_source import training_captions
from refine_jax.data.pipeline import CaptionFeatures, pad_to, random_word_subset, train_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.evaluation.matching import retrieval_recall, step_scores
from refine_jax.losses import contrastive_loss, match_head_loss
from refine_jax.model_kinds import build_model, model_kind
from refine_jax.models import match as match_module
from refine_jax.models.match import MAX_LOGIT_SCALE, same_image, same_text, sample_hard_negatives
from refine_jax.tokenizer import train_tokenizer


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.sum(np.exp(x)))


def test_contrastive_loss_on_a_hand_computed_batch():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, 0.1, 3.0]])
    positives = np.eye(3, dtype=bool)
    loss, metrics = contrastive_loss(jnp.asarray(logits), positives, np.ones(3, bool))
    rows = [-log_softmax(logits[i])[i] for i in range(3)]
    cols = [-log_softmax(logits[:, j])[j] for j in range(3)]
    assert float(loss) == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-6)
    assert float(metrics["image_to_text_top1"]) == 1.0  # every row's maximum is its own text
    assert float(metrics["text_to_image_top1"]) == 1.0

    # Examples 0 and 1 share a description: each is right for the other's text as well, and
    # the padding example 2 takes no part (neither as anchor nor as candidate).
    positives = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    valid = np.array([True, True, False])
    loss, _ = contrastive_loss(jnp.asarray(logits), positives, valid)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # every candidate left is right
    block = logits[:2, :2]
    positives = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)
    loss, _ = contrastive_loss(jnp.asarray(logits), positives, valid)
    rows = [-log_softmax(block[i])[i] for i in range(2)]
    cols = [-log_softmax(block[:, j])[j] for j in range(2)]
    assert float(loss) == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-6)


def test_match_head_loss_is_weighted_binary_cross_entropy():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    labels = np.array([1.0, 0.0, 0.0, 1.0])
    weights = np.array([1.0, 1.0, 1.0, 0.0])  # the last pair had no negative to draw
    loss, metrics = match_head_loss(jnp.asarray(logits), labels, weights)
    p = 1 / (1 + np.exp(-logits[:3]))
    bce = -(labels[:3] * np.log(p) + (1 - labels[:3]) * np.log(1 - p))
    assert float(loss) == pytest.approx(bce.mean(), rel=1e-6)
    assert float(metrics["match_accuracy"]) == pytest.approx(2 / 3)


def test_hard_negatives_are_never_a_positive_nor_padding():
    texts = np.array([[5, 6], [7, 8], [5, 6], [9, 9], [10, 0], [11, 0]])  # 0 and 2 the same
    positives = same_text(jnp.asarray(texts))
    valid = np.array([True, True, True, True, True, False])
    seen = np.zeros((6, 6), int)
    for seed in range(200):
        rng = jax.random.key(seed)
        similarity = jax.random.normal(rng, (6, 6)) * 3
        index, found = sample_hard_negatives(
            jax.random.fold_in(rng, 1), similarity, positives, valid
        )
        index, found = np.asarray(index), np.asarray(found)
        assert found.tolist() == [True] * 5 + [False]  # padding is no anchor
        for i in np.flatnonzero(found):
            seen[i, index[i]] += 1
    assert not np.any(seen[np.asarray(positives)])  # never a positive (nor the example itself)
    assert not np.any(seen[:, 5])  # never padding
    assert np.all(seen[0, [1, 3, 4]] > 0) and seen[0, 2] == 0  # the twin is never drawn

    # Draws follow the scaled similarities: at the initial scale 1 / 0.07 a near-duplicate
    # (cosine 0.95) among 126 unrelated candidates (cosine 0) is drawn almost always, which
    # raw cosines in [-1, 1] would do 2% of the time (what the model passes is checked in
    # test_hard_negatives_are_drawn_at_the_learned_temperature).
    batch = 128
    cosine = np.eye(batch, dtype=np.float32)
    cosine[0, 1] = 0.95
    draws = [
        int(
            sample_hard_negatives(
                jax.random.key(seed), cosine / 0.07, np.eye(batch, dtype=bool), np.ones(batch, bool)
            )[0][0]
        )
        for seed in range(50)
    ]
    assert draws.count(1) >= 48
    # An anchor whose every valid candidate is a positive has nothing to draw.
    all_same = same_text(jnp.zeros((3, 2), jnp.int32))
    _, found = sample_hard_negatives(
        jax.random.key(0), np.zeros((3, 3)), all_same, np.ones(3, bool)
    )
    assert not np.any(found)


@pytest.fixture(scope="module")
def match_setup():
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 500)), 400)
    config = load_config("shapes", "tiny,match")
    features = CaptionFeatures.from_config(config, tokenizer)
    batch = next(train_batches(ShapesSource("train", 500), features, 16, 0, 1, 0, 1))
    return tokenizer, config, batch


@pytest.fixture(scope="module")
def match_model(match_setup):
    tokenizer, config, _ = match_setup
    model = build_model(config, tokenizer.vocab_size)
    return model, init_params(model, config, tokenizer.vocab_size)


def spy_on(monkeypatch, module, name: str) -> list[tuple]:
    """Records the arguments of every call of `module.name` (run eagerly, never jitted)."""
    calls, original = [], getattr(module, name)

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return calls


def match_loss_inputs(monkeypatch, match_setup, match_model, batch, subset_rate: float = 0.0):
    """(positives given to the contrastive loss, weights given to the matching-head loss) of
    the match kind's training loss on `batch`."""
    _, config, _ = match_setup
    model, params = match_model
    config = copy.deepcopy(config)
    config.match.subset_rate = subset_rate
    contrastive = spy_on(monkeypatch, model_kinds, "contrastive_loss")
    head = spy_on(monkeypatch, model_kinds, "match_head_loss")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model_kind("match").loss(model, params, batch, jax.random.key(0), config, None, None)
    return np.asarray(contrastive[0][1]), np.asarray(head[0][2])


def test_hard_negatives_are_drawn_from_the_cosine_similarities(
    match_setup, match_model, monkeypatch
):
    # The sampler sees the unscaled similarities (text negatives, and transposed image
    # negatives): at the learned temperature the Flickr8k head collapsed (BENCHMARKS.md).
    _, _, batch = match_setup
    model, params = match_model
    draws = spy_on(monkeypatch, match_module, "sample_hard_negatives")
    outputs = model.apply(
        {"params": params},
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["caption"]),
        jnp.asarray(batch["mask"]),
        jax.random.key(0),
    )
    scale = float(model.apply({"params": params}, method=model.logit_scale))
    cosines = np.asarray(outputs["logits"]) / scale
    assert len(draws) == 2
    np.testing.assert_allclose(np.asarray(draws[0][1]), cosines, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(draws[1][1]), cosines.T, rtol=1e-5, atol=1e-6)


def test_a_caption_read_as_a_word_subset_is_still_a_positive_of_the_same_caption(
    match_setup, match_model, monkeypatch
):
    # Examples 0 and 1 have the same caption; 0 reads it whole, 1 only its first token: they
    # are still each other's positives (README: the same caption is never a negative).
    _, _, batch = match_setup
    batch = dict(batch)
    caption, subset = batch["caption"].copy(), batch["word_subset"].copy()
    caption[1] = caption[0]
    subset[0] = caption[0]
    subset[1] = pad_to(caption[0][:1], caption.shape[1])
    assert not np.array_equal(subset[0], subset[1])
    assert batch["index"][0] != batch["index"][1]  # two images
    batch["caption"], batch["word_subset"] = caption, subset
    positives, _ = match_loss_inputs(monkeypatch, match_setup, match_model, batch, 1.0)
    assert positives[0, 1] and positives[1, 0]
    same_caption = np.all(caption[:, None] == caption[None], axis=-1)
    assert np.all(positives[same_caption])


def test_the_same_image_twice_in_a_batch_is_never_its_own_negative(
    match_setup, match_model, monkeypatch
):
    # Batches span epoch boundaries: example 1 is example 0's image again, with another
    # caption. Only those two are real, so neither has a negative to draw.
    _, _, batch = match_setup
    batch = dict(batch)
    image, index, source = batch["image"].copy(), batch["index"].copy(), batch["source"].copy()
    image[1], index[1], source[1] = image[0], index[0], source[0]
    mask = np.zeros_like(batch["mask"])
    mask[:2] = True
    index[2] = index[0]  # a padding row with the same index changes nothing: never drawn
    assert not np.array_equal(batch["caption"][0], batch["caption"][1])
    batch.update(image=image, index=index, source=source, mask=mask)
    positives, weights = match_loss_inputs(monkeypatch, match_setup, match_model, batch)
    assert positives[0, 1] and positives[1, 0]
    size = len(mask)
    np.testing.assert_array_equal(weights[:size], mask)  # both pairs, and no padding, scored
    assert not np.any(weights[size:])  # no hard negative text nor image for either


def test_examples_of_unknown_index_are_not_the_same_image():
    index, source = jnp.array([3, 3, 3, -1, -1]), jnp.array([0, 0, 1, 0, 0])
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],  # the same index in another source of a mixture: another image
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(same_image(index, source), expected)


def test_the_logit_scale_past_its_cap_can_still_come_back_down(match_model):
    # Adam can carry the scale parameter past log(100); the cap holds the value there, and the
    # gradient still flows, so a loss that wants a lower scale brings it back.
    model, params = match_model
    wrong = jnp.array([[0.2, 0.3], [0.25, 0.2]])  # a lower scale lowers this loss

    def loss(log_scale):
        variables = {"params": {**params, "log_logit_scale": log_scale}}
        scale = model.apply(variables, method="logit_scale")
        return contrastive_loss(scale * wrong, jnp.eye(2, dtype=bool), jnp.ones(2, bool))[0], scale

    for value in (150.0, 100.5):
        (_, scale), gradient = jax.value_and_grad(loss, has_aux=True)(jnp.log(value))
        assert float(scale) == pytest.approx(MAX_LOGIT_SCALE)
        assert float(gradient) > 0.0  # descent lowers the parameter below the cap
    (_, scale), _ = jax.value_and_grad(loss, has_aux=True)(jnp.log(50.0))
    assert float(scale) == pytest.approx(50.0)


def test_negatives_come_from_the_whole_global_batch_on_a_sharded_mesh(match_setup):
    # The loss of a batch sharded over 8 devices equals the loss of the same batch on one: the
    # similarities span the global batch, not each device's 2 examples.
    tokenizer, config, batch = match_setup
    model = build_model(config, tokenizer.vocab_size)
    params = init_params(model, config, tokenizer.vocab_size)
    loss_fn = model_kind("match").loss
    rng = jax.random.key(3)
    compute = jax.jit(lambda p, b: loss_fn(model, p, b, rng, config, None, None))
    single, single_metrics = compute(params, {k: jnp.asarray(v) for k, v in batch.items()})

    mesh = sharding.make_mesh((8, 1, 1))
    spread = NamedSharding(mesh, PartitionSpec("data"))
    sharded_batch = {k: jax.device_put(v, spread) for k, v in batch.items()}
    assert len(sharded_batch["image"].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        sharded, sharded_metrics = compute(params, sharded_batch)
    assert float(sharded) == pytest.approx(float(single), rel=1e-5)
    for key in ("contrastive_loss", "match_loss"):
        assert float(sharded_metrics[key]) == pytest.approx(float(single_metrics[key]), rel=1e-5)

    # What per-device negatives would give instead: the mean over 8 local 2 x 2 problems.
    outputs = model.apply(
        {"params": params},
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["caption"]),
        jnp.asarray(batch["mask"]),
        rng,
    )
    logits, positives = np.asarray(outputs["logits"]), np.asarray(outputs["positives"])
    local = np.mean(
        [
            float(
                contrastive_loss(
                    logits[i : i + 2, i : i + 2], positives[i : i + 2, i : i + 2], np.ones(2, bool)
                )[0]
            )
            for i in range(0, 16, 2)
        ]
    )
    global_loss = float(contrastive_loss(logits, positives, np.asarray(batch["mask"]))[0])
    assert abs(local - global_loss) > 0.1


def test_word_subsets_keep_caption_order_and_at_least_one_word(match_setup):
    tokenizer, config, batch = match_setup
    words = [[11], [12, 13], [14], [15], [16, 17]]
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(300):
        subset = random_word_subset(words, rng)
        kept = [w for w in words if all(t in subset for t in w)]
        assert subset == [t for w in kept for t in w] and kept  # in order, whole words
        sizes.add(len(kept))
    assert sizes == {1, 2, 3, 4, 5}
    # In training batches the subset is drawn from the caption; the evaluation map keeps it all.
    for caption, subset in zip(batch["caption"], batch["word_subset"], strict=True):
        assert set(subset[subset != 0]) <= set(caption[caption != 0])
    features = CaptionFeatures.from_config(config, tokenizer)
    example = features.map(ShapesSource("eval", 4)[0])
    np.testing.assert_array_equal(example["word_subset"], example["caption"])


def test_retrieval_recall_on_hand_made_embeddings():
    images = np.eye(3)
    # Texts 0, 1 describe image 0; text 2 image 1; text 3 image 2 but sits nearest image 1.
    texts = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0.9, 0.1]])
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    recall = retrieval_recall(images, texts, [0, 0, 1, 2], at=(1, 2))
    # Image 0: text 0 ranks first. Image 1: text 2 first. Image 2: text 3 is its best, ranked
    # first among the texts by similarity to image 2 (0.11 against 0 for the others).
    assert recall["image_to_text_r@1"] == 1.0
    # Text 0 -> image 0 first; text 1 -> image 1 (0.8) above image 0 (0.6): rank 2; text 2 ->
    # image 1 first; text 3 -> image 1 above image 2: rank 2.
    assert recall["text_to_image_r@1"] == 0.5 and recall["text_to_image_r@2"] == 1.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(images, texts, [0, 0, 1, 3])


def test_an_image_without_references_is_a_retrieval_miss():
    # Image 2 has no reference among the texts: a miss at every k, even k beyond the number of
    # texts (where every text is in its top k).
    recall = retrieval_recall(np.eye(4)[:3], np.eye(4)[:2], [0, 1], at=(1, 5))
    assert recall["image_to_text_r@1"] == recall["image_to_text_r@5"] == pytest.approx(2 / 3)
    assert recall["text_to_image_r@1"] == 1.0


def test_a_split_without_texts_has_every_image_a_retrieval_miss():
    recall = retrieval_recall(np.eye(3), np.zeros((0, 3)), [], at=(1,))
    assert recall == {"image_to_text_r@1": 0.0, "text_to_image_r@1": 0.0}


def test_step_scores_are_clipped_cosines_and_their_harmonic_mean_with_the_references():
    image = np.array([[1.0, 0.0]])
    steps = np.array([[[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]])
    references = [np.array([[0.0, 1.0], [0.6, -0.8]])]
    match, ref_match = step_scores(image, steps, references)
    np.testing.assert_allclose(match, [[0.6, 0.0, 0.0]])
    # Best reference cosines 0.8, 1.0 and 0 (clipped); harmonic means with 0.6, 0 and 0.
    np.testing.assert_allclose(ref_match, [[2 * 0.6 * 0.8 / 1.4, 0.0, 0.0]])
