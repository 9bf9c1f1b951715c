"""The trainer: one linear function, read top to bottom.

setup (config, mesh, data, tokenizer, model) -> sharded state -> jitted train step ->
loop (log, evaluate) -> describe the held-out split into samples.jsonl.
"""

from __future__ import annotations

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from refine_jax import sharding
from refine_jax.checkpointing import Checkpointer, model_signature, probe_writable
from refine_jax.config import validate_config
from refine_jax.data import make_sources, training_captions
from refine_jax.data.caption_source import HasLongestCaption
from refine_jax.data.pipeline import (
    DROPPED_PREFIX,
    SKIP_REASONS,
    CaptionFeatures,
    count_skips,
    structural_skip_counts,
    train_batches,
)
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, is_record
from refine_jax.errors import ConfigError, WorkdirLockedError
from refine_jax.evaluation.captioning import describe_split, exact_match_rates
from refine_jax.evaluation.matching import MatchEmbedder, split_retrieval
from refine_jax.evaluation.metrics import evaluate_samples
from refine_jax.flops import training_flops_per_example
from refine_jax.metric_writer import MetricWriter
from refine_jax.model_kinds import build_model, model_kind
from refine_jax.model_loading import load_encoder
from refine_jax.stop_signals import StopSignals
from refine_jax.targets import schedule_fractions
from refine_jax.tokenizer import Tokenizer, train_tokenizer
from refine_jax.train_state import (  # init_variables: re-exported for existing importers
    TrainState,
    create_state,
    init_variables,  # noqa: F401
    make_optimizer,
    restore_state,
)
from refine_jax.workdir_config import record_config, recorded_setting
from refine_jax.workdir_lock import WorkdirLock


def load_or_train_tokenizer(
    config: ml_collections.ConfigDict, workdir: epath.Path, source
) -> Tokenizer:
    """The configured tokenizer, or one trained on the training captions and kept in workdir."""
    if config.tokenizer.path:
        return Tokenizer.load(config.tokenizer.path)
    local = workdir / "tokenizer"
    if (local / "spm.model").exists():
        # The workdir's tokenizer is reused as trained: a vocab_size changed since would be
        # silently ignored (the model's shapes follow the tokenizer, so the checkpoint fits).
        trained_with = recorded_setting(workdir, "tokenizer.vocab_size")
        if trained_with is not None and trained_with != config.tokenizer.vocab_size:
            raise ConfigError(
                f"config.tokenizer.vocab_size = {config.tokenizer.vocab_size}, but {local} was "
                f"trained with {trained_with} and this workdir reuses it: set it back to "
                f"{trained_with}, or train a new tokenizer in a new --workdir"
            )
        return Tokenizer.load(local)
    tokenizer = train_tokenizer(training_captions(source), config.tokenizer.vocab_size)
    if jax.process_index() == 0:
        tokenizer.save(local)
    return tokenizer


def check_canvas_fits(config: ml_collections.ConfigDict, tokenizer: Tokenizer, source) -> None:
    """A canvas shorter than the longest target the data can produce is a config error."""
    if not isinstance(source, HasLongestCaption):
        return  # open-ended sources: over-long captions are cut and counted by the pipeline
    longest = source.longest_caption()
    need = len(tokenizer.encode(longest))
    if need > config.model.canvas_length:
        raise ValueError(
            f"config.model.canvas_length = {config.model.canvas_length} is shorter than the "
            f"longest target ({need} tokens: {longest!r}); raise it to at least {need}"
        )


def check_teacher_captions(config: ml_collections.ConfigDict, source, probes: int = 32) -> None:
    """Distillation (`data.teacher_caption_rate` > 0) on data none of whose probed records, spread
    over the source, carries a teacher's captions would silently train on the references only:
    a config error naming the command that writes them."""
    rate = config.data.teacher_caption_rate
    if rate <= 0 or len(source) == 0:
        return
    positions = np.unique(np.linspace(0, len(source) - 1, probes).astype(int))
    records = [source[int(i)] for i in positions]
    if any(is_record(r) and r.get(TEACHER_CAPTIONS_FIELD) for r in records):
        return
    raise ConfigError(
        f"config.data.teacher_caption_rate = {rate} trains on a teacher's captions, but none of "
        f"{len(positions)} training records spread over the data carries any: point "
        "config.data.train_path at shards written by refine_jax.commands.caption_shards"
    )


def step_rng(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The key of a training step's randomness (dropout, self-conditioning draws): the seed
    folded with the step, from the configured PRNG implementation (`config.rng_impl`)."""
    return jax.random.fold_in(jax.random.key(config.seed, impl=config.rng_impl), step)


def train_step(
    state: TrainState, batch: dict, *, model, optimizer, schedule, config, weights, fractions
):
    """One update. A non-finite loss, gradient or update skips the update and is counted, so the
    parameters and optimizer state only ever take finite values."""
    rng = step_rng(config, state.step)
    kind_loss = model_kind(config.model.kind).loss

    def loss_fn(params):
        return kind_loss(model, params, batch, rng, config, weights, fractions)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The update itself is checked too: a finite gradient can still give a non-finite update
    # (a non-finite learning rate, an overflowing optimizer moment).
    updates_finite = jnp.all(jnp.stack([jnp.isfinite(u).all() for u in jax.tree.leaves(updates)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & updates_finite
    # One branch over the whole state, not a jnp.where per leaf: XLA fused the finiteness test
    # (an `and` of every leaf's flag) into each leaf's select, which made the program 2.6 times
    # the instructions and its compile 1.3-1.7 times as long (BENCHMARKS.md).
    params, opt_state = jax.lax.cond(
        finite, lambda: (params, opt_state), lambda: (state.params, state.opt_state)
    )
    new_state = TrainState(state.step + 1, params, opt_state)
    metrics.update(
        grad_norm=grad_norm,
        # The rate of this update: skipped updates do not advance the optimizer's own count.
        learning_rate=schedule(
            optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[0][1]
        ),
        skipped_nonfinite=1.0 - finite.astype(jnp.float32),
    )
    return new_state, metrics


def bind_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
):
    """`train_step` with the model, optimizer, step fractions s(k) and loss weights w_k (the
    model kind's step schedule) bound: a function (state, batch) -> (state, metrics), ready to
    jit."""
    fractions, weights = model_kind(config.model.kind).step_schedule(config)
    return functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        config=config,
        weights=jnp.asarray(weights, jnp.float32),
        fractions=jnp.asarray(fractions, jnp.float32),
    )


def lock_workdir(workdir: epath.Path) -> WorkdirLock:
    """The workdir's lock, taken by process 0 (the only one that matters); every process raises
    WorkdirLockedError together when another live run holds it."""
    lock, refusal = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as error:
            refusal = error
    refused = sharding.sum_over_processes(np.asarray([refusal is not None]))[0]
    if refused:
        raise refusal or WorkdirLockedError(f"workdir {workdir} is in use by another run")
    return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as configured, logging to workdir/metrics.jsonl; returns the final eval summary.
    One run per workdir: it is locked for the run's duration. SIGTERM or SIGINT save a
    checkpoint and end the run cleanly; a second SIGINT exits at once."""
    validate_config(config)  # before anything is locked, read or compiled
    lock = lock_workdir(epath.Path(workdir))
    stop_signals = StopSignals(before_forced_exit=lock.release).install()
    try:
        return _train_and_evaluate(config, workdir, stop_signals)
    finally:
        stop_signals.uninstall()
        lock.release()


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, stop_signals: StopSignals
) -> dict:
    # --- Setup: everything that can fail on bad input fails here, before compilation.
    workdir = epath.Path(workdir)  # local or gs://
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(map(tuple, config.mesh.axis_rules))
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_shards:  # then also over the processes' blocks of it
        raise ValueError(
            f"batch_size {config.batch_size} must divide evenly over the {batch_shards} batch "
            f"shards of mesh {dict(mesh.shape)}"
        )
    train_source, eval_source = make_sources(config)
    tokenizer = load_or_train_tokenizer(config, workdir, train_source)
    check_canvas_fits(config, tokenizer, train_source)
    check_teacher_captions(config, train_source)
    m, t = config.model, config.targets
    features = CaptionFeatures.from_config(config, tokenizer)
    fractions = schedule_fractions(m.num_refine_steps, t.schedule, t.log_a)  # for decoding
    model = build_model(config, tokenizer.vocab_size)
    optimizer, schedule = make_optimizer(config)
    is_logger = jax.process_index() == 0

    # --- State, created already sharded on the mesh (refine_jax.train_state).
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, state_shardings = create_state(
            model, config, tokenizer.vocab_size, mesh, rules, optimizer
        )
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        if is_logger:
            print(f"{m.kind} model: {num_params:,} parameters on mesh {dict(mesh.shape)}")

        step_fn = jax.jit(
            bind_train_step(config, model, optimizer, schedule),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        put_batch = lambda batch: sharding.global_batch(batch, mesh, rules, config.batch_size)
        put_full_batch = lambda batch: sharding.global_batch_from_full(batch, mesh, rules)
        # This process reads its block of each batch; processes sharing rows read the same.
        block, blocks, first_reader = sharding.process_batch_block(mesh, rules, config.batch_size)
        batches = train_batches(
            train_source,
            features,
            config.batch_size,
            config.seed,
            config.data.num_threads,
            block,
            blocks,
            num_workers=config.data.num_workers,
            worker_buffer_size=config.data.worker_buffer_size,
        )
        # Samples the pipeline could not use, by reason: counted on the host, summed over
        # processes when logged. What indexing left out is the same on every process.
        skip_names = [*SKIP_REASONS[1:], *(DROPPED_PREFIX + r for r in SKIP_REASONS)]
        skip_counts = np.zeros(len(skip_names), np.int64)

        def add_skips(counts: dict[str, int]) -> None:
            for name, n in counts.items():
                skip_counts[skip_names.index(name)] += n

        if is_logger:
            add_skips(structural_skip_counts(train_source))

        # The matching model is evaluated by retrieval; its jitted towers are built once.
        embedder = None
        if not model_kind(m.kind).describes:
            embedder = MatchEmbedder(
                model, state.params, tokenizer, features, config.batch_size, put_full_batch
            )

        def evaluate() -> tuple[list[dict], dict]:
            if embedder is not None:
                embedder.params = state.params
                return [], split_retrieval(embedder, eval_source)
            samples = describe_split(
                model,
                state.params,
                eval_source,
                features,
                tokenizer,
                config.batch_size,
                fractions,
                put_full_batch,
                drop_repeats=config.decode.drop_repeats,
            )
            return samples, {**exact_match_rates(samples), **evaluate_samples(samples, config)}

        # --- Resume from the newest intact checkpoint, if any (a re-run of the same command
        # resumes). A location checkpoints cannot be written to fails now, not at the first save.
        probe_writable(workdir / "checkpoints", sum(x.nbytes for x in jax.tree.leaves(state)))
        checkpointer = Checkpointer(
            workdir / "checkpoints",
            config.checkpoint_every_steps,
            config.keep_checkpoints,
            config.best_checkpoint_metric or None,
        )
        # The saved data position is a batch count: the settings that cut the stream into
        # batches are saved with it, and a resume that changes them is refused.
        signature = model_signature(config, state.params) | {
            "data_order": {
                "batch_size": config.batch_size,
                "seed": config.seed,
                "process_batch_blocks": blocks,
            }
        }
        restored = checkpointer.restore_newest_intact(
            lambda step: restore_state(
                checkpointer, step, state, state_shardings, signature, batches
            )
        )
        if restored is not None:
            state = restored[1]
            if is_logger:
                print(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
        elif m.pretrained_encoder:
            state = state.replace(params=load_encoder(state.params, m.pretrained_encoder))
            if is_logger:
                print(f"encoder initialised from {m.pretrained_encoder}")
        # Eval and caption read it (--workdir alone is enough there). Written only now: a run
        # refused above leaves the config of the run that wrote the checkpoints.
        if is_logger:
            record_config(config, workdir)

        # --- Training loop. SIGTERM (preemption) or SIGINT saves a checkpoint and ends the run
        # cleanly. Processes must stop at the same step to save together: with several, the
        # signal is shared at the next logging step (a point where they already synchronise).
        def should_stop(step: int) -> bool:
            if jax.process_count() == 1:
                return bool(stop_signals.received)
            if (step - 1) % config.log_every_steps:
                return False
            received = len(stop_signals.received)
            return bool(sharding.sum_over_processes(np.asarray([received]))[0])

        writer = MetricWriter(workdir, enabled=is_logger)
        flops_per_step = (
            training_flops_per_example(config, tokenizer.vocab_size) * config.batch_size
        )
        profile_start, profile_stop = config.profile_steps
        profiling = False  # a run resumed inside the window traces what is left of it
        start_step = int(state.step)
        last_time, last_step, eval_rates, samples = time.time(), start_step, {}, None
        previous_metrics, nonfinite_streak = None, 0
        for step in range(start_step + 1, config.total_steps + 1):
            if should_stop(step):
                if profiling:  # stopped inside the window: keep the trace so far
                    jax.profiler.stop_trace()
                checkpointer.save(step - 1, state, batches, signature, force=True)
                checkpointer.wait()
                if is_logger:
                    print(
                        f"{stop_signals.requested or 'SIGTERM'}: saved a checkpoint at step "
                        f"{step - 1}; exiting",
                        flush=True,
                    )
                checkpointer.close()
                writer.close()
                return {"stopped_at_step": step - 1}
            if profile_start <= step <= profile_stop and not profiling:
                jax.profiler.start_trace(str(workdir / "profile"))
                profiling = True
            batch = next(batches)
            if first_reader:  # processes sharing a block read the same rows: counted once
                add_skips(count_skips(batch))
            state, metrics = step_fn(state, put_batch(batch))
            if step == profile_stop and profiling:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
            if previous_metrics is not None:  # checked one step late, so dispatch never waits
                skipped = bool(previous_metrics["skipped_nonfinite"])
                nonfinite_streak = nonfinite_streak + 1 if skipped else 0
                if nonfinite_streak >= config.max_consecutive_nonfinite:
                    checkpointer.wait()
                    raise RuntimeError(
                        f"{nonfinite_streak} consecutive updates had a non-finite loss, "
                        f"gradient or update (up to step {step - 1}); stopping. The last good "
                        f"checkpoint is step {checkpointer.latest_step()} in "
                        f"{workdir / 'checkpoints'}"
                    )
            previous_metrics = metrics
            # A checkpoint is ranked only by its own step's evaluation, never an earlier one's.
            eval_rates = {}
            eval_due = step % config.eval_every_steps == 0 or step == config.total_steps
            if step % config.log_every_steps == 0 or eval_due:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                steps_per_second = (step - last_step) / (now - last_time)
                last_time, last_step = now, step
                skipped = sharding.sum_over_processes(skip_counts)
                skipped = {
                    f"skipped/{n}": int(c) for n, c in zip(skip_names, skipped, strict=True) if c
                }
                record = {
                    **metrics,
                    **skipped,
                    "steps_per_second": steps_per_second,
                    "examples_per_second": steps_per_second * config.batch_size,
                    "model_flops_per_second": steps_per_second * flops_per_step,
                }
                if eval_due:
                    samples, rates = evaluate()
                    eval_rates = {f"eval/{k}": v for k, v in rates.items()}
                    best = config.best_checkpoint_metric
                    if best and best not in eval_rates:  # before orbax's save needs it
                        checkpointer.wait()
                        raise ConfigError(
                            f"config.best_checkpoint_metric = {best!r} is not a metric of this "
                            f"run's evaluation, which has: {', '.join(sorted(eval_rates))}"
                        )
                    record.update(eval_rates)
                    last_time = time.time()  # evaluation time is not training time
                writer.write(step, record)
                if is_logger:
                    eta = (config.total_steps - step) / max(steps_per_second, 1e-9)
                    print(
                        f"step {step}/{config.total_steps} loss {record['loss']:.4f} "
                        f"{steps_per_second:.2f} steps/s ETA {eta:.0f}s",
                        flush=True,
                    )
            checkpointer.save(
                step,
                state,
                batches,
                signature,
                metrics=eval_rates or None,
                # With a best metric, every evaluated step is saved so that it can be ranked.
                force=step == config.total_steps
                or bool(eval_rates and config.best_checkpoint_metric),
            )

        # --- Describe the held-out split (already done if the last step was evaluated).
        if samples is None or last_step != config.total_steps:
            samples, rates = evaluate()
        checkpointer.wait()
        checkpointer.close()
    writer.close()
    if is_logger:
        with (workdir / "samples.jsonl").open("w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
        for sample in samples[: config.num_samples_to_print]:
            print(f"\n{sample['image_id']}  reference: {sample['references'][0]}")
            for k, text in enumerate(sample["steps"], 1):
                print(f"  step {k}: {text}")
        print("\n" + json.dumps(rates, indent=1))
    return rates
