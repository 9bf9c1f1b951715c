"""Caption-quality metrics that match the COCO caption evaluation (pycocoevalcap), in pure Python.

What is here (DESIGN §4):

- `bleu`, `CiderD`, `rouge_l`, `meteor` and the entry points `score_captions` (corpus scores) and
  `evaluate_captions` (corpus and per-image scores): BLEU-1..4 (corpus level, 'closest' reference
  length), CIDEr-D (sigma 6, clipped counts, x10, IDF from the references of the scored set),
  ROUGE-L (beta 1.2), each as coco-caption computes it; METEOR through pycocoevalcap's Java jar
  when Java is present, otherwise absent (never 0).
- `CiderVectorizer` and `cosine_distance`: the CIDEr TF-IDF n-gram vector of a caption, used by
  the refinement metrics as the text encoding e(c). The blank caption is the zero vector, whose
  cosine distance to anything (itself included) is 1.

Captions are first tokenised as coco-caption does (`ptb_tokenizer.py`: PTB tokens, lower case,
punctuation removed), unless the caller passes `tokenize=False`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refine_jax.evaluation.ptb_tokenizer import tokenize_for_eval, tokenize_many

# ==============================================================================================
# Input handling and n-grams.
# ==============================================================================================

MAX_N = 4


def _ngram_counts(words: Sequence[str], max_n: int = MAX_N) -> Counter[tuple[str, ...]]:
    """Counts every n-gram of `words` for n = 1..max_n (n is the tuple's length)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _check_inputs(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> list[Hashable]:
    """Validates a references/candidates pair and returns the image ids in references' order."""
    ids = list(references)
    if not ids:
        raise ValueError("no images to score: references is empty")
    if set(ids) != set(candidates):
        missing = [i for i in ids if i not in candidates][:5]
        extra = [i for i in candidates if i not in references][:5]
        raise ValueError(
            f"references and candidates must have the same image ids; "
            f"missing candidates for {missing}, candidates without references {extra}"
        )
    for i in ids:
        refs = references[i]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"image {i!r}: references must be a non-empty sequence of strings")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image {i!r}: every reference must be a string")
        if not isinstance(candidates[i], str):
            raise ValueError(
                f"image {i!r}: the candidate must be a string, got {type(candidates[i]).__name__}"
            )
    return ids


# ==============================================================================================
# BLEU (coco-caption's BleuScorer: corpus level, 'closest' reference length).
# ==============================================================================================

_TINY = 1e-15  # keeps a zero n-gram match count from making the geometric mean exactly 0
_SMALL = 1e-9  # keeps a zero denominator from dividing by zero


def _bleu_from_stats(
    correct: Sequence[float], guess: Sequence[float], test_len: float, ref_len: float, max_n: int
) -> list[float]:
    """BLEU-1..max_n from match statistics (smoothed and brevity-penalised as coco-caption)."""
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def bleu(
    references: Sequence[Sequence[str]], candidates: Sequence[str], max_n: int = MAX_N
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..max_n and per-image BLEU (rows: images) of already tokenised captions."""
    if len(references) != len(candidates):
        raise ValueError("bleu needs one candidate per reference group")
    total_correct, total_guess = [0] * max_n, [0] * max_n
    total_test = total_ref = 0
    per_image = []
    for refs, cand in zip(references, candidates, strict=True):
        words = cand.split()
        test_len = len(words)
        max_ref: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngram_counts(ref_words, max_n).items():
                if count > max_ref.get(gram, 0):
                    max_ref[gram] = count
        ref_len = min(ref_lens, key=lambda r: (abs(r - test_len), r))
        correct = [0] * max_n
        for gram, count in _ngram_counts(words, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
        guess = [max(0, test_len - k) for k in range(max_n)]
        per_image.append(_bleu_from_stats(correct, guess, test_len, ref_len, max_n))
        for k in range(max_n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        total_test += test_len
        total_ref += ref_len
    corpus = _bleu_from_stats(total_correct, total_guess, total_test, total_ref, max_n)
    return corpus, per_image


# ==============================================================================================
# CIDEr-D and its TF-IDF vector encoding.
# ==============================================================================================

_SparseVector = dict[tuple[str, ...], float]


class CiderVectorizer:
    """CIDEr's TF-IDF n-gram encoding; document frequencies come from `references` (one document
    per image: the set of n-grams in any of its references), as coco-caption computes them."""

    def __init__(
        self,
        references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
        max_n: int = MAX_N,
        tokenize: bool = False,
    ) -> None:
        groups = list(references.values()) if isinstance(references, Mapping) else list(references)
        if not groups:
            raise ValueError("CiderVectorizer needs references for at least one image")
        if any(isinstance(refs, str) for refs in groups):
            raise ValueError(
                "CiderVectorizer: give each image's references as a sequence of "
                "strings (one group per image), not a bare string"
            )
        self.max_n = max_n
        self.tokenize = tokenize
        if tokenize:
            flat = tokenize_many([r for refs in groups for r in refs])
            it = iter(flat)
            groups = [[next(it) for _ in refs] for refs in groups]
        self.reference_groups: list[list[str]] = [list(refs) for refs in groups]
        doc_freq: Counter[tuple[str, ...]] = Counter()
        for refs in self.reference_groups:
            doc_freq.update({g for r in refs for g in _ngram_counts(r.split(), max_n)})
        self.doc_freq = doc_freq
        self.log_num_docs = math.log(float(len(self.reference_groups)))

    def _idf(self, gram: tuple[str, ...]) -> float:
        """log(#images) - log(max(1, document frequency)), as coco-caption."""
        return self.log_num_docs - math.log(max(1.0, self.doc_freq.get(gram, 0.0)))

    def vectors(self, words: Sequence[str]) -> tuple[list[_SparseVector], list[float], int]:
        """Per-n TF-IDF vectors, their norms, and coco-caption's length term (the bigram count,
        which is the word count minus one for non-empty captions)."""
        vecs: list[_SparseVector] = [{} for _ in range(self.max_n)]
        sq = [0.0] * self.max_n
        for gram, tf in _ngram_counts(words, self.max_n).items():
            weight = float(tf) * self._idf(gram)
            vecs[len(gram) - 1][gram] = weight
            sq[len(gram) - 1] += weight * weight
        return vecs, [math.sqrt(s) for s in sq], max(len(words) - 1, 0)

    def encode(self, caption: str) -> _SparseVector:
        """The caption's TF-IDF vector over all n-grams n = 1..max_n (the n-gram tuple's length
        says its order); the blank caption gives the empty (zero) vector."""
        text = tokenize_for_eval(caption) if self.tokenize else caption
        vecs, _, _ = self.vectors(text.split())
        return {g: w for v in vecs for g, w in v.items()}


def cosine_distance(
    a: Mapping[Hashable, float] | np.ndarray, b: Mapping[Hashable, float] | np.ndarray
) -> float:
    """1 - cos(a, b) for sparse (dict) or dense vectors; 1 when either is the zero vector (the
    blank caption), DESIGN §4."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        norm_a = math.sqrt(sum(v * v for v in a.values()))
        norm_b = math.sqrt(sum(v * v for v in b.values()))
        if norm_a == 0.0 or norm_b == 0.0:
            return 1.0
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        dot = sum(v * large[k] for k, v in small.items() if k in large)
    else:
        va, vb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        if va.shape != vb.shape:
            raise ValueError(f"cosine_distance: shapes differ, {va.shape} vs {vb.shape}")
        norm_a, norm_b = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
        if norm_a == 0.0 or norm_b == 0.0:
            return 1.0
        dot = float(va @ vb)
    return min(2.0, max(0.0, 1.0 - dot / (norm_a * norm_b)))


class CiderD:
    """CIDEr-D scorer (sigma 6, clipped counts, x10) with the IDF of a fixed reference set, so the
    same references can score many candidate sets (e.g. every refinement step)."""

    def __init__(
        self, references: Sequence[Sequence[str]], sigma: float = 6.0, max_n: int = MAX_N
    ) -> None:
        self.vectorizer = CiderVectorizer(references, max_n=max_n)
        self.sigma = sigma
        self._refs = [
            [self.vectorizer.vectors(r.split()) for r in refs]
            for refs in self.vectorizer.reference_groups
        ]

    def _similarity(
        self,
        hyp: tuple[list[_SparseVector], list[float], int],
        ref: tuple[list[_SparseVector], list[float], int],
    ) -> float:
        """Mean over n of the clipped cosine of the n-gram vectors, times the Gaussian length
        penalty (sigma 6)."""
        (hv, hn, hl), (rv, rn, rl) = hyp, ref
        penalty = math.exp(-((hl - rl) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for n in range(self.vectorizer.max_n):
            rvn = rv[n]
            val = sum(min(w, rvn[g]) * rvn[g] for g, w in hv[n].items() if g in rvn)
            if hn[n] != 0 and rn[n] != 0:
                val /= hn[n] * rn[n]
            total += val * penalty
        return total / self.vectorizer.max_n

    def score(self, candidates: Sequence[str]) -> tuple[float, np.ndarray]:
        """Corpus CIDEr-D (mean over images) and the per-image scores of tokenised candidates,
        one per reference group, in the same order."""
        if len(candidates) != len(self._refs):
            raise ValueError(
                f"CiderD.score: {len(candidates)} candidates for {len(self._refs)} reference groups"
            )
        scores = np.empty(len(candidates), dtype=np.float64)
        for i, (cand, refs) in enumerate(zip(candidates, self._refs, strict=True)):
            hyp = self.vectorizer.vectors(cand.split())
            scores[i] = 10.0 * sum(self._similarity(hyp, ref) for ref in refs) / len(refs)
        return float(scores.mean()), scores


# ==============================================================================================
# ROUGE-L and METEOR.
# ==============================================================================================


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, one big-int row per symbol)."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for tok in b:
        match = row & masks.get(tok, 0)
        row = ((row + match) | (row - match)) & full
    return len(a) - row.bit_count()


def rouge_l(
    references: Sequence[Sequence[str]], candidates: Sequence[str], beta: float = 1.2
) -> tuple[float, np.ndarray]:
    """Mean and per-image ROUGE-L (F-measure of the best LCS precision and recall over the
    references, beta 1.2); captions are split on single spaces exactly as coco-caption does."""
    if len(references) != len(candidates):
        raise ValueError("rouge_l needs one candidate per reference group")
    scores = np.empty(len(candidates), dtype=np.float64)
    for i, (refs, cand) in enumerate(zip(references, candidates, strict=True)):
        cand_tokens = cand.split(" ")
        best_p = best_r = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand_tokens)
            best_p = max(best_p, lcs / len(cand_tokens))
            best_r = max(best_r, lcs / len(ref_tokens))
        if best_p != 0 and best_r != 0:
            scores[i] = (1 + beta**2) * best_p * best_r / (best_r + beta**2 * best_p)
        else:
            scores[i] = 0.0
    return float(scores.mean()), scores


def meteor_available() -> bool:
    """Whether METEOR can run here: a `java` on PATH and pycocoevalcap installed."""
    if shutil.which("java") is None:
        return False
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return False
    return True


def meteor_score(
    references: Sequence[Sequence[str]], candidates: Sequence[str]
) -> tuple[float, np.ndarray] | None:
    """Corpus and per-image METEOR 1.5 through pycocoevalcap's Java jar, or None (with a warning
    if it failed) when it cannot run: METEOR is reported as absent, never as 0."""
    if not meteor_available():
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    try:
        scorer = Meteor()
        try:
            score, per_image = scorer.compute_score(gts, res)
        finally:
            _stop_meteor(scorer)
    except (OSError, ValueError) as err:
        warnings.warn(f"METEOR failed, reported as absent: {err}", RuntimeWarning, stacklevel=2)
        return None
    return float(score), np.asarray(per_image, dtype=np.float64)


def _stop_meteor(scorer: Any) -> None:
    """Ends a pycocoevalcap `Meteor` scorer's Java process, whether or not it failed.

    `compute_score` keeps the scorer's lock when it raises, and `Meteor.__del__` waits on that
    lock: left to itself, dropping a failed scorer blocks forever. The lock is released here
    (the scorer is ours alone), the process ended, and `__del__` then finds nothing to do."""
    if scorer.lock.locked():
        scorer.lock.release()
    with scorer.lock:
        process = scorer.meteor_p
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # stdin's flush into a closed pipe
                    stream.close()


# ==============================================================================================
# Entry points.
# ==============================================================================================

BLEU_KEYS = tuple(f"Bleu_{n}" for n in range(1, MAX_N + 1))


@dataclass
class CaptionScores:
    """Corpus scores (metric -> float) and per-image scores (metric -> image id -> float)."""

    corpus: dict[str, float]
    per_image: dict[str, dict[Hashable, float]] = field(default_factory=dict)
    image_ids: list[Hashable] = field(default_factory=list)


def prepare_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    tokenize: bool = True,
) -> tuple[list[Hashable], list[list[str]], list[str]]:
    """Validates inputs and returns (image ids, reference groups, candidates), eval-tokenised as
    pycocoevalcap does (references and candidates as two separate batches) when `tokenize`."""
    ids = _check_inputs(references, candidates)
    groups = [list(references[i]) for i in ids]
    cands = [candidates[i] for i in ids]
    if tokenize:
        flat = tokenize_many([r for refs in groups for r in refs])
        it = iter(flat)
        groups = [[next(it) for _ in refs] for refs in groups]
        cands = tokenize_many(cands)
    return ids, groups, cands


def evaluate_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    tokenize: bool = True,
    meteor: bool = False,
) -> CaptionScores:
    """Corpus and per-image Bleu_1..4, CIDEr (CIDEr-D), ROUGE_L and, when asked for and Java is
    present, METEOR, matching pycocoevalcap on the same inputs. Keys of `candidates` must equal
    those of `references`; each image needs at least one reference."""
    ids, groups, cands = prepare_captions(references, candidates, tokenize)
    corpus: dict[str, float] = {}
    per_image: dict[str, dict[Hashable, float]] = {}
    bleu_corpus, bleu_rows = bleu(groups, cands)
    for k, key in enumerate(BLEU_KEYS):
        corpus[key] = float(bleu_corpus[k])
        per_image[key] = {i: float(row[k]) for i, row in zip(ids, bleu_rows, strict=True)}
    for key, (mean, scores) in (
        ("CIDEr", CiderD(groups).score(cands)),
        ("ROUGE_L", rouge_l(groups, cands)),
    ):
        corpus[key] = mean
        per_image[key] = {i: float(s) for i, s in zip(ids, scores, strict=True)}
    if meteor:
        result = meteor_score(groups, cands)
        if result is not None:
            corpus["METEOR"] = result[0]
            per_image["METEOR"] = {i: float(s) for i, s in zip(ids, result[1], strict=True)}
    return CaptionScores(corpus=corpus, per_image=per_image, image_ids=ids)


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    tokenize: bool = True,
    meteor: bool = False,
) -> dict[str, float]:
    """Corpus scores only: {'Bleu_1'..'Bleu_4', 'CIDEr', 'ROUGE_L'} plus 'METEOR' when asked for
    and available (see `evaluate_captions`)."""
    return evaluate_captions(references, candidates, tokenize=tokenize, meteor=meteor).corpus


def load_coco_references(path: str) -> dict[Hashable, list[str]]:
    """Reads a COCO-caption ground-truth json into {image_id: [captions]} (file order)."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out: dict[Hashable, list[str]] = {img["id"]: [] for img in data.get("images", [])}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


def load_coco_results(path: str) -> dict[Hashable, str]:
    """Reads a COCO-caption results json ([{image_id, caption}]) into {image_id: caption}."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {r["image_id"]: r["caption"] for r in data}


__all__ = [
    "BLEU_KEYS",
    "CaptionScores",
    "CiderD",
    "CiderVectorizer",
    "bleu",
    "cosine_distance",
    "evaluate_captions",
    "load_coco_references",
    "load_coco_results",
    "meteor_available",
    "meteor_score",
    "prepare_captions",
    "rouge_l",
    "score_captions",
]
