"""Checkpoints that can be trusted: verified on restore, damaged ones skipped and set aside,
intact ones never deleted in their place, and an unwritable location refused before training."""

import errno
import json
import logging
import shutil

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from etils import epath

from refine_jax import train
from refine_jax.checkpointing import CHECKSUMS_FILE, Checkpointer, probe_writable
from refine_jax.errors import CheckpointError

SIGNATURE = {"model": {}, "param_shapes": {}}


def iterator():
    return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def weights(step):
    """Random (incompressible) values, so the array's bytes fill a data file of their own."""
    return np.random.default_rng(step).random(1 << 16, np.float32)


def save_steps(directory, steps=(2, 4, 6), keep=3):
    """Checkpoints of `weights(step)`, saved asynchronously."""
    checkpointer = Checkpointer(directory, save_every=2, keep=keep)
    data = iterator()
    for step in range(1, max(steps) + 1):
        next(data)
        if step in steps:
            checkpointer.save(step, {"w": jnp.asarray(weights(step))}, data, SIGNATURE)
    checkpointer.wait()
    checkpointer.close()


def largest_state_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def overwrite_4_kib(step_dir):
    """4 KiB of the array data replaced: orbax itself restores this without complaint."""
    path = largest_state_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
    path.write_bytes(bytes(data))


def truncate(step_dir):
    path = largest_state_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def remove_ocdbt_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def restore_into(checkpointer, data):
    return lambda step: checkpointer.restore(
        step, {"w": jnp.zeros((1 << 16,))}, {"w": None}, data, SIGNATURE
    )


@pytest.mark.parametrize(
    "damage,with_checksums",
    [
        (overwrite_4_kib, True),
        (truncate, True),
        (remove_metadata, True),
        (remove_ocdbt_manifest, True),
        # Written before checksums were kept: what orbax cannot read is skipped too.
        (truncate, False),
        (remove_metadata, False),
    ],
)
def test_a_damaged_latest_checkpoint_is_skipped_set_aside_and_named(
    tmp_path, caplog, damage, with_checksums
):
    directory = tmp_path / "checkpoints"
    save_steps(directory)
    assert all((directory / str(s) / CHECKSUMS_FILE).exists() for s in (2, 4, 6))
    if not with_checksums:
        for step in (2, 4, 6):
            (directory / str(step) / CHECKSUMS_FILE).unlink()
    damage(directory / "6")
    checkpointer = Checkpointer(directory, save_every=2, keep=3)
    data = iterator()
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_newest_intact(restore_into(checkpointer, data))
    assert step == 4
    np.testing.assert_array_equal(state["w"], weights(4))
    np.testing.assert_array_equal(next(data), [8, 9])  # the data position of step 4
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "checkpoints/6 is damaged" in warning and "resuming from step 4" in warning
    assert sorted(checkpointer.manager.all_steps()) == [2, 4]
    assert (tmp_path / "checkpoints_damaged" / "6" / "state").is_dir()
    # Retention of the last 3 never counts the damaged one: saving on keeps every intact one.
    for step in (6, 8):
        next(data)
        checkpointer.save(step, {"w": jnp.asarray(weights(step))}, data, SIGNATURE)
    checkpointer.wait()
    assert sorted(checkpointer.manager.all_steps()) == [4, 6, 8]
    checkpointer.close()


def test_a_restore_that_fails_once_is_retried_and_its_checkpoint_kept(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory)
    checkpointer = Checkpointer(directory, save_every=2, keep=3)
    data = iterator()
    restore = restore_into(checkpointer, data)
    failures = []

    def flaky(step):  # a storage hiccup on the first read of the newest checkpoint
        if not failures:
            failures.append(step)
            raise OSError("503 Service Unavailable")
        return restore(step)

    step, state = checkpointer.restore_newest_intact(flaky)
    assert (step, failures) == (6, [6])
    np.testing.assert_array_equal(state["w"], weights(6))
    assert sorted(checkpointer.manager.all_steps()) == [2, 4, 6]
    assert not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


def test_with_every_checkpoint_damaged_the_error_names_each_and_nothing_is_moved(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, steps=(2, 4))
    overwrite_4_kib(directory / "4")
    truncate(directory / "2")
    checkpointer = Checkpointer(directory, save_every=2)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        checkpointer.restore_newest_intact(restore_into(checkpointer, iterator()))
    assert "step 4: state/" in str(error.value) and "checksum mismatch" in str(error.value)
    assert "step 2: state/" in str(error.value) and "bytes" in str(error.value)
    assert sorted(checkpointer.manager.all_steps()) == [2, 4]
    assert not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


def test_no_checkpoint_at_all_restores_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=2)
    assert (
        checkpointer.restore_newest_intact(lambda step: pytest.fail("nothing to restore")) is None
    )
    checkpointer.close()


def test_checksums_cover_every_item_file_and_are_written_by_synchronous_saves_too(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(1, {"w": jnp.ones(3)}, iterator(), SIGNATURE)
    checkpointer.close()
    recorded = json.loads((tmp_path / "1" / CHECKSUMS_FILE).read_text())["files"]
    on_disk = {
        str(p.relative_to(tmp_path / "1"))
        for item in ("state", "data", "signature")
        for p in (tmp_path / "1" / item).rglob("*")
        if p.is_file()
    }
    assert set(recorded) == on_disk and "state/_METADATA" in recorded


def short_config(steps):
    config = load_config("shapes", "tiny")
    config.total_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 2
    config.data.eval_size = 8
    config.mesh.shape = (1, 1, 1)
    return config


def step_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}  # a re-run step's last wins


def test_training_resumes_from_the_newest_intact_checkpoint_and_matches_an_intact_run(
    tmp_path, capsys
):
    reference = tmp_path / "reference"
    train.train_and_evaluate(short_config(6), str(reference))
    damaged = tmp_path / "damaged"
    train.train_and_evaluate(short_config(4), str(damaged))
    overwrite_4_kib(damaged / "checkpoints" / "4")
    capsys.readouterr()
    train.train_and_evaluate(short_config(6), str(damaged))
    assert "resumed from step 2" in capsys.readouterr().out
    assert (damaged / "checkpoints_damaged" / "4").is_dir()
    assert {2, 4, 6} <= {int(p.name) for p in (damaged / "checkpoints").iterdir()}
    expected, resumed = step_losses(reference), step_losses(damaged)
    for step in (3, 4, 5, 6):
        assert resumed[step] == expected[step], step


def test_an_unwritable_checkpoint_location_fails_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to .*checkpoints"):
        train.train_and_evaluate(short_config(4), str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_read_only_location_is_named_as_such(tmp_path, monkeypatch):
    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(epath.Path, "write_bytes", read_only)
    with pytest.raises(CheckpointError, match="Read-only file system"):
        probe_writable(tmp_path / "checkpoints")


def test_a_full_disk_is_refused_naming_what_a_checkpoint_needs(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(CheckpointError, match="only 1 MiB free .* needs about 100 MiB"):
        probe_writable(tmp_path / "checkpoints", needed_bytes=100 * 2**20)
    probe_writable(tmp_path / "checkpoints", needed_bytes=2**19)  # enough: no error
