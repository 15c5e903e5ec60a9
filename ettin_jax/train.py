"""The training loop: the jitted sharded train and eval steps, and `train_and_evaluate`.

    train_and_evaluate(config, workdir) -> dict   # the last logged metrics
    train_steps(config, workdir)                  # the same as a generator that pauses per step
    make_setup(config, mesh) -> Setup             # state layout and the jitted steps

One optimizer step takes a global batch of `rows_for_step(step)` rows, split into micro batches
`[num_micro, micro_rows, ...]` whose gradients are summed inside one jitted step (gradient
accumulation; batch-size warmup adds micro batches, so the step compiles once per distinct
count, about 1 / optimizer.batch_warmup_start_fraction times: schedules.warmup_split). The
loss is the mean over every predicted token of the step (ettin_jax.losses).

State is functional: `{"params": nnx.State of Params, "opt_state": optax state}`, sharded by
the logical-axis rules (ettin_jax.sharding) and donated to the step. Dropout keys are
`fold_in(seed, step, micro batch)`, so a resumed run repeats the same masks and dropout.

Every step's batch is fingerprinted on the host (data_pipeline.fingerprint) and every line of
metrics.jsonl carries `data_fingerprints`, the fingerprints of the steps since the previous
line: `python -m ettin_jax.compare` proves two runs saw the same rows in the same order.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import demo
from ettin_jax import divergence
from ettin_jax import evaluation
from ettin_jax import losses
from ettin_jax import model_loader
from ettin_jax import optimizer as optimizer_lib
from ettin_jax import precompile
from ettin_jax import schedules
from ettin_jax import sharding as sharding_lib
from ettin_jax import step_tokens
from ettin_jax import stop_signals
from ettin_jax import train_metrics
from ettin_jax import workdir as workdir_lib
from ettin_jax import workdir_lock
from ettin_jax import xla_options
from ettin_jax.train_metrics import TrainMetrics, device_peak_flops


# --- the compiled steps ------------------------------------------------------------------------

def train_step(state: dict, batch: dict, learning_rate, step, *, graphdef, rng_layout, tx,
               loss_fn: Callable, params_sharding, seed: int, prng_impl: str):
    """One optimizer step on the summed gradients of the step's micro batches.

    batch: dict of `[num_micro, micro_rows, ...]` arrays; learning_rate, step: scalars;
    prng_impl: jax's PRNG implementation of the dropout keys (PRNG_IMPLS' values).
    Returns (new state, TrainMetrics). A step whose loss, gradient norm or learning rate is
    not finite returns `state` unchanged, one whose new params' norm is not keeps the params
    (ettin_jax.divergence); either counts in TrainMetrics.skipped_steps.
    """
    params = state["params"]
    step_key = jax.random.fold_in(jax.random.key(seed, impl=prng_impl), step)
    num_micro = batch["input_ids"].shape[0]

    def micro_loss(params, micro_batch, key):
        model = nnx.merge(graphdef, params, model_loader.fresh_rng_state(rng_layout))
        model_loader.reseed_dropout(model, key)
        return loss_fn(model, micro_batch)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def micro_grads(micro_batch, index):
        (loss_sum, stats), grads = grad_fn(params, micro_batch, jax.random.fold_in(step_key, index))
        grads = jax.lax.with_sharding_constraint(grads, params_sharding)
        return grads, dict(stats, loss=loss_sum)

    if num_micro == 1:   # no accumulation: a loop of one would only cost buffers
        grads, stats = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
    else:
        def accumulate(carry, inputs):
            return jax.tree.map(jnp.add, carry, micro_grads(*inputs)), None

        zeros = (jax.tree.map(jnp.zeros_like, params),
                 {"count": jnp.zeros([]), "correct": jnp.zeros([]), "loss": jnp.zeros([])})
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(num_micro)))
    # gradient of the summed loss -> gradient of the mean over the step's predictions
    count = jnp.maximum(stats["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    # Divergence guard: a non-finite loss, gradient or LR keeps params and optimizer state. Known
    # before the update, so XLA fuses the moments' select into the optimizer's own pass.
    inputs_ok = divergence.update_is_finite(stats["loss"], grad_norm, learning_rate)
    updates, opt_state = tx.update(grads, state["opt_state"], params, learning_rate=learning_rate)
    opt_state = divergence.keep_if(inputs_ok, opt_state, state["opt_state"])
    new_params = optax.apply_updates(params, updates)
    new_param_norm = optax.tree.norm(new_params)
    ok = inputs_ok & divergence.update_is_finite(new_param_norm)
    new_state = {"params": divergence.keep_if(ok, new_params, params), "opt_state": opt_state}
    applied = ok.astype(jnp.float32)
    metrics = TrainMetrics.single_from_model_output(
        loss_sum=jnp.where(ok, stats["loss"], 0.0), predictions=stats["count"] * applied,
        correct=stats["correct"] * applied, grad_norm=jnp.where(ok, grad_norm, 0.0),
        applied=applied, skipped=1.0 - applied,
        # The kept params' norm: the new one, re-reduced only when the step was skipped.
        param_norm=jax.lax.cond(ok, lambda: new_param_norm, lambda: optax.tree.norm(params)),
        real_tokens=jnp.sum(batch["segment_ids"] > 0, dtype=jnp.float32),
        tokens=batch["segment_ids"].size)
    return new_state, metrics


@dataclasses.dataclass
class Setup:
    """What a run fixes once: the mesh, the state's layout and the jitted steps."""
    mesh: jax.sharding.Mesh
    abstract_state: dict             # ShapeDtypeStructs with shardings, like the state
    init_state: Callable[..., dict]  # ([params]) -> {"params", "opt_state"}
    init_params: Callable            # () -> fresh params (jitted; see init_state)
    train_step: Callable             # (state, batch, learning_rate, step) -> (state, TrainMetrics)
    eval_step: Callable              # (params, batch) -> EvalMetrics


def make_setup(config, mesh: jax.sharding.Mesh) -> Setup:
    """Builds the sharded state layout and jits `train_step` and `eval_step` for `mesh`."""
    parts = model_loader.model_parts(config.model, seed=config.seed)
    tx = optimizer_lib.make_optimizer(config.optimizer, parts.abstract_params)
    params_sharding = sharding_lib.param_shardings(parts.abstract_params, mesh)
    sharding_lib.warn_unsplit(parts.abstract_params, params_sharding)
    state_shardings = {
        "params": params_sharding,
        "opt_state": sharding_lib.optimizer_shardings(tx, parts.abstract_params, params_sharding,
                                                      mesh)}
    abstract_state = {
        "params": checkpoint_lib.abstract_like(parts.abstract_params, params_sharding),
        "opt_state": checkpoint_lib.abstract_like(jax.eval_shape(tx.init, parts.abstract_params),
                                                  state_shardings["opt_state"])}
    replicated = sharding_lib.replicated(mesh)
    loss_fn = losses.loss_fn_for(config)
    compiler_options = xla_options.compiler_options(config.train.xla_options)

    init_params = jax.jit(functools.partial(model_loader.init_params, config.model, seed=config.seed),
                          out_shardings=params_sharding, compiler_options=compiler_options)
    init_opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])

    def init_state(params=None):
        """Fresh state; with `params` (e.g. from another run), a fresh optimizer for them."""
        with model_loader.init_lowering():
            params = init_params() if params is None else params
        return {"params": params, "opt_state": init_opt_state(params)}

    jit_train_step = jax.jit(
        functools.partial(train_step, graphdef=parts.graphdef_train, rng_layout=parts.rng_layout,
                          tx=tx, loss_fn=loss_fn, params_sharding=params_sharding,
                          seed=config.seed, prng_impl=model_loader.prng_impl(config)),
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, leading_axes=1),
                      replicated, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,), compiler_options=compiler_options)
    jit_eval_step = jax.jit(
        functools.partial(evaluation.eval_step, graphdef=parts.graphdef_eval,
                          rng_layout=parts.rng_layout, loss_fn=loss_fn),
        in_shardings=(params_sharding, sharding_lib.batch_sharding(mesh)),
        out_shardings=replicated, compiler_options=compiler_options)
    return Setup(mesh=mesh, abstract_state=abstract_state, init_state=init_state,
                 init_params=init_params, train_step=jit_train_step, eval_step=jit_eval_step)


# --- the loop's bookkeeping --------------------------------------------------------------------

def _make_checkpointer(config, workdir: str, mean_sequence_length: float | None, data_parallel: int,
                       setup: Setup) -> tuple[checkpoint_lib.Checkpointer, int]:
    """(the workdir's Checkpointer, warning when its disk has no room for one; save interval)."""
    save_every = schedules.checkpoint_every_steps(config, mean_sequence_length, data_parallel)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, keep_last=config.checkpoint.keep_last,
        keep_every_steps=save_every * config.checkpoint.keep_every_nth,
        async_save=config.checkpoint.async_save, abstract_state=setup.abstract_state)
    return ckpt, save_every


def _restore_or_init(config, setup: Setup, ckpt, train_iter,
                     resume_at_most: int | None = None) -> tuple[dict, int, int]:
    """(state, step, tokens seen) to start from. With `resume_at_most`, the checkpoints after
    that step are deleted first (a pair resumes at a step both sides have). Resume order:
      1. this workdir's newest readable checkpoint (params, optimizer state, data position);
      2. config.train.init_from: another run's params, with its optimizer state where the phase
         keeps it (config.train.init_optimizer_state), else a fresh optimizer; step 0;
      3. a fresh initialisation (also for init_from "scratch").
    """
    abstract = setup.abstract_state
    if resume_at_most is not None:
        ckpt.discard_after(resume_at_most)
    restored = ckpt.restore_latest(abstract_params=abstract["params"],
                                   abstract_opt_state=abstract["opt_state"],
                                   data_iterator=train_iter)
    if restored is not None:
        params, opt_state, meta = restored
        return ({"params": params, "opt_state": opt_state}, int(meta["step"]),
                int(meta["tokens_seen"]))
    if workdir_lib.init_source(config):
        params, opt_state, _ = checkpoint_lib.restore_from_run(
            workdir_lib.init_source(config), abstract_params=abstract["params"],
            abstract_opt_state=abstract["opt_state"] if config.train.init_optimizer_state else None)
        if opt_state is None:
            return setup.init_state(params), 0, 0
        return {"params": params, "opt_state": opt_state}, 0, 0
    return setup.init_state(), 0, 0


def _save(ckpt, step: int, state: dict, tokens: int, config, train_iter, tokenizer: str,
          mean_sequence_length: float | None):
    if not divergence.params_finite(state["params"]):   # never let NaNs push out good ones
        logging.error("not saving the checkpoint of step %d: its params are not all finite", step)
        return
    ckpt.save(step, params=state["params"], opt_state=state["opt_state"],
              meta={"step": step, "tokens_seen": tokens, "phase": config.phase,
                    "objective": config.objective, "init_from": config.train.init_from,
                    "tokenizer": tokenizer, "mean_sequence_length": mean_sequence_length},
              data_iterator=train_iter, config=config)


# --- train_and_evaluate ------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir` until schedule.total_tokens, resuming from the workdir's
    newest checkpoint if there is one; SIGTERM or Ctrl-C saves and stops. Returns the last
    logged metrics.

    Raises workdir_lock.WorkdirLockedError (another process trains there),
    workdir_lib.RunIdentityError (the workdir holds another run) and
    divergence.DivergenceError (config.train.max_nonfinite_steps non-finite steps in a row)."""
    if config.get("pair"):
        raise ValueError(f"config.pair={config.pair!r}: a pair trains two runs; main.py builds "
                         "their configs and runs them with ettin_jax.pairs.train_pair")
    run = train_steps(config, workdir)
    stop = stop_signals.StopOnSignal()
    try:
        progress = next(run)
        while True:
            if progress.stage != "step":
                if stop.requested_in_setup():
                    return {}
                progress = run.send(None)
            else:   # the signal's name stops the run and is named in its last message
                progress = run.send((stop.name or "a signal") if stop.requested() else None)
    except StopIteration as done:
        return done.value
    finally:
        run.close()
        stop.restore()


@dataclasses.dataclass
class Progress:
    """Where `train_steps` pauses, and what it reports there."""
    stage: str                             # "setup", "start" or "step"
    step: int = 0                          # "start": the step resumed at; "step": steps done
    config: Any = None                     # "setup": the run's config, demo variant applied
    abstract_state: dict | None = None     # "setup": the state's layout (nothing allocated yet)
    num_steps: int = 0                     # "setup": the run's last step
    fingerprint: str = ""                  # "step": data fingerprint of the step's batch
    metrics: Any = None                    # "step": the step's TrainMetrics (maybe in flight)


def train_steps(config, workdir: str, *, resume_at_most: int | None = None,
                pauses: train_metrics.Pauses | None = None):
    """`train_and_evaluate` as a generator, so that one process can drive two runs in lockstep
    (ettin_jax.pairs). It holds the workdir's lock while it runs and pauses (yields a Progress)
    at three stages:

      "setup"  the mesh, state layout and jitted steps are built, no state allocated; send None
      "start"  the state is restored or initialised (to at most `resume_at_most`); send None
      "step"   after each step's logging, before its save; send a reason (e.g. "SIGTERM",
               or True) to save and stop there

    and returns the last logged metrics. `pauses`: shared by a pair's runs (its docstring).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.WorkdirLock(workdir):    # before anything is written to the workdir
        return (yield from _train_in_workdir(config, workdir, resume_at_most,
                                             pauses or train_metrics.Pauses()))


def _train_in_workdir(config, workdir: str, resume_at_most: int | None, pauses):
    from ettin_jax import writers as writers_lib  # pylint: disable=import-outside-toplevel
    from data_pipeline import fingerprint as fingerprint_lib  # pylint: disable=import-outside-toplevel
    from data_pipeline import loader  # pylint: disable=import-outside-toplevel

    # Config: with no data configured, the demo variant (it builds the demo corpus); the
    # workdir must hold this run (checked before compiling).
    workdir_lib.check_init_from(config, workdir, resume_at_most)
    demo_run = not config.data.mixture
    config = demo.apply_demo(config)
    demo.validate(config, demo_run=demo_run)
    record_identity = workdir_lib.check_identity(config, workdir)
    try:   # recorded with each checkpoint, for `python -m ettin_jax.hf export`
        tokenizer = os.path.abspath(loader.tokenizer_path(config))
    except ValueError:
        tokenizer = ""
    workdir_lib.check_source_tokenizer(config, tokenizer, workdir, resume_at_most)

    # Mesh.
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.log_mesh(mesh)

    # Model and optimizer state: layout and jitted steps (arrays come with the restore).
    setup = make_setup(config, mesh)

    # Tokens per step: 4608 sequences of the data's mean length in packed rows, the mean
    # measured at the first start and read back on every resume (ettin_jax.step_tokens).
    mean = step_tokens.agreed(config, workdir, demo=demo_run)
    data_parallel = sharding_lib.data_parallel_size(mesh)
    rows_per_step = schedules.rows_per_step(config, mean, data_parallel)
    logging.info(schedules.describe_split(config, mean, data_parallel))
    saved = [s for s in checkpoint_lib.saved_steps(workdir)
             if resume_at_most is None or s <= resume_at_most]
    num_steps = schedules.total_steps(config, mean, data_parallel)
    step_tokens.check_split(workdir, {
        "data_parallel": data_parallel, "rows_per_step": rows_per_step,
        "warmup_split": list(schedules.warmup_split(config, mean, data_parallel)),
        "warmup_steps": schedules.batch_warmup_steps(config, mean, data_parallel),
        "num_steps": num_steps}, has_checkpoints=bool(saved))

    # Data.
    rows_for_step = schedules.rows_schedule(config, mean, data_parallel)
    micro_rows_for = schedules.micro_rows_schedule(config, mean, data_parallel)
    batch_keys = losses.BATCH_KEYS[config.objective]
    # The train step compiles on a thread from here on (ettin_jax.precompile), for the shapes
    # of the step the run starts at; everything up to the loop runs beside it.
    first_step = saved[-1] if saved else 0
    # A finished run compiles nothing (if its restore falls back, the first step compiles).
    first_rows = rows_for_step(first_step)
    compiled = precompile.done() if first_step >= num_steps else precompile.start(
        setup.train_step, setup.abstract_state,
        precompile.batch_spec(config, mesh, first_rows, micro_rows_for(first_rows)),
        schedules.learning_rate(config, 0.0), first_step)
    train_iter = loader.make_train_iterator(config, rows_for_step=rows_for_step)
    yield Progress("setup", config=config, abstract_state=setup.abstract_state,
                   num_steps=num_steps)

    # Restore (see _restore_or_init for the order).
    ckpt, save_every = _make_checkpointer(config, workdir, mean, data_parallel, setup)
    with pauses.pause():
        state, step, tokens = _restore_or_init(config, setup, ckpt, train_iter, resume_at_most)
    record_identity()                  # the start holds: its config is the run's
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("%s %s, %s: %s parameters, %d steps of up to %d x %d tokens (%s tokens), "
                 "starting at step %d", config.size, config.objective, config.phase,
                 f"{num_params:,}", num_steps, rows_per_step,
                 config.train.seq_len, f"{config.schedule.total_tokens:,.0f}", step)

    # Writers.
    writers, report_progress, hooks = writers_lib.run_writers(config, workdir, step, num_steps)
    guard = divergence.DivergenceGuard(config, ckpt.describe_latest)
    pending = None    # (step, metrics) whose skipped flag the host reads one step late
    peak_flops = device_peak_flops(config) * jax.device_count()
    last = {}
    fingerprints = []      # of the steps since the last line of metrics.jsonl
    run_start, start_step, start_tokens = time.time(), step, tokens

    # Loop.
    with pauses.pause():
        compiled.result()
    loop_start = time.time()
    window = train_metrics.Window(pauses)  # throughput from here: the compile wait is not a step
    try:
        yield Progress("start", step=step)
        with writers_lib.metric_writers.ensure_flushes(writers):
            while step < num_steps:
                rows = rows_for_step(step)
                micro_rows = micro_rows_for(rows)
                with report_progress.timed("data", wait_jax_async_dispatch=False):
                    host_batch = next(train_iter)
                # Of the host's rows before they go to the devices; ~40 ms of one core for
                # 4608 x 1024 rows (data_pipeline.fingerprint), timed in the progress notes.
                with report_progress.timed("fingerprint", wait_jax_async_dispatch=False):
                    fingerprint = fingerprint_lib.batch_fingerprint(host_batch, config.objective)
                fingerprints.append(fingerprint)
                batch = sharding_lib.host_batch_to_global(
                    {k: host_batch[k] for k in batch_keys}, mesh, num_micro=rows // micro_rows)
                learning_rate = schedules.learning_rate(config, tokens)
                with report_progress.timed("train_step", wait_jax_async_dispatch=False):
                    state, metrics = setup.train_step(state, batch, learning_rate, step)
                step += 1
                tokens += rows * config.train.seq_len
                window.add(metrics, rows)
                if pending is not None:
                    guard.observe(*pending)
                pending = (step, metrics)
                for hook in hooks:
                    hook(step)

                is_last = step == num_steps

                def train_scalars():
                    scalars = dict(train_metrics.train_scalars(
                        window, config, step=step, num_steps=num_steps,
                        learning_rate=learning_rate, rows=rows, tokens=tokens,
                        peak_flops=peak_flops, run_tokens_per_sec=(tokens - start_tokens) / max(
                            time.time() - loop_start, 1e-9)), micro_batches=rows // micro_rows)
                    window.metrics = None
                    guard.check_loss(step, scalars["loss"])
                    return scalars

                scalars = {}
                evaluates = config.train.eval_batches and (
                    step % config.train.eval_every_steps == 0 or is_last)
                # An eval's line carries the train metrics since the last line too: one line
                # per step, and a stop right after it leaves no steps unlogged.
                if step % config.log.every_steps == 0 or is_last or evaluates:
                    ckpt.raise_failed_save()    # a full disk ends the run here, not a save later
                    scalars.update(train_scalars())
                if evaluates:
                    with pauses.pause():
                        scalars.update(evaluation.evaluate(setup, state["params"], config))

                def write(scalars):
                    nonlocal window, fingerprints
                    writers.write_scalars(step, dict(scalars, data_fingerprints=fingerprints))
                    last.update(scalars)
                    window, fingerprints = train_metrics.Window(pauses, metrics=window.metrics), []

                if scalars:
                    write(scalars)

                stopping = yield Progress("step", step=step, fingerprint=fingerprint,
                                          metrics=metrics)
                if stopping and window.metrics is not None:
                    # The steps since the last line: a resume does not log them again.
                    write(train_scalars())
                if step % save_every == 0 or is_last or stopping:
                    guard.observe(*pending)          # no lag here: the save waits anyway
                    pending = None
                    # Mid-run, a skipped step is not saved (a rerun resumes before the bad
                    # batches); the last step and a stop save the kept state, or the good steps
                    # since the last save would be lost and each rerun would end unsaved again.
                    if guard.in_skip_streak and not (is_last or stopping):
                        logging.warning("not saving step %d: its update was skipped", step)
                    else:
                        with pauses.pause():
                            _save(ckpt, step, state, tokens, config, train_iter, tokenizer, mean)
                if stopping:
                    ckpt.wait()
                    by = stopping if isinstance(stopping, str) else "request"
                    logging.warning("stopped by %s at step %d; last checkpoint %s, rerun the same "
                                    "command to continue", by, step, ckpt.describe_latest())
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        writers.close()

    # Finish.
    if step > num_steps and jax.process_index() == 0:
        logging.warning("the checkpoint of step %d lies past this config's end, step %d (%s "
                        "tokens): nothing to train", step, num_steps,
                        f"{config.schedule.total_tokens:,.0f}")
    if step >= num_steps and jax.process_index() == 0:
        logging.info("%s. Checkpoints: %s; TensorBoard: tensorboard --logdir %s; metrics: %s; "
                     "export: python -m ettin_jax.hf export --checkpoint=%s --out=%s/hf",
                     train_metrics.run_summary(last, step=step, num_steps=num_steps, tokens=tokens,
                                               seconds=time.time() - run_start,
                                               skipped=guard.total_skipped,
                                               first_step=start_step, first_tokens=start_tokens),
                     ckpt.directory, workdir, os.path.join(workdir, "metrics.jsonl"), workdir,
                     workdir)
    return last
