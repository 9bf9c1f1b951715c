"""COCO captions (Karpathy split) on a TPU pod: a ViT-B-sized encoder, bfloat16, data parallel.

`config.data.path` is the folder written by the COCO converter (`train/`, `val/` tar shards or
ArrayRecord files):

    python -m refine_jax.data.coco --coco_dir=COCO --karpathy_json=dataset_coco.json \\
        --output_dir=gs://BUCKET/coco
    python -m refine_jax.main --config=configs/coco.py --config.data.path=gs://BUCKET/coco \\
        --workdir=gs://BUCKET/runs/coco

Variants (combine with commas): `:tfds` reads the TFDS builder of `refine_jax.data.coco` instead
(`data.path` is then its TFDS data_dir); `:tiny` is a small float32 model that runs on a CPU
from any folder of `train/` + `val/` shards (e.g. the shared Flickr8k copy);
`:autoregressive` selects the autoregressive baseline; `:match` the image-text matching model
(DESIGN §11) at CLIP-B/16 size: the same ViT-B image tower, a 12-layer text tower, a 512-d
embedding space, batch 4,096 for the contrastive loss's in-batch negatives (combines with
`:tiny`).
"""

import ml_collections

from refine_jax.config import base_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(arg, allowed=("tiny", "tfds", "autoregressive", "match"))
    config = base_config()
    config.seed = 0
    config.batch_size = 1024  # global; each process reads batch_size / process_count
    config.total_steps = 20_000  # ~180 passes over the 113k training images, a caption each
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 2000
    config.learning_rate = 5e-4
    config.warmup_steps = 1000
    config.weight_decay = 0.05
    config.best_checkpoint_metric = "eval/final_matches_reference"

    config.data.name = "shards"
    config.data.path = ""  # required: the converter's output folder
    config.data.train_split = "train"  # restval merged in by the converter's default
    config.data.eval_split = "val"
    config.data.random_crop = True
    config.data.crop_min_scale = 0.7
    config.data.num_threads = 8
    config.data.num_workers = 8  # grain worker processes per host
    config.data.worker_buffer_size = 2

    config.tokenizer.vocab_size = 8000

    m = config.model
    m.image_size = 224
    m.patch_size = 16  # 196 image tokens
    m.width = 768
    m.num_heads = 12
    m.mlp_dim = 3072
    m.encoder_depth = 12
    m.detailer_depth = 6
    m.num_refine_steps = 4
    m.canvas_length = 40
    m.dropout_rate = 0.1
    m.dtype = "bfloat16"
    m.remat = "none"

    config.mesh.shape = (-1, 1, 1)  # data parallel: ViT-B fits on every chip

    if "tfds" in variants:
        config.data.name = "tfds_coco"  # data.path: the TFDS data_dir of coco_karpathy_captions
    if "tiny" in variants:
        config.batch_size = 8
        config.total_steps = 10
        config.log_every_steps = 5
        config.checkpoint_every_steps = 5
        config.eval_every_steps = 10
        config.warmup_steps = 2
        config.best_checkpoint_metric = ""
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
        m.dropout_rate = 0.0
        m.dtype = "float32"
    if "autoregressive" in variants:
        m.kind = "autoregressive"
    if "match" in variants:  # the image-text matching model, the captioners' yardstick
        m.kind = "match"
        config.best_checkpoint_metric = "eval/text_to_image_r@5"
        if "tiny" not in variants:
            config.batch_size = 4096  # the contrastive loss's negatives: the global batch
            config.total_steps = 3000  # ~110 passes over the 113k training images
            config.warmup_steps = 300
            config.weight_decay = 0.2
            config.eval_every_steps = 500
            config.match.embed_dim = 512
            config.match.text_depth = 12
            config.match.match_depth = 2
    config.lock()
    return config
