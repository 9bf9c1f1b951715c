"""Refinement metrics (DESIGN §4) on hand-made trajectories with exact expected values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refine_jax.evaluation.caption_metrics import score_captions
from refine_jax.evaluation.refinement_metrics import (
    bootstrap_interval,
    chain_agreement,
    consensus_words,
    degenerate_deviation,
    has_repeated_word,
    paired_difference,
    refinement_metrics,
)

LINEAR4 = np.array([0.25, 0.5, 0.75, 1.0])
UNIFORM4 = np.full(4, 0.25)
# Under the linear schedule at K = 4 both degenerate paths deviate by (0.25 + 0.5 + 0.75) / 4.
D_LINEAR4 = 0.375
# The log schedule s(k) = log(1 + a k) / log(1 + a K), a = 3, K = 4: 0.5405, 0.7587, 0.8977, 1.
LOG4 = np.log1p(3 * np.arange(1, 5)) / np.log1p(12)

# Two images whose captions share no n-gram: every n-gram of a reference has document frequency
# 1 of 2 images, and a caption equal to all of its image's references scores CIDEr-D = 10.
CAPTION_A = "man rides brown horse"
CAPTION_B = "two dogs play outside"
REFS = {"a": [CAPTION_A, CAPTION_A], "b": [CAPTION_B, CAPTION_B]}
GROWING_A = ["man", "man rides", "man rides brown", CAPTION_A]  # nested prefixes, 1..4 words
GROWING_B = ["two", "two dogs", "two dogs play", CAPTION_B]


def test_evenly_growing_chain_with_exact_progress_vectors_has_g_1() -> None:
    # Vectors with cos(e_k, e_K) = k/K, so p_k = k/K = s(k) exactly under the linear schedule.
    frac = np.arange(1, 5) / 4
    vecs_a = np.stack([frac, np.sqrt(1 - frac**2)], axis=1)
    vecs_b = vecs_a[:, ::-1] * 3.0  # another direction and scale, same angles
    out = refinement_metrics(
        {"a": GROWING_A, "b": GROWING_B},
        REFS,
        LINEAR4,
        UNIFORM4,
        step_vectors=np.stack([vecs_a, vecs_b]),
    )
    assert out["gradualness"] == pytest.approx(1.0, abs=1e-12)
    assert out["gradualness_raw"] == pytest.approx(1.0, abs=1e-12)
    assert out["progress_per_step"] == pytest.approx(list(LINEAR4), abs=1e-12)
    # Word counts 1, 2, 3, 4 of 4: len_k / len_K = k/K.
    assert out["length_adherence"] == pytest.approx(1.0, abs=1e-12)
    assert out["length_ratio_per_step"] == pytest.approx(list(LINEAR4))
    by_id = refinement_metrics(
        {"a": GROWING_A, "b": GROWING_B},
        REFS,
        LINEAR4,
        UNIFORM4,
        step_vectors={"b": vecs_b, "a": vecs_a},
    )
    assert by_id == out


def test_evenly_growing_chain_with_the_default_tfidf_encoding() -> None:
    # Every n-gram has weight log 2 (document frequency 1 of 2 images), so for the prefix chain
    # cos(e_k, e_K) = sqrt(m_k / m_K), m_k = number of 1..4-grams of k words = 1, 3, 6, 10.
    out = refinement_metrics({"a": GROWING_A, "b": GROWING_B}, REFS, LINEAR4, UNIFORM4)
    progress = np.sqrt(np.array([1, 3, 6, 10]) / 10)
    assert out["progress_per_step"] == pytest.approx(list(progress), rel=1e-12)
    deviation = np.mean(np.abs(progress - LINEAR4))  # 0.03464...
    assert out["gradualness_raw"] == pytest.approx(1 - deviation, rel=1e-12)
    expected_g = 1 - deviation / D_LINEAR4  # 0.90762...
    assert out["gradualness"] == pytest.approx(expected_g, rel=1e-12)
    assert out["length_adherence"] == pytest.approx(1.0)
    assert out["monotonic_fraction"] == 1.0
    assert out["final_cider"] == pytest.approx(10.0)
    assert out["refine_score"] == pytest.approx(out["weighted_quality"] * expected_g)


def test_two_step_tfidf_progress_by_hand() -> None:
    # e("red") = (L), e("red car") = (L, L, L) over red / car / "red car": cos = 1/sqrt(3).
    refs = {"a": ["a red car"], "b": ["a blue sky"]}
    out = refinement_metrics(
        {"a": ["red", "red car"], "b": ["blue", "blue sky"]}, refs, [0.5, 1.0], [0.5, 0.5]
    )
    assert out["progress_per_step"] == pytest.approx([1 / math.sqrt(3), 1.0])
    deviation = abs(1 / math.sqrt(3) - 0.5) / 2
    assert out["gradualness_raw"] == pytest.approx(1 - deviation)
    # K = 2, s = (0.5, 1): both degenerate paths deviate by 0.5 / 2 = 0.25.
    assert out["gradualness"] == pytest.approx(1 - deviation / 0.25)


def test_degenerate_deviation() -> None:
    assert degenerate_deviation(LINEAR4) == pytest.approx(D_LINEAR4)
    dev_end, dev_start = LOG4[:3].sum() / 4, np.mean(1 - LOG4)
    assert dev_end == pytest.approx(0.5492106, rel=1e-6)
    assert dev_start == pytest.approx(0.2007894, rel=1e-6)
    assert degenerate_deviation(LOG4) == pytest.approx(dev_end)
    assert degenerate_deviation([1.0]) == 0.0


def test_blank_until_the_last_step() -> None:
    # p = (0, 0, 0, 1) and len ratios (0, 0, 0, 1): raw 1 - (0.25 + 0.5 + 0.75 + 0) / 4 = 0.625
    # (DESIGN §4's formula), normalised 1 - 0.375 / 0.375 = 0.
    trajectories = {"a": ["", "", "", CAPTION_A], "b": ["", " ", "", CAPTION_B]}
    out = refinement_metrics(trajectories, REFS, LINEAR4, UNIFORM4)
    assert out["gradualness"] == 0.0 and out["length_adherence"] == 0.0
    assert out["gradualness_raw"] == pytest.approx(0.625)
    assert out["length_adherence_raw"] == pytest.approx(0.625)
    assert out["cider_per_step"] == pytest.approx([0.0, 0.0, 0.0, 10.0])
    assert out["weighted_quality"] == pytest.approx(2.5)
    assert out["refine_score"] == 0.0
    assert out["monotonic_fraction"] == 1.0  # CIDEr 0, 0, 0, 10 never drops
    assert out["num_blank_final"] == 0
    # Under the log schedule this is the worse degenerate path: 0 again.
    out_log = refinement_metrics(trajectories, REFS, LOG4, UNIFORM4)
    assert out_log["gradualness"] == 0.0 and out_log["length_adherence"] == 0.0
    assert out_log["gradualness_raw"] == pytest.approx(1 - LOG4[:3].sum() / 4)


def test_complete_at_step_one_then_unchanged() -> None:
    # p = (1, 1, 1, 1): raw 1 - (0.75 + 0.5 + 0.25 + 0) / 4 = 0.625, normalised exactly 0 under
    # the linear schedule; the same for the length ratios.
    trajectories = {"a": [CAPTION_A] * 4, "b": [CAPTION_B] * 4}
    out = refinement_metrics(trajectories, REFS, LINEAR4, UNIFORM4)
    assert out["gradualness"] == 0.0 and out["length_adherence"] == 0.0
    assert out["gradualness_raw"] == pytest.approx(0.625)
    assert out["length_adherence_raw"] == pytest.approx(0.625)
    assert out["cider_per_step"] == pytest.approx([10.0] * 4)
    assert out["weighted_quality"] == pytest.approx(10.0)
    assert out["refine_score"] == 0.0
    assert out["monotonic_fraction"] == 1.0
    # Under the log schedule: raw G = mean_k s(k); normalised 1 - dev_start / dev_end.
    out_log = refinement_metrics(trajectories, REFS, LOG4, UNIFORM4)
    assert out_log["gradualness_raw"] == pytest.approx(np.mean(LOG4))
    expected = 1 - np.mean(1 - LOG4) / (LOG4[:3].sum() / 4)
    assert expected == pytest.approx(0.6344037, rel=1e-6)
    assert out_log["gradualness"] == pytest.approx(expected, rel=1e-12)
    assert out_log["length_adherence"] == pytest.approx(expected, rel=1e-12)


def test_half_way_chain_by_hand() -> None:
    # p = (0.5, 0.5, 1, 1), words 2, 2, 4, 4: deviation (0.25 + 0 + 0.25 + 0) / 4 = 0.125 under
    # the linear schedule: G = A = 1 - 0.125 / 0.375 = 2/3 (raw 0.875).
    angles = np.arccos([0.5, 0.5, 1.0, 1.0])
    vecs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    chains = {
        "a": ["man rides", "man rides", CAPTION_A, CAPTION_A],
        "b": ["two dogs", "two dogs", CAPTION_B, CAPTION_B],
    }
    out = refinement_metrics(
        chains, REFS, LINEAR4, UNIFORM4, step_vectors=np.stack([vecs, vecs]), per_image=True
    )
    assert out["gradualness"] == pytest.approx(2 / 3)
    assert out["gradualness_raw"] == pytest.approx(0.875)
    assert out["length_adherence"] == pytest.approx(2 / 3)
    assert out["refine_score"] == pytest.approx(out["weighted_quality"] * 2 / 3)
    first = out["per_image"][0]
    assert first["image_id"] == "a" and first["monotonic"]
    assert first["progress"] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert first["length_ratio"] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert first["gradualness"] == pytest.approx(2 / 3)
    assert first["cider"][-1] == pytest.approx(10.0)
    # The same chain under the log schedule: deviations |0.5 - s| + |0.5 - s| + |1 - s| + 0.
    out_log = refinement_metrics(chains, REFS, LOG4, UNIFORM4, step_vectors=np.stack([vecs, vecs]))
    deviation = (abs(0.5 - LOG4[0]) + abs(0.5 - LOG4[1]) + abs(1 - LOG4[2])) / 4
    assert out_log["gradualness"] == pytest.approx(1 - deviation / (LOG4[:3].sum() / 4))


def test_a_single_step_has_no_gradualness_adherence_or_refine_score() -> None:
    # K = 1 (the autoregressive baseline): no path to be gradual along, so G, A and R are not
    # applicable (None), not 1 and CIDEr; the caption scores are reported as usual.
    one = refinement_metrics({"a": [CAPTION_A], "b": [CAPTION_B]}, REFS, [1.0], [1.0])
    for key in (
        "gradualness",
        "gradualness_raw",
        "length_adherence",
        "length_adherence_raw",
        "refine_score",
    ):
        assert one[key] is None, key
    assert one["final_cider"] > 0 and one["weighted_quality"] == one["final_cider"]
    assert one["monotonic_fraction"] == 1.0


def test_progress_is_measured_from_the_blank_descriptions_encoding() -> None:
    # With a blank encoding t_0, p_k = 1 - d(t_k, t_K) / d(t_0, t_K): a step half-way along the
    # arc from t_0 to t_K (in angle: cosine distance 1 - cos(45°) to each end, against
    # 1 - cos(90°) = 1 end to end) has progress 1 - (1 - cos 45°).
    blank = np.array([1.0, 0.0])
    final = np.array([0.0, 1.0])
    half = np.array([1.0, 1.0]) / np.sqrt(2)
    chains = {"a": ["x", "x y", "x y z", CAPTION_A]}
    vecs = np.stack([[blank, half, final, final]])
    out = refinement_metrics(
        chains, {"a": REFS["a"]}, LINEAR4, UNIFORM4, step_vectors=vecs, blank_vector=blank
    )
    assert out["progress_per_step"] == pytest.approx([0.0, np.cos(np.pi / 4), 1.0, 1.0])
    # A final that encodes like the blank description has no span: scored as blank (G = 0).
    same = refinement_metrics(
        chains,
        {"a": REFS["a"]},
        LINEAR4,
        UNIFORM4,
        step_vectors=np.stack([[half, half, blank, blank]]),
        blank_vector=blank,
    )
    assert same["gradualness"] == 0.0 and same["progress_per_step"] is None


def test_given_progress_scores_as_the_same_progress_from_vectors_and_nan_marks_a_blank_final():
    chains = {"a": GROWING_A, "b": GROWING_B}
    frac = np.arange(1, 5) / 4
    off = np.array([0.1, 0.7, 0.6, 1.0])  # b deviates from the schedule
    vecs = np.stack([np.stack([p, np.sqrt(1 - p**2)], axis=1) for p in (frac, off)])
    from_vectors = refinement_metrics(chains, REFS, LINEAR4, UNIFORM4, step_vectors=vecs)
    given = refinement_metrics(
        chains, REFS, LINEAR4, UNIFORM4, step_progress=np.stack([frac, off]), per_image=True
    )
    for key in ("gradualness", "gradualness_raw", "progress_per_step", "refine_score"):
        assert given[key] == pytest.approx(from_vectors[key]), key
    # dev_b = mean(0.15, 0.2, 0.15, 0) = 0.125 against D = 0.375: G_b = 2/3; G_a = 1.
    assert [r["gradualness"] for r in given["per_image"]] == pytest.approx([1.0, 2 / 3])
    # NaN: the final has no span from the blank description, so b scores as a blank final.
    blank_b = refinement_metrics(
        chains, REFS, LINEAR4, UNIFORM4, step_progress={"a": frac, "b": [np.nan] * 4}
    )
    assert blank_b["gradualness"] == pytest.approx(0.5)
    assert blank_b["progress_per_step"] == pytest.approx(list(frac))


def test_monotonicity_on_hand_made_trajectories() -> None:
    # a improves at every step; b gets worse at step 3 (a wrong word replaces a right one).
    chains = {"a": GROWING_A, "b": ["two", "two dogs", "two cats", CAPTION_B]}
    out = refinement_metrics(chains, REFS, LINEAR4, UNIFORM4, per_image=True)
    assert out["monotonic_fraction"] == 0.5
    assert [p["monotonic"] for p in out["per_image"]] == [True, False]
    cider_b = out["per_image"][1]["cider"]
    assert cider_b[2] < cider_b[1]


def test_repetition_and_consensus_shares_per_step() -> None:
    refs = {
        "a": ["a dog runs", "a dog in snow", "the dog jumps", "a cat sits", "snow falls"],
        "b": [CAPTION_B, CAPTION_B, CAPTION_B],
    }
    chains = {
        "a": ["snow", "a snow snow", "the dog runs", "a dog dog runs"],  # repeats at 2 and 4
        "b": ["outside", "dogs", "two dogs play", "Two two dogs play outside."],
    }
    out = refinement_metrics(chains, refs, LINEAR4, UNIFORM4)
    # "b" at step 4 repeats after lower-casing tokenisation ("two two").
    assert out["repetition_per_step"] == [0.0, 0.5, 0.0, 1.0]
    assert out["final_repetition"] == 1.0
    # a's majority word is "dog" (3 of 5; "snow" 2 of 5); b's are all four of its words.
    assert out["consensus_per_step"] == [0.5, 0.5, 1.0, 1.0]
    assert out["repetition_as_written_per_step"] == out["repetition_per_step"]  # none given


def test_repetition_as_written_is_measured_on_the_captions_before_de_duplication() -> None:
    refs = {"a": ["a dog runs"], "b": [CAPTION_B]}
    shown = {"a": ["dog", "a dog", "a dog runs"], "b": ["dogs", "two dogs", "two dogs play"]}
    written = {
        "a": ["dog dog", "a dog", "a dog runs"],
        "b": ["dogs", "two dogs", "Two two dogs play"],
    }
    out = refinement_metrics(shown, refs, [0.3, 0.6, 1.0], [0.2, 0.3, 0.5], written=written)
    assert out["repetition_per_step"] == [0.0, 0.0, 0.0]
    assert out["repetition_as_written_per_step"] == [0.5, 0.0, 0.5]


def test_consensus_words_need_a_majority_of_references_and_skip_function_words() -> None:
    refs = ["a dog in the snow", "a dog runs", "the brown dog in snow", "a cat"]
    assert consensus_words(refs) == {"dog"}  # "snow": 2 of 4, no majority; "a": a function word
    assert has_repeated_word("a dog dog runs") and not has_repeated_word("a dog a dog")


def test_final_cider_interval_is_a_bootstrap_interval_around_the_mean() -> None:
    chains = {"a": GROWING_A, "b": ["two", "two dogs", "two dogs play", "a horse"]}
    out = refinement_metrics(chains, REFS, LINEAR4, UNIFORM4, per_image=True)
    finals = [p["cider"][-1] for p in out["per_image"]]
    assert finals[0] == pytest.approx(10.0) and finals[1] == 0.0
    low, high = out["final_cider_interval"]
    # Resampling two images gives means 0, 5 or 10, with 5 the likeliest.
    assert low == 0.0 and high == pytest.approx(10.0) and low <= out["final_cider"] <= high
    assert bootstrap_interval([3.0, 3.0, 3.0]) == [3.0, 3.0]
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])


def test_length_adherence_counts_eval_tokens() -> None:
    # "Man." is 1 word and "A man rides brown horse." 5 after tokenisation: ratios 1/5, 1.
    out = refinement_metrics(
        {"a": ["Man.", "A man rides brown horse."], "b": ["", CAPTION_B]},
        REFS,
        [0.5, 1.0],
        [0.5, 0.5],
    )
    # a: deviation (|0.2 - 0.5| + 0) / 2 = 0.15; b: (0.5 + 0) / 2 = 0.25. D = 0.25.
    assert out["length_adherence_raw"] == pytest.approx((0.85 + 0.75) / 2)
    assert out["length_adherence"] == pytest.approx((1 - 0.15 / 0.25 + 0.0) / 2)
    assert out["length_ratio_per_step"] == pytest.approx([0.1, 1.0])


def test_weighted_quality_monotonicity_and_blank_final() -> None:
    # a goes blank -> exact (CIDEr 0 -> 10), b goes exact -> blank (10 -> 0).
    out = refinement_metrics(
        {"a": ["", CAPTION_A], "b": [CAPTION_B, ""]}, REFS, [0.5, 1.0], [0.25, 0.75]
    )
    assert out["cider_per_step"] == pytest.approx([5.0, 5.0])
    assert out["weighted_quality"] == pytest.approx(5.0)
    assert out["final_cider"] == pytest.approx(5.0)
    assert out["monotonic_fraction"] == 0.5
    # b's final caption is blank: G_b = A_b = 0. a: p = (0, 1), raw G_a = 1 - 0.5 / 2 = 0.75,
    # normalised 0 (all at the last step).
    assert out["num_blank_final"] == 1
    assert out["gradualness_raw"] == pytest.approx(0.375)
    assert out["length_adherence_raw"] == pytest.approx(0.375)
    assert out["gradualness"] == 0.0 and out["length_adherence"] == 0.0
    assert out["refine_score"] == 0.0
    assert out["progress_per_step"] == pytest.approx([0.0, 1.0])  # over images with a final

    rising = refinement_metrics(
        {"a": ["", CAPTION_A], "b": ["", CAPTION_B]}, REFS, [0.5, 1.0], [0.25, 0.75]
    )
    assert rising["cider_per_step"] == pytest.approx([0.0, 10.0])
    assert rising["weighted_quality"] == pytest.approx(0.75 * 10.0)

    all_blank = refinement_metrics({"a": ["x", ""], "b": ["y", ""]}, REFS, [0.5, 1.0], [0.5, 0.5])
    assert all_blank["gradualness"] == 0.0 and all_blank["length_adherence"] == 0.0
    assert all_blank["gradualness_raw"] == 0.0 and all_blank["length_adherence_raw"] == 0.0
    assert all_blank["progress_per_step"] is None and all_blank["length_ratio_per_step"] is None
    assert all_blank["num_blank_final"] == 2
    json.dumps(all_blank, allow_nan=False)


def test_step_quality_matches_score_captions() -> None:
    references = {
        "1": ["A dog runs on the grass.", "A brown dog is running outside."],
        "2": ["Two children play in the snow.", "Kids are playing in snow."],
        "3": ["A man rides a bike down a hill.", "A cyclist on a hill."],
    }
    trajectories = {
        "1": ["dog", "a dog runs", "A brown dog runs on the grass ."],
        "2": ["children", "children in snow", "Two kids play in the snow."],
        "3": ["man", "a man on a bike", "a man rides a bike down the hill"],
    }
    out = refinement_metrics(trajectories, references, [1 / 3, 2 / 3, 1.0], [0.2, 0.3, 0.5])
    for k in range(3):
        scores = score_captions(references, {i: t[k] for i, t in trajectories.items()})
        assert out["cider_per_step"][k] == pytest.approx(scores["CIDEr"], abs=1e-12)
        assert out["bleu4_per_step"][k] == pytest.approx(scores["Bleu_4"], abs=1e-12)
    assert out["weighted_quality"] == pytest.approx(np.dot([0.2, 0.3, 0.5], out["cider_per_step"]))
    assert out["num_images"] == 3 and out["num_steps"] == 3
    json.dumps(out, allow_nan=False)


def test_model_vectors_pointing_away_are_capped() -> None:
    # cos = -1 gives p = -1; the deviation |p - s| = 1.5 counts as 1, so raw G = 1 - (1 + 0) / 2;
    # normalised 1 - 0.5 / 0.25 < 0 is clipped to 0.
    vectors = np.array([[[-1.0, 0.0], [1.0, 0.0]], [[-2.0, 0.0], [3.0, 0.0]]])
    out = refinement_metrics(
        {"a": ["man", CAPTION_A], "b": ["two", CAPTION_B]},
        REFS,
        [0.5, 1.0],
        [0.5, 0.5],
        step_vectors=vectors,
    )
    assert out["gradualness_raw"] == pytest.approx(0.5)
    assert out["gradualness"] == 0.0
    zero_final = vectors.copy()
    zero_final[1, 1] = 0.0
    out = refinement_metrics(
        {"a": ["man", CAPTION_A], "b": ["two", CAPTION_B]},
        REFS,
        [0.5, 1.0],
        [0.5, 0.5],
        step_vectors=zero_final,
    )
    assert out["gradualness_raw"] == pytest.approx(0.25)  # b's zero final vector: G_b = 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trajectories": {"a": GROWING_A, "b": GROWING_B[:3]}}, "same number of steps"),
        ({"schedule": [0.5, 1.0]}, "schedule must have one value per step"),
        ({"weights": [0.5, 0.5]}, "weights must have one value per step"),
        ({"weights": [0.5, 0.5, 0.5, 0.5]}, "sum to 1"),
        ({"weights": [-0.5, 0.5, 0.5, 0.5]}, "non-negative"),
        ({"schedule": [0.5, 1.0, 1.5, 2.0]}, r"in \[0, 1\]"),
        ({"schedule": [0.25, float("nan"), 0.75, 1.0]}, "finite"),
        ({"references": {"a": [CAPTION_A]}}, "same image ids"),
        ({"trajectories": {}}, "empty"),
        ({"trajectories": {"a": CAPTION_A, "b": GROWING_B}}, "sequence of K step captions"),
        ({"step_vectors": np.zeros((2, 3, 5))}, "step_vectors must have shape"),
        ({"step_vectors": {"a": np.zeros((4, 2))}}, "step_vectors must have exactly"),
        (
            {"step_progress": np.zeros((2, 3))},
            r"step_progress must have shape \[num_images=2, K=4\]",
        ),
        ({"step_progress": np.full((2, 4), np.inf)}, "step_progress must be finite"),
        (
            {"step_progress": np.zeros((2, 4)), "step_vectors": np.zeros((2, 4, 3))},
            "not both",
        ),
    ],
)
def test_bad_inputs_raise_value_error(kwargs: dict, message: str) -> None:
    args = {
        "trajectories": {"a": GROWING_A, "b": GROWING_B},
        "references": REFS,
        "schedule": LINEAR4,
        "weights": UNIFORM4,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        refinement_metrics(**args)


def test_chain_agreement() -> None:
    true_chains = {"a": ["man", "man rides", CAPTION_A], "b": ["two", "two dogs", CAPTION_B]}
    trajectories = {
        "a": [" man ", "man  rides", CAPTION_A],  # equal after whitespace normalisation
        "b": ["two", "Two dogs", CAPTION_B + " ."],  # case and punctuation count
    }
    assert chain_agreement(trajectories, true_chains) == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="K=2"):
        chain_agreement({k: v[:2] for k, v in trajectories.items()}, true_chains)
    with pytest.raises(ValueError, match="same image ids"):
        chain_agreement({"a": trajectories["a"]}, true_chains)


def test_paired_difference_resamples_the_images_both_runs_scored() -> None:
    better = {"a": 0.5, "b": 0.7, "c": 0.2, "only_here": 9.0}
    worse = {"a": 0.4, "b": 0.6, "c": 0.1, "only_there": -9.0}
    result = paired_difference(better, worse)
    assert result["num_images"] == 3
    assert result["mean"] == pytest.approx(0.1)
    assert result["interval"] == pytest.approx([0.1, 0.1])  # the same gain on every photo
    mixed = paired_difference({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0})
    assert mixed["mean"] == 0.0 and mixed["interval"][0] < 0.0 < mixed["interval"][1]
    with pytest.raises(ValueError, match="none are shared"):
        paired_difference({"a": 1.0}, {"b": 1.0})
