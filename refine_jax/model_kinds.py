"""The registry of model kinds: what the trainer, evaluation and benchmarks need of each.

A kind (`config.model.kind`) is one `ModelKind`: how to build its module, the dummy inputs that
initialise its parameters, the step schedule its descriptions are scored against, its training
loss, the text-stack passes its FLOPs are counted from and, for a captioner, how it writes its
descriptions (with and without attention maps). A new kind registers one entry (and adds its
name to `config.MODEL_KINDS`) instead of adding `if kind == ...` branches to the trainer, the
loader, decoding, evaluation and the benchmarks. `build_model`, `decode_batch` and
`describe_with_attention` are the entry points that dispatch on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from refine_jax.decoding import (
    autoregressive_attention,
    autoregressive_canvases,
    refine_attention,
    refine_canvases,
)
from refine_jax.losses import (
    autoregressive_loss,
    contrastive_loss,
    match_head_loss,
    refine_loss,
    step_weights,
)
from refine_jax.models.autoregressive import AutoregressiveCaptioner
from refine_jax.models.match import MatchModel, match_positives
from refine_jax.models.refine import STEP_FEATURES, RefineCaptioner
from refine_jax.targets import schedule_fractions

# (model, params, batch, rng, config, weights w_k, fractions s(k)) -> (loss, metrics)
LossFn = Callable[
    [
        nn.Module,
        Any,
        dict[str, jax.Array],
        jax.Array,
        ml_collections.ConfigDict,
        jax.Array,
        jax.Array,
    ],
    tuple[jax.Array, dict[str, jax.Array]],
]
# (model, params, images [B, H, W, 3], fractions [K], start [B, L] | None, method, beam,
#  early_stop) -> token canvases of every step [B, K, L]
Describe = Callable[..., jax.Array]
# (model, params, images, fractions) -> (canvases [B, K, L], cross-attention [B, K, L, N])
DescribeWithAttention = Callable[..., tuple[jax.Array, jax.Array]]


@dataclass(frozen=True)
class ModelKind:
    """One model kind. `module_type`: the class `build` returns, by which a built module finds
    its kind; `build(config, vocab_size, scan)` gives the module (`scan=None`: the config's
    choice); `init_inputs(config)` the dummy arrays after the rng of `module.init`;
    `step_schedule(config)` the (s(k), w_k) its described steps are scored with; `loss` the
    training loss of a batch (a `LossFn`; `rng` is the step's key, dropout included);
    `text_passes(config)` the text passes of one image's forward pass (`TextPass`), which its
    FLOPs are counted from; `describe` and `describe_with_attention`: how a captioner writes
    the descriptions of every step (jit-able `decoding` functions), None for a kind that
    writes none (the matching model, evaluated by retrieval)."""

    name: str
    module_type: type[nn.Module]
    build: Callable[[ml_collections.ConfigDict, int, bool | None], nn.Module]
    init_inputs: Callable[[ml_collections.ConfigDict], tuple[jax.Array, ...]]
    step_schedule: Callable[[ml_collections.ConfigDict], tuple[np.ndarray, np.ndarray]]
    loss: LossFn
    text_passes: Callable[[ml_collections.ConfigDict], tuple[TextPass, ...]]
    describe: Describe | None = None
    describe_with_attention: DescribeWithAttention | None = None

    @property
    def describes(self) -> bool:
        """A captioner, evaluated on its descriptions (else evaluated by retrieval)."""
        return self.describe is not None


@dataclass(frozen=True)
class TextPass:
    """`count` runs of a text stack of `depth` layers over `length` tokens, for FLOP counting:
    with cross-attention to the image tokens or not, with vocabulary logits or not, plus
    `head_flops` of small per-pass heads. `keys_values_once`: the runs read one image, whose
    cross-attention keys and values are projected once for all of them (the detailer's K
    steps), not once per run."""

    count: int
    length: int
    depth: int
    cross_attention: bool = True
    vocab_logits: bool = True
    head_flops: float = 0.0
    keys_values_once: bool = False


_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Adds `kind` under its name; registering a name twice is an error."""
    if kind.name in _KINDS:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def model_kind(name: str) -> ModelKind:
    """The registered kind `name`; an unknown name fails listing the registered ones."""
    if name not in _KINDS:
        raise ValueError(f"unknown model.kind {name!r}; registered kinds: {sorted(_KINDS)}")
    return _KINDS[name]


def registered_model_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def kind_of_model(model: nn.Module) -> ModelKind:
    """The kind whose `module_type` is the class of `model`, or else its nearest base class (a
    kind registered for a subclass of another kind's module wins for that subclass)."""
    for cls in type(model).__mro__:
        for kind in _KINDS.values():
            if kind.module_type is cls:
                return kind
    raise TypeError(f"{type(model).__name__} is not the module of any registered model kind")


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None = None
) -> nn.Module:
    """The model `config.model.kind` names; `scan=False` gives the unscanned refinement oracle."""
    return model_kind(config.model.kind).build(config, vocab_size, scan)


def _describing_kind(model: nn.Module) -> ModelKind:
    kind = kind_of_model(model)
    if not kind.describes:
        raise ValueError(f"a model of kind {kind.name!r} writes no descriptions to decode")
    return kind


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
    """Token canvases of every step, [B, K, L] (K = 1 for the baseline), by the model's kind's
    `describe` hook. `start` [B, L]: descriptions a refinement model continues instead of the
    blank one. `method` ('greedy' or 'beam'), `beam` and `early_stop`: the baseline's search
    (`decoding.autoregressive_canvases`).

    Jitted once at import, with the model and settings static: every call with the same model
    (equal modules hash alike), settings and array shapes reuses one compilation."""
    describe = _describing_kind(model).describe
    return describe(model, params, images, fractions, start, method, beam, early_stop)


def describe_with_attention(
    model: nn.Module, params, images: jax.Array, fractions: jax.Array, beam: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Canvases [B, K, L] and the last text layer's head-averaged cross-attention [B, K, L, N]
    of every step (jit-able, `beam` static), by the model's kind's `describe_with_attention`
    hook. `beam` > 1: the baseline's beam-search caption, as `decode_batch` writes it."""
    kind = _describing_kind(model)
    return kind.describe_with_attention(model, params, images, fractions, beam)


def _shared_module_args(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
    """Constructor arguments the encoder-plus-text-decoder kinds share."""
    m = config.model
    return dict(
        vocab_size=vocab_size,
        canvas_length=m.canvas_length,
        image_size=m.image_size,
        patch_size=m.patch_size,
        width=m.width,
        encoder_depth=m.encoder_depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dtype=jnp.dtype(m.dtype),
        dropout_rate=m.dropout_rate,
        dropout_bits=m.dropout_bits,
        remat=m.remat,
        position_bias=m.position_bias,
        unroll_scans=m.unroll_scans,
        freeze_encoder=m.freeze_encoder,
    )


def _dummy_images(config: ml_collections.ConfigDict) -> jax.Array:
    size = config.model.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32)


# --- The refinement captioner (DESIGN §2).


def _build_refine(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None
) -> RefineCaptioner:
    m = config.model
    return RefineCaptioner(
        num_refine_steps=m.num_refine_steps,
        detailer_depth=m.detailer_depth,
        scan=m.scan_detailer if scan is None else scan,
        layout=config.targets.layout,
        objective=config.targets.objective,
        self_condition_layout=config.targets.self_condition_layout,
        due_loss_weight=config.targets.due_loss_weight,
        revise=config.decode.revise,
        polish_steps=config.decode.polish_steps,
        **_shared_module_args(config, vocab_size),
    )


def _refine_init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    m = config.model
    return (
        _dummy_images(config),
        jnp.zeros((1, m.num_refine_steps, m.canvas_length), jnp.int32),
        jnp.zeros((m.num_refine_steps,), jnp.float32),
        jnp.zeros((1,), bool),
    )


def _refine_step_schedule(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    m, t = config.model, config.targets
    return (
        schedule_fractions(m.num_refine_steps, t.schedule, t.log_a),
        step_weights(m.num_refine_steps, t.loss_weighting, t.geometric_ratio),
    )


def refine_step_losses(
    outputs: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    weights: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the refinement model's per-step outputs ([K, B] terms) on `batch`."""
    return refine_loss(
        outputs,
        weights,
        batch["scheduled_lengths"],
        batch["mask"],
        config.model.canvas_length,
        config.targets.length_loss_weight,
    )


def _refine_loss(model, params, batch, rng, config, weights, fractions):
    """The K steps from the blank description; each example reads its own prediction instead
    of the target after a step with probability `targets.self_condition_rate` (per step)."""
    dropout_rng, self_condition_rng = jax.random.split(rng)
    self_condition = jax.random.bernoulli(
        self_condition_rng,
        config.targets.self_condition_rate,
        (batch["image"].shape[0], config.model.num_refine_steps),
    )
    outputs = model.apply(
        {"params": params},
        batch["image"],
        batch["targets"],
        fractions,
        self_condition,
        deterministic=False,
        rngs={"dropout": dropout_rng},
    )
    return refine_step_losses(outputs, batch, config, weights)


def _refine_text_passes(config: ml_collections.ConfigDict) -> tuple[TextPass, ...]:
    """K detailer steps; each adds the step embedding of s(k) and, with the `final` objective,
    the due head. The image's keys and values are projected once, before the steps."""
    m = config.model
    due_head = 2 * m.canvas_length * m.width if config.targets.objective == "final" else 0
    heads = float(2 * STEP_FEATURES * m.width + due_head)
    k, length = m.num_refine_steps, m.canvas_length
    return (TextPass(k, length, m.detailer_depth, head_flops=heads, keys_values_once=True),)


# --- The autoregressive baseline: the same encoder and a causal decoder of the same depth.


def _build_autoregressive(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None
) -> AutoregressiveCaptioner:
    del scan  # the baseline has no refinement steps to scan
    return AutoregressiveCaptioner(
        decoder_depth=config.model.detailer_depth, **_shared_module_args(config, vocab_size)
    )


def _autoregressive_init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    return _dummy_images(config), jnp.zeros((1, config.model.canvas_length), jnp.int32)


def _single_step_schedule(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """One description, scored as the final step."""
    del config
    return np.ones(1), np.ones(1)


def _autoregressive_loss(model, params, batch, rng, config, weights, fractions):
    """Teacher-forced cross-entropy of the whole caption (one step: `weights`, `fractions`
    unused)."""
    del config, weights, fractions
    dropout_rng, _ = jax.random.split(rng)  # the refinement kind's dropout key, for the same seed
    outputs = model.apply(
        {"params": params},
        batch["image"],
        batch["caption"],
        deterministic=False,
        rngs={"dropout": dropout_rng},
    )
    return autoregressive_loss(outputs, batch["mask"])


def _autoregressive_text_passes(config: ml_collections.ConfigDict) -> tuple[TextPass, ...]:
    m = config.model
    return (TextPass(1, m.canvas_length + 1, m.detailer_depth),)  # bos, the caption, eos


# --- The image-text matching model (DESIGN §11): the yardstick of the captioners' steps.


def _build_match(
    config: ml_collections.ConfigDict, vocab_size: int, scan: bool | None
) -> MatchModel:
    del scan  # no refinement steps
    args = _shared_module_args(config, vocab_size)
    return MatchModel(
        text_depth=config.match.text_depth,
        match_depth=config.match.match_depth,
        embed_dim=config.match.embed_dim,
        **args,
    )


def _match_init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    texts = jnp.zeros((1, config.model.canvas_length), jnp.int32)
    return _dummy_images(config), texts, jnp.ones((1,), bool), jax.random.key(0)


def _match_loss(model, params, batch, rng, config, weights, fractions):
    """Contrastive loss over the global batch plus the matching head on hard negatives; each
    example reads a random word subset of its caption at `match.subset_rate`. Examples with
    the same whole caption or the same image (its `index` and `source`) are each other's
    positives, whichever words each one reads (`match_positives`)."""
    del weights, fractions
    dropout_rng, subset_rng, negatives_rng = jax.random.split(rng, 3)
    use_subset = jax.random.bernoulli(
        subset_rng, config.match.subset_rate, (batch["caption"].shape[0],)
    )
    texts = jnp.where(use_subset[:, None], batch["word_subset"], batch["caption"])
    valid = batch["mask"].astype(bool)
    positives = match_positives(texts, batch["caption"], batch["index"], batch["source"])
    outputs = model.apply(
        {"params": params},
        batch["image"],
        texts,
        valid,
        negatives_rng,
        deterministic=False,
        positives=positives,
        rngs={"dropout": dropout_rng},
    )
    itc, itc_metrics = contrastive_loss(outputs["logits"], outputs["positives"], valid)
    itm, itm_metrics = match_head_loss(
        outputs["match_logits"], outputs["match_labels"], outputs["match_weights"]
    )
    loss = itc + config.match.match_loss_weight * itm
    return loss, {"loss": loss, **itc_metrics, **itm_metrics}


def _match_text_passes(config: ml_collections.ConfigDict) -> tuple[TextPass, ...]:
    """The text tower over BOS + caption, its projection, and the matching head on three
    pairs per example (the pair, a negative text, a negative image)."""
    m, match = config.model, config.match
    length = m.canvas_length + 1
    projections = float(2 * 2 * m.width * match.embed_dim)  # image and text
    return (
        TextPass(
            1,
            length,
            match.text_depth,
            cross_attention=False,
            vocab_logits=False,
            head_flops=projections,
        ),
        TextPass(3, length, match.match_depth, vocab_logits=False, head_flops=2.0 * m.width),
    )


register_model_kind(
    ModelKind(
        "refine",
        module_type=RefineCaptioner,
        build=_build_refine,
        init_inputs=_refine_init_inputs,
        step_schedule=_refine_step_schedule,
        loss=_refine_loss,
        text_passes=_refine_text_passes,
        describe=refine_canvases,
        describe_with_attention=refine_attention,
    )
)
register_model_kind(
    ModelKind(
        "autoregressive",
        module_type=AutoregressiveCaptioner,
        build=_build_autoregressive,
        init_inputs=_autoregressive_init_inputs,
        step_schedule=_single_step_schedule,
        loss=_autoregressive_loss,
        text_passes=_autoregressive_text_passes,
        describe=autoregressive_canvases,
        describe_with_attention=autoregressive_attention,
    )
)
register_model_kind(
    ModelKind(
        "match",
        module_type=MatchModel,
        build=_build_match,
        init_inputs=_match_init_inputs,
        step_schedule=_single_step_schedule,
        loss=_match_loss,
        text_passes=_match_text_passes,
    )
)
