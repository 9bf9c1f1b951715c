"""Refinement metrics (DESIGN §4): how good each step's caption is and how evenly the steps get
from the blank description to the final one.

For images i with step captions c_1..c_K (c_0 is the blank description), references, the ideal
schedule s(k) and the loss weights w_k:

- CIDEr-D and BLEU-4 at every step (corpus scores, coco-caption scale, same IDF at every step:
  that of the references), `final_cider` = the CIDEr of step K.
- Weighted quality Q_w = sum_k w_k * CIDEr_k.
- Gradualness G: with e(c) the text encoding (default: CIDEr's TF-IDF n-gram vector, from the
  references, of the eval-tokenised caption; the blank caption is the zero vector) and d the
  cosine distance (1 whenever one side is the zero vector), progress
  p_k = 1 - d(c_k, c_K) / d(c_0, c_K) and the mean deviation dev_i = mean_k |p_k - s(k)|.
  Because d(c_0, c_K) = 1 for any non-blank final caption, p_k = cos(e(c_k), e(c_K)).
  DESIGN §4's G_i = 1 - dev_i is reported as `gradualness_raw`. A caller may bring its own
  encoding instead: vectors (`step_vectors`, the same cosine distance) or the progress values
  themselves (`step_progress`; the matching model's are divergences between image posteriors,
  `evaluation.matching.posterior_progress`).
- Length adherence: the same with the length ratios r_k = len_k / len_K (len: words after eval
  tokenisation) in place of p_k; DESIGN §4's A_i = 1 - mean_k |r_k - s(k)| is
  `length_adherence_raw`.
- Refine score R = Q_w * G (the normalised G below), and `monotonic_fraction`: the fraction of
  images whose per-image CIDEr never drops from one step to the next (a drop of at most 1e-9
  relative is float noise).
- Repetition: the share of step-k captions with an immediately repeated word ("snow snow"),
  the typical failure of parallel decoding. Consensus: the share of step-k captions that hold a
  content word (not in `targets.FUNCTION_WORDS`) used by a majority of the image's references
  (3 of 5): does the coarse description already name what people agree is there?
- `final_cider_interval`: a 95% bootstrap interval of the final CIDEr-D over images (2,000
  resamples, seed 0). The IDF comes from the references and is fixed, so the corpus CIDEr is the
  mean of the per-image scores and resampling those is exact.
- `paired_difference`: two runs' per-image scores on the same images, their mean difference
  and its paired bootstrap interval (how the equal-budget comparisons are reported).

Normalised G and A (`gradualness`, `length_adherence`). The raw 1 - dev does not separate a
gradual chain from the two degenerate ones: at K = 4 under the linear schedule both "blank until
the last step" (p = 0, 0, 0, 1) and "complete at step 1, then unchanged" (p = 1, 1, 1, 1) score
0.625, although neither refines at all. So the deviation is measured against the worse of these
two paths under the same schedule:

    D = max(dev_end, dev_start),  dev_end = mean_k |e_k - s(k)| with e = (0, ..., 0, 1),
                                  dev_start = mean_k |1 - s(k)|,
    G_i = clip(1 - dev_i / D, 0, 1)   (G_i = 1 when K = 1 or D = 0),

and likewise A_i from the length deviations. With s(K) = 1, dev_end = (1/K) sum_{k<K} s(k).
A chain that follows the schedule exactly scores 1; the worse degenerate path scores 0, the
other one 1 - dev_other / D. Under the linear schedule the two are equally bad, so both score
exactly 0; under a log schedule, which front-loads progress, "blank until the last step" scores
0 and "complete at step 1" 1 - dev_start / dev_end > 0. G = mean_i G_i, A = mean_i A_i.

Conventions (stated because the formulas leave them open):

- Blank final caption: progress and length ratios are undefined, so that image's G_i and A_i
  are 0 (worst), raw and normalised; it still counts in every average, and `num_blank_final`
  counts such images.
  G_i is 0 whenever the final encoding is the zero vector: a blank caption, one made only of
  n-grams that occur in every image's references (zero IDF), with `step_vectors` an all-zero
  final vector, with `step_progress` a row holding NaN. With a single image every IDF is 0 (as
  CIDEr is), so G is 0 there.
- Each step's deviation |p_k - s(k)| or |len_k/len_K - s(k)| is capped at 1, which keeps the raw G
  and A in [0, 1] as DESIGN §4 states, also for model state vectors (cosine < 0) and intermediate
  captions longer than the final one. The normalised values are clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from refine_jax.evaluation.caption_metrics import (
    CiderD,
    CiderVectorizer,
    bleu,
    cosine_distance,
    prepare_captions,
)
from refine_jax.evaluation.ptb_tokenizer import tokenize_many
from refine_jax.targets import FUNCTION_WORDS

_MONOTONE_RTOL = 1e-9
BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """[low, high] percentile bootstrap interval of the mean of per-image `values`."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def paired_difference(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], seed: int = 0
) -> dict[str, Any]:
    """Mean of a - b over the images both score (per-image values by image id) with its paired
    95% bootstrap interval (the same images resampled for both): is one model better on the
    same photos, not only on average."""
    shared = sorted(a.keys() & b.keys(), key=str)
    if not shared:
        raise ValueError("a paired difference needs images that both runs scored; none are shared")
    differences = np.asarray([a[i] - b[i] for i in shared], np.float64)
    return {
        "mean": float(differences.mean()),
        "interval": bootstrap_interval(differences, seed=seed),
        "num_images": len(shared),
    }


def has_repeated_word(caption: str) -> bool:
    """Whether two consecutive words of the (tokenised) caption are the same."""
    words = caption.split()
    return any(a == b for a, b in zip(words, words[1:], strict=False))


def consensus_words(references: Sequence[str]) -> set[str]:
    """Content words that a majority of the (tokenised) references use (3 of 5)."""
    counts: dict[str, int] = {}
    for caption in references:
        for word in set(caption.split()) - FUNCTION_WORDS:
            counts[word] = counts.get(word, 0) + 1
    return {w for w, n in counts.items() if n > len(references) / 2}


def _as_step_array(values: Any, num_steps: int, name: str) -> np.ndarray:
    """A finite float vector of length K, or a ValueError naming `name`."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != num_steps:
        raise ValueError(
            f"{name} must have one value per step: expected shape ({num_steps},), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _check_trajectories(
    trajectories: Mapping[Hashable, Sequence[str]], name: str = "trajectories"
) -> tuple[list[Hashable], int]:
    """Image ids (in order) and the common number of steps K, or a clear ValueError."""
    ids = list(trajectories)
    if not ids:
        raise ValueError(f"{name} is empty: no images to evaluate")
    lengths = {}
    for i in ids:
        steps = trajectories[i]
        if isinstance(steps, str) or not isinstance(steps, Sequence):
            raise ValueError(
                f"{name}[{i!r}] must be a sequence of K step captions, got {type(steps).__name__}"
            )
        if not all(isinstance(c, str) for c in steps):
            raise ValueError(f"{name}[{i!r}]: every step caption must be a string")
        lengths[i] = len(steps)
    num_steps = lengths[ids[0]]
    if num_steps == 0:
        raise ValueError(f"{name}[{ids[0]!r}] has no steps")
    bad = [(i, n) for i, n in lengths.items() if n != num_steps]
    if bad:
        raise ValueError(
            f"every trajectory must have the same number of steps K={num_steps} "
            f"(that of {ids[0]!r}); these differ: {bad[:5]}"
        )
    return ids, num_steps


def _per_image_steps(
    values: np.ndarray | Mapping[Hashable, Any],
    ids: list[Hashable],
    num_steps: int,
    name: str,
    per_step_dims: int,
) -> np.ndarray:
    """The caller's per-image, per-step values as an array [num_images, K, ...] in `ids` order
    (`per_step_dims` trailing axes: 1 for vectors [N, K, D], 0 for scalars [N, K])."""
    if isinstance(values, Mapping):
        if set(values) != set(ids):
            raise ValueError(f"{name} must have exactly the image ids of trajectories")
        arr = np.stack([np.asarray(values[i], dtype=np.float64) for i in ids])
    else:
        arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 + per_step_dims or arr.shape[:2] != (len(ids), num_steps):
        trailing = ", D" if per_step_dims else ""
        raise ValueError(
            f"{name} must have shape [num_images={len(ids)}, K={num_steps}{trailing}], "
            f"got {arr.shape}"
        )
    return arr


def degenerate_deviation(schedule: Sequence[float] | np.ndarray) -> float:
    """D = max(dev_end, dev_start): the mean deviation from `schedule` of the worse of the two
    paths that do not refine (all at the last step, all at step 1); each step's deviation capped
    at 1 as for real chains."""
    sched = np.asarray(schedule, dtype=np.float64)
    all_at_end = np.zeros_like(sched)
    all_at_end[-1] = 1.0
    dev_end = float(np.minimum(1.0, np.abs(all_at_end - sched)).mean())
    dev_start = float(np.minimum(1.0, np.abs(1.0 - sched)).mean())
    return max(dev_end, dev_start)


def _adherence(
    values: np.ndarray, blank: np.ndarray, schedule: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (normalised, raw) scores of trajectories `values` [N, K] against `schedule`;
    0 for images whose final is blank."""
    deviation = np.minimum(1.0, np.abs(values - schedule[None, :])).mean(axis=1)
    raw = np.where(blank, 0.0, 1.0 - deviation)
    denominator = degenerate_deviation(schedule)
    if len(schedule) == 1 or denominator == 0.0:
        normalised = np.ones_like(deviation)
    else:
        normalised = np.clip(1.0 - deviation / denominator, 0.0, 1.0)
    return np.where(blank, 0.0, normalised), raw


def _tokenised_steps(
    trajectories: Mapping[Hashable, Sequence[str]],
    ids: Sequence[Hashable],
    num_steps: int,
    tokenize: bool,
) -> list[list[str]]:
    """[K][N] captions of `ids`, each step tokenised as one batch (as coco-caption would score
    each step's results file)."""
    steps = []
    for k in range(num_steps):
        captions = [trajectories[i][k] for i in ids]
        steps.append(tokenize_many(captions) if tokenize else captions)
    return steps


def refinement_metrics(
    trajectories: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[str]],
    schedule: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    tokenize: bool = True,
    step_vectors: np.ndarray | Mapping[Hashable, Any] | None = None,
    per_image: bool = False,
    blank_vector: np.ndarray | None = None,
    written: Mapping[Hashable, Sequence[str]] | None = None,
    step_progress: np.ndarray | Mapping[Hashable, Any] | None = None,
) -> dict[str, Any]:
    """DESIGN §4 refinement metrics of K-step caption trajectories (JSON-serialisable).

    trajectories: image id -> K captions (step 1..K); references: image id -> its references
    (same ids); schedule: the ideal progress s(k), k = 1..K, in [0, 1]; weights: the loss
    weights w_k (non-negative, sum 1). tokenize: eval-tokenise captions as coco-caption does.
    step_vectors: optional encodings e(c_k) to use for gradualness instead of the CIDEr TF-IDF
    vectors, an array [num_images, K, D] in the iteration order of `trajectories` or a mapping
    image id -> [K, D] (e.g. the matching model's text embeddings). blank_vector: the encoding
    [D] of the blank description c_0 (the matching model's empty description); then
    p_k = 1 - d(c_k, c_K) / d(c_0, c_K), and a final with d(c_0, c_K) ~ 0 counts as blank.
    Without it c_0 is the zero vector (d(c_0, c_K) = 1). step_progress: instead of vectors,
    the progress p_k itself, [num_images, K] or image id -> [K], measured by the caller in its
    own encoding (the matching model's image posteriors, `evaluation.matching`); NaN in a row
    marks an image whose final is indistinguishable from the blank description (counted as a
    blank final). written: optional image id -> K
    captions as the model wrote them, before decode-time de-duplication; repetition is also
    measured on them (`repetition_as_written_per_step`; the trajectories themselves without).

    A single step (K = 1: the autoregressive baseline) has no path to be gradual along: G, A
    and R (and their raw forms) are None, "not applicable".

    Gradualness is always also reported in CIDEr's TF-IDF space, as `gradualness_tfidf`,
    `gradualness_raw_tfidf`, `progress_per_step_tfidf` and `refine_score_tfidf` (and per image
    `progress_tfidf`, `gradualness_tfidf`, `gradualness_raw_tfidf`): the same values as the
    unsuffixed ones when no step vectors are given.

    Returns num_images, num_steps, cider_per_step, bleu4_per_step, final_cider, final_bleu4,
    final_cider_interval, repetition_per_step, final_repetition,
    repetition_as_written_per_step, consensus_per_step,
    weighted_quality (Q_w), gradualness (normalised G), gradualness_raw (DESIGN's 1 - mean
    deviation), progress_per_step (mean p_k over images with a non-zero final encoding, None if
    none), length_adherence (normalised A), length_adherence_raw, length_ratio_per_step (mean
    len_k/len_K over images with a non-blank final), refine_score (R = Q_w * G),
    monotonic_fraction and num_blank_final. With `per_image`, also `per_image`: one dict per
    image in the order of `trajectories` (image_id, cider [K], progress [K], length_ratio [K],
    gradualness, gradualness_raw, length_adherence, length_adherence_raw, monotonic).
    """
    ids, num_steps = _check_trajectories(trajectories)
    if set(ids) != set(references):
        raise ValueError("trajectories and references must have the same image ids")
    sched = _as_step_array(schedule, num_steps, "schedule")
    if np.any(sched < 0) or np.any(sched > 1):
        raise ValueError(
            f"schedule values are ideal progress fractions in [0, 1], got {sched.tolist()}"
        )
    w = _as_step_array(weights, num_steps, "weights")
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"weights must be non-negative and sum to 1, got {w.tolist()} (sum {w.sum()})"
        )
    if step_vectors is not None and step_progress is not None:
        raise ValueError("give step_vectors or step_progress, not both: they are two encodings")
    vectors = progress_given = None
    if step_vectors is not None:
        vectors = _per_image_steps(step_vectors, ids, num_steps, "step_vectors", 1)
        if not np.all(np.isfinite(vectors)):
            raise ValueError("step_vectors must be finite")
    if step_progress is not None:
        progress_given = _per_image_steps(step_progress, ids, num_steps, "step_progress", 0)
        if np.any(np.isinf(progress_given)):
            raise ValueError("step_progress must be finite (NaN marks a blank final)")

    ordered_refs = {i: references[i] for i in ids}
    _, ref_groups, _ = prepare_captions(ordered_refs, {i: "" for i in ids}, tokenize=tokenize)
    steps = _tokenised_steps(trajectories, ids, num_steps, tokenize)  # [K][N]

    cider = CiderD(ref_groups)
    cider_per_step, bleu4_per_step, per_image_cider = [], [], []
    for k in range(num_steps):
        mean, scores = cider.score(steps[k])
        cider_per_step.append(mean)
        per_image_cider.append(scores)
        bleu4_per_step.append(bleu(ref_groups, steps[k])[0][3])
    per_image_cider_arr = np.stack(per_image_cider, axis=1)  # [N, K]
    drops = np.diff(per_image_cider_arr, axis=1) < -_MONOTONE_RTOL * np.maximum(
        1.0, np.abs(per_image_cider_arr[:, :-1])
    )
    monotonic = ~drops.any(axis=1)
    agreed = [consensus_words(ref_groups[n]) for n in range(len(ids))]
    repetition_per_step = [
        float(np.mean([has_repeated_word(c) for c in steps[k]])) for k in range(num_steps)
    ]
    if written is None:
        repetition_as_written = repetition_per_step
    else:
        repetition_as_written = [
            float(np.mean([has_repeated_word(c) for c in captions]))
            for captions in _tokenised_steps(written, ids, num_steps, tokenize)
        ]
    consensus_per_step = [
        float(np.mean([bool(agreed[n] & set(c.split())) for n, c in enumerate(steps[k])]))
        for k in range(num_steps)
    ]

    lengths = np.array(
        [[len(steps[k][n].split()) for k in range(num_steps)] for n in range(len(ids))],
        dtype=np.float64,
    )
    # Progress in CIDEr's TF-IDF space, always (reported as *_tfidf); in the caller's encoding
    # when step vectors are given.
    vectorizer: CiderVectorizer = cider.vectorizer
    tfidf_distances = np.empty((len(ids), num_steps), dtype=np.float64)
    tfidf_blank = np.empty(len(ids), dtype=bool)
    for n in range(len(ids)):
        encoded = [vectorizer.encode(steps[k][n]) for k in range(num_steps)]
        tfidf_blank[n] = not any(encoded[-1].values())
        tfidf_distances[n] = [cosine_distance(e, encoded[-1]) for e in encoded]
    distances, final_blank = tfidf_distances, tfidf_blank
    if vectors is not None:
        distances = np.array(
            [
                [cosine_distance(vectors[n, k], vectors[n, -1]) for k in range(num_steps)]
                for n in range(len(ids))
            ]
        )
        if blank_vector is None:
            final_blank = ~np.any(vectors[:, -1, :] != 0, axis=1)
        else:
            blank = np.asarray(blank_vector, np.float64)
            span = np.array([cosine_distance(blank, vectors[n, -1]) for n in range(len(ids))])
            final_blank = span <= 1e-6
            distances = distances / np.where(final_blank, 1.0, span)[:, None]
    if progress_given is not None:
        final_blank = np.isnan(progress_given).any(axis=1)
        distances = 1.0 - np.where(final_blank[:, None], 0.0, progress_given)
    final = lengths[:, -1:]
    has_words = final[:, 0] > 0
    ratios = lengths / np.where(final == 0, 1, final)
    adherence, adherence_raw = _adherence(ratios, ~has_words, sched)
    weighted_quality = float(np.dot(w, cider_per_step))
    applicable = num_steps > 1  # one step: nothing to be gradual along

    def gradualness_of(distances: np.ndarray, blank: np.ndarray, suffix: str) -> tuple:
        """(summary keys with `suffix`, per-image (progress, G, raw G)) of one encoding."""
        progress = 1.0 - distances
        grad, grad_raw = _adherence(progress, blank, sched)
        kept = ~blank
        summary = {
            f"gradualness{suffix}": float(grad.mean()) if applicable else None,
            f"gradualness_raw{suffix}": float(grad_raw.mean()) if applicable else None,
            f"progress_per_step{suffix}": (
                progress[kept].mean(axis=0).tolist() if kept.any() else None
            ),
            f"refine_score{suffix}": weighted_quality * float(grad.mean()) if applicable else None,
        }
        return summary, (progress, grad, grad_raw)

    main, (progress, grad, grad_raw) = gradualness_of(distances, final_blank, "")
    tfidf, (progress_tfidf, grad_tfidf, grad_raw_tfidf) = gradualness_of(
        tfidf_distances, tfidf_blank, "_tfidf"
    )
    out: dict[str, Any] = {
        "num_images": len(ids),
        "num_steps": num_steps,
        "cider_per_step": [float(x) for x in cider_per_step],
        "bleu4_per_step": [float(x) for x in bleu4_per_step],
        "final_cider": float(cider_per_step[-1]),
        "final_bleu4": float(bleu4_per_step[-1]),
        "final_cider_interval": bootstrap_interval(per_image_cider_arr[:, -1]),
        "repetition_per_step": repetition_per_step,
        "final_repetition": repetition_per_step[-1],
        "repetition_as_written_per_step": repetition_as_written,
        "consensus_per_step": consensus_per_step,
        "weighted_quality": weighted_quality,
        **main,
        "length_adherence": float(adherence.mean()) if applicable else None,
        "length_adherence_raw": float(adherence_raw.mean()) if applicable else None,
        "length_ratio_per_step": (
            ratios[has_words].mean(axis=0).tolist() if has_words.any() else None
        ),
        "monotonic_fraction": float(monotonic.mean()),
        "num_blank_final": int((~has_words).sum()),
        **tfidf,
    }
    if per_image:
        out["per_image"] = [
            {
                "image_id": image_id,
                "cider": per_image_cider_arr[n].tolist(),
                "progress": progress[n].tolist(),
                "progress_tfidf": progress_tfidf[n].tolist(),
                "gradualness_tfidf": float(grad_tfidf[n]),
                "gradualness_raw_tfidf": float(grad_raw_tfidf[n]),
                "length_ratio": ratios[n].tolist(),
                "gradualness": float(grad[n]),
                "gradualness_raw": float(grad_raw[n]),
                "length_adherence": float(adherence[n]),
                "length_adherence_raw": float(adherence_raw[n]),
                "monotonic": bool(monotonic[n]),
            }
            for n, image_id in enumerate(ids)
        ]
    return out


def _normalize_whitespace(text: str) -> str:
    """Collapses runs of whitespace to one space and strips the ends."""
    return " ".join(text.split())


def chain_agreement(
    trajectories: Mapping[Hashable, Sequence[str]],
    true_chains: Mapping[Hashable, Sequence[str]],
) -> list[float]:
    """Per step k, the fraction of images whose step-k caption equals the generator's true step-k
    caption exactly after whitespace normalisation (for synthetic data with a known chain)."""
    ids, num_steps = _check_trajectories(trajectories)
    if set(ids) != set(true_chains):
        raise ValueError("trajectories and true_chains must have the same image ids")
    _, true_steps = _check_trajectories(true_chains, "true_chains")
    if true_steps != num_steps:
        raise ValueError(
            f"trajectories have K={num_steps} steps but true_chains have K={true_steps}"
        )
    hits = np.array(
        [
            [
                _normalize_whitespace(trajectories[i][k])
                == _normalize_whitespace(true_chains[i][k])
                for k in range(num_steps)
            ]
            for i in ids
        ]
    )
    return [float(x) for x in hits.mean(axis=0)]


__all__ = ["chain_agreement", "degenerate_deviation", "refinement_metrics"]
