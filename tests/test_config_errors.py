"""Bad configs fail with a message naming the problem, before anything is compiled."""

import re
import subprocess
import sys

import jax
import pytest
from conftest import REPO, load_config

from refine_jax import train
from refine_jax.config import load_config_file, parse_variants, validate_config
from refine_jax.errors import ConfigError


@pytest.fixture
def no_compilation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compilation started before the config was checked")

    monkeypatch.setattr(jax, "jit", refuse)


def run_main(tmp_path, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.main",
            "--config=configs/shapes.py:tiny",
            f"--workdir={tmp_path}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_config_key_on_the_command_line_is_rejected_with_a_suggestion(tmp_path):
    result = run_main(tmp_path, "--config.model.widht=64")
    assert result.returncode != 0
    assert "widht" in result.stderr and 'Did you mean "width"' in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_key_set_in_code_is_rejected():
    config = load_config("shapes", "tiny")
    with pytest.raises(AttributeError, match="num_refine_step"):
        config.model.num_refine_step = 3


def test_unknown_config_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown config variant.*'huge'"):
        parse_variants("tiny,huge", ("tiny", "autoregressive"))


def test_k_below_one_is_rejected_before_compilation(tmp_path, no_compilation):
    config = load_config("shapes", "tiny")
    config.model.num_refine_steps = 0
    with pytest.raises(ValueError, match=r"num_refine_steps \(K\) must be >= 1, got 0"):
        train.train_and_evaluate(config, str(tmp_path))


def test_canvas_shorter_than_longest_target_is_rejected_before_compilation(
    tmp_path, no_compilation
):
    config = load_config("shapes", "tiny")
    config.model.canvas_length = 12
    with pytest.raises(ValueError, match="canvas_length = 12 is shorter than the longest target"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.kind", "diffusion", "model.kind = 'diffusion' is not one of"),
        ("targets.schedule", "cubic", "targets.schedule = 'cubic' is not one of"),
        ("targets.self_condition_rate", 1.5, "self_condition_rate must be in"),
        ("model.patch_size", 7, "not divisible by patch_size 7"),
        ("decode.beam_size", 0, "decode.beam_size must be >= 1"),
        ("model.position_bias", "alibi", "model.position_bias = .alibi. is not one of"),
        ("match.embed_dim", 0, "match.embed_dim must be >= 1"),
        ("match.subset_rate", -0.1, "match.subset_rate must be in"),
        ("model.freeze_encoder", True, "freeze_encoder .* set config.model.pretrained_encoder"),
        ("targets.kind", "full", "objective = 'final' needs .* coarse-to-fine targets.kind"),
        ("data.train_path", "/data/train", "data.train_path = '/data/train' has no effect with"),
        ("data.path", "/data", "data.path = '/data' has no effect with data.name = 'shapes'"),
        ("data.crop_min_scale", 0.0, r"crop_min_scale must be in \(0, 1\], got 0.0"),
        ("data.crop_min_scale", 1.5, r"crop_min_scale must be in \(0, 1\], got 1.5"),
        ("model.dropout_rate", 1.5, r"dropout_rate must be in \[0, 1\), got 1.5"),
        ("model.dropout_rate", -0.5, r"dropout_rate must be in \[0, 1\), got -0.5"),
        ("model.num_heads", 0, "model.num_heads must be >= 1, got 0"),
        ("model.patch_size", 0, "model.patch_size must be >= 1, got 0"),
        ("model.encoder_depth", 0, "model.encoder_depth must be >= 1, got 0"),
        ("model.mlp_dim", 0, "model.mlp_dim must be >= 1, got 0"),
        ("model.dtype", "float61", "model.dtype = 'float61' is not one of"),
        ("targets.length_loss_weight", -1.0, "length_loss_weight must be >= 0, got -1.0"),
        ("targets.due_loss_weight", -1.0, "due_loss_weight must be >= 0, got -1.0"),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    config = load_config("shapes", "tiny")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):  # main reports it as one line
        validate_config(config)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("eval_every_steps", 0, "eval_every_steps must be >= 1, got 0"),
        ("checkpoint_every_steps", 0, "checkpoint_every_steps must be >= 1, got 0"),
        ("keep_checkpoints", 0, "keep_checkpoints must be >= 1, got 0"),
        ("max_consecutive_nonfinite", 0, "max_consecutive_nonfinite must be >= 1, got 0"),
        ("best_checkpoint_metric", "final_matches_reference", "named 'eval/...'"),
        ("grad_clip_norm", -1.0, "grad_clip_norm must be > 0, got -1.0"),  # flips the update
        ("grad_clip_norm", 0.0, "grad_clip_norm must be > 0, got 0.0"),  # no update at all
        ("warmup_steps", -5, "warmup_steps must be >= 0, got -5"),
        ("weight_decay", -1e-4, "weight_decay must be >= 0, got -0.0001"),
    ],
)
def test_invalid_top_level_values_name_the_key(key, value, message):
    config = load_config("shapes", "tiny")
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_keeping_written_words_with_the_step_objective_is_rejected():
    config = load_config("shapes", "tiny")
    config.decode.revise = False
    validate_config(config)  # the final objective keeps them
    config.targets.objective = "step"
    with pytest.raises(ConfigError, match="revise = False .*objective = 'step' rewrites"):
        validate_config(config)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_lr_decay_fraction_outside_zero_to_one_is_rejected(fraction):
    config = load_config("shapes", "tiny")
    config.lr_decay_fraction = fraction
    with pytest.raises(ConfigError, match=r"lr_decay_fraction must be in \[0, 1\], got"):
        validate_config(config)


def test_unknown_prng_implementation_is_rejected():
    config = load_config("shapes", "tiny")
    config.rng_impl = "philox"
    with pytest.raises(ValueError, match="rng_impl = 'philox' is not one of"):
        validate_config(config)


def test_dropout_bits_other_than_32_16_or_8_are_rejected():
    config = load_config("shapes", "tiny")
    config.model.dropout_bits = 4
    with pytest.raises(
        ConfigError, match=re.escape("model.dropout_bits = 4 is not one of [32, 16, 8]")
    ):
        validate_config(config)


def test_mesh_that_does_not_fit_the_devices_is_rejected(tmp_path, no_compilation):
    config = load_config("shapes", "tiny")
    config.mesh.shape = (4, 4, 1)
    with pytest.raises(ValueError, match=r"mesh shape \(4, 4, 1\) needs 16 devices but 8 are"):
        train.train_and_evaluate(config, str(tmp_path))


def test_config_file_loads_with_variant_and_dotted_overrides_and_rejects_unknown_keys():
    path = f"{REPO / 'configs' / 'shapes.py'}"
    config = load_config_file(
        f"{path}:tiny", **{"model.num_refine_steps": 6, "targets.layout": "left"}
    )
    assert config.model.num_refine_steps == 6 and config.targets.layout == "left"
    assert config.total_steps == load_config("shapes", "tiny").total_steps
    with pytest.raises(KeyError, match="no config key 'model.num_refine_step'"):
        load_config_file(path, **{"model.num_refine_step": 6})
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config_file(f"{REPO / 'configs' / 'nope.py'}:tiny")


def test_a_train_path_a_mixture_would_ignore_is_refused():
    config = load_config("shapes", "tiny")
    config.data.name = "mixture"
    config.data.mixture = (("a", 1.0, "shards", "a"), ("b", 1.0, "shards", "b"))
    validate_config(config)
    config.data.train_path = "/data/train"
    with pytest.raises(ConfigError, match="no effect with data.name = 'mixture'"):
        validate_config(config)
