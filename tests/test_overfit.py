"""A tiny model memorises 8 shapes examples: every step writes exactly its target."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_config

from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.model_kinds import build_model
from refine_jax.targets import schedule_fractions
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train import bind_train_step
from refine_jax.train_state import initial_state, make_optimizer


def test_tiny_model_overfits_eight_examples_at_every_step():
    config = load_config("shapes", "tiny")
    config.learning_rate = 3e-3
    config.warmup_steps = 20
    config.total_steps = 250  # exact at every step from about step 150
    config.targets.self_condition_rate = 0.0
    config.model.width = 64
    config.model.mlp_dim = 128
    source = ShapesSource("train", 8, seed=3, image_size=config.model.image_size)
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 2000)), 400)
    m = config.model
    features = CaptionFeatures(tokenizer, m.num_refine_steps, m.canvas_length, m.image_size)
    batch, _ = next(eval_batches(source, features, 8))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    fractions = jnp.asarray(schedule_fractions(m.num_refine_steps), jnp.float32)
    model = build_model(config, tokenizer.vocab_size)
    optimizer, schedule = make_optimizer(config)
    state = initial_state(model, config, tokenizer.vocab_size, optimizer)
    step = jax.jit(bind_train_step(config, model, optimizer, schedule))
    for _ in range(config.total_steps):
        state, metrics = step(state, batch)
    canvases = model.apply(
        {"params": state.params}, batch["image"], fractions, method=model.describe
    )["canvas"]  # [K, B, L]
    np.testing.assert_array_equal(np.swapaxes(canvases, 0, 1), batch["targets"])
    assert float(metrics["exact_match_step_4"]) == 1.0
