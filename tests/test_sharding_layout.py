"""Parameter and optimizer-state shardings of the tiny config on a (2, 2, 2) mesh (golden), and
batches placed on meshes of any layout."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_config
from jax.sharding import PartitionSpec as P

from refine_jax import sharding, train
from refine_jax.data import training_captions
from refine_jax.data.shapes import ShapesSource
from refine_jax.errors import ConfigError
from refine_jax.evaluation.captioning import describe_split
from refine_jax.evaluation.evaluate import evaluate_checkpoint
from refine_jax.model_kinds import build_model
from refine_jax.model_loading import load_model
from refine_jax.tokenizer import train_tokenizer
from refine_jax.train_state import create_state

F, T = "fsdp", "tensor"
ATTENTION = {"query": (F, T), "key": (F, T), "value": (F, T), "out": (T, F)}
TEXT_LAYER = {
    **{
        f"{a}/{p}/kernel": spec
        for a in ("self_attention", "cross_attention")
        for p, spec in ATTENTION.items()
    },
    **{
        f"{a}/{p}/bias": (spec[1],)
        for a in ("self_attention", "cross_attention")
        for p, spec in ATTENTION.items()
    },
    "mlp/wi/kernel": (F, T),
    "mlp/wi/bias": (T,),
    "mlp/wo/kernel": (T, F),
    "mlp/wo/bias": (F,),
    **{
        f"{n}/{w}": (F,)
        for n in ("pre_self_attention_norm", "pre_cross_attention_norm", "pre_mlp_norm")
        for w in ("scale", "bias")
    },
}
ENCODER_BLOCK = {
    "self_attention/query/kernel": (None, F, T),
    "self_attention/key/kernel": (None, F, T),
    "self_attention/value/kernel": (None, F, T),
    "self_attention/out/kernel": (None, T, F),
    "self_attention/query/bias": (None, T),
    "self_attention/key/bias": (None, T),
    "self_attention/value/bias": (None, T),
    "self_attention/out/bias": (None, F),
    "mlp/wi/kernel": (None, F, T),
    "mlp/wi/bias": (None, T),
    "mlp/wo/kernel": (None, T, F),
    "mlp/wo/bias": (None, F),
    "pre_attention_norm/scale": (None, F),
    "pre_attention_norm/bias": (None, F),
    "pre_mlp_norm/scale": (None, F),
    "pre_mlp_norm/bias": (None, F),
    "relative_position_bias": (None, None, None),  # [layers, offsets, heads]: small, replicated
}
GOLDEN = {
    **{f"detailer/layer_0/{k}": v for k, v in TEXT_LAYER.items()},
    "detailer/final_norm/scale": (F,),
    "detailer/final_norm/bias": (F,),
    "detailer/logits/kernel": (F, T),
    "detailer/logits/bias": (T,),
    "detailer/due/kernel": (F, None),  # the per-position due decision: one output, replicated
    "detailer/due/bias": (None,),
    "detailer/pos_embedding": (None, F),
    "detailer/step_embedding/kernel": (None, F),
    "detailer/step_embedding/bias": (F,),
    "detailer/token_embedding/embedding": (T, F),
    "encoder/embedding/kernel": (None, F),
    "encoder/embedding/bias": (F,),
    "encoder/pos_embedding": (None, F),
    "encoder/encoder_norm/scale": (F,),
    "encoder/encoder_norm/bias": (F,),
    **{f"encoder/encoderblock/{k}": v for k, v in ENCODER_BLOCK.items()},
}


def flat_specs(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_params_and_optimizer_state_shard_as_the_golden_table():
    config = load_config("shapes", "tiny")
    model = build_model(config, 400)
    optimizer, _ = train.make_optimizer(config)
    mesh = sharding.make_mesh((2, 2, 2))
    rules = tuple(map(tuple, config.mesh.axis_rules))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = create_state(model, config, 400, mesh, rules, optimizer)
    expected = {k: P(*v) for k, v in GOLDEN.items()}
    assert flat_specs(shardings.params) == expected
    adam = shardings.opt_state[1][0]
    assert flat_specs(adam.mu) == expected and flat_specs(adam.nu) == expected
    assert adam.count.spec == P()
    # The arrays are born with these shardings (no host round trip, no resharding).
    kernel = state.params["detailer"]["logits"]["kernel"]
    assert kernel.sharding.spec == P(F, T)
    assert kernel.addressable_shards[0].data.shape == (32 // 2, 400 // 2)


def test_a_sharded_init_traces_its_init_once_and_computes_what_the_unsharded_one_does():
    rules = (("embed", "fsdp"), ("mlp", "tensor"))
    traces = []

    def init(key):
        traces.append(key)
        weights = jax.random.normal(key, (8, 4))
        return {
            "kernel": nn.LogicallyPartitioned(weights, ("embed", "mlp")),
            "bias": nn.LogicallyPartitioned(2 * weights[0], ("mlp",)),
            "count": jax.numpy.zeros((), jax.numpy.int32),
        }

    mesh = sharding.make_mesh((2, 2, 2))
    value, shardings = sharding.create_sharded(init, mesh, rules, jax.random.key(3))
    assert len(traces) == 1
    expected = jax.jit(init)(jax.random.key(3))  # one device, no shardings
    np.testing.assert_array_equal(value["kernel"], expected["kernel"].value)
    np.testing.assert_array_equal(value["bias"], expected["bias"].value)
    assert value["count"] == 0
    assert value["kernel"].sharding.spec == P(F, T) and value["bias"].sharding.spec == P(T)
    assert value["count"].sharding.spec == P() and shardings["kernel"].spec == P(F, T)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 4, 2)])
def test_a_batch_every_process_holds_lands_whole_on_any_mesh_layout(shape):
    rules = tuple(map(tuple, load_config("shapes", "tiny").mesh.axis_rules))
    mesh = sharding.make_mesh(shape)
    rows = np.arange(16 * 3).reshape(16, 3)
    placed = sharding.global_batch_from_full({"x": rows}, mesh, rules)["x"]
    np.testing.assert_array_equal(sharding.to_host(placed), rows)
    assert sharding.process_batch_block(mesh, rules, 16) == (0, 1, True)  # one process


def test_processes_sharing_a_block_name_one_of_them_to_count_its_rows():
    # Four processes, two per block (the batch axis replicated across each pair).
    rows_of = {0: set(range(8)), 1: set(range(8)), 2: set(range(8, 16)), 3: set(range(8, 16))}
    blocks = [sharding.batch_block_of(rows_of, 16, p, {}) for p in range(4)]
    assert blocks == [(0, 2, True), (0, 2, False), (1, 2, True), (1, 2, False)]
    with pytest.raises(ValueError, match="not equal contiguous blocks"):
        sharding.batch_block_of({0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}, 8, 0, {})


def test_describing_on_more_batch_shards_than_the_batch_divides_pads_its_batches(tmp_path):
    config = load_config("shapes", "tiny")
    config.batch_size = 12  # trained on, say, 4 devices; described on 8
    config.mesh.shape = (8, 1, 1)
    tokenizer = train_tokenizer(training_captions(ShapesSource("train", 200)), 400)
    loaded = load_model(config, tmp_path, random_init=True, tokenizer=tokenizer)
    assert loaded.config.batch_size == 16 and config.batch_size == 12
    source = ShapesSource("eval", 20)
    with loaded.context():
        samples = describe_split(
            loaded.model,
            loaded.params,
            source,
            loaded.features,
            tokenizer,
            loaded.config.batch_size,
            loaded.fractions,
            loaded.put_batch,
        )
    assert len(samples) == 20 and len({s["image_id"] for s in samples}) == 20
    # --mode=eval describes with the padded batch too.
    config.data.eval_size = 20
    metrics = evaluate_checkpoint(config, tmp_path, loaded=loaded, max_report_images=2)
    assert metrics["num_images"] == 20


def test_a_mesh_that_cannot_split_a_parameter_names_it_and_the_mesh():
    config = load_config("shapes", "tiny")  # width 32
    model = build_model(config, 400)
    mesh = sharding.make_mesh((2, 1, 3))  # 6 of the 8 devices: 'tensor' 3 does not divide 32
    rules = tuple(map(tuple, config.mesh.axis_rules))
    named = r"\['key'\]\['bias'\] has 32 entries .* cannot split in 3"
    with pytest.raises(ConfigError, match=named):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            create_state(model, config, 400, mesh, rules)
