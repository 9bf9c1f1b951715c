"""Coarse-to-fine targets: nested, on schedule, ending at the full caption (DESIGN §3)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_jax.data.shapes import generate
from refine_jax.targets import (
    FUNCTION_WORDS,
    SalienceStats,
    canvas_targets,
    caption_words,
    coarse_to_fine,
    normalize_caption,
    phrase_heads,
    schedule_fractions,
    scheduled_word_counts,
    step_word_indices,
    subject_position,
)

VOCABULARY = ["dog", "man", "red", "ball", "grass", "running", "small", "park", "two", "water"]
WORDS = st.sampled_from(VOCABULARY + sorted(FUNCTION_WORDS)[:20])
CAPTIONS = st.lists(WORDS, min_size=1, max_size=30).map(" ".join)
STATS = SalienceStats.from_captions(
    ["a dog running on grass", "a man with a red ball", "two dogs in the water", "a dog"]
)


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(word in it for word in short)


@settings(max_examples=300, deadline=None)
@given(
    caption=CAPTIONS,
    num_steps=st.integers(1, 8),
    schedule=st.sampled_from(["linear", "log"]),
    kind=st.sampled_from(["salience", "frequency"]),
)
def test_targets_are_nested_follow_the_schedule_and_end_at_the_caption(
    caption, num_steps, schedule, kind
):
    steps = coarse_to_fine(caption, num_steps, STATS, kind, schedule)
    words = caption_words(caption)
    assert len(steps) == num_steps
    assert steps[-1] == " ".join(words)
    expected = scheduled_word_counts(len(words), schedule_fractions(num_steps, schedule))
    assert [len(s.split()) for s in steps] == expected
    for coarse, fine in zip(steps, steps[1:], strict=False):
        assert is_subsequence(coarse.split(), fine.split())


@pytest.mark.parametrize("schedule", ["linear", "log"])
def test_word_counts_are_round_n_times_schedule(schedule):
    fractions = schedule_fractions(5, schedule)
    counts = scheduled_word_counts(20, fractions)
    assert counts == [max(1, int(np.floor(20 * f + 0.5))) for f in fractions]
    assert counts[-1] == 20


def test_log_schedule_front_loads_words():
    linear, log = schedule_fractions(6, "linear"), schedule_fractions(6, "log", 4.0)
    assert np.all(log[:-1] > linear[:-1]) and log[-1] == pytest.approx(1.0)
    assert np.allclose(log, np.log1p(4.0 * np.arange(1, 7)) / np.log1p(24.0))


def test_heads_come_before_modifiers_and_articles_join_them():
    stats = SalienceStats.from_captions(generate(0, "train", i)["captions"][0] for i in range(500))
    steps = coarse_to_fine("a large red circle above a small blue square", 4, stats)
    assert steps[0] == "a circle"
    assert steps[1] == "a circle above a square"
    assert steps[-1] == "a large red circle above a small blue square"


def test_full_kind_targets_the_whole_caption_at_every_step():
    assert coarse_to_fine("A dog  runs", 3, STATS, kind="full") == ["a dog runs"] * 3


def test_bad_schedule_and_kind_are_rejected():
    with pytest.raises(ValueError, match="num_refine_steps must be >= 1"):
        schedule_fractions(0)
    with pytest.raises(ValueError, match="unknown length schedule"):
        schedule_fractions(3, "cubic")
    with pytest.raises(ValueError, match="unknown target kind"):
        coarse_to_fine("a dog", 3, STATS, kind="random")


def test_salience_stats_round_trip(tmp_path):
    STATS.save(tmp_path / "salience.json")
    loaded = SalienceStats.load(tmp_path / "salience.json")
    assert loaded.word_counts == STATS.word_counts and loaded.num_captions == 4
    assert loaded.frequency("dog") == pytest.approx(2 / 4)  # "dogs" is another word


@settings(max_examples=200, deadline=None)
@given(caption=CAPTIONS, num_steps=st.integers(1, 6))
def test_aligned_canvas_keeps_tokens_in_place_and_left_canvas_spells_the_target(caption, num_steps):
    words = caption_words(caption)
    word_tokens = [[10 + VOCABULARY.index(w)] if w in VOCABULARY else [50, 51] for w in words]
    full = [t for tokens in word_tokens for t in tokens]
    steps = step_word_indices(words, num_steps, STATS)
    texts = coarse_to_fine(caption, num_steps, STATS)
    aligned = canvas_targets(word_tokens, steps, "aligned", blank_id=4)
    left = canvas_targets(word_tokens, steps, "left", blank_id=4)
    for k in range(num_steps):
        # Aligned: every position holds the final token or a blank; the blanks dropped, and
        # the left layout, are the step's target text.
        assert len(aligned[k]) == len(full)
        assert all(a in (f, 4) for a, f in zip(aligned[k], full, strict=True))
        kept_tokens = [t for i in steps[k] for t in word_tokens[i]]
        assert [a for a in aligned[k] if a != 4] == left[k] == kept_tokens
        assert " ".join(words[i] for i in steps[k]) == texts[k]
    for coarse, fine in zip(aligned, aligned[1:], strict=False):  # nested: written stays written
        assert all(f == c for c, f in zip(coarse, fine, strict=True) if c != 4)
    assert aligned[-1] == full


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="layout 'diagonal'"):
        canvas_targets([[5]], [[0]], "diagonal", blank_id=4)


PHOTO_STATS = SalienceStats.from_captions(
    [
        "a dog runs on the grass .",
        "a black dog is jumping over a log .",
        "two dogs play in the snow .",
        "a man is riding a bike .",
        "a little girl in a red dress is running .",
        "the boy throws a ball .",
        "a brown dog is running through the water .",
        "two men are playing soccer on a field .",
        "the dogs are running .",
        "three dogs in the snow .",
    ]
)


@pytest.mark.parametrize(
    "caption, subject",
    [
        ("a dog jumping over a log .", "dog"),  # the verb ends the run, the noun heads it
        ("two dogs play in the snow .", "dogs"),
        ("a black dog running on the grass .", "dog"),
        ("a girl in a red dress running .", "girl"),
    ],
)
def test_step_one_names_the_subject_not_the_verb(caption, subject):
    steps = coarse_to_fine(caption, 4, PHOTO_STATS)
    assert subject in steps[0].split(), steps
    words = caption_words(caption)
    assert words[subject_position(words, PHOTO_STATS)] == subject


def test_frequency_kind_ranks_the_subject_as_any_other_head():
    # The ablation of rule 1: "running" (3 of the 10 captions) outranks the rarer subject.
    caption = "a girl in a red dress running ."
    assert coarse_to_fine(caption, 4, PHOTO_STATS)[0] == "a girl"
    assert coarse_to_fine(caption, 4, PHOTO_STATS, kind="frequency")[0] == "running ."
    # Where the subject is also the most frequent head, the two orders agree.
    caption = "a dog jumping over a log ."
    assert coarse_to_fine(caption, 4, PHOTO_STATS, kind="frequency") == coarse_to_fine(
        caption, 4, PHOTO_STATS
    )


def test_a_run_of_content_words_splits_after_its_noun():
    words = caption_words("a dog jumping over a log")
    heads = phrase_heads(words, PHOTO_STATS)
    assert heads[1] == 1 and heads[2] == 2  # "dog" and "jumping" head their own phrases
    words = caption_words("a black dog runs")
    assert phrase_heads(words, PHOTO_STATS)[1] == 2  # "black" modifies "dog"


def test_shape_captions_grow_from_the_first_shape():
    stats = SalienceStats.from_captions(generate(0, "train", i)["captions"][0] for i in range(500))
    steps = coarse_to_fine("a large yellow square beside a small green circle", 4, stats)
    assert steps == [
        "a square",
        "a square beside a circle",
        "a large square beside a small circle",
        "a large yellow square beside a small green circle",
    ]


def test_unseen_words_fall_back_to_the_last_word_of_a_run():
    words = caption_words("a zorp blick")
    assert phrase_heads(words, SalienceStats())[1] == 2


def test_salience_stats_of_an_older_format_are_refused_with_a_hint(tmp_path):
    (tmp_path / "salience.json").write_text('{"num_captions": 1, "word_counts": {"a": 1}}')
    with pytest.raises(ValueError, match="retrain the tokenizer"):
        SalienceStats.load(tmp_path / "salience.json")


def test_u2581_separates_words_as_the_tokenizer_reads_it():
    # Sentencepiece reads U+2581 as its space mark: counted as part of a word, "a\u2581dog"
    # would be one word of targets yet two words of tokens, and decode as "a dog".
    assert caption_words("A\u2581Dog \u2581runs\u2581") == ["a", "dog", "runs"]
    assert normalize_caption("\u2581a\u2581\u2581dog ") == "a dog"
