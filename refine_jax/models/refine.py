"""The refinement captioner (DESIGN §2): one weight-shared detailer applied K times.

Each step reads the image tokens and the current description (a canvas of L token ids;
the blank description is all <blank>) and writes the whole next description in parallel.
Positions after the description's end hold pad; with the `aligned` target layout a position
whose word is still to come holds <blank> (see refine_jax.targets.canvas_targets).
The description carried from step k to step k+1 is tokens, so what a person reads at step
k is exactly what the model carries. In training, step k+1 reads the ground-truth target of
step k or, per example with the self-conditioning probability, the model's own step-k
prediction (no gradient flows through it). Each step's loss terms are computed inside the
scan body, so no [K, B, L, V] tensor is ever built.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from refine_jax.models.layers import (
    Dropout,
    Dtype,
    KeysValues,
    TextLayer,
    constrain,
    dense,
    layer_norm,
    learned_positions,
    sinusoid,
    token_embedding,
)
from refine_jax.models.vit import encoder_for
from refine_jax.special_tokens import BLANK_ID, NOT_TEXT_IDS, PAD_ID, UNK_ID

STEP_FEATURES = 64  # sinusoidal features of a step's scheduled fraction s(k)


def clean_canvas(tokens: jax.Array) -> jax.Array:
    """Blanks every position after the first pad: a description ends at its first pad."""
    ended = jnp.cumsum(tokens == PAD_ID, axis=-1) > 0
    return jnp.where(ended, PAD_ID, tokens)


def write_scheduled(logits: jax.Array, fraction: jax.Array) -> jax.Array:
    """The canvas an `aligned` step writes: its s(k) share of the description, most confident
    words first. logits [B, L, V], fraction s(k) (scalar) -> token ids [B, L].

    The description ends at the first position more likely pad than not; its length n is the
    count of positions before that. Each position's candidate is its most likely word (never
    pad, blank or another special id); the ⌊n·s(k) + ½⌋ positions (at least one) whose
    candidate is most probable are written and the rest of the description stays blank. Taking
    the argmax per position instead would leave an early step all blank, since there every
    position is more likely blank than any single word.
    """
    distribution = word_distribution(logits)
    ended = jnp.cumsum(distribution.pad_probability >= 0.5, axis=-1) > 0  # [B, L]
    length = jnp.sum(~ended, axis=-1)  # [B]
    words = distribution.best_word  # [B, L]
    best_logit = jnp.take_along_axis(logits, words[..., None], axis=-1)[..., 0]
    word_probability = jnp.exp(best_logit - distribution.log_normalizer)
    confidence = jnp.where(ended, -1.0, word_probability)
    rank = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)  # 0 = most confident
    due = jnp.maximum(jnp.floor(length * fraction + 0.5), 1)  # [B], rounded as the targets are
    written = (rank < due[:, None]) & ~ended
    return jnp.where(ended, PAD_ID, jnp.where(written, words, BLANK_ID))


def is_word(tokens: jax.Array) -> jax.Array:
    """Positions holding a word piece (not pad, blank or another special id)."""
    return ~jnp.isin(tokens, jnp.asarray((*NOT_TEXT_IDS, UNK_ID)))


def best_words(logits: jax.Array) -> jax.Array:
    """Each position's most likely word piece (never pad, blank or another special id).
    The special ids are masked by a broadcast select, which XLA fuses into the argmax, rather
    than a scatter into a copy of the [B, L, V] logits."""
    words = is_word(jnp.arange(logits.shape[-1]))  # [V]
    return jnp.argmax(jnp.where(words, logits, -jnp.inf), axis=-1)


class WordDistribution(NamedTuple):
    """What a step reads off its vocabulary logits [B, L, V], computed once and shared by the
    loss, the length term and the canvas it writes: per position [B, L], the log normaliser
    log Σ_v exp(logit_v), P(pad), and the most likely word piece (`best_words`)."""

    log_normalizer: jax.Array
    pad_probability: jax.Array
    best_word: jax.Array


def word_distribution(logits: jax.Array) -> WordDistribution:
    """One pass over the vocabulary (a logsumexp and an argmax) for everything a step needs:
    the cross-entropy of any label is `log_normalizer` minus its logit, and P(pad) is
    exp(logit_pad − log_normalizer), without the full [B, L, V] softmax."""
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    pad_probability = jnp.exp(logits[..., PAD_ID] - log_normalizer)
    return WordDistribution(log_normalizer, pad_probability, best_words(logits))


def write_due(
    words: WordDistribution, due_logits: jax.Array, canvas: jax.Array, revise: bool = True
) -> jax.Array:
    """The canvas a `final`-objective step writes. words: the `word_distribution` of its logits
    (the final word of every position), due_logits [B, L] (whether the position is written by
    this step), the canvas read [B, L] -> token ids [B, L].

    The description ends at its median predicted length. The objective trains pad only at the
    caption's first pad (`final_objective_terms`), so P(pad) at position i is the model's
    probability that the description is i tokens long, and positions past the end carry no
    trained prediction at all: the end is the first position where these probabilities add
    up to one half (where a reference's length is uncertain, as on photos with five
    references, no single position need be more likely pad than not). Before that, every
    position the model deems due (due logit > 0) gets its most likely word and the rest stay
    blank, so how many words a step writes is the model's decision; at least the most due
    position is written. With `revise`, a word already on the canvas may be replaced by a
    likelier one, blanked, or cut off by a shorter end; without, written words are copied
    wherever they are (and the description does not end before the last of them).
    """
    ended = jnp.cumsum(jax.lax.stop_gradient(words.pad_probability), axis=-1) >= 0.5  # [B, L]
    best = words.best_word
    if not revise:
        kept = is_word(canvas)
        best = jnp.where(kept, canvas, best)
        # [B, L]: a written word at this position or after it
        ended &= jnp.flip(jnp.cumsum(jnp.flip(kept, -1), axis=-1), -1) == 0
    due = (due_logits > 0) & ~ended
    most_due = jnp.argmax(jnp.where(ended, -jnp.inf, due_logits), axis=-1)  # [B]
    fallback = (jnp.arange(canvas.shape[-1]) == most_due[:, None]) & ~ended
    due = jnp.where(jnp.any(due, axis=-1, keepdims=True), due, fallback)
    if not revise:
        due |= kept
    return jnp.where(ended, PAD_ID, jnp.where(due, best, BLANK_ID))


def final_objective_terms(
    logits: jax.Array,
    words: WordDistribution,
    due_logits: jax.Array,
    target: jax.Array,
    final: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(word cross-entropy, due cross-entropy, expected written length), each [B], of a
    `final`-objective step: the final caption's token is predicted at every position up to
    its end (the first pad included, so the length is learned), averaged over those positions;
    the due decision (is the position written in this step's target?) over the caption's
    positions. logits [B, L, V] and their `word_distribution`, due_logits, target, final
    [B, L]."""
    first_pad = jnp.argmax(final == PAD_ID, axis=-1)  # [B]; 0 when the caption fills the canvas
    positions = jnp.arange(final.shape[-1])
    in_caption = final != PAD_ID
    scored = in_caption | (positions == first_pad[:, None])
    count = lambda m: jnp.maximum(jnp.sum(m, axis=-1), 1)
    final_logit = jnp.take_along_axis(logits, final[..., None], axis=-1)[..., 0]  # [B, L]
    word_ce = words.log_normalizer - final_logit
    word_ce = jnp.sum(word_ce * scored, axis=-1) / count(scored)
    written = is_word(target)
    due_ce = optax.sigmoid_binary_cross_entropy(due_logits, written.astype(jnp.float32))
    due_ce = jnp.sum(due_ce * in_caption, axis=-1) / count(in_caption)
    p_text = 1.0 - words.pad_probability
    expected_length = jnp.sum(jax.nn.sigmoid(due_logits) * p_text, axis=-1)
    return word_ce, due_ce, expected_length


class DetailerStep(nn.Module):
    """One refinement step; the scan body. carry: canvas [B, L] -> next canvas [B, L].

    `step` carries, per step: `fraction` (s(k), the scheduled share of the final description,
    which tells the detailer how much detail is due), and in training `target` [B, L] and
    `self_condition` [B] (read the own prediction at the next step); `final` [B, L] is the
    whole caption's canvas (training with the `final` objective; None otherwise).

    Objective `final` (aligned layout only): the step predicts the final caption's word at
    every position plus a per-position due decision, and writes the due positions
    (`write_due`), so it may revise earlier words. Objective `step`: the step predicts its own
    target canvas; with the `aligned` layout it writes its scheduled share of the description
    (`write_scheduled`), with `left` each position's most likely token.

    The image enters as `memory`: every layer's cross-attention (keys, values) of the image
    tokens, from `image_keys_values`. They are the same at every step, so the caller projects
    them once per image, outside the scan, rather than K times inside it. The text layers are
    defined in `setup` for that method to reach them (same parameter paths as inline ones).
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    canvas_length: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    layout: str = "aligned"
    objective: str = "final"
    self_condition_layout: str = "written"
    due_loss_weight: float = 1.0
    revise: bool = True
    keep_logits: bool = False

    def setup(self):
        self.layers = [
            TextLayer(
                self.num_heads,
                self.mlp_dim,
                self.dtype,
                self.dropout_rate,
                dropout_bits=self.dropout_bits,
                name=f"layer_{i}",
            )
            for i in range(self.depth)
        ]

    def image_keys_values(self, image_tokens: jax.Array) -> tuple[KeysValues, ...]:
        """Per text layer, its cross-attention (keys, values) of `image_tokens` [B, N, D]."""
        return tuple(layer.image_keys_values(image_tokens) for layer in self.layers)

    @nn.compact
    def __call__(
        self,
        canvas: jax.Array,  # [B, L] int
        step: dict[str, jax.Array],
        memory: tuple[KeysValues | jax.Array, ...],  # per layer: image_keys_values' pair, or
        # the image tokens [B, N, D] themselves, projected again by this step
        final: jax.Array | None,  # [B, L] int: the whole caption (training, `final` objective)
        deterministic: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = token_embedding(self.vocab_size, self.width, self.dtype, "token_embedding")(canvas)
        x = x + learned_positions(self, "pos_embedding", self.canvas_length, self.width, "length")
        step_features = sinusoid(step["fraction"], STEP_FEATURES).astype(self.dtype)
        x = x + dense(self.width, ("step", "embed"), self.dtype, "step_embedding")(step_features)
        x = constrain(x, ("batch", "length", "embed"))
        x = Dropout(self.dropout_rate, self.dropout_bits)(x, deterministic)
        for layer, keys_values in zip(self.layers, memory, strict=True):
            x = layer(x, keys_values, deterministic)
        x = layer_norm(self.dtype, "final_norm")(x)
        logits = dense(self.vocab_size, ("embed", "vocab"), jnp.float32, "logits")(x)
        logits = constrain(logits, ("batch", "length", "vocab"))  # [B, L, V]
        if self.objective == "final":
            due_logits = dense(1, ("embed", "decision"), jnp.float32, "due")(x)[..., 0]  # [B, L]
            words = word_distribution(logits)  # the one pass over the vocabulary of this step
            prediction = write_due(words, jax.lax.stop_gradient(due_logits), canvas, self.revise)
        elif self.layout == "aligned":
            prediction = write_scheduled(jax.lax.stop_gradient(logits), step["fraction"])
        else:
            prediction = clean_canvas(jnp.argmax(jax.lax.stop_gradient(logits), axis=-1))
        if "target" not in step:  # decoding: carry the prediction
            if "start" in step:  # words a person wrote stay where they are
                prediction = jnp.where(is_word(step["start"]), step["start"], prediction)
            return prediction, {"canvas": prediction, "pooled": jnp.mean(x, axis=1)}

        target = step["target"]  # [B, L]
        if self.objective == "final":
            word_ce, due_ce, expected_length = final_objective_terms(
                logits, words, due_logits, target, final
            )
            cross_entropy = word_ce + self.due_loss_weight * due_ce
        else:
            cross_entropy = jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, target), axis=-1
            )
            # Expected number of written (neither pad nor blank) positions: what the length
            # term ties to the schedule.
            probabilities = jax.nn.softmax(logits, axis=-1)
            p_unwritten = probabilities[..., PAD_ID] + probabilities[..., BLANK_ID]
            expected_length = jnp.sum(1.0 - p_unwritten, axis=-1)
        outputs = {
            "cross_entropy": cross_entropy,  # [B]
            "expected_length": expected_length,  # [B]
            "exact_match": jnp.all(prediction == target, axis=-1),  # [B]
            "token_accuracy": jnp.mean(prediction == target, axis=-1),  # [B]
        }
        if self.keep_logits:  # inspection and tests only: this is the [K, B, L, V] tensor
            outputs["logits"] = logits
        # Self-conditioning (DESIGN §3: train the way it decodes). "target": the own words on
        # the target's positions, so length and layout stay the reference's and the next step
        # learns to repair wrong words rather than to write them twice. "written": the canvas
        # this step wrote (its own due set, blanks and words, as decoding carries it) where its
        # length is the reference's, else as "target". "own": the written canvas as it is.
        best = words.best_word if self.objective == "final" else best_words(logits)
        on_target = jnp.where(is_word(target), best, target)
        if self.self_condition_layout == "target":
            own = on_target
        elif self.self_condition_layout == "written":
            same_length = jnp.all((prediction == PAD_ID) == (target == PAD_ID), axis=-1)
            own = jnp.where(same_length[:, None], prediction, on_target)
        else:
            own = prediction
        next_canvas = jnp.where(step["self_condition"][:, None], own, target)
        return next_canvas, outputs


class RefineCaptioner(nn.Module):
    """ViT encoder + K applications of one DetailerStep (scanned, or a Python loop as oracle)."""

    vocab_size: int
    num_refine_steps: int
    canvas_length: int
    image_size: int
    patch_size: int
    width: int
    encoder_depth: int
    detailer_depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    remat: str = "none"
    position_bias: str = "none"  # of the encoder's self-attention (models.vit)
    unroll_scans: bool = False  # the encoder's (and detailer's) scans as straight-line code
    freeze_encoder: bool = False  # a fixed, pretrained image encoder (models.vit)
    scan: bool = True
    layout: str = "aligned"  # of the targets: how a step writes its canvas (see DetailerStep)
    objective: str = "final"  # "final" or "step" (see DetailerStep)
    self_condition_layout: str = "written"  # "target", "written" or "own" (see DetailerStep)
    due_loss_weight: float = 1.0
    revise: bool = True  # decoding: a step may replace words already written
    polish_steps: int = 0  # decoding: extra applications of the final step
    keep_logits: bool = False  # also return every step's logits (tests and inspection only)

    def setup(self):
        self.encoder = encoder_for(self)
        step_cls = DetailerStep
        if self.remat != "none":
            policy = (
                jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if self.remat == "dots"
                else None
            )
            step_cls = nn.remat(DetailerStep, policy=policy, static_argnums=(5,))
        kwargs = dict(
            vocab_size=self.vocab_size,
            width=self.width,
            depth=self.detailer_depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            canvas_length=self.canvas_length,
            dtype=self.dtype,
            dropout_rate=self.dropout_rate,
            dropout_bits=self.dropout_bits,
            layout=self.layout,
            objective=self.objective,
            self_condition_layout=self.self_condition_layout,
            due_loss_weight=self.due_loss_weight,
            revise=self.revise,
            keep_logits=self.keep_logits,
        )
        if self.scan:
            step_cls = nn.scan(
                step_cls,
                variable_broadcast="params",
                variable_axes={"intermediates": 0},
                split_rngs={"params": False, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                unroll=self.unroll_scans,
            )  # its length is that of the steps given: K in training, more with polish passes
        self.detailer = step_cls(**kwargs)

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(images, deterministic)

    def _refine(self, image_tokens, steps, final, deterministic, start=None):
        """Applies the detailer once per entry of `steps` (leading axis), from the `start`
        canvas [B, L] (default: the blank description). The image tokens' cross-attention keys
        and values are projected once here and read by every step."""
        if start is None:
            start = jnp.full((image_tokens.shape[0], self.canvas_length), BLANK_ID, jnp.int32)
        # Not scanned (nn.scan and nn.remat lift __call__ only): the detailer's own parameters.
        memory = self.detailer.image_keys_values(image_tokens)
        if self.scan:
            _, outputs = self.detailer(start, steps, memory, final, deterministic)
            return outputs
        canvas, per_step = start, []
        for k in range(steps["fraction"].shape[0]):
            step_k = jax.tree.map(lambda a, k=k: a[k], steps)
            canvas, out = self.detailer(canvas, step_k, memory, final, deterministic)
            per_step.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)

    def __call__(
        self,
        images: jax.Array,  # [B, H, W, 3]
        targets: jax.Array,  # [B, K, L] int
        fractions: jax.Array,  # [K] scheduled fractions s(k)
        self_condition: jax.Array,  # [B] or [B, K] bool: read own prediction after step k
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Training pass: per-step loss terms, each [K, B]."""
        image_tokens = self.encode(images, deterministic)
        num_steps = targets.shape[1]
        if self_condition.ndim == 1:
            self_condition = jnp.repeat(self_condition[:, None], num_steps, axis=1)
        steps = {
            "fraction": fractions,
            "target": jnp.swapaxes(targets, 0, 1),  # [K, B, L]
            "self_condition": jnp.swapaxes(self_condition, 0, 1),  # [K, B]
        }
        final = targets[:, -1] if self.objective == "final" else None  # [B, L]
        return self._refine(image_tokens, steps, final, deterministic)

    def describe(
        self, images: jax.Array, fractions: jax.Array, start: jax.Array | None = None
    ) -> dict[str, Any]:
        """Decoding: `canvas` [K, B, L] token ids written at each step, `pooled` [K, B, D].

        `start` [B, L] is a description to continue instead of the blank one (its words are
        kept at their positions; see `start_canvas`). With `polish_steps`, the final step is
        applied that many more times and the last application's canvas is step K's."""
        image_tokens = self.encode(images, True)
        if self.polish_steps:
            fractions = jnp.concatenate([fractions, jnp.repeat(fractions[-1:], self.polish_steps)])
        steps = {"fraction": fractions}
        if start is not None:
            steps["start"] = jnp.broadcast_to(start, (fractions.shape[0], *start.shape))
        out = self._refine(image_tokens, steps, None, True, start)
        if self.polish_steps:
            keep = self.described_applications(fractions.shape[0])
            out = jax.tree.map(lambda a: a[keep], out)
        return out

    def described_applications(self, applications: int) -> jax.Array:
        """Which of `describe`'s detailer applications are its K steps: steps 1..K−1, then
        the last application (the last polish pass when there are any)."""
        return jnp.r_[jnp.arange(self.num_refine_steps - 1), applications - 1]


def start_canvas(word_tokens: list[list[int]], canvas_length: int) -> list[int]:
    """The canvas of a description a person starts from: its tokens first, then blanks for the
    detailer to fill (no pad, so the detailer decides where the description ends)."""
    tokens = [t for word in word_tokens for t in word]
    if len(tokens) >= canvas_length:
        raise ValueError(
            f"the start description has {len(tokens)} tokens; the canvas holds "
            f"{canvas_length}, so nothing is left to refine"
        )
    return tokens + [BLANK_ID] * (canvas_length - len(tokens))
