"""Decoding: K refinement steps in parallel per step, and greedy / beam search for the baseline.

All functions are pure and jit-able; `decode_batch` is the one entry point the trainer and
evaluation use: it returns, per image, the token canvases of every step ([B, K, L]; K = 1
for the autoregressive baseline).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from refine_jax.models.autoregressive import AutoregressiveCaptioner, next_token_logits
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


@functools.partial(jax.jit, static_argnames=("model", "method", "beam", "early_stop"))
def decode_batch(
    model: nn.Module,
    params,
    images: jax.Array,
    fractions,
    method: str = "greedy",
    beam: int = 1,
    start: jax.Array | None = None,
    early_stop: bool = True,
) -> jax.Array:
    """Token canvases of every step, [B, K, L] (K = 1 for the baseline). `start` [B, L]:
    descriptions the refinement model continues instead of the blank one. `early_stop`: the
    baseline stops decoding once every caption has ended (False: always all L + 1 positions,
    the worst case; the captions are the same).

    Jitted once at import, with the model, method, beam and early_stop static: every call
    with the same model (equal modules hash alike), settings and array shapes reuses one
    compilation."""
    if isinstance(model, RefineCaptioner):
        return refine_decode(model, params, images, fractions, start)["canvas"]
    if start is not None:
        raise ValueError("only a refinement model can continue a given description")
    if method == "beam" and beam > 1:
        return beam_decode(model, params, images, beam, early_stop=early_stop)[:, None]
    return greedy_decode(model, params, images, early_stop)[:, None]
