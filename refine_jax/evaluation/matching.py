"""The matching model as a yardstick (DESIGN §4, §11): retrieval recall of the model itself,
and, for a captioner's steps, a reference-free image–text score, a reference-based one and the
text embeddings the gradualness metric measures progress in.

Scores:
- `match_score` of a description c for image x: max(cos(e_img(x), e_txt(c)), 0), CLIPScore's
  form with weight 1 (the cosine of this project's model, not CLIP's).
- `ref_match_score`: the harmonic mean of `match_score` and max(max_r cos(e_txt(c), e_txt(r)), 0)
  over the image's references r (RefCLIPScore's form).
- `posterior_progress`, gradualness in the matching model's space: each description c gets the
  model's posterior over a bank of images (the evaluated split),
  q_c(x) = softmax_x(scale * cos(e_img(x), e_txt(c))), with the model's learned contrastive
  scale, and step k's progress is p_k = 1 - KL(q_K || q_k) / KL(q_K || q_0), q_0 the empty
  description's. When the posteriors are uniform over nested sets of images M_0 ⊇ M_k ⊇ M_K,
  KL(q_K || q_k) = log(|M_k| / |M_K|), so p_k = log(|M_0| / |M_k|) / log(|M_0| / |M_K|): the
  share of what the final description says about which image it is that step k already says.
  A step that points at other images than the final one can be further from it than the
  blank is: p_k < 0.
  (The cosine between text embeddings, the first form, keeps every coarse description about as
  far from the full one as another image's caption is: BENCHMARKS.md.)
- Retrieval recall@k: image -> text, the share of images with one of their references among
  the k texts most similar to them (an image with no reference is a miss); text -> image, the
  share of texts whose image is among the k images most similar to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from refine_jax.data.pipeline import CaptionFeatures, eval_batches, pad_to
from refine_jax.evaluation.refinement_metrics import refinement_metrics
from refine_jax.model_loading import LoadedModel
from refine_jax.sharding import to_host
from refine_jax.targets import SalienceStats, caption_words, schedule_fractions, step_word_indices
from refine_jax.tokenizer import Tokenizer

RECALL_AT = (1, 5, 10)
SPAN_EPS = 1e-9  # nats: a final description whose posterior is the blank's has no path to it
PAIRS_PER_IMAGE = 8  # matching-head batches hold this many (image, text) pairs per image


class MatchEmbedder:
    """Embeds images and descriptions with a matching model's towers (jitted once per batch
    shape; batches padded to `batch_size` so every call has the same shape)."""

    def __init__(
        self,
        model,
        params,
        tokenizer: Tokenizer,
        features: CaptionFeatures,
        batch_size: int,
        put_batch: Callable[[dict], dict] = lambda batch: batch,
    ):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.features, self.batch_size, self.put_batch = features, batch_size, put_batch
        self._images = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=model.encode_images)[1]
        )
        self._texts = jax.jit(
            lambda p, t: model.apply({"params": p}, t, method=model.encode_texts)[2]
        )
        self._pairs = jax.jit(
            lambda p, x, t, o: jax.nn.sigmoid(
                model.apply({"params": p}, x, t, o, method=model.pair_logits)
            )
        )

    @property
    def logit_scale(self) -> float:
        """The model's learned contrastive scale, read from the current `params`."""
        return float(
            to_host(self.model.apply({"params": self.params}, method=self.model.logit_scale))
        )

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> MatchEmbedder:
        if loaded.config.model.kind != "match":
            raise ValueError(
                f"a matching model is needed (model.kind = 'match'); this checkpoint is a "
                f"{loaded.config.model.kind!r} model"
            )
        return cls(
            loaded.model,
            loaded.params,
            loaded.tokenizer,
            loaded.features,
            loaded.config.batch_size,
            loaded.put_batch,
        )

    def match_probabilities(
        self, images: np.ndarray, texts: Sequence[str], owner: Sequence[int]
    ) -> np.ndarray:
        """The matching head's probability that texts[p] describes images[owner[p]]: [P].
        `images` [N, S, S, 3] preprocessed; pairs go through in fixed-size batches."""
        owner = np.asarray(owner, np.int32)
        pairs = self.batch_size * PAIRS_PER_IMAGE
        out = np.zeros((len(texts),), np.float32)
        for start in range(0, len(images), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(images)))
            chunk = images[rows]
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
            placed = self.put_batch({"image": chunk})["image"]
            picked = np.flatnonzero((owner >= rows[0]) & (owner <= rows[-1]))
            for first in range(0, len(picked), pairs):
                part = picked[first : first + pairs]
                tokens = np.stack([self.text_tokens(texts[p]) for p in part])
                local = owner[part] - rows[0]
                padding = pairs - len(part)
                tokens = np.concatenate([tokens, np.repeat(tokens[-1:], padding, 0)])
                local = np.concatenate([local, np.repeat(local[-1:], padding)])
                out[part] = to_host(self._pairs(self.params, placed, tokens, local))[: len(part)]
        return out

    def text_tokens(self, text: str) -> np.ndarray:
        """A description as the text tower reads it: its words cut to the canvas, then pad. A
        text none of whose words fits reads as the empty description: callers that must not
        score it so (the filter) check `features.fit_to_canvas` first."""
        fitted, _ = self.features.fit_to_canvas(text)
        return pad_to(self.tokenizer.encode(fitted) if fitted else [], self.features.canvas_length)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), E] unit embeddings ("" is the empty description)."""
        tokens = np.stack([self.text_tokens(t) for t in texts]) if texts else None
        return self._batched(self._texts, tokens, "caption")

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images [N, S, S, 3] -> [N, E] unit embeddings."""
        return self._batched(self._images, images, "image")

    def embed_split(self, source) -> tuple[list[dict], np.ndarray]:
        """(records without pixels, image embeddings [N, E]) of every usable image of a split,
        in source order, read at this model's image size."""
        records, embeddings = [], []
        for arrays, batch_records in eval_batches(source, self.features, self.batch_size):
            embeddings.append(self.embed_images(arrays["image"][: len(batch_records)]))
            records.extend(batch_records)
        if not embeddings:
            return records, np.zeros((0, self.model.embed_dim), np.float32)
        return records, np.concatenate(embeddings)

    def _batched(self, fn, array: np.ndarray | None, field: str) -> np.ndarray:
        if array is None or len(array) == 0:
            return np.zeros((0, self.model.embed_dim), np.float32)
        out = []
        for start in range(0, len(array), self.batch_size):
            chunk = array[start : start + self.batch_size]
            padded = np.concatenate(
                [chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)]
            )
            placed = self.put_batch({field: padded})[field]
            out.append(to_host(fn(self.params, placed))[: len(chunk)])
        return np.concatenate(out).astype(np.float32)


def retrieval_recall(
    image_embeddings: np.ndarray,  # [N, E] unit vectors
    text_embeddings: np.ndarray,  # [M, E] unit vectors
    text_image: Sequence[int] | np.ndarray,  # [M]: the image each text describes
    at: Iterable[int] = RECALL_AT,
) -> dict[str, float]:
    """Recall@k both ways (see the module docstring), as `image_to_text_r@k` and
    `text_to_image_r@k` in [0, 1]. Ties are ranked against the right answer; an image with no
    reference among the texts counts as a miss (none of its references can be found)."""
    owner = np.asarray(text_image, dtype=np.int64).reshape(-1)  # [M], also when M = 0
    similarity = np.asarray(image_embeddings) @ np.asarray(text_embeddings).T  # [N, M]
    n, m = similarity.shape
    if m != len(owner) or (m and (owner.min() < 0 or owner.max() >= n)):
        raise ValueError(f"text_image must give an image in [0, {n}) for each of {m} texts")
    is_right = owner[None, :] == np.arange(n)[:, None]  # [N, M]
    # Image -> text: the rank of an image's best-scoring reference is the number of other
    # texts scoring at least as high.
    # An image without references (best_right = -inf) would rank 0: it is made a miss instead.
    best_right = np.where(is_right, similarity, -np.inf).max(axis=1, initial=-np.inf)  # [N]
    image_rank = np.sum(~is_right & (similarity >= best_right[:, None]), axis=1)
    image_rank = np.where(is_right.any(axis=1), image_rank, np.inf)
    # Text -> image: the number of other images scoring at least as high as its own.
    own = similarity[owner, np.arange(m)]  # [M]
    text_rank = np.sum(~is_right & (similarity >= own[None, :]), axis=0)
    out = {}
    for k in at:
        out[f"image_to_text_r@{k}"] = float(np.mean(image_rank < k)) if n else 0.0
        out[f"text_to_image_r@{k}"] = float(np.mean(text_rank < k)) if m else 0.0
    return out


def split_retrieval(embedder: MatchEmbedder, source) -> dict[str, Any]:
    """Retrieval recall of every usable image of a split against all of their references."""
    records, images = embedder.embed_split(source)
    texts, owner = [], []
    for i, record in enumerate(records):
        for caption in record["captions"]:
            texts.append(caption)
            owner.append(i)
    recall = retrieval_recall(images, embedder.embed_texts(texts), owner)
    return {"num_images": len(records), "num_texts": len(texts), **recall}


def match_scores(image_embeddings: np.ndarray, step_embeddings: np.ndarray) -> np.ndarray:
    """The reference-free `match_score` [N, K] of each image [N, E] and its steps [N, K, E]."""
    return np.maximum(np.einsum("ne,nke->nk", image_embeddings, step_embeddings), 0.0)


def log_posteriors(
    text_embeddings: np.ndarray,  # [..., E] unit vectors
    bank_embeddings: np.ndarray,  # [B, E] unit vectors
    logit_scale: float,
) -> np.ndarray:
    """log q_c(x) [..., B]: the matching model's posterior over the bank's images for each text."""
    logits = (
        logit_scale
        * np.asarray(text_embeddings, np.float64)
        @ np.asarray(bank_embeddings, np.float64).T
    )
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def posterior_progress(
    step_embeddings: np.ndarray,  # [N, K, E]
    blank_embedding: np.ndarray,  # [E]: the empty description
    bank_embeddings: np.ndarray,  # [B, E]
    logit_scale: float,
    images_per_chunk: int = 256,
) -> np.ndarray:
    """Progress p_k [N, K] of each image's steps toward its final one (module docstring); a row
    is NaN where the final description's posterior is the empty description's (no span).
    Images are scored `images_per_chunk` at a time, so memory stays ~chunk x K x B floats
    (a 5,000-image split would otherwise hold 5,000 x K x 5,000)."""
    log_blank = log_posteriors(blank_embedding, bank_embeddings, logit_scale)  # [B]
    out = []
    for start in range(0, len(step_embeddings), images_per_chunk):
        chunk = step_embeddings[start : start + images_per_chunk]
        log_q = log_posteriors(chunk, bank_embeddings, logit_scale)  # [n, K, B]
        span = _divergence_from_final(log_q, log_blank)  # [n, 1]
        progress = 1.0 - _divergence_from_final(log_q, log_q) / np.where(span > SPAN_EPS, span, 1.0)
        out.append(np.where(span > SPAN_EPS, progress, np.nan))
    num_steps = np.shape(step_embeddings)[1]
    return np.concatenate(out) if out else np.zeros((0, num_steps))


def _divergence_from_final(log_q: np.ndarray, log_other: np.ndarray) -> np.ndarray:
    """KL(q_K || other) [n, K'] with q_K each image's last step of log_q [n, K, B]; log_other
    [n, K', B] or [B] broadcasts against it."""
    log_final = log_q[:, -1:, :]  # [n, 1, B]
    return np.sum(np.exp(log_final) * (log_final - log_other), axis=-1)


def step_scores(
    image_embeddings: np.ndarray,  # [N, E]
    step_embeddings: np.ndarray,  # [N, K, E]
    reference_embeddings: Sequence[np.ndarray],  # N arrays [R_i, E]
) -> tuple[np.ndarray, np.ndarray]:
    """Per image and step: (match_score [N, K], ref_match_score [N, K]) (module docstring)."""
    image_fit = match_scores(image_embeddings, step_embeddings)
    reference_fit = np.stack(
        [
            np.maximum((steps @ refs.T).max(axis=1), 0.0)
            for steps, refs in zip(step_embeddings, reference_embeddings, strict=True)
        ]
    )
    total = image_fit + reference_fit
    harmonic = np.where(total > 0, 2 * image_fit * reference_fit / np.where(total > 0, total, 1), 0)
    return image_fit, harmonic


def score_steps(embedder: MatchEmbedder, source, samples: Sequence[dict]) -> dict[str, Any]:
    """The matching model's view of described samples (`describe_split` output, same source
    order): per image the steps' `posterior_progress` over the split's images (for
    gradualness) and per-step match and ref-match scores."""
    records, images = embedder.embed_split(source)
    keys = [r["key"] for r in records]
    if keys != [s["image_id"] for s in samples]:
        raise ValueError(
            "the matching model read other images than the captioner (another canvas or image "
            "size leaves other examples out); score with a matching model of the same canvas"
        )
    num_steps = len(samples[0]["steps"])
    flat = [text for s in samples for text in s["steps"]]
    steps = embedder.embed_texts(flat).reshape(len(samples), num_steps, -1)  # [N, K, E]
    # Every reference embedded in one pass, then split back per image.
    embedded = embedder.embed_texts([r for s in samples for r in s["references"]])
    ends = np.cumsum([len(s["references"]) for s in samples])[:-1]
    match, ref_match = step_scores(images, steps, np.split(embedded, ends))
    blank = embedder.embed_texts([""])[0]
    return {
        "step_progress": posterior_progress(steps, blank, images, embedder.logit_scale),
        "match_score": match,
        "ref_match_score": ref_match,
    }


CALIBRATION_CHAINS = ("perfect", "blank_until_last", "complete_at_first")


def calibration_chains(caption: str, salience: SalienceStats, num_steps: int) -> dict[str, list]:
    """Three K-step chains ending in `caption`: the perfect one (its salience targets under
    the linear schedule, the chain a captioner is trained to write) and the two that do not
    refine (blank until the last step; complete at step 1, then unchanged)."""
    words = caption_words(caption)
    full = " ".join(words)
    steps = step_word_indices(words, num_steps, salience)
    return {
        "perfect": [" ".join(words[i] for i in kept) for kept in steps],
        "blank_until_last": [""] * (num_steps - 1) + [full],
        "complete_at_first": [full] * num_steps,
    }


def calibration(
    embedder: MatchEmbedder,
    source,
    salience: SalienceStats,
    num_steps: int = 4,
    extra_bank: np.ndarray | None = None,  # [M, E] unit image embeddings
) -> dict[str, dict[str, Any]]:
    """Gradualness G of the three `calibration_chains` of the first reference of every usable
    image of `source`, scored against all of the image's references: in the matching model's
    space (`posterior_progress` over the split's images and any `extra_bank` images, such as
    training images, which give a posterior over more of the image distribution), by the
    cosine between its text embeddings (`*_cosine`, the first form) and in CIDEr's TF-IDF space
    (`*_tfidf`). A good encoding puts the perfect chain near 1 and the other two near 0."""
    records, images = embedder.embed_split(source)
    schedule = schedule_fractions(num_steps)
    weights = np.full(num_steps, 1.0 / num_steps)
    refs = {i: list(r["captions"]) for i, r in enumerate(records) if r["captions"]}
    blank = embedder.embed_texts([""])[0]
    all_chains = {i: calibration_chains(r[0], salience, num_steps) for i, r in refs.items()}
    bank, scale = images[list(refs)], embedder.logit_scale
    if extra_bank is not None:
        bank = np.concatenate([bank, extra_bank])
    out: dict[str, dict[str, Any]] = {}
    for name in CALIBRATION_CHAINS:
        chains = {i: all_chains[i][name] for i in refs}
        flat = [text for i in refs for text in chains[i]]
        vectors = embedder.embed_texts(flat).reshape(len(refs), num_steps, -1)
        progress = posterior_progress(vectors, blank, bank, scale)
        # Each call also reports the TF-IDF form (*_tfidf), so the cosine call adds only that.
        posterior = refinement_metrics(chains, refs, schedule, weights, step_progress=progress)
        cosine = refinement_metrics(
            chains, refs, schedule, weights, step_vectors=vectors, blank_vector=blank
        )
        out[name] = {
            "gradualness": posterior["gradualness"],
            "progress_per_step": posterior["progress_per_step"],
            "gradualness_cosine": cosine["gradualness"],
            "progress_per_step_cosine": cosine["progress_per_step"],
            "gradualness_tfidf": posterior["gradualness_tfidf"],
            "progress_per_step_tfidf": posterior["progress_per_step_tfidf"],
        }
    return out


__all__ = [
    "CALIBRATION_CHAINS",
    "calibration",
    "calibration_chains",
    "log_posteriors",
    "MatchEmbedder",
    "RECALL_AT",
    "match_scores",
    "posterior_progress",
    "retrieval_recall",
    "score_steps",
    "split_retrieval",
    "step_scores",
]
