"""Decoding: K refinement steps in parallel per step, and greedy / beam search for the baseline.

All functions are pure and jit-able. Each captioner kind registers two of them in
`model_kinds`: its `describe` hook (`refine_canvases`, `autoregressive_canvases`: the token
canvases of every step, [B, K, L], K = 1 for the baseline) and its `describe_with_attention`
hook (`refine_attention`, `autoregressive_attention`: the canvases and the last text layer's
cross-attention). The trainer and evaluation call them through `model_kinds.decode_batch`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from refine_jax.models.autoregressive import (
    AutoregressiveCaptioner,
    next_token_logits,
    shift_right,
    with_eos,
)
from refine_jax.models.refine import RefineCaptioner
from refine_jax.special_tokens import BOS_ID, EOS_ID, PAD_ID


def _cache_for(decoder_model: AutoregressiveCaptioner, params, image_tokens: jax.Array):
    """A zeroed key/value cache for `image_tokens.shape[0]` sequences of the full length."""
    full = jnp.zeros((image_tokens.shape[0], decoder_model.canvas_length + 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: decoder_model.init(
            jax.random.key(0), image_tokens, full, method=AutoregressiveCaptioner.logits
        )["cache"]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _finish(tokens: jax.Array) -> jax.Array:
    """Replaces eos and everything after it by pad: [B, T] -> [B, T-1] canvas of the caption."""
    ended = jnp.cumsum(tokens == EOS_ID, axis=-1) > 0
    return jnp.where(ended, PAD_ID, tokens)[:, :-1]


def _keep_going(step: jax.Array, steps: int, done: jax.Array, early_stop: bool) -> jax.Array:
    """Whether a decoding loop runs position `step`: always before `steps`, and with
    `early_stop` only while some sequence has not ended."""
    more = step < steps
    return more & ~jnp.all(done) if early_stop else more


def greedy_decode_with_steps(
    model: AutoregressiveCaptioner, params, images: jax.Array, early_stop: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Greedy captions [B, L] and the number of decoder calls made (a scalar).

    With `early_stop` the loop ends once every caption of the batch has emitted eos, so a
    batch of short captions makes fewer than L + 1 calls; without it, it always makes
    L + 1 (the worst case). The captions are the same either way: the positions a stopped
    loop never wrote hold pad, which is what an ended caption writes."""
    decoder_model = model.clone(decode=True)
    image_tokens = model.apply({"params": params}, images, method=AutoregressiveCaptioner.encode)
    batch, steps = images.shape[0], model.canvas_length + 1
    cache = _cache_for(decoder_model, params, image_tokens)

    def step(state):
        t, cache, token, done, tokens = state
        logits, mutated = decoder_model.apply(
            {"params": params, "cache": cache},
            image_tokens,
            token[:, None],
            method=AutoregressiveCaptioner.logits,
            mutable=["cache"],
        )
        next_token = jnp.argmax(next_token_logits(logits[:, 0]), axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, PAD_ID, next_token)
        done = done | (next_token == EOS_ID)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, t, axis=1)
        return t + 1, mutated["cache"], next_token, done, tokens

    init = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.full((batch,), BOS_ID, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.full((batch, steps), PAD_ID, jnp.int32),  # [B, L+1]
    )
    keep_going = lambda state: _keep_going(state[0], steps, state[3], early_stop)
    calls, _, _, _, tokens = jax.lax.while_loop(keep_going, step, init)
    # A caption that never emitted eos is cut at the canvas length.
    return _finish(tokens.at[:, -1].set(EOS_ID)), calls


def greedy_decode(
    model: AutoregressiveCaptioner, params, images: jax.Array, early_stop: bool = True
) -> jax.Array:
    """Greedy captions [B, L] (pad after the end) with a key/value cache; see
    `greedy_decode_with_steps` for `early_stop`."""
    return greedy_decode_with_steps(model, params, images, early_stop)[0]


def beam_decode_with_steps(
    model: AutoregressiveCaptioner,
    params,
    images: jax.Array,
    beam_size: int,
    length_penalty: float = 0.0,
    early_stop: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Beam search captions [B, L] and the number of decoder calls made (a scalar); scores
    are log-probabilities / length**length_penalty.

    With `early_stop` the search ends once every beam of every image has emitted eos: from
    then on each beam could only add pad at no cost, which keeps every beam, its score and
    its place (top_k puts equal scores in index order), so the captions are those of the
    full L + 1 calls that `early_stop=False` always makes."""
    decoder_model = model.clone(decode=True)
    image_tokens = model.apply({"params": params}, images, method=AutoregressiveCaptioner.encode)
    batch, steps, width = images.shape[0], model.canvas_length + 1, beam_size
    image_tokens = jnp.repeat(image_tokens, width, axis=0)  # [B*W, N, D]
    cache = _cache_for(decoder_model, params, image_tokens)
    vocab = model.vocab_size

    def step(state):
        t, cache, tokens, scores, done = state  # tokens [B, W, T], scores/done [B, W]
        last = jnp.where(t == 0, BOS_ID, tokens[:, :, jnp.maximum(t - 1, 0)]).reshape(-1)
        logits, mutated = decoder_model.apply(
            {"params": params, "cache": cache},
            image_tokens,
            last[:, None],
            method=AutoregressiveCaptioner.logits,
            mutable=["cache"],
        )
        log_probs = jax.nn.log_softmax(next_token_logits(logits[:, 0].astype(jnp.float32)))
        log_probs = log_probs.reshape(batch, width, -1)
        # A finished beam continues only with pad, at no cost.
        pad_only = jnp.full((vocab,), -jnp.inf).at[PAD_ID].set(0.0)
        log_probs = jnp.where(done[..., None], pad_only, log_probs)
        candidates = (scores[..., None] + log_probs).reshape(batch, width * vocab)
        # At t = 0 all beams are identical: expand from the first one only.
        candidates = jnp.where(
            (t == 0) & (jnp.arange(width * vocab) >= vocab)[None], -jnp.inf, candidates
        )
        scores, flat = jax.lax.top_k(candidates, width)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, t, axis=2)
        done = jnp.take_along_axis(done, parent, axis=1) | (token == EOS_ID)
        rows = (parent + jnp.arange(batch)[:, None] * width).reshape(-1)
        cache = jax.tree.map(lambda c: c[rows] if c.ndim else c, mutated["cache"])
        return t + 1, cache, tokens, scores, done

    init = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.full((batch, width, steps), PAD_ID, jnp.int32),
        jnp.zeros((batch, width)),
        jnp.zeros((batch, width), bool),
    )
    keep_going = lambda state: _keep_going(state[0], steps, state[4], early_stop)
    calls, _, tokens, scores, _ = jax.lax.while_loop(keep_going, step, init)
    lengths = jnp.sum(jnp.cumsum(tokens == EOS_ID, -1) == 0, -1) + 1
    best = jnp.argmax(scores / lengths.astype(jnp.float32) ** length_penalty, axis=1)
    tokens = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
    return _finish(tokens.at[:, -1].set(EOS_ID)), calls


def beam_decode(
    model: AutoregressiveCaptioner,
    params,
    images: jax.Array,
    beam_size: int,
    length_penalty: float = 0.0,
    early_stop: bool = True,
) -> jax.Array:
    """Beam search captions [B, L]; see `beam_decode_with_steps`."""
    return beam_decode_with_steps(model, params, images, beam_size, length_penalty, early_stop)[0]


def refine_decode(
    model: RefineCaptioner, params, images: jax.Array, fractions, start: jax.Array | None = None
) -> dict:
    """Every step's canvas [B, K, L] and pooled detailer state [B, K, D], from the blank
    description or the `start` canvases [B, L] (see `models.refine.start_canvas`)."""
    out = model.apply({"params": params}, images, fractions, start, method=RefineCaptioner.describe)
    return {
        "canvas": jnp.swapaxes(out["canvas"], 0, 1),
        "pooled": jnp.swapaxes(out["pooled"], 0, 1),
    }


def refine_canvases(
    model: RefineCaptioner,
    params,
    images: jax.Array,
    fractions,
    start: jax.Array | None = None,
    method: str = "greedy",
    beam: int = 1,
    early_stop: bool = True,
) -> jax.Array:
    """The refinement kind's `describe` hook: the canvases of its K steps, [B, K, L], from the
    blank description or `start` [B, L]. The K steps are its whole decoding: `method`, `beam`
    and `early_stop` are the baseline's settings and change nothing here."""
    del method, beam, early_stop
    return refine_decode(model, params, images, fractions, start)["canvas"]


def autoregressive_canvases(
    model: AutoregressiveCaptioner,
    params,
    images: jax.Array,
    fractions,
    start: jax.Array | None = None,
    method: str = "greedy",
    beam: int = 1,
    early_stop: bool = True,
) -> jax.Array:
    """The baseline's `describe` hook: its one caption as a one-step canvas, [B, 1, L], greedy
    or by beam search (`method='beam'`, `beam` > 1). `early_stop`: stop once every caption has
    ended (False: always all L + 1 positions, the worst case; the captions are the same).
    `fractions` (its one step) is unused; it cannot continue a given `start`."""
    del fractions
    if start is not None:
        raise ValueError("only a refinement model can continue a given description")
    if method == "beam" and beam > 1:
        return beam_decode(model, params, images, beam, early_stop=early_stop)[:, None]
    return greedy_decode(model, params, images, early_stop)[:, None]


_LAYER = re.compile(r"layer_(\d+)$")


def last_layer_attention(intermediates: Mapping[str, Any]) -> jax.Array:
    """The sown cross-attention of the last text layer, [K, B, H, Q, N] (K = 1 when unstacked).

    Accepts the 'intermediates' collection (or the dict holding it) of a scanned refinement
    model ([K, B, H, Q, N] in a 1-tuple), of an unscanned one (K arrays [B, H, Q, N]) or of the
    baseline's decoder (one [B, H, Q, N])."""
    found: list[tuple[int, Any]] = []

    def visit(node: Any, layer: int | None) -> None:
        if not isinstance(node, Mapping):
            return
        for key, value in node.items():
            match = _LAYER.match(str(key))
            if (
                key == "cross_attention"
                and isinstance(value, Mapping)
                and "attention_weights" in value
            ):
                found.append((-1 if layer is None else layer, value["attention_weights"]))
            else:
                visit(value, int(match.group(1)) if match else layer)

    visit(intermediates, None)
    if not found:
        raise ValueError(
            "no sown cross-attention weights: apply the model with mutable=['intermediates']"
        )
    weights = max(found, key=lambda item: item[0])[1]
    arrays = list(weights) if isinstance(weights, tuple | list) else [weights]
    if len(arrays) == 1:
        array = arrays[0]
        return array if array.ndim == 5 else array[None]
    return jnp.stack(arrays)  # an unscanned loop sows once per step


def refine_attention(
    model: RefineCaptioner, params, images: jax.Array, fractions: jax.Array, beam: int = 1
) -> tuple[jax.Array, jax.Array]:
    """The refinement kind's `describe_with_attention` hook: canvases [B, K, L] and the last
    layer's head-averaged cross-attention [B, K, L, N] of every step (jit-able). `beam` is the
    baseline's and changes nothing here."""
    del beam
    out, state = model.apply(
        {"params": params},
        images,
        fractions,
        method=RefineCaptioner.describe,
        mutable=["intermediates"],
    )
    weights = last_layer_attention(state["intermediates"])  # [K + polish steps, B, H, L, N]
    weights = weights[model.described_applications(weights.shape[0])]  # [K, B, H, L, N]
    return jnp.swapaxes(out["canvas"], 0, 1), jnp.swapaxes(weights.mean(axis=2), 0, 1)


def autoregressive_attention(
    model: AutoregressiveCaptioner, params, images: jax.Array, fractions: jax.Array, beam: int = 1
) -> tuple[jax.Array, jax.Array]:
    """The baseline's `describe_with_attention` hook: its caption [B, 1, L] (greedy, or by beam
    search with `beam` > 1, as it is described) and, from a teacher-forced pass over it, the
    last layer's head-averaged cross-attention [B, 1, L, N]."""
    method = "beam" if beam > 1 else "greedy"
    caption = autoregressive_canvases(model, params, images, fractions, None, method, beam)[:, 0]
    image_tokens = model.apply({"params": params}, images, method=AutoregressiveCaptioner.encode)
    inputs = shift_right(with_eos(jnp.pad(caption, ((0, 0), (0, 1)))))
    _, state = model.apply(
        {"params": params},
        image_tokens,
        inputs,
        method=AutoregressiveCaptioner.logits,
        mutable=["intermediates"],
    )
    weights = last_layer_attention(state["intermediates"])[0]  # [B, H, L+1, N]
    attention = weights.mean(axis=1)[:, : caption.shape[1]]
    return caption[:, None], attention[:, None]
