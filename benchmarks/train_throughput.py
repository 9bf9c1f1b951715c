"""Training throughput and a same-run "MFU": the train step against this machine's dense matmul.

Jits the trainer's `train_step` (refine_jax.train, with its optimizer) for the Flickr8k
configuration (configs/flickr8k.py: 64 px, width 192, K=4, canvas 28, vocabulary 2,500,
batch 64) and for its autoregressive baseline, with random weights and a random batch of the
pipeline's shapes. It times steps and reports examples/s and the analytic FLOP/s
(refine_jax/flops.py: matmul FLOPs, the detailer counted K times, training = 3 forward
passes). In the same process and the same rounds it times a jitted square matmul (2048 x
2048, of the model's dtype): the step's FLOP/s divided by that rate is the MFU on this
machine. The timings of all variants and the matmul alternate, round by round, so background
load falls on all alike. Each variant's compile time and compiled size (HLO instructions) are
reported too.

    python benchmarks/train_throughput.py                      # refine and autoregressive
    python benchmarks/train_throughput.py --quick              # seconds: tiny config
    python benchmarks/train_throughput.py --kinds=refine --batch_sizes=64,128,256
    python benchmarks/train_throughput.py --remat=none,dots --dropout=0.1,0 --dtype=bfloat16
    python benchmarks/train_throughput.py --kinds=refine --dropout_bits=32,16,8
    python benchmarks/train_throughput.py --freeze_encoder=false,true  # cheaper experiments
    python benchmarks/train_throughput.py --kinds=refine --data_devices=1,2  # CPU data parallel
    python benchmarks/train_throughput.py --breakdown          # forward / backward / parts
    python benchmarks/train_throughput.py --profile_dir=/tmp/p # trace + op time by model part
    python benchmarks/train_throughput.py --hlo_cost           # XLA's cost analysis

Comma-separated --batch_sizes, --remat, --dtype, --dropout, --dropout_bits, --scan_detailer,
--unroll_scans, --freeze_encoder, --prng and --data_devices give one variant per combination (a
frozen encoder is timed with its random weights: only its speed is measured). --data_devices=N
splits the batch over a ('data', 'fsdp', 'tensor') = (N, 1, 1) mesh, as the trainer does; on a
CPU host the process is given the most CPU devices asked for (jax_num_cpu_devices), so one CPU
is split into several XLA devices that run their shards of the step side by side.
--profile_dir traces --profile_steps steps of every variant with jax.profiler (open with
TensorBoard / XProf) and sums the time of each compiled op (XLA:CPU records one event per op,
with the op's source path in the model) by model part, layer kind and forward/backward. Writes
JSON to --output (default benchmarks/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
from pathlib import Path

import common  # noqa: I001 (the folder's shared helpers, imported first)
import flax.linen as nn
import jax
import jax.numpy as jnp
import profile_table

from refine_jax import sharding
from refine_jax.flops import encoder_flops, text_stack_flops, training_flops_per_example
from refine_jax.model_kinds import model_kind
from refine_jax.train import bind_train_step, make_optimizer


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny refine config: seconds")
    parser.add_argument("--output", default=None, help="JSON result path")
    parser.add_argument(
        "--kinds", default=None, help="model kinds to time (default refine,autoregressive)"
    )
    parser.add_argument("--batch_sizes", default="", help="comma list; default: the config's")
    parser.add_argument("--remat", default="none", help="comma list of none | full | dots")
    parser.add_argument("--dtype", default="float32", help="comma list: float32, bfloat16")
    parser.add_argument("--dropout", default="", help="comma list of rates; default: config's")
    parser.add_argument(
        "--dropout_bits", default="", help="comma list of 32, 16, 8 (model.dropout_bits)"
    )
    parser.add_argument(
        "--prng", default="", help="comma list of config.rng_impl (threefry2x32, rbg, unsafe_rbg)"
    )
    parser.add_argument(
        "--scan_detailer", default="", help="comma list of true/false; default: config's"
    )
    parser.add_argument(
        "--unroll_scans", default="", help="comma list of true/false; default: config's"
    )
    parser.add_argument(
        "--freeze_encoder", default="", help="comma list of true/false; default: config's"
    )
    parser.add_argument(
        "--data_devices",
        default="1",
        help="comma list: devices the batch is split over (the trainer's 'data' mesh axis)",
    )
    parser.add_argument("--num_refine_steps", type=int, default=None, help="override K")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings per variant (median)")
    parser.add_argument("--matmul_size", type=int, default=2048, help="reference matmul side")
    parser.add_argument("--profile_dir", default="", help="trace each variant into this folder")
    parser.add_argument("--profile_steps", type=int, default=2, help="steps traced per variant")
    parser.add_argument("--top_ops", type=int, default=12, help="slowest ops listed per profile")
    parser.add_argument("--hlo_cost", action="store_true", help="print XLA's cost analysis")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time forward alone, forward+backward, encoder and text stack",
    )
    quick = dict(steps=1, rounds=2, matmul_size=256, profile_steps=1)
    args = common.parse_args_with_quick(parser, argv, quick)
    if args.kinds is None:  # --quick: the refinement model only, unless asked
        args.kinds = "refine" if args.quick else "refine,autoregressive"
    unknown = set(csv(args.kinds)) - {"refine", "autoregressive"}
    if unknown:  # the captioners' Flickr8k configs are what this script builds
        parser.error(f"--kinds: {sorted(unknown)} not timed here (refine, autoregressive)")
    return args


def as_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def csv(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()] or [None]


class Variant:
    """One configuration to time: its compiled step, state, batch and analytic FLOPs."""

    def __init__(self, config, prng: str | None, data_devices: int):
        m = config.model
        self.config = config
        self.prng = prng
        self.data_devices = data_devices
        self.name = (
            f"{m.kind} B={config.batch_size} remat={m.remat} {m.dtype} "
            f"dropout={m.dropout_rate:g}"
            + (f"/{m.dropout_bits}bit" if m.dropout_bits != 32 else "")
            + (f" prng={prng}" if prng else "")
            + ("" if m.scan_detailer else " unscanned")
            + (" unrolled" if m.unroll_scans else "")
            + (" frozen-encoder" if m.freeze_encoder else "")
            + (f" data-devices={data_devices}" if data_devices > 1 else "")
        )
        self.vocab = config.tokenizer.vocab_size
        self.flops_per_step = training_flops_per_example(config, self.vocab) * config.batch_size
        start = time.perf_counter()
        self.model, step, state, self.num_params = common.make_train_step(config)
        # The trainer's layout on a (data_devices, 1, 1) mesh: parameters replicated, the batch
        # split along 'data' (the default axis rules).
        mesh = sharding.make_mesh((data_devices, 1, 1))
        state = jax.device_put(state, sharding.replicated(mesh))
        batch = common.synthetic_batch(config)
        self.batch = sharding.global_batch_from_full(batch, mesh, config.mesh.axis_rules)
        self.compiled = step.lower(state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        # The compiled program's size, which its compile time follows (BENCHMARKS.md, "The
        # update guard's program").
        self.hlo_instructions = len(profile_table.hlo_ops(self.compiled.as_text()))
        self.state, metrics = self.compiled(state, self.batch)
        jax.block_until_ready(metrics)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` consecutive steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


# Comma-list flags that override a config.model key: flag -> (key, value type). With --kinds,
# --batch_sizes and --prng they give one variant per combination.
MODEL_FLAGS = {
    "remat": ("remat", str),
    "dtype": ("dtype", str),
    "dropout": ("dropout_rate", float),
    "dropout_bits": ("dropout_bits", int),
    "scan_detailer": ("scan_detailer", as_bool),
    "unroll_scans": ("unroll_scans", as_bool),
    "freeze_encoder": ("freeze_encoder", as_bool),
}


def build_config(kind, batch_size, quick, num_refine_steps, **model):
    """The Flickr8k config of `kind` with `model` overrides (None: keep the config's)."""
    return common.load_config(
        ",".join(filter(None, ["tiny" if quick else "", "autoregressive" * (kind != "refine")])),
        batch_size,
        **model,
        # the trainer would load a frozen encoder from here; timing keeps the random weights
        pretrained_encoder="(random weights, timing only)" if model["freeze_encoder"] else None,
        num_refine_steps=num_refine_steps,
    )


def profile_variant(variant: Variant, folder: Path, steps: int, top: int) -> dict:
    """Traces `steps` steps of `variant` and sums its op time by part, kind and pass."""
    return profile_table.profile_ops(
        lambda: variant.run(steps) * steps,
        variant.compiled.as_text(),
        folder,
        steps,
        top,
        flops_per_call=variant.flops_per_step,
    )


# --- Breakdown: forward, backward, encoder, text stack ------------------------------------


def breakdown(variant: Variant, rounds: int) -> dict:
    """Times parts of the step in isolation: the loss forward, forward+backward (no optimizer),
    the encoder forward / forward+backward, and the rest (the text stack with its loss, on
    fixed image tokens)."""
    config, model = variant.config, variant.model
    optimizer, schedule = make_optimizer(config)
    bound = bind_train_step(config, model, optimizer, schedule)
    weights, fractions = bound.keywords["weights"], bound.keywords["fractions"]
    kind_loss = model_kind(config.model.kind).loss
    batch = variant.batch
    params = jax.tree.map(jnp.copy, variant.state.params)  # the train step donates its own
    rng = jax.random.key(1)

    def loss(params, batch):  # the trainer's loss (the model kind's, as train_step calls it)
        return kind_loss(model, params, batch, rng, config, weights, fractions)[0]

    def encode(params, images):
        return model.apply(
            {"params": params},
            images,
            False,
            method=type(model).encode,
            rngs={"dropout": rng},
        )

    def text_stack_loss(params, image_tokens):  # the loss with the encoder's output given
        def given_image_tokens(next_fn, args, kwargs, context):
            if context.method_name == "encode" and type(context.module) is type(model):
                return image_tokens
            return next_fn(*args, **kwargs)

        with nn.intercept_methods(given_image_tokens):
            return loss(params, batch)

    cotangent = jnp.ones_like(jax.eval_shape(encode, params, batch["image"]))
    encoder_loss = lambda params, images: jnp.sum(encode(params, images) * cotangent)
    image_tokens = jax.jit(encode)(params, batch["image"])
    functions = {
        "loss forward": (jax.jit(loss), (params, batch)),
        "loss forward+backward": (jax.jit(jax.value_and_grad(loss)), (params, batch)),
        "encoder forward": (jax.jit(encode), (params, batch["image"])),
        "encoder forward+backward": (
            jax.jit(jax.value_and_grad(encoder_loss)),
            (params, batch["image"]),
        ),
        "text stack + loss forward": (jax.jit(text_stack_loss), (params, image_tokens)),
        "text stack + loss forward+backward": (
            jax.jit(jax.value_and_grad(text_stack_loss, argnums=(0, 1))),
            (params, image_tokens),
        ),
    }
    measures = {}
    for name, (fn, fn_args) in functions.items():
        jax.block_until_ready(fn(*fn_args))  # compile
        measures[name] = functools.partial(common.time_call, lambda f=fn, a=fn_args: f(*a), 2)
    measures["full train step"] = lambda: variant.run(2)
    seconds = common.interleaved(measures, rounds, log=lambda s: print("  breakdown " + s))
    result = {name: common.median(values) for name, values in seconds.items()}
    b = config.batch_size
    text = text_stack_flops(config, variant.vocab)
    return {
        "seconds": result,
        "analytic_forward_flops": {"encoder": encoder_flops(config) * b, "text stack": text * b},
        "analytic_train_step_flops": training_flops_per_example(config, variant.vocab) * b,
    }


def print_breakdown(name: str, result: dict, matmul_rate: float) -> None:
    seconds = result["seconds"]
    flops = result["analytic_forward_flops"]
    step = seconds["full train step"]
    rows = []
    for part, s in seconds.items():
        passes = 3 if "backward" in part else 1
        if part == "full train step":  # the training count: a frozen encoder runs forward only
            f = result["analytic_train_step_flops"]
        elif part.startswith("encoder"):
            f = passes * flops["encoder"]
        elif part.startswith("text stack"):
            f = passes * flops["text stack"]
        else:
            f = passes * (flops["encoder"] + flops["text stack"])
        rows.append([part, s, 100 * s / step, f / s / 1e9, 100 * f / s / matmul_rate])
    print(f"\n### Parts of {name}, timed alone\n")
    headers = ["part", "s", "% of step", "analytic GFLOP/s", "MFU %"]
    print(common.markdown_table(headers, rows))


# --- Main -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    data_devices = csv(args.data_devices, int)
    if max(data_devices) > 1:  # before the first JAX computation, which fixes the CPU count
        jax.config.update("jax_num_cpu_devices", max(data_devices))
    load_before = os.getloadavg()
    variants = []
    for kind, batch_size, *values, prng, devices in itertools.product(
        csv(args.kinds),
        csv(args.batch_sizes, int),
        *(csv(getattr(args, flag), cast) for flag, (_, cast) in MODEL_FLAGS.items()),
        csv(args.prng),
        data_devices,
    ):
        model = {key: value for (key, _), value in zip(MODEL_FLAGS.values(), values, strict=True)}
        if kind != "refine" and model["scan_detailer"] is False:
            continue  # the baseline has no detailer scan
        config = build_config(kind, batch_size, args.quick, args.num_refine_steps, **model)
        if prng:
            config.rng_impl = prng  # the step's dropout and self-conditioning keys (step_rng)
        variant = Variant(config, prng, devices)
        print(
            f"compiled {variant.name}: {variant.num_params:,} parameters, "
            f"{variant.hlo_instructions:,} HLO instructions, {variant.compile_s:.1f}s",
            flush=True,
        )
        variants.append(variant)

    dtypes = sorted({v.config.model.dtype for v in variants})
    matmuls = {}
    for dtype in dtypes:
        size = args.matmul_size

        def measure_matmul(dtype=dtype, size=size):
            result = common.matmul_flops_per_s(size, dtype, reps=3, rounds=1)
            return result["seconds_per_product"]

        matmuls[f"matmul {size}x{size} {dtype}"] = (dtype, measure_matmul)
        measure_matmul()  # compile
    measures = {v.name: functools.partial(v.run, args.steps) for v in variants}
    measures.update({name: fn for name, (_, fn) in matmuls.items()})
    seconds = common.interleaved(measures, args.rounds)
    matmul_rate = {
        dtype: 2.0 * args.matmul_size**3 / common.median(seconds[name])
        for name, (dtype, _) in matmuls.items()
    }

    rows, records = [], []
    for v in variants:
        m = v.config.model
        step_s = common.median(seconds[v.name])
        flops_rate = v.flops_per_step / step_s
        mfu = flops_rate / matmul_rate[m.dtype]
        record = {
            "name": v.name,
            "model": common.model_summary(v.config),
            "prng": v.config.rng_impl,
            "data_devices": v.data_devices,
            "num_params": v.num_params,
            "compile_s": v.compile_s,
            "hlo_instructions": v.hlo_instructions,
            "seconds_per_step": step_s,
            "seconds_per_step_all": seconds[v.name],
            "spread": common.spread(seconds[v.name]),
            "examples_per_s": v.config.batch_size / step_s,
            "analytic_flops_per_step": v.flops_per_step,
            "analytic_flops_per_s": flops_rate,
            "mfu": mfu,
        }
        if args.hlo_cost:
            cost = v.compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            record["xla_cost_analysis"] = {
                k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals")
            }
        records.append(record)
        rows.append(
            [
                m.kind,
                v.config.batch_size,
                m.remat,
                m.dtype,
                f"{m.dropout_rate:g}"
                + (f" ({m.dropout_bits} bits)" if m.dropout_bits != 32 else ""),
                ("unrolled " if m.unroll_scans else "")
                + ("scan" if m.scan_detailer or m.kind != "refine" else "loop")
                + (", frozen encoder" if m.freeze_encoder else ""),
                v.prng or "default",
                v.data_devices,
                step_s,
                record["examples_per_s"],
                v.flops_per_step / 1e9,
                flops_rate / 1e9,
                100 * mfu,
            ]
        )
    info = common.machine_info()
    print(f"\n## Train step throughput ({common.machine_line(info)})\n")
    headers = ["model", "batch", "remat", "dtype", "dropout", "detailer", "prng", "devices"]
    headers += ["s/step", "examples/s", "GFLOP/step", "GFLOP/s", "MFU %"]
    print(common.markdown_table(headers, rows))
    print()
    matmul_rows = [
        [name, common.median(seconds[name]), matmul_rate[dtype] / 1e9]
        for name, (dtype, _) in matmuls.items()
    ]
    print(common.markdown_table(["reference", "s/product", "GFLOP/s"], matmul_rows))

    if args.hlo_cost:
        print("\n### XLA cost analysis of the compiled step (loop bodies counted once)\n")
        rows = [
            [
                r["name"],
                r["xla_cost_analysis"]["flops"] / 1e9,
                r["analytic_flops_per_step"] / 1e9,
                r["xla_cost_analysis"]["bytes accessed"] / 1e9,
                r["xla_cost_analysis"]["transcendentals"] / 1e6,
            ]
            for r in records
        ]
        headers = ["variant", "XLA GFLOP", "analytic GFLOP", "XLA GB accessed", "M transcend."]
        print(common.markdown_table(headers, rows))

    if args.breakdown:
        for v, record in zip(variants, records, strict=True):
            record["breakdown"] = breakdown(v, args.rounds)
            print_breakdown(v.name, record["breakdown"], matmul_rate[v.config.model.dtype])

    if args.profile_dir:
        for i, (v, record) in enumerate(zip(variants, records, strict=True)):
            folder = Path(args.profile_dir) / f"{i}_{common.slug(v.name)}"
            record["profile"] = profile_variant(v, folder, args.profile_steps, args.top_ops)
            profile_table.print_profile(v.name, record["profile"], "step")

    result = {
        "benchmark": "train_throughput" + ("_quick" if args.quick else ""),
        "quick": args.quick,
        "config": "configs/flickr8k.py" + (":tiny" if args.quick else ""),
        "steps_per_timing": args.steps,
        "rounds": args.rounds,
        "matmul": {
            name: {
                "dtype": dtype,
                "size": args.matmul_size,
                "seconds": seconds[name],
                "flops_per_s": matmul_rate[dtype],
            }
            for name, (dtype, _) in matmuls.items()
        },
        "variants": records,
        "machine": {**info, "load_average_before": [round(x, 2) for x in load_before]},
    }
    common.save(result, args.output, result["benchmark"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
