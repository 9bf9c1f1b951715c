"""Flickr8k (real photos, 5 captions each) from its tar shards, sized for a 2-core CPU.

The shards are read from `config.data.path` (a folder with `train/` and `val/`), which must be
given; the tokenizer is trained on the training captions into the workdir. The default (a
4M-parameter model at 64 px) trains in about an hour on an otherwise idle 2-core CPU: 1,800
steps of 64 images (measured: ~2 s per step), ~19 epochs of the 6,000 photos; the pipeline
delivers far more than training consumes (benchmarks/input_pipeline.py). Captions longer
than the 28-token canvas (under 1% at this vocabulary) are cut and counted as
`truncated_caption`. For a ~1.4x faster step (BENCHMARKS.md) at the price of the recorded
runs' bit-for-bit reproduction, add `--config.model.dropout_bits=8
--config.model.unroll_scans=True`.

    python -m refine_jax.main --config=configs/flickr8k.py \\
        --config.data.path=../shared/data/flickr8k --workdir=/tmp/flickr8k

Variants (combine with commas): `:tiny` runs a few steps on a small model in about a minute;
`:autoregressive` selects the autoregressive baseline with the same encoder and width;
`:match` the image-text matching model that scores the captioners (DESIGN §11); `:distill`
trains the refinement model on a teacher's captions (sequence-level distillation), from shards
that `refine_jax.commands.caption_shards` wrote with a trained baseline:

    python -m refine_jax.main --config=configs/flickr8k.py:autoregressive \
        --config.data.path=../shared/data/flickr8k --workdir=/tmp/flickr8k_ar
    python -m refine_jax.commands.caption_shards --workdir=/tmp/flickr8k_ar \
        --input=../shared/data/flickr8k/train --output=/tmp/flickr8k_teacher --beam=3
    python -m refine_jax.main --config=configs/flickr8k.py:distill \
        --config.data.path=../shared/data/flickr8k \
        --config.data.train_path=/tmp/flickr8k_teacher --workdir=/tmp/flickr8k_distill
"""

import ml_collections

from refine_jax.config import base_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(arg, allowed=("tiny", "autoregressive", "match", "distill"))
    config = base_config()
    config.seed = 0
    config.batch_size = 64
    config.total_steps = 1800
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    config.learning_rate = 1e-3
    config.warmup_steps = 200
    config.weight_decay = 1e-4

    config.data.name = "shards"
    config.data.path = ""  # required: e.g. --config.data.path=../shared/data/flickr8k
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.random_crop = True
    config.data.crop_min_scale = 0.85
    config.data.num_threads = 2
    config.data.num_workers = 0

    config.tokenizer.vocab_size = 2500

    m = config.model
    m.image_size = 64  # the 160 px photos, cropped and resized
    m.patch_size = 8  # 64 image tokens
    m.width = 192
    m.num_heads = 4
    m.mlp_dim = 768
    m.encoder_depth = 4
    m.detailer_depth = 2
    m.num_refine_steps = 4
    m.canvas_length = 28  # >99% of captions fit at this vocabulary; longer ones are cut
    m.dropout_rate = 0.1

    config.targets.self_condition_rate = 0.25

    if "tiny" in variants:
        config.batch_size = 16
        config.total_steps = 20
        config.log_every_steps = 10
        config.checkpoint_every_steps = 10
        config.eval_every_steps = 20
        config.warmup_steps = 5
        config.data.max_eval_examples = 32
        config.tokenizer.vocab_size = 500
        m.image_size = 32
        m.width = 32
        m.num_heads = 2
        m.mlp_dim = 64
        m.encoder_depth = 1
        m.detailer_depth = 1
        m.dropout_rate = 0.0
    if "autoregressive" in variants:
        m.kind = "autoregressive"
    if "match" in variants:  # the image-text matching model (DESIGN §11), the yardstick
        m.kind = "match"
        if "tiny" not in variants:
            config.batch_size = 128  # more in-batch negatives
            config.total_steps = 600
            config.eval_every_steps = 300
    if "distill" in variants:
        # Every training example's caption is the teacher's (BENCHMARKS.md: distillation);
        # data.train_path must name the captioned shards, or every example is counted as
        # dropped/no_teacher_caption.
        config.data.teacher_caption_rate = 1.0
    config.lock()
    return config
