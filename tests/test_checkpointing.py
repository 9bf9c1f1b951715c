"""The checkpointer's retention policy and model signatures, on small real orbax checkpoints."""

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from refine_jax.checkpointing import Checkpointer, model_signature, signature_differences


def iterator():
    return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def test_keeps_the_last_n_and_the_best_by_metric(tmp_path):
    checkpointer = Checkpointer(
        tmp_path, save_every=1, keep=2, best_metric="eval/score", async_save=False
    )
    state = {"w": jnp.zeros((3,))}
    data = iterator()
    scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4}
    for step, score in scores.items():
        next(data)
        checkpointer.save(
            step,
            {"w": state["w"] + step},
            data,
            {"model": {}, "param_shapes": {}},
            metrics={"eval/score": score},
        )
    checkpointer.wait()
    assert sorted(checkpointer.manager.all_steps()) == [2, 4, 5]
    restored = checkpointer.restore(2, state, {"w": None}, None, {"model": {}, "param_shapes": {}})
    np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
    checkpointer.close()


def test_signature_differences_name_config_keys_and_parameter_shapes():
    config = load_config("shapes", "tiny")
    saved = model_signature(config, {"dense": {"kernel": np.zeros((4, 8))}})
    config.model.width = 64
    config.model.dropout_rate = 0.5  # changes no shape: not part of the signature
    current = model_signature(config, {"dense": {"kernel": np.zeros((4, 16))}})
    assert signature_differences(saved, current) == [
        "model.width: checkpoint has 32, config has 64",
        "parameter ['dense']['kernel']: checkpoint shape [4, 8], model shape [4, 16]",
    ]
    assert signature_differences(saved, saved) == []


@pytest.mark.parametrize(
    "key,value",
    [
        ("unroll_scans", True),
        ("scan_detailer", False),
        ("remat", "full"),
        ("dtype", "bfloat16"),
        ("freeze_encoder", True),
    ],
)
def test_keys_that_change_how_the_model_runs_but_no_parameter_do_not_block_a_restore(key, value):
    config = load_config("shapes", "tiny")
    params = {"dense": {"kernel": np.zeros((4, 8))}}
    saved = model_signature(config, params)
    config.model[key] = value
    assert signature_differences(saved, model_signature(config, params)) == []


def test_a_model_key_the_checkpoint_predates_counts_as_its_default():
    config = load_config("shapes", "tiny")
    config.model.position_bias = "none"  # the default of base_config
    params = {"dense": {"kernel": np.zeros((4, 8))}}
    saved = model_signature(config, params)
    del saved["model"]["position_bias"]  # written before the key existed
    assert signature_differences(saved, model_signature(config, params)) == []
    config.model.position_bias = "relative"
    assert signature_differences(saved, model_signature(config, params)) == [
        "model.position_bias: checkpoint has 'none', config has 'relative'"
    ]


def test_a_step_already_saved_is_not_saved_again(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=10, async_save=False)
    data = iterator()
    signature = {"model": {}, "param_shapes": {}}
    assert checkpointer.save(10, {"w": jnp.ones(2)}, data, signature)
    assert not checkpointer.save(10, {"w": jnp.ones(2)}, data, signature, force=True)
    assert not checkpointer.save(11, {"w": jnp.ones(2)}, data, signature)  # not due
    with pytest.raises(ValueError, match="written by a different model"):
        checkpointer.restore(
            10, {"w": jnp.ones(2)}, {"w": None}, None, {"model": {"width": 1}, "param_shapes": {}}
        )
    checkpointer.close()
