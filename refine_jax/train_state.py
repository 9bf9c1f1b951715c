"""The train state and the one way it is built: training, evaluation, captioning and the
benchmarks all create (or restore) it here, so a checkpoint always has the same layout.

The optimizer state is built from the logically boxed parameters, so its moments inherit the
parameters' axis names and shard like them. State is created already sharded on the mesh, and
restored straight into those shardings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer
from refine_jax.errors import CheckpointMismatchError
from refine_jax.model_kinds import model_kind


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; the learning rate of the n-th applied update (n from 0)
    warms up linearly to its peak, reached at update `warmup_steps`, then decays as a cosine:
    over the rest of training, or with `lr_decay_fraction` f < 1 over the last f of the
    updates only (never more than follow the warm-up), after a constant stretch at the peak.
    Weight decay applies to matrices only, and not to a frozen encoder, whose gradient is zero
    (models.vit), so its update is exactly zero and the state keeps one layout either way."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    if config.lr_decay_fraction < 1.0:  # warm-up, stable, then (if any) the cosine
        decay_steps = min(round(config.lr_decay_fraction * total), max(total - warmup, 0))
        parts = [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)]
        boundaries = [warmup]
        if decay_steps:
            parts.append(optax.cosine_decay_schedule(peak, decay_steps))
            boundaries.append(total - decay_steps)
        rate = optax.join_schedules(parts, boundaries)
    else:
        rate = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))
    schedule = lambda count: rate(count + 1)  # the first update is not wasted at 0

    def decay_mask(params):
        mask = jax.tree.map(lambda p: p.ndim > 1, params)  # matrices only
        if config.model.freeze_encoder:
            mask = {**mask, "encoder": jax.tree.map(lambda _: False, mask["encoder"])}
        return mask

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
    ), schedule


def init_variables(model: nn.Module, config: ml_collections.ConfigDict, vocab_size: int) -> Any:
    """Parameters (logically boxed) from the kind's dummy inputs (use under eval_shape/jit)."""
    del vocab_size  # the model already knows it; kept so every caller passes the same things
    inputs = model_kind(config.model.kind).init_inputs(config)
    return model.init(jax.random.key(config.seed), *inputs)["params"]


def initial_state(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    vocab_size: int,
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """Step 0, fresh parameters and the optimizer state built from the boxed parameters (so the
    moments carry the parameters' axis names); still boxed, for eval_shape or a sharded jit."""
    params = init_variables(model, config, vocab_size)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def _rules(rules) -> tuple:
    return tuple(map(tuple, rules))


def abstract_state(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    vocab_size: int,
    mesh: Mesh,
    rules,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[TrainState, Any]:
    """(the unboxed state's shapes and dtypes, its shardings on `mesh`), allocating nothing."""
    optimizer = optimizer or make_optimizer(config)[0]
    init = lambda: initial_state(model, config, vocab_size, optimizer)
    with nn.logical_axis_rules(_rules(rules)):
        boxed = jax.eval_shape(init)
    return sharding.bare_values(boxed), sharding.logical_shardings(boxed, mesh, rules)


def create_state(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    vocab_size: int,
    mesh: Mesh,
    rules,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[TrainState, Any]:
    """(a fresh state born sharded on `mesh`, its shardings)."""
    optimizer = optimizer or make_optimizer(config)[0]
    return sharding.create_sharded(
        lambda: initial_state(model, config, vocab_size, optimizer), mesh, rules
    )


def create_params(
    model: nn.Module, config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, rules
) -> Any:
    """Fresh parameters alone, born sharded on `mesh` (no optimizer state: inference)."""
    params, _ = sharding.create_sharded(
        lambda: init_variables(model, config, vocab_size), mesh, rules
    )
    return params


def restore_state(
    checkpointer: Checkpointer,
    step: int,
    target: TrainState,
    shardings: Any,
    signature: dict,
    data_iterator: Any = None,
) -> TrainState:
    """The state saved at `step`, placed with `shardings` (and the data iterator repositioned
    when one is given). A checkpoint of another model shape fails naming what differs; one whose
    state has another layout (written by an incompatible version of the trainer) fails saying
    so and what to do, instead of with orbax's tree error."""
    try:
        return checkpointer.restore(step, target, shardings, data_iterator, signature)
    except CheckpointMismatchError:  # another model shape, or another input pipeline
        raise
    except ValueError as e:
        raise _layout_error(checkpointer, step, target, e) from e
    except KeyError as e:
        raise _layout_error(checkpointer, step, target, e) from e


def _layout_error(
    checkpointer: Checkpointer, step: int, target: TrainState, cause: Exception
) -> ValueError:
    opt_arrays = len(jax.tree.leaves(target.opt_state))
    return ValueError(
        f"checkpoint {checkpointer.directory}/{step} matches this model's parameters but not "
        "the train state this version builds (TrainState(step, params, opt_state), an optimizer "
        f"state of {opt_arrays} arrays from refine_jax.train_state.make_optimizer): it was "
        "written by a version whose optimizer or state layout differs. Restore it with the "
        f"version that wrote it, or retrain. Orbax said: {cause}"
    )


__all__ = [
    "TrainState",
    "abstract_state",
    "create_params",
    "create_state",
    "init_variables",
    "initial_state",
    "make_optimizer",
    "restore_state",
]
