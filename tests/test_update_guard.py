"""Updates are checked before they land: non-finite updates, configs and metrics."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from refine_jax import train
from refine_jax.config import validate_config
from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.metric_writer import MetricWriter
from refine_jax.model_kinds import build_model
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import initial_state


@pytest.fixture(scope="module")
def model_and_batch():
    config = load_config("shapes", "tiny")
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 500)), 400)
    features = CaptionFeatures.from_config(config, tokenizer)
    batch, _ = next(eval_batches(ShapesSource("train", 4), features, 4))
    model = build_model(config, tokenizer.vocab_size)
    return config, model, {k: jnp.asarray(v) for k, v in batch.items()}


def poison_one_leaf(value: float) -> optax.GradientTransformation:
    """An optimizer stage that puts `value` into the update of the first parameter only."""

    def update(updates, state, params=None):
        leaves, tree = jax.tree.flatten(updates)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(value)
        return jax.tree.unflatten(tree, leaves), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf])
def test_a_non_finite_update_from_finite_gradients_leaves_the_params_bit_identical(
    model_and_batch, value
):
    config, model, batch = model_and_batch
    optimizer, schedule = train.make_optimizer(config)
    optimizer = optax.chain(optimizer, poison_one_leaf(value))
    state = initial_state(model, config, model.vocab_size, optimizer)
    step = jax.jit(train.bind_train_step(config, model, optimizer, schedule))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    for before, after in zip(
        jax.tree.leaves((state.params, state.opt_state)),
        jax.tree.leaves((new_state.params, new_state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(before, after)


def test_a_nan_learning_rate_is_refused_before_compilation(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compilation started before the config was checked")

    monkeypatch.setattr(jax, "jit", refuse)
    config = load_config("shapes", "tiny")
    config.learning_rate = float("nan")
    with pytest.raises(ValueError, match="config.learning_rate = nan"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("grad_clip_norm", float("inf"), "config.grad_clip_norm = inf"),
        ("targets.log_a", float("-inf"), "config.targets.log_a = -inf"),
        ("learning_rate", -1e-3, "config.learning_rate must be >= 0"),
    ],
)
def test_non_finite_or_negative_numbers_in_the_config_are_named(key, value, named):
    config = load_config("shapes", "tiny")
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ValueError, match=named):
        validate_config(config)


def test_metrics_jsonl_stays_strict_json_with_non_finite_values(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 0.5})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse_constant(token):
        raise ValueError(f"non-strict JSON token {token}")

    record = json.loads(line, parse_constant=refuse_constant)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "learning_rate": 0.5}
    assert not any(isinstance(v, float) and math.isnan(v) for v in record.values())
