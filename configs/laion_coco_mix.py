"""LAION + COCO + ImageNet-labels-as-text mixture on a TPU pod, FSDP over the chips.

`config.data.path` is the root holding the sources (relative paths of `data.mixture` are taken
under it): `coco/{train,val}/` (from `refine_jax.data.coco`), `laion/` (img2dataset tar shards,
any layout the shard reader takes: a `train/` folder or the shards themselves) and ImageNet as
a prepared TFDS dataset (`tfds:imagenet2012`; set `data.label_names` to
`LOC_synset_mapping.txt` to caption with words rather than WordNet ids). Evaluation uses COCO's
held-out split.

    python -m refine_jax.main --config=configs/laion_coco_mix.py \\
        --config.data.path=gs://BUCKET/data --workdir=gs://BUCKET/runs/mix

Variants: `:tiny` is a small float32 model for a CPU with the same three-way mixture read from
`data.path` = a folder with `coco/{train,val}/`, `laion/` shards and a `labels/` class-folder tree;
`:autoregressive` selects the autoregressive baseline; `:match` the image-text matching model
(DESIGN §11) at CLIP-B/16 size (12-layer text tower, 512-d embeddings) with batch 16,384 for the
contrastive loss's in-batch negatives (combines with `:tiny`).
"""

import ml_collections

from refine_jax.config import base_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(arg, allowed=("tiny", "autoregressive", "match"))
    config = base_config()
    config.seed = 0
    config.batch_size = 4096
    config.total_steps = 100_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.eval_every_steps = 5000
    config.learning_rate = 5e-4
    config.warmup_steps = 5000
    config.weight_decay = 0.05

    config.data.name = "mixture"
    config.data.path = ""  # required: the root of the relative paths below
    config.data.mixture = (
        ("coco", 0.6, "shards", "coco"),
        ("laion", 0.35, "shards", "laion"),
        ("labels", 0.05, "labels", "tfds:imagenet2012"),
    )
    config.data.mixture_eval = "coco"
    config.data.label_mode = "one"
    config.data.random_crop = True
    config.data.crop_min_scale = 0.7
    config.data.num_threads = 8
    config.data.num_workers = 16
    config.data.worker_buffer_size = 2

    config.tokenizer.vocab_size = 32_000

    m = config.model
    m.image_size = 224
    m.patch_size = 16
    m.width = 768
    m.num_heads = 12
    m.mlp_dim = 3072
    m.encoder_depth = 12
    m.detailer_depth = 6
    m.num_refine_steps = 4
    m.canvas_length = 48  # LAION alt-texts run long; longer ones are cut and counted
    m.dropout_rate = 0.0
    m.dtype = "bfloat16"
    m.remat = "dots"  # keeps matmul outputs, recomputes the rest: memory for 4096 x K steps

    config.mesh.shape = (1, -1, 1)  # fully sharded data parallel over every chip

    if "tiny" in variants:
        config.batch_size = 8
        config.total_steps = 10
        config.log_every_steps = 5
        config.checkpoint_every_steps = 5
        config.eval_every_steps = 10
        config.warmup_steps = 2
        config.data.mixture = (
            ("coco", 0.6, "shards", "coco"),
            ("laion", 0.35, "shards", "laion"),
            ("labels", 0.05, "labels", "labels"),  # a class-folder tree instead of TFDS
        )
        config.data.num_threads = 2
        config.data.num_workers = 0
        config.data.max_eval_examples = 16
        config.tokenizer.vocab_size = 400
        m.image_size = 32
        m.patch_size = 8
        m.width = 32
        m.num_heads = 2
        m.mlp_dim = 64
        m.encoder_depth = 1
        m.detailer_depth = 1
        m.canvas_length = 32
        m.dtype = "float32"
        m.remat = "none"
        config.mesh.shape = (-1, 1, 1)
    if "autoregressive" in variants:
        m.kind = "autoregressive"
    if "match" in variants:  # the image-text matching model, the captioners' yardstick
        m.kind = "match"
        config.best_checkpoint_metric = "eval/text_to_image_r@5"  # on COCO's held-out split
        if "tiny" not in variants:
            config.batch_size = 16_384  # the contrastive loss's negatives: the global batch
            config.total_steps = 50_000
            config.weight_decay = 0.2
            config.match.embed_dim = 512
            config.match.text_depth = 12
            config.match.match_depth = 2
    config.lock()
    return config
