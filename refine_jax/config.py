"""The configuration every experiment shares, and its validation before anything compiles.

Experiment files in `configs/` start from `base_config()`, change values, and lock the
result, so a misspelt key (in the file or as `--config.x=y`) is an error, not a new key.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import ml_collections

from refine_jax.errors import ConfigError

# The choices of config values, owned here so that loading a config imports no JAX, Flax or PIL;
# the modules that implement them import them from here.
MODEL_KINDS = ("refine", "autoregressive", "match")  # registered in model_kinds.py
REMAT_POLICIES = ("none", "full", "dots")  # models.refine
POSITION_BIASES = ("none", "relative")  # models.vit
# targets.kind: "salience" (DESIGN §3), "frequency" (the same order without the subject first: an
# ablation), "full" (every step's target is the whole caption).
TARGET_KINDS = ("salience", "frequency", "full")
LAYOUTS = ("aligned", "left")  # targets.canvas_targets
SCHEDULES = ("linear", "log")  # targets.schedule_fractions
WEIGHTINGS = ("linear", "geometric", "final_only", "uniform")  # losses.step_weights
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # jax.random.key(seed, impl=...) in training
DROPOUT_BITS = (32, 16, 8)  # models.layers.Dropout
DTYPES = ("float32", "bfloat16")  # model.dtype: the compute dtype (parameters stay float32)
DEFAULT_TEMPLATES = (  # data.labels: how a class label becomes a caption
    "a photo of a {label}",
    "a picture of a {label}",
    "an image of a {label}",
    "a close-up photo of a {label}",
    "a photo of the {label}",
)
OBJECTIVES = ("final", "step")  # what a refinement step predicts (models.refine.DetailerStep)
SELF_CONDITION_LAYOUTS = ("target", "written", "own")  # where self-conditioned words are placed

# Logical axis -> mesh axis (None: replicated). Parameters shard over 'fsdp' along their
# embedding axis and over 'tensor' along heads / mlp / vocab; the batch over data and fsdp.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("patches", None),
    ("pixels", None),
    ("step", None),
    ("layers", None),
)


def parse_variants(arg: str, allowed: Sequence[str]) -> set[str]:
    """Comma-separated variants (`file.py:tiny,autoregressive`), checked against `allowed`."""
    variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
    unknown = variants - set(allowed)
    if unknown:
        raise ConfigError(f"unknown config variant(s) {sorted(unknown)}; allowed: {list(allowed)}")
    return variants


def base_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with defaults. Experiment files override values only."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The PRNG of training randomness (dropout, self-conditioning draws). threefry2x32 is JAX's
    # default and reproducible everywhere; rbg/unsafe_rbg make random bits much cheaper on
    # TPU and GPU (BENCHMARKS.md) but their streams differ between backends.
    config.rng_impl = "threefry2x32"
    config.batch_size = 64
    config.total_steps = 1000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 500
    config.num_samples_to_print = 5
    config.keep_checkpoints = 3
    config.best_checkpoint_metric = ""  # e.g. "eval/final_matches_reference": also keep the best
    config.max_consecutive_nonfinite = 20  # stop when this many updates in a row are skipped
    config.profile_steps = (0, 0)  # (first, last) step of a JAX profiler trace; (0, 0): none

    config.learning_rate = 1e-3
    config.warmup_steps = 100
    # 1: after the warm-up the rate decays as a cosine over the rest of training. f < 1: it
    # stays at its peak until the last f * total_steps updates and decays as a cosine over
    # those (warm-up, stable, decay), so a run keeps a high rate longer for the same number of
    # steps; 0 never decays. A fraction, so overriding total_steps keeps the shape.
    config.lr_decay_fraction = 1.0
    config.weight_decay = 1e-4
    config.grad_clip_norm = 1.0

    config.model = ml_collections.ConfigDict()
    config.model.kind = "refine"
    config.model.num_refine_steps = 4
    config.model.canvas_length = 32
    config.model.image_size = 64
    config.model.patch_size = 8
    config.model.width = 128
    config.model.num_heads = 4
    config.model.mlp_dim = 512
    config.model.encoder_depth = 4
    config.model.detailer_depth = 2  # the baseline's decoder gets the same depth
    config.model.dropout_rate = 0.0
    # Random bits per dropout decision: 32 draws as flax's nn.Dropout (the recorded runs); 16 or 8
    # pack 2 or 4 decisions into each 32-bit draw, the rate rounded to a multiple of 2**-bits:
    # cheaper training steps where random bits are dear, as on the CPU (BENCHMARKS.md).
    config.model.dropout_bits = 32
    config.model.dtype = "float32"
    config.model.remat = "none"
    # "relative": every encoder self-attention adds a learned bias per head and 2-D patch
    # offset (models.vit), so a head can attend by relative place ("the next row, same column").
    config.model.position_bias = "none"
    config.model.scan_detailer = True
    # Lay the scanned loops (encoder layers, detailer steps) out as straight-line code: the same
    # parameters and results without the loop's copies of per-step values; faster steps on the
    # CPU (BENCHMARKS.md), longer compiles as depth and K grow.
    config.model.unroll_scans = False
    # Where a fresh run's image encoder starts: "" (random), a big_vision ViT .npz, or the workdir
    # of a trained refine_jax run of any kind with the same encoder shape (its newest intact
    # checkpoint). With freeze_encoder the encoder stays as loaded (no dropout, no gradient, no
    # update): cheaper steps and one shared image representation across ablations.
    config.model.pretrained_encoder = ""
    config.model.freeze_encoder = False

    config.targets = ml_collections.ConfigDict()
    config.targets.kind = "salience"
    config.targets.schedule = "linear"
    config.targets.layout = "aligned"  # or "left" (see refine_jax.targets.canvas_targets)
    config.targets.log_a = 4.0
    # "final": every step predicts the whole caption's word at each position and decides which
    # positions are due now; "step": every step predicts its own target canvas.
    config.targets.objective = "final"
    config.targets.due_loss_weight = 1.0
    # Per example and step, the next step reads the own prediction instead of the target:
    # "target" keeps the target's positions with the own words there; "written" the canvas the
    # step wrote where its length is the reference's (else as "target"); "own" the written
    # canvas as it is.
    config.targets.self_condition_rate = 0.5
    config.targets.self_condition_layout = "written"
    config.targets.loss_weighting = "linear"
    config.targets.geometric_ratio = 2.0
    config.targets.length_loss_weight = 0.1

    # The image-text matching model (model.kind = "match", DESIGN §11): the shared model keys
    # size its image tower; these its text tower, matching head and training.
    config.match = ml_collections.ConfigDict()
    config.match.embed_dim = 128  # the shared embedding space
    config.match.text_depth = 2  # bidirectional text tower layers
    config.match.match_depth = 1  # matching-head layers (text attending to the image tokens)
    # Per example, train on a random word subset of the caption (order kept, each word kept
    # with a probability drawn uniformly) instead of the whole caption at this rate, so short
    # descriptions embed near their images.
    config.match.subset_rate = 0.5
    config.match.match_loss_weight = 1.0

    config.decode = ml_collections.ConfigDict()
    config.decode.revise = True  # a step may replace words earlier steps wrote
    config.decode.polish_steps = 0  # extra applications of the final step
    config.decode.beam_size = 1  # the baseline in eval and caption modes: 1 greedy, > 1 beam
    # Blank a word that repeats the word before it in every step's description ("is is" ->
    # "is"), as parallel decoders de-duplicate; either model kind, at eval and caption time.
    # On by default: on Flickr8k it removed every doubled word and never lowered a caption's
    # CIDEr-D (BENCHMARKS.md); eval still reports repetition as written (repetition_as_written).
    config.decode.drop_repeats = True

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"  # shapes | shards | tfds_coco | labels | mixture (data/__init__)
    # Root of the data: a folder with one sub-folder per split (shards, labels), a TFDS data_dir
    # (tfds_coco), `tfds:NAME` (labels, prepared in TFDS's own data_dir: $TFDS_DATA_DIR, else
    # ~/tensorflow_datasets), or the root of a mixture's relative paths.
    config.data.path = ""
    config.data.train_path = ""  # optional: this split's folder / glob / file list instead
    config.data.eval_path = ""
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.train_size = 50_000  # shapes only
    config.data.eval_size = 500  # shapes only
    config.data.max_eval_examples = 0  # > 0: evaluate on the first N held-out examples only
    config.data.index_cache_dir = ""  # tar member indexes; empty: next to shards or ~/.cache
    config.data.random_crop = False  # training: random square crop (never a flip)
    config.data.crop_min_scale = 1.0  # random crop side, as a fraction of the shorter side
    # Shards written by refine_jax.caption_shards carry a teacher's captions: training draws one
    # of them instead of a reference at this rate (sequence-level distillation).
    config.data.teacher_caption_rate = 0.0
    config.data.num_threads = 2  # grain read threads (per worker process when there are any)
    config.data.num_workers = 0  # grain worker processes; 0: threads in the trainer's process
    config.data.worker_buffer_size = 2  # batches each worker process prepares ahead
    config.data.tfds_config = ""  # tfds_coco builder config (default: restval_in_train)
    config.data.label_templates = DEFAULT_TEMPLATES  # labels as text: templates with {label}
    config.data.label_mode = "one"  # one template per image, or "all" as references
    config.data.label_names = ""  # optional file mapping class ids to words
    # Mixture: ((name, weight, kind, path), ...), kind in shards | tfds_coco | labels; weights
    # are normalised; relative paths are under data.path.
    config.data.mixture = ()
    config.data.mixture_eval = ""  # the component whose held-out split evaluates; "": first

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.path = ""  # empty: train one on the training captions into the workdir
    config.tokenizer.vocab_size = 1000

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    config.mesh.axis_rules = DEFAULT_AXIS_RULES
    return config


def load_config_file(spec: str, **overrides) -> ml_collections.ConfigDict:
    """The config of `PATH.py[:ARG]`, as `--config=` reads it, with dotted-key overrides
    (`**{"model.num_refine_steps": 6}`) applied to the locked config (misspelt keys are errors).

    For scripts and notebooks; the command line uses absl's config flags.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("refine_jax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            raise KeyError(f"{spec} has no config key {key!r}")
        node[leaf] = value
    return config


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"config.{name} = {value!r} is not one of {list(choices)}")


def _non_finite_values(node, prefix: str = "config") -> list[str]:
    """Dotted names of every NaN or infinite number in a config (inside tuples too)."""
    if isinstance(node, ml_collections.ConfigDict):
        items = ((f"{prefix}.{key}", node[key]) for key in node.keys())
    elif isinstance(node, (tuple, list)):
        items = ((f"{prefix}[{i}]", value) for i, value in enumerate(node))
    elif isinstance(node, float) and not math.isfinite(node):
        return [f"{prefix} = {node}"]
    else:
        return []
    return [bad for name, value in items for bad in _non_finite_values(value, name)]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad key for values no run could succeed with."""
    non_finite = _non_finite_values(config)
    if non_finite:
        raise ConfigError(f"non-finite config value: {', '.join(non_finite)}; use a finite number")
    m, t = config.model, config.targets
    # Values that train silently wrongly: a negative clip norm flips the update's sign, 0 stops
    # every update; a dropout rate of 1 or more zeroes the activations.
    for name, value in (
        ("learning_rate", config.learning_rate),
        ("warmup_steps", config.warmup_steps),
        ("weight_decay", config.weight_decay),
        ("targets.due_loss_weight", t.due_loss_weight),
        ("targets.length_loss_weight", t.length_loss_weight),
    ):
        if not value >= 0:
            raise ConfigError(f"config.{name} must be >= 0, got {value}")
    if not config.grad_clip_norm > 0:
        raise ConfigError(f"config.grad_clip_norm must be > 0, got {config.grad_clip_norm}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ConfigError(f"config.model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
    if not 0.0 <= config.lr_decay_fraction <= 1.0:
        raise ConfigError(
            f"config.lr_decay_fraction must be in [0, 1], got {config.lr_decay_fraction}"
        )
    _check_choice(m.dtype, "model.dtype", DTYPES)
    _check_choice(config.rng_impl, "rng_impl", RNG_IMPLS)
    _check_choice(m.kind, "model.kind", MODEL_KINDS)
    _check_choice(m.remat, "model.remat", REMAT_POLICIES)
    _check_choice(m.dropout_bits, "model.dropout_bits", DROPOUT_BITS)
    _check_choice(m.position_bias, "model.position_bias", POSITION_BIASES)
    _check_choice(t.kind, "targets.kind", TARGET_KINDS)
    _check_choice(t.schedule, "targets.schedule", SCHEDULES)
    _check_choice(t.layout, "targets.layout", LAYOUTS)
    _check_choice(t.loss_weighting, "targets.loss_weighting", WEIGHTINGS)
    _check_choice(t.objective, "targets.objective", OBJECTIVES)
    _check_choice(t.self_condition_layout, "targets.self_condition_layout", SELF_CONDITION_LAYOUTS)
    if t.objective == "final" and (t.layout != "aligned" or t.kind == "full"):
        raise ConfigError(
            "config.targets.objective = 'final' needs targets.layout = 'aligned' and a "
            f"coarse-to-fine targets.kind (got {t.layout!r}, {t.kind!r}); or use objective 'step'"
        )
    if m.kind == "refine" and not config.decode.revise and t.objective != "final":
        raise ConfigError(
            "config.decode.revise = False keeps written words in the 'final' objective's "
            f"decoding; targets.objective = {t.objective!r} rewrites every position at each step"
        )
    if config.best_checkpoint_metric and not config.best_checkpoint_metric.startswith("eval/"):
        raise ConfigError(
            f"config.best_checkpoint_metric = {config.best_checkpoint_metric!r} is not an "
            "evaluation metric: those are named 'eval/...', e.g. 'eval/final_matches_reference'"
        )
    if config.decode.beam_size < 1:
        raise ConfigError(f"config.decode.beam_size must be >= 1, got {config.decode.beam_size}")
    if config.decode.polish_steps < 0:
        raise ConfigError(
            f"config.decode.polish_steps must be >= 0, got {config.decode.polish_steps}"
        )
    if m.num_refine_steps < 1:
        raise ConfigError(
            f"config.model.num_refine_steps (K) must be >= 1, got {m.num_refine_steps}"
        )
    for key in (
        "batch_size",
        "total_steps",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "max_consecutive_nonfinite",
        "canvas_length",
        "width",
        "image_size",
        "patch_size",
        "num_heads",
        "mlp_dim",
        "encoder_depth",
        "detailer_depth",
    ):
        name, value = (key, config[key]) if key in config else (f"model.{key}", m[key])
        if value < 1:
            raise ConfigError(f"config.{name} must be >= 1, got {value}")
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"config.model.image_size {m.image_size} is not divisible by patch_size {m.patch_size}"
        )
    if m.width % m.num_heads:
        raise ConfigError(
            f"config.model.width {m.width} is not divisible by num_heads {m.num_heads}"
        )
    if m.freeze_encoder and not m.pretrained_encoder:
        raise ConfigError(
            "config.model.freeze_encoder keeps the encoder as it starts, which would be random: "
            "set config.model.pretrained_encoder (a big_vision .npz or a trained run's workdir)"
        )
    ignored = {
        "shapes": ("path", "train_path", "eval_path"),  # generated: it reads no files
        "mixture": ("train_path",),  # every entry of data.mixture names its own location
    }.get(config.data.name, ())
    for key in ignored:
        if config.data[key]:
            raise ConfigError(
                f"config.data.{key} = {config.data[key]!r} has no effect with data.name = "
                f"{config.data.name!r}; leave it empty"
            )
    if not 0.0 < config.data.crop_min_scale <= 1.0:
        raise ConfigError(
            f"config.data.crop_min_scale must be in (0, 1], got {config.data.crop_min_scale}"
        )
    if not 0.0 <= config.data.teacher_caption_rate <= 1.0:
        raise ConfigError(
            "config.data.teacher_caption_rate must be in [0, 1], got "
            f"{config.data.teacher_caption_rate}"
        )
    for key in ("embed_dim", "text_depth", "match_depth", "match_loss_weight"):
        least = 1 if key == "embed_dim" else 0
        if not config.match[key] >= least:
            raise ConfigError(f"config.match.{key} must be >= {least}, got {config.match[key]}")
    if not 0.0 <= config.match.subset_rate <= 1.0:
        raise ConfigError(
            f"config.match.subset_rate must be in [0, 1], got {config.match.subset_rate}"
        )
    if not 0.0 <= t.self_condition_rate <= 1.0:
        raise ConfigError(
            f"config.targets.self_condition_rate must be in [0, 1], got {t.self_condition_rate}"
        )
    if len(config.mesh.shape) != 3:
        raise ConfigError(
            f"config.mesh.shape must give ('data', 'fsdp', 'tensor'), got {config.mesh.shape}"
        )
