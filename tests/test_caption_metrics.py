"""Caption metrics: the pure-Python PTB tokenisation and scorers against pycocoevalcap (Java
tokenizer, BLEU, CIDEr-D, ROUGE-L, METEOR), the nlg-eval fixture and hand-computed cases."""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from refine_jax.evaluation import caption_metrics as cm
from refine_jax.evaluation import ptb_tokenizer as ptb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR = DATA / "flickr8k"
FIXTURES = DATA / "metric_fixtures"


@pytest.fixture
def java() -> None:
    """Java for the parity tests: without it they skip, except in CI (CI set), where .ci/run
    installs a JRE and a skip would hide that the parity was never checked, so they fail."""
    if shutil.which("java") is None:
        reason = "java is not on PATH: pycocoevalcap's Java PTBTokenizer and METEOR cannot run"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (in CI the Java parity tests must run; see .ci/run)")
        pytest.skip(reason)


needs_java = pytest.mark.usefixtures("java")


def _needs_data(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (the repo expects shared/ beside it)")


def _java_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Java) on `captions` as one batch, in order."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    out = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


# ----------------------------------------------------------------------------------------------
# Tokenisation.
# ----------------------------------------------------------------------------------------------

# Expected outputs are what pycocoevalcap's Java PTBTokenizer gives (checked in
# test_tokenizer_matches_java_on_tricky_text where java exists).
KNOWN_TOKENIZATIONS = [
    ("A dog's ball isn't red, it's blue.", "a dog 's ball is n't red it 's blue"),
    (
        "Two girls play on a skateboard in a courtyard .",
        "two girls play on a skateboard in a courtyard",
    ),
    (
        'A man is wearing a shirt that reads , " Mambo " with an image of a baby .',
        "a man is wearing a shirt that reads mambo with an image of a baby",
    ),
    ("He said \"hello\" and 'bye' to them.", "he said hello and bye to them"),
    (
        "A person riding transit ( catching ? ) a paper bag .",
        "a person riding transit -lrb- catching -rrb- a paper bag",
    ),
    (
        "They can't, won't and don't; I'm sure we're fine.",
        "they ca n't wo n't and do n't i 'm sure we 're fine",
    ),
    ("gonna wanna cannot 'tis", "gon na wan na can not 't is"),
    (
        "Rock 'n' roll in the '90s, o'clock, y'all, ma'am.",
        "rock 'n' roll in the '90s o'clock y' all ma'am",
    ),
    (
        "Mr. Smith met Dr. Jones at 10:30 a.m. on Jan. 5 in the U.S. today.",
        "mr. smith met dr. jones at 10:30 a.m. on jan. 5 in the u.s. today",
    ),
    ("the U.S. The end", "the u.s. the end"),
    ("etc. And so on", "etc. and so on"),
    ("A man -- in black - runs ... and ... stops.", "a man in black runs and stops"),
    ("[brackets] {braces} <angle>", "-lsb- brackets -rsb- -lcb- braces -rcb- <angle>"),
    ("Price $5 & 20% off #1 item * star / slash", "price $ 5 & 20 % off # 1 item * star / slash"),
    (
        "a 1/2 cup, 5 1/2 cups, \u00bd cup, 3.5 km, 1,000 people, -5 degrees",
        "a 1/2 cup 5\u00a01/2 cups 1/2 cup 3.5 km 1,000 people -5 degrees",
    ),
    (
        "t-shirt x-ray 3-year-old re-enter -ependent word-",
        "t-shirt x-ray 3-year-old re-enter ependent word",
    ),
    ("www.google.com http://x.com/a/b foo@bar.com", "www.google.com http://x.com/a/b foo@bar.com"),
    (
        "\u201ccurly\u201d \u2018quotes\u2019 it\u2019s don\u2019t \u2013 dash \u2014 dash \u2026 end",  # noqa: E501
        "curly quotes it 's do n't dash dash end",
    ),
    (
        "caf\u00e9 na\u00efve \u03a3\u0391\u03a3 Stra\u00dfe",
        "caf\u00e9 na\u00efve \u03c3\u03b1\u03c2 stra\u00dfe",
    ),
    ("soft\u00adhyphen and \u00ad alone", "softhyphen and alone"),
    ("smile :) wink ;-) ^_^", "smile :-rrb- wink ;--rrb- ^_^"),
    ("a <b>bold</b> word", "a <b> bold </b> word"),
    ("\u00a35 \u20ac5 \u00a2", "# 5 $ 5 cents"),
    ('A boy making an " oh ! " face .', "a boy making an oh face"),
    ("dog... cat.... end", "dog cat end"),
    ("I. M. Pei and plan B. then", "i. m. pei and plan b. then"),
    ("no. 5 and no.5", "no. 5 and no. 5"),
    ("emoji \U0001f436 dropped", "emoji dropped"),
    ("", ""),
    ("  . , ;  ", ""),
]


@pytest.mark.parametrize(("caption", "expected"), KNOWN_TOKENIZATIONS)
def test_tokenize_for_eval_known_cases(caption: str, expected: str) -> None:
    assert ptb.tokenize_for_eval(caption) == expected
    assert ptb.tokenize_many([caption]) == [expected]


def test_tokenize_many_sees_the_next_caption_like_the_java_batch() -> None:
    # In one Java batch an acronym before "The" and "no." before a digit look at the next line.
    batch = ["the plan B.", "The end", "x no.", "5 dogs"]
    assert ptb.tokenize_many(batch) == ["the plan b", "the end", "x no.", "5 dogs"]
    assert [ptb.tokenize_for_eval(c) for c in batch] == ["the plan b.", "the end", "x no", "5 dogs"]


def test_tokenize_newlines_inside_a_caption_are_spaces() -> None:
    assert ptb.tokenize_for_eval("a dog\nruns\r\nfast") == "a dog runs fast"
    assert ptb.tokenize_many(["a\nb", "c"]) == ["a b", "c"]
    assert ptb.tokenize_many([]) == []


def test_java_lower_final_sigma() -> None:
    assert ptb.java_lower("\u03a3\u0391\u03a3") == "\u03c3\u03b1\u03c2"
    assert ptb.java_lower("\u0391\u03a33\u0392") == "\u03b1\u03c33\u03b2"  # cased letter later
    assert ptb.java_lower("ABC") == "abc"


@needs_java
def test_tokenizer_matches_java_on_every_flickr8k_caption() -> None:
    captions = []
    for split in ("train", "val"):
        path = FLICKR / split / "references.json"
        _needs_data(path)
        captions += [c for caps in cm.load_coco_references(str(path)).values() for c in caps]
    assert len(captions) == 35000
    java = _java_tokenize(captions)
    assert ptb.tokenize_many(captions) == java
    assert [ptb.tokenize_for_eval(c) for c in captions] == java


def _random_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    pieces = (
        "dog cat the a A I The U.S. u.s. Mr. mr Dr. St. etc. jan. Jan. e.g. a.m. no. No. ca. "
        "fig. co. Co. Ltd pty. Inc. x X b. B. gonna cannot 'tis dog's dogs' don't can't I'm "
        "it's o'clock rock'n'roll 'n' y'all '90s 'em ol' 1980's 5'10 6' 3 3.5 .5 1,000 10:30 "
        "-5 1/2 12/25/2010 2-1 $5 5% #1 #tag @user t-shirt 3-year-old and/or w/o \" ' ` `` '' "
        "( ) [ ] { } < > & ; : , . ! ? ... .. .... - -- --- * / \\ | = + ~ ^ _ @ # $ % "
        "\u201c \u201d \u2018 \u2019 \u2013 \u2014 \u2026 \u00bd \u00b0 \u00e9 caf\u00e9 \u00ab "
        "\u00bb \u00a3 \u20ac :) ;-) ^_^ <b> www.x.com foo@bar.com http://x.com/y AT&T Q&A "
        "S&P-500 C++ c# -LRB- pro- anti- 555-1234 (650) x.jpg"
    ).split()
    chars = (
        "aAbBcCdDeEiInNoOsStTxXyYzZ0123456789    .,;:!?'\"`-_/\\()[]{}<>@#$%&*+=|~^"
        "\u201c\u201d\u2018\u2019\u2013\u2014\u2026\u00bd\u00b0\u00e9\u00c9\u00f1\u00a7"
    )
    lines = []
    for n in range(count):
        if n % 2:
            words = [rng.choice(pieces) for _ in range(rng.randint(1, 10))]
            words = [w.upper() if rng.random() < 0.15 else w for w in words]
            lines.append(
                "".join(w + rng.choice([" ", " ", " ", "", "  "]) for w in words).strip() or "x"
            )
        else:
            lines.append(
                "".join(rng.choice(chars) for _ in range(rng.randint(1, 25))).strip() or "x"
            )
    return lines


@needs_java
def test_tokenizer_matches_java_on_tricky_text() -> None:
    known = [caption for caption, _ in KNOWN_TOKENIZATIONS if caption.strip()]
    lines = known + ["the plan B.", "The end", "x no.", "5 dogs"] + _random_lines(0, 1500)
    assert ptb.tokenize_many(lines) == _java_tokenize(lines)


# ----------------------------------------------------------------------------------------------
# Scores against the fixture and pycocoevalcap.
# ----------------------------------------------------------------------------------------------


def _fixture() -> tuple[dict, dict, dict]:
    _needs_data(FIXTURES)
    refs = cm.load_coco_references(str(FIXTURES / "nlgeval_example_references.json"))
    cands = cm.load_coco_results(str(FIXTURES / "nlgeval_example_results.json"))
    expected = json.loads((FIXTURES / "nlgeval_example_expected.json").read_text())
    return refs, cands, expected


def test_scores_reproduce_the_nlgeval_fixture() -> None:
    refs, cands, expected = _fixture()
    scores = cm.score_captions(refs, cands, tokenize=False)
    assert set(scores) == {*cm.BLEU_KEYS, "CIDEr", "ROUGE_L"}
    for key, value in scores.items():
        # The fixture is rounded to 6 decimals.
        assert value == pytest.approx(expected[key], abs=1.5e-6), key


@needs_java
def test_meteor_reproduces_the_nlgeval_fixture() -> None:
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    refs, cands, expected = _fixture()
    result = cm.evaluate_captions(refs, cands, tokenize=False, meteor=True)
    assert result.corpus["METEOR"] == pytest.approx(expected["METEOR"], abs=1.5e-6)
    assert set(result.per_image["METEOR"]) == set(refs)


def test_meteor_is_absent_not_zero_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    refs, cands, _ = _fixture()
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    assert not cm.meteor_available()
    result = cm.evaluate_captions(refs, cands, tokenize=False, meteor=True)
    assert "METEOR" not in result.corpus and "METEOR" not in result.per_image
    assert cm.meteor_score([["a b"]], ["a b"]) is None


class _FailingMeteor:
    """Stands in for pycocoevalcap's `Meteor`, with its locking: `compute_score` raises while
    holding the lock, and `__del__` takes the lock (with a timeout, so the test cannot hang)
    and records whether it got it."""

    lock_taken_on_delete: list[bool] = []
    processes: list[subprocess.Popen] = []

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _FailingMeteor.processes.append(self.meteor_p)

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        self.lock.acquire()
        raise ValueError("could not convert string to float: b'2.0 3.0'")

    def __del__(self) -> None:
        _FailingMeteor.lock_taken_on_delete.append(self.lock.acquire(timeout=2))
        self.meteor_p.kill()
        self.meteor_p.wait()


def test_a_failed_meteor_is_absent_and_its_scorer_is_dropped_without_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meteor_module = pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setattr(cm, "meteor_available", lambda: True)
    monkeypatch.setattr(meteor_module, "Meteor", _FailingMeteor)
    _FailingMeteor.lock_taken_on_delete.clear()
    _FailingMeteor.processes.clear()
    with pytest.warns(RuntimeWarning, match="METEOR failed"):
        assert cm.meteor_score([["a dog runs"]], ["a dog runs"]) is None
    gc.collect()  # the dropped scorer's __del__ has run
    assert _FailingMeteor.lock_taken_on_delete == [True], "Meteor.__del__ would block forever"
    (process,) = _FailingMeteor.processes
    assert process.poll() is not None, "the scorer's process is still running"


@needs_java
def test_meteor_failing_in_java_is_reported_absent_instead_of_hanging() -> None:
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    # A newline in an untokenised candidate splits METEOR's input line: the jar's answers no
    # longer parse, compute_score raises while holding its lock, and (before the fix) dropping
    # the scorer blocked forever. Run in a subprocess so a regression fails instead of hanging.
    script = (
        "from refine_jax.evaluation import caption_metrics as cm\n"
        "refs = {1: ['a dog runs on grass', 'a brown dog'], 2: ['a cat sits', 'cat on mat']}\n"
        "cands = {1: 'a dog\\nruns', 2: 'a cat'}\n"
        "result = cm.evaluate_captions(refs, cands, tokenize=False, meteor=True)\n"
        "print('METEOR' in result.corpus, sorted(result.corpus))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("evaluate_captions hung after METEOR failed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False"), done.stdout
    assert "CIDEr" in done.stdout and "METEOR failed" in done.stderr


@needs_java
def test_scores_match_pycocoevalcap_on_flickr8k_val() -> None:
    path = FLICKR / "val" / "references.json"
    _needs_data(path)
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    all_refs = cm.load_coco_references(str(path))
    assert len(all_refs) == 1000
    refs = {k: v[1:] for k, v in all_refs.items()}
    cands = {k: v[0] for k, v in all_refs.items()}
    gts = ptb.PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = ptb.PTBTokenizer().tokenize({k: [{"caption": cands[k]}] for k in refs})
    bleu_corpus, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    cider_corpus, cider_images = Cider().compute_score(gts, res)
    rouge_corpus, rouge_images = Rouge().compute_score(gts, res)

    ids, groups, tokenized = cm.prepare_captions(refs, cands)
    assert groups == [gts[i] for i in ids] and tokenized == [res[i][0] for i in ids]

    ours = cm.evaluate_captions(refs, cands)
    assert ours.image_ids == list(refs)
    expected_corpus = {
        **dict(zip(cm.BLEU_KEYS, bleu_corpus, strict=True)),
        "CIDEr": cider_corpus,
        "ROUGE_L": rouge_corpus,
    }
    expected_images = {
        **dict(zip(cm.BLEU_KEYS, bleu_images, strict=True)),
        "CIDEr": cider_images,
        "ROUGE_L": rouge_images,
    }
    assert set(ours.corpus) == set(expected_corpus)
    for key, value in expected_corpus.items():
        assert ours.corpus[key] == pytest.approx(value, abs=1e-6), key
        per_image = np.array([ours.per_image[key][i] for i in ids])
        np.testing.assert_allclose(
            per_image, np.asarray(expected_images[key]), rtol=0, atol=1e-6, err_msg=key
        )


def test_scorers_match_pycocoevalcap_on_pretokenized_flickr8k_val() -> None:
    # pycocoevalcap's BLEU, CIDEr-D and ROUGE-L are pure Python: compare them without Java on
    # captions tokenised here, including an empty candidate and candidates with no match.
    path = FLICKR / "val" / "references.json"
    _needs_data(path)
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    all_refs = cm.load_coco_references(str(path))
    ids = list(all_refs)
    refs = {k: ptb.tokenize_many(v[1:]) for k, v in all_refs.items()}
    cands = dict(zip(ids, ptb.tokenize_many([all_refs[k][0] for k in ids]), strict=True))
    cands[ids[0]], cands[ids[1]] = "", "zebra zebra"
    gts, res = refs, {k: [c] for k, c in cands.items()}
    bleu_corpus, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {key: (bleu_corpus[k], bleu_images[k]) for k, key in enumerate(cm.BLEU_KEYS)}
    expected["CIDEr"] = Cider().compute_score(gts, res)
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)
    ours = cm.evaluate_captions(refs, cands, tokenize=False)
    for key, (corpus, images) in expected.items():
        assert ours.corpus[key] == pytest.approx(corpus, abs=1e-6), key
        np.testing.assert_allclose(
            [ours.per_image[key][i] for i in ids], images, rtol=0, atol=1e-6, err_msg=key
        )


# ----------------------------------------------------------------------------------------------
# Hand-computed cases (no Java needed).
# ----------------------------------------------------------------------------------------------

CAPTION_A = "a man rides a horse on the beach"
CAPTION_B = "two dogs play in the snow"


def test_identical_caption_scores() -> None:
    refs = {"a": [CAPTION_A, CAPTION_A], "b": [CAPTION_B]}
    scores = cm.evaluate_captions(refs, {"a": CAPTION_A, "b": CAPTION_B})
    for key in cm.BLEU_KEYS:
        assert scores.corpus[key] == pytest.approx(1.0, abs=1e-6)
    assert scores.corpus["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D of a caption equal to all of its references: 10 * mean over n of cos = 1. Only
    # "the" is shared by both images, so its IDF is 0 but the other n-grams keep their weight.
    assert scores.per_image["CIDEr"]["a"] == pytest.approx(10.0)
    assert scores.per_image["CIDEr"]["b"] == pytest.approx(10.0)


def test_bleu_brevity_penalty_by_hand() -> None:
    corpus, per_image = cm.bleu([["the cat sat on the mat"]], ["the cat sat"])
    # Precisions 3/3, 2/2, 1/1 and, with no 4-gram, coco-caption's smoothed 1e-15 / 1e-9;
    # brevity penalty e^(1 - 6/3).
    for k in range(3):
        assert corpus[k] == pytest.approx(math.exp(-1), rel=1e-6)
    assert corpus[3] == pytest.approx(1e-6**0.25 * math.exp(-1), rel=1e-6)
    assert per_image[0] == corpus


def test_blank_candidate_scores_zero() -> None:
    refs = {"a": [CAPTION_A], "b": [CAPTION_B]}
    scores = cm.evaluate_captions(refs, {"a": "", "b": CAPTION_B})
    assert scores.per_image["CIDEr"]["a"] == 0.0
    assert scores.per_image["ROUGE_L"]["a"] == 0.0
    assert scores.per_image["Bleu_1"]["a"] < 1e-6


def test_rouge_l_by_hand() -> None:
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F_beta with beta = 1.2.
    p, r, b2 = 0.75, 0.6, 1.2**2
    mean, per_image = cm.rouge_l([["a c d e f"]], ["a b c d"])
    assert mean == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert per_image.shape == (1,)


def test_lcs_matches_dynamic_programming() -> None:
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 12))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = (
                    table[i - 1][j - 1] + 1
                    if a[i - 1] == b[j - 1]
                    else max(table[i - 1][j], table[i][j - 1])
                )
        assert cm._lcs_length(a, b) == table[-1][-1]


def test_cider_vectorizer_and_cosine_distance() -> None:
    refs = {"a": ["red car", "a red car"], "b": ["blue sky"], "c": ["green tree"]}
    vec = cm.CiderVectorizer(refs)
    assert vec.encode("") == {}
    encoded = vec.encode("red car")
    # tf * (log(#images) - log(df)): "red", "car", "red car" occur in one image's references.
    idf = math.log(3) - math.log(1)
    assert encoded == pytest.approx({("red",): idf, ("car",): idf, ("red", "car"): idf})
    unseen = vec.encode("purple purple")
    assert unseen[("purple",)] == pytest.approx(2 * math.log(3))
    assert cm.cosine_distance(encoded, encoded) == pytest.approx(0.0)
    assert cm.cosine_distance({}, encoded) == 1.0
    assert cm.cosine_distance({}, {}) == 1.0
    assert cm.cosine_distance(vec.encode("red"), encoded) == pytest.approx(1 - 1 / math.sqrt(3))
    assert cm.cosine_distance(np.zeros(3), np.ones(3)) == 1.0
    assert cm.cosine_distance(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(1.0)
    assert cm.cosine_distance(np.array([1.0, 1.0]), np.array([-1.0, -1.0])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.cosine_distance(np.ones(2), np.ones(3))
    tokenizing = cm.CiderVectorizer({"a": ["A red car."], "b": ["Blue sky."]}, tokenize=True)
    assert tokenizing.encode("The red car!") == pytest.approx(
        cm.CiderVectorizer({"a": ["a red car"], "b": ["blue sky"]}).encode("the red car")
    )


def test_cider_scorer_reuses_idf_across_candidate_sets() -> None:
    groups = [[CAPTION_A, "a man on a horse"], [CAPTION_B, "dogs in the snow"]]
    scorer = cm.CiderD(groups)
    mean, per_image = scorer.score([CAPTION_A, ""])
    assert per_image[1] == 0.0 and mean == pytest.approx(per_image[0] / 2)
    with pytest.raises(ValueError, match="2 reference groups"):
        scorer.score([CAPTION_A])


def test_bad_inputs_raise_value_error() -> None:
    refs = {"a": [CAPTION_A], "b": [CAPTION_B]}
    with pytest.raises(ValueError, match="same image ids"):
        cm.score_captions(refs, {"a": CAPTION_A})
    with pytest.raises(ValueError, match="non-empty"):
        cm.score_captions({"a": []}, {"a": CAPTION_A})
    with pytest.raises(ValueError, match="non-empty"):
        cm.score_captions({"a": CAPTION_A}, {"a": CAPTION_A})
    with pytest.raises(ValueError, match="must be a string"):
        cm.score_captions(refs, {"a": [CAPTION_A], "b": CAPTION_B})
    with pytest.raises(ValueError, match="empty"):
        cm.score_captions({}, {})
    with pytest.raises(ValueError, match="at least one image"):
        cm.CiderVectorizer({})
    with pytest.raises(ValueError, match="one group per image"):
        cm.CiderVectorizer(["a caption", "another caption"])
