"""Sharded training: mesh equivalence, sharding layout, checkpoint restore, non-finite skips."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from etils import epath

from refine_jax import train
from refine_jax.data import training_captions
from refine_jax.data.pipeline import CaptionFeatures, eval_batches
from refine_jax.data.shapes import ShapesSource
from refine_jax.errors import CheckpointMismatchError, ConfigError
from refine_jax.model_kinds import build_model
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import initial_state
from refine_jax.workdir_config import record_config


def short_config(steps=3, mesh=(1, 1, 1), **model):
    config = load_config("shapes", "tiny")
    config.total_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 2
    config.data.eval_size = 8
    config.mesh.shape = mesh
    for key, value in model.items():
        config.model[key] = value
    return config


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
    return {r["step"]: r["loss"] for r in records(workdir)}  # a resumed step's last record wins


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    train.train_and_evaluate(short_config(), str(workdir))
    return losses(workdir)


@pytest.fixture(scope="module")
def two_steps_trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_steps")
    train.train_and_evaluate(short_config(steps=2), str(workdir))  # checkpoint at step 2
    return workdir


@pytest.fixture
def workdir_at_step_2(two_steps_trained, tmp_path):
    """A copy of a workdir trained 2 steps with `short_config` (checkpoint at step 2)."""
    workdir = tmp_path / "workdir"
    shutil.copytree(two_steps_trained, workdir)
    return workdir


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_training_matches_a_single_device(tmp_path, single_device_losses, mesh):
    config = short_config(mesh=mesh)
    # Same global batch on every mesh; (1, 1, 1) uses one of the 8 devices.
    train.train_and_evaluate(config, str(tmp_path))
    sharded = losses(tmp_path)
    assert sharded.keys() == single_device_losses.keys() == {1, 2, 3}
    for step, loss in single_device_losses.items():
        assert sharded[step] == pytest.approx(loss, abs=1e-5, rel=1e-5)


def test_single_device_mesh_uses_one_device():
    from refine_jax.sharding import make_mesh, resolve_mesh_shape

    assert resolve_mesh_shape((1, 1, 1), 1) == (1, 1, 1)
    assert resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    assert make_mesh((1, 1, 1), jax.devices()[:1]).devices.size == 1


def test_restore_onto_a_different_mesh_gives_the_same_next_loss(tmp_path, single_device_losses):
    train.train_and_evaluate(short_config(steps=2, mesh=(8, 1, 1)), str(tmp_path))
    train.train_and_evaluate(short_config(steps=3, mesh=(2, 2, 2)), str(tmp_path))
    # The second run resumed at step 3 (a restore that did nothing would retrain and re-log
    # steps 1 and 2, reaching the same deterministic step-3 loss).
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    assert losses(tmp_path)[3] == pytest.approx(single_device_losses[3], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize(
    "change,named",
    [
        ({"width": 48}, "model.width: checkpoint has 32, config has 48"),
        ({"num_refine_steps": 5}, "model.num_refine_steps: checkpoint has 4, config has 5"),
    ],
)
def test_restoring_into_another_model_shape_names_the_mismatch(workdir_at_step_2, change, named):
    with pytest.raises(ValueError, match="written by a different model") as error:
        train.train_and_evaluate(short_config(steps=3, **change), str(workdir_at_step_2))
    assert named in str(error.value)
    if "width" in change:
        assert "parameter ['detailer']['final_norm']['scale']" in str(error.value)
    # The refused run leaves the config of the run that wrote the checkpoints, which eval and
    # caption read from the workdir.
    recorded = json.loads((workdir_at_step_2 / "config.json").read_text())["model"]
    assert {key: recorded[key] for key in change} != change


def test_resuming_with_another_number_of_data_workers_names_the_setting(workdir_at_step_2):
    config = short_config(steps=3)
    config.data.num_workers = 1  # grain saves another iterator state with worker processes
    with pytest.raises(CheckpointMismatchError, match="data.num_workers, the number of proc"):
        train.train_and_evaluate(config, str(workdir_at_step_2))
    assert (workdir_at_step_2 / "checkpoints" / "2").is_dir()  # not set aside as damaged
    assert not (workdir_at_step_2 / "checkpoints_damaged").exists()


@pytest.mark.parametrize(
    "key,value,named",
    [("batch_size", 32, "batch_size: checkpoint has 16, this run has 32"), ("seed", 1, "seed: ")],
)
def test_resuming_with_another_batch_size_or_seed_is_refused_naming_it(
    workdir_at_step_2, key, value, named
):
    # The data position is a count of batches of a seeded order: either change would move it.
    config = short_config(steps=3)
    config[key] = value
    with pytest.raises(CheckpointMismatchError, match="skip or repeat examples") as error:
        train.train_and_evaluate(config, str(workdir_at_step_2))
    assert named in str(error.value)
    assert (workdir_at_step_2 / "checkpoints" / "2").is_dir()  # not set aside as damaged
    assert json.loads((workdir_at_step_2 / "config.json").read_text())[key] != value


def test_resuming_with_another_tokenizer_vocab_size_is_refused_naming_both(tmp_path):
    # The workdir's tokenizer is reused as trained, and the model's shapes follow it, so a
    # changed vocab_size would otherwise be ignored without a word.
    config = short_config()
    train_tokenizer(training_captions(ShapesSource("train", 200)), 400).save(tmp_path / "tokenizer")
    record_config(config, tmp_path)
    # A config.json written by another version (a key this one does not know) still answers.
    recorded = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**recorded, "a_later_key": 1}))
    assert train.load_or_train_tokenizer(config, epath.Path(tmp_path), None).vocab_size > 300
    config.tokenizer.vocab_size = 300
    with pytest.raises(ConfigError, match="vocab_size = 300, but .* trained with 400"):
        train.load_or_train_tokenizer(config, epath.Path(tmp_path), None)


def test_a_nan_batch_skips_the_update_and_is_counted():
    config = short_config()
    m = config.model
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 500)), 400)
    features = CaptionFeatures(tokenizer, m.num_refine_steps, m.canvas_length, m.image_size)
    batch, _ = next(eval_batches(ShapesSource("train", 4), features, 4))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = build_model(config, tokenizer.vocab_size)
    optimizer, schedule = train.make_optimizer(config)
    state = initial_state(model, config, tokenizer.vocab_size, optimizer)
    step = jax.jit(train.bind_train_step(config, model, optimizer, schedule))
    poisoned = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    new_state, metrics = step(state, poisoned)
    assert not np.isfinite(float(metrics["loss"]))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    assert int(new_state.step) == 1
    for before, after in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(new_state.params), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    good_state, metrics = step(new_state, batch)
    assert float(metrics["skipped_nonfinite"]) == 0.0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(good_state.params), jax.tree.leaves(new_state.params), strict=True
        )
    )


def test_too_many_nonfinite_updates_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    from refine_jax import sharding

    calls = []
    real_global_batch = sharding.global_batch

    def poison_after_step_three(batch, mesh, rules, global_rows):
        calls.append(1)
        if len(calls) > 3:  # every batch from step 4 on carries a NaN pixel
            batch = dict(batch, image=batch["image"].copy())
            batch["image"][0, 0, 0, 0] = np.nan
        return real_global_batch(batch, mesh, rules, global_rows)

    monkeypatch.setattr(sharding, "global_batch", poison_after_step_three)
    config = short_config(steps=30)
    config.max_consecutive_nonfinite = 3
    message = "3 consecutive updates had a non-finite loss, gradient or update"
    with pytest.raises(RuntimeError, match=message) as error:
        train.train_and_evaluate(config, str(tmp_path))
    logged = losses(tmp_path)
    assert all(np.isfinite(logged[s]) for s in (1, 2, 3)) and logged[4] is None  # JSON null
    # Skipped updates never touch the parameters, so every checkpoint left behind is good:
    # once the data is clean again, the same command resumes and trains on.
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert f"last good checkpoint is step {saved}" in str(error.value)
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    logged_before = len(records(tmp_path))
    train.train_and_evaluate(short_config(steps=saved + 2), str(tmp_path))
    resumed = records(tmp_path)[logged_before:]
    assert [r["step"] for r in resumed] == [saved + 1, saved + 2]  # resumed, not restarted
    assert np.isfinite(resumed[-1]["loss"])


def checkpoint_config(steps, checkpoint_every, eval_every):
    config = short_config(steps=steps)
    config.checkpoint_every_steps = checkpoint_every
    config.eval_every_steps = eval_every
    config.keep_checkpoints = 1
    config.best_checkpoint_metric = "eval/score"
    return config


@pytest.mark.slow
def test_the_best_checkpoint_is_ranked_by_its_own_steps_evaluation(tmp_path, monkeypatch):
    from refine_jax.checkpointing import Checkpointer

    scores = iter([0.9, 0.1, 0.95, 0.2])  # the evaluations at steps 2, 4 | 6, 8
    monkeypatch.setattr(train, "evaluate_samples", lambda samples, config: {"score": next(scores)})

    def kept_scores():
        reader = Checkpointer(tmp_path / "checkpoints", 1, best_metric="eval/score")
        steps = reader.manager.all_steps()
        kept = {s: (reader.manager.metrics(s) or {}).get("eval/score") for s in steps}
        reader.close()
        return kept

    # Saved every step, evaluated every other step (as configs/coco.py, scaled down). Step 3
    # must not inherit step 2's score, and unevaluated steps are kept only as the latest.
    train.train_and_evaluate(checkpoint_config(4, 1, 2), str(tmp_path))
    assert kept_scores() == {2: 0.9, 4: 0.1}
    # Resumed, saving every 4 steps: step 6 is saved because it is evaluated, and its score
    # beats step 2's, read back from disk.
    train.train_and_evaluate(checkpoint_config(8, 4, 2), str(tmp_path))
    assert kept_scores() == {6: 0.95, 8: 0.2}
    logged = {r["step"]: r["eval/score"] for r in records(tmp_path) if "eval/score" in r}
    assert logged == {2: 0.9, 4: 0.1, 6: 0.95, 8: 0.2}


def test_a_run_resumed_inside_the_profile_window_traces_the_rest_of_it(workdir_at_step_2):
    config = short_config(steps=4)
    config.profile_steps = (1, 3)  # resumed at step 3, inside the window
    train.train_and_evaluate(config, str(workdir_at_step_2))
    assert [r["step"] for r in records(workdir_at_step_2)] == [1, 2, 3, 4]
    assert list((workdir_at_step_2 / "profile").rglob("*.xplane.pb"))


def test_a_best_metric_the_evaluation_lacks_is_named_before_any_save_needs_it(tmp_path):
    config = checkpoint_config(2, 1, 2)
    config.best_checkpoint_metric = "eval/no_such_metric"
    with pytest.raises(ConfigError, match="'eval/no_such_metric' is not a metric of .*eval/"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # no partial save


@pytest.mark.slow
def test_in_training_evaluation_is_logged_at_the_configured_steps(tmp_path):
    config = short_config(steps=5)
    config.log_every_steps = 2
    config.eval_every_steps = 3
    final = train.train_and_evaluate(config, str(tmp_path))
    logged = records(tmp_path)
    # Logging steps 2 and 4, evaluation steps 3 and 5 (the last step is always evaluated).
    assert [r["step"] for r in logged] == [2, 3, 4, 5]
    evaluated = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in logged}
    assert [s for s, rates in evaluated.items() if rates] == [3, 5]
    assert evaluated[5] == {f"eval/{k}": v for k, v in final.items()}
    for key in ("eval/final_matches_reference", "eval/final_cider", "eval/final_bleu4"):
        assert key in evaluated[3]
    assert evaluated[3]["eval/num_images"] == config.data.eval_size
