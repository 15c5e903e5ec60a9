"""The training loop: sharded train step, losses, metrics, eval, checkpoints.

    train_and_evaluate(config, workdir)

One optimizer step takes a global batch of `rows_for_step(step)` rows, split into micro batches
`[num_micro, micro_rows, ...]` whose gradients are summed inside one jitted step (gradient
accumulation; batch-size warmup adds micro batches, so the step compiles once per distinct
count, at most `train.grad_accum_steps` times). The loss is the mean over every
predicted token of the step: MLM predicts the masked positions only (sparse prediction: the
head runs on the gathered hidden states), CLM every next token, MNTP (encoder from decoder)
the masked token at position p from the hidden state at p - 1.

State is functional: `{"params": nnx.State of Params, "opt_state": optax state}`, sharded by
the logical-axis rules (ettin_jax.sharding) and donated to the step. Dropout keys are
`fold_in(seed, step, micro batch)`, so a resumed run repeats the same masks and dropout.
"""
# No `from __future__ import annotations`: clu reads the metric classes from __annotations__.

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from flax import nnx
from jax.experimental import multihost_utils

from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import cross_entropy
from ettin_jax import model as model_lib
from ettin_jax import optimizer as optimizer_lib
from ettin_jax import schedules
from ettin_jax import sharding as sharding_lib

IGNORE = cross_entropy.IGNORE

# bf16 dense peak FLOP/s per device, for MFU when config.log.device_peak_flops is 0.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


# --- losses ------------------------------------------------------------------------------------

def _head_loss(model, hidden, labels):
    """Summed loss of the head on `hidden [..., hidden]` against `labels [...]` (-100 = none),
    through the chunked cross-entropy (the `[..., vocab]` logits are never built)."""
    return cross_entropy.cross_entropy(
        model.head_features(hidden), model.tok_embeddings[...], model.decoder_bias[...],
        labels, dtype=model.config.compute_dtype)


def mlm_loss(model, batch, *, mntp: bool = False):
    """Sparse MLM: the head runs on the hidden states of the masked positions only.

    batch: input_ids/segment_ids/positions `[rows, seq]`, mask_positions/mask_labels
    `[rows, max_predictions]` (-100 = unused slot). MNTP reads position p - 1 for the token
    at p (a document's first token has no predecessor and is skipped).
    """
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    where, labels = batch["mask_positions"], batch["mask_labels"]
    valid = labels != IGNORE
    if mntp:
        starts_document = jnp.take_along_axis(batch["positions"], where, axis=1) == 0
        valid &= ~starts_document
        where = jnp.maximum(where - 1, 0)
    gathered = jnp.take_along_axis(hidden, where[..., None], axis=1)   # [rows, P, hidden]
    return _head_loss(model, gathered, jnp.where(valid, labels, IGNORE))


def clm_loss(model, batch):
    """Next-token loss; batch["labels"] `[rows, seq]` is already shifted (-100 = none)."""
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    return _head_loss(model, hidden, batch["labels"])


# What each objective's step reads from the loader's batches (the rest stays on the host).
BATCH_KEYS = {"mlm": ("input_ids", "segment_ids", "positions", "mask_positions", "mask_labels"),
              "clm": ("input_ids", "segment_ids", "positions", "labels")}


def loss_fn_for(config) -> Callable:
    if config.objective == "mlm":
        return functools.partial(mlm_loss, mntp=bool(config.train.mntp))
    return clm_loss


# --- metrics -----------------------------------------------------------------------------------

def _ratio(total_name: str, count_name: str):
    """An Average whose update is (kwargs[total_name], kwargs[count_name]): merged over steps it
    weighs every step by its count (e.g. loss per predicted token over a logging window)."""

    @flax.struct.dataclass
    class Ratio(clu_metrics.Average):
        @classmethod
        def from_model_output(cls, **kwargs) -> clu_metrics.Average:
            return cls(total=jnp.asarray(kwargs[total_name], jnp.float32),
                       count=jnp.asarray(kwargs[count_name], jnp.float32))

    return Ratio


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: _ratio("loss_sum", "predictions")            # per predicted token
    accuracy: _ratio("correct", "predictions")         # argmax == label
    grad_norm: clu_metrics.Average.from_output("grad_norm")   # of the step's mean gradient
    param_norm: clu_metrics.LastValue.from_output("param_norm")
    packing_efficiency: _ratio("real_tokens", "tokens")  # non-padding share of the rows


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: _ratio("loss_sum", "predictions")
    accuracy: _ratio("correct", "predictions")


def training_flops_per_row(config) -> float:
    """Model FLOPs of one row (forward + backward) under the stated convention:
    6 x (layer matmul params) per token, 6 x (head + decoder params) per predicted token
    (the masked fraction for MLM, every token for CLM), and attention scores + values
    12 x hidden x keys per token per layer, keys = seq for global layers, the window for
    local ones, halved when causal. Embedding lookups count zero; padding counts fully."""
    m, seq = config.model, config.train.seq_len
    H, I, V = m.hidden_size, m.intermediate_size, m.vocab_size
    layer_params = 3 * H * H + H * H + 2 * H * I + I * H
    predicted = seq * config.train.mask_ratio if config.objective == "mlm" else seq
    flops = 6 * layer_params * m.num_layers * seq + 6 * (H * H + V * H) * predicted
    for layer in range(m.num_layers):
        is_global = layer % m.global_attn_every_n_layers == 0
        keys = seq if is_global else min(seq, m.local_attention + 1)
        if m.causal:
            keys = keys / 2
        flops += 12 * H * keys * seq
    return float(flops)


def device_peak_flops(config) -> float:
    if config.log.device_peak_flops > 0:
        return float(config.log.device_peak_flops)
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in _PEAK_FLOPS.items() if name in kind), 0.0)


# --- state and steps ---------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """Everything the loop needs that is fixed for a run: mesh, optimizer, jitted steps."""
    config: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformationExtraArgs
    graphdef_train: Any
    graphdef_eval: Any
    abstract_state: dict           # ShapeDtypeStructs with shardings, like the state
    state_shardings: dict
    init_state: Callable[..., dict]  # ([params]) -> {"params", "opt_state"}
    train_step: Callable           # (state, batch, learning_rate, step) -> (state, TrainMetrics)
    eval_step: Callable            # (params, batch) -> EvalMetrics


def _model_ctor(config):
    model_config = model_lib.ModelConfig.from_config(config.model)
    return lambda: model_lib.EttinModel(model_config, rngs=nnx.Rngs(params=config.seed,
                                                                   dropout=config.seed))


def make_setup(config, mesh: jax.sharding.Mesh) -> Setup:
    """Builds the sharded state layout and the jitted train and eval steps for `mesh`."""
    ctor = _model_ctor(config)
    abstract_model = nnx.eval_shape(ctor)
    abstract_model.train()
    graphdef_train, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()
    graphdef_eval, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    tx = optimizer_lib.make_optimizer(config.optimizer, abstract_params)
    params_sharding = sharding_lib.param_shardings(abstract_params, mesh)
    state_shardings = {
        "params": params_sharding,
        "opt_state": sharding_lib.optimizer_shardings(tx, abstract_params, params_sharding, mesh)}
    abstract_state = {
        "params": checkpoint_lib.abstract_like(abstract_params, params_sharding),
        "opt_state": checkpoint_lib.abstract_like(jax.eval_shape(tx.init, abstract_params),
                                                  state_shardings["opt_state"])}
    replicated = sharding_lib.replicated(mesh)
    loss_fn = loss_fn_for(config)
    level = config.train.xla_backend_optimization_level
    compiler_options = {"xla_backend_optimization_level": level} if level >= 0 else None
    seed_key = jax.random.key(config.seed)

    init_params = jax.jit(lambda: nnx.split(ctor(), nnx.Param, ...)[1],
                          out_shardings=params_sharding, compiler_options=compiler_options)
    init_opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])

    def init_state(params=None):
        """Fresh state; with `params` (e.g. from another run), a fresh optimizer for them."""
        params = init_params() if params is None else params
        return {"params": params, "opt_state": init_opt_state(params)}

    # The dropout RNG state (keys and counters of the model's nnx.Dropout streams). Every micro
    # batch re-keys it from (seed, step, index), so only its layout is kept here.
    rng_layout = jax.eval_shape(lambda: nnx.split(ctor(), nnx.Param, ...)[2])

    def blank_rng_state():
        return jax.tree.map(
            lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else jnp.zeros(x.shape, x.dtype), rng_layout)

    def micro_loss(params, micro_batch, key):
        model = nnx.merge(graphdef_train, params, blank_rng_state())
        nnx.reseed(model, dropout=key)
        loss_sum, stats = loss_fn(model, micro_batch)
        return loss_sum, stats

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, learning_rate, step):
        """batch: dict of `[num_micro, micro_rows, ...]` arrays; learning_rate, step scalars."""
        params = state["params"]
        step_key = jax.random.fold_in(seed_key, step)
        num_micro = batch["input_ids"].shape[0]

        def micro_grads(micro_batch, index):
            (loss_sum, stats), grads = grad_fn(params, micro_batch,
                                               jax.random.fold_in(step_key, index))
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
        updates, opt_state = tx.update(grads, state["opt_state"], params,
                                       learning_rate=learning_rate)
        params = optax.apply_updates(params, updates)
        tokens = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.float32)
        metrics = TrainMetrics.single_from_model_output(
            loss_sum=stats["loss"], predictions=stats["count"], correct=stats["correct"],
            grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
            real_tokens=tokens, tokens=batch["segment_ids"].size)
        return {"params": params, "opt_state": opt_state}, metrics

    def eval_step(params, batch):
        model = nnx.merge(graphdef_eval, params, blank_rng_state())
        loss_sum, stats = loss_fn(model, batch)
        return EvalMetrics.single_from_model_output(
            loss_sum=loss_sum, predictions=stats["count"], correct=stats["correct"])

    batch_sharding = sharding_lib.batch_sharding(mesh, leading_axes=1)
    jit_train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, replicated, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,), compiler_options=compiler_options)
    jit_eval_step = jax.jit(
        eval_step, in_shardings=(params_sharding, sharding_lib.batch_sharding(mesh)),
        out_shardings=replicated, compiler_options=compiler_options)
    return Setup(config=config, mesh=mesh, tx=tx, graphdef_train=graphdef_train,
                 graphdef_eval=graphdef_eval, abstract_state=abstract_state,
                 state_shardings=state_shardings, init_state=init_state,
                 train_step=jit_train_step, eval_step=jit_eval_step)


def host_batch_to_global(host_batch: dict, mesh, *, num_micro: int) -> dict:
    """This process's rows `[rows, ...]` -> global `[num_micro, micro_rows, ...]` arrays,
    rows split over data x fsdp. Micro batch i holds rows [i*n/k, (i+1)*n/k) of every process."""
    sharding = sharding_lib.batch_sharding(mesh, leading_axes=1)
    out = {}
    for key, rows in host_batch.items():
        rows = np.asarray(rows)
        local = rows.reshape(num_micro, rows.shape[0] // num_micro, *rows.shape[1:])
        global_shape = (num_micro, local.shape[1] * jax.process_count(), *rows.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


# --- the loop ----------------------------------------------------------------------------------

def demo_config(config):
    """The config of a run with no dataset (data.mixture == ""): `config.demo` replaces the
    batch, length and token budget so that it ends in minutes on a CPU. Returns a copy."""
    config = config.copy_and_resolve_references()
    if config.data.mixture:
        return config
    d, s = config.demo, config.schedule
    logging.info("config.data.mixture is empty: demo run on the stdlib corpus with %d rows of "
                 "%d tokens for %d tokens (config.demo)", d.global_batch_size, d.seq_len,
                 d.total_tokens)
    decay_share = s.decay_tokens / s.total_tokens
    config.train.global_batch_size = d.global_batch_size
    config.train.seq_len = d.seq_len
    config.train.grad_accum_steps = d.grad_accum_steps
    config.train.eval_every_steps = d.eval_every_steps
    config.train.eval_batches = min(config.train.eval_batches, 4)
    config.data.eval_batch_size = d.global_batch_size
    config.data.num_workers = d.num_workers
    s.total_tokens = d.total_tokens
    s.decay_tokens = decay_share * d.total_tokens
    if config.optimizer.lr_warmup_tokens > 0:
        config.optimizer.lr_warmup_tokens = d.lr_warmup_tokens
    config.optimizer.batch_warmup_tokens = 0.0
    config.checkpoint.every_steps = d.checkpoint_every_steps
    config.log.every_steps = d.log_every_steps
    if d.cpu_float32 and jax.default_backend() == "cpu":
        config.model.dtype = "float32"
    return config


def _stop_requested(flag: list) -> bool:
    """Whether any process got SIGTERM (all processes agree, so they save together)."""
    if jax.process_count() == 1:
        return flag[0]
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag[0]))))


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def evaluate(setup: Setup, params, config) -> dict:
    """Loss and accuracy on the held-out split (config.train.eval_batches batches)."""
    from data_pipeline import loader  # pylint: disable=import-outside-toplevel
    eval_iter = loader.make_eval_iterator(config)
    sharding = sharding_lib.batch_sharding(setup.mesh)
    total = None
    for _, host_batch in zip(range(config.train.eval_batches), eval_iter):
        batch = {k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (np.shape(v)[0] * jax.process_count(), *np.shape(v)[1:]))
            for k, v in host_batch.items() if k in BATCH_KEYS[config.objective]}
        metrics = setup.eval_step(params, batch)
        total = metrics if total is None else total.merge(metrics)
    if total is None:
        return {}
    out = {f"eval_{k}": float(v) for k, v in total.compute().items()}
    if config.objective == "clm":
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir` until schedule.total_tokens, resuming from the workdir's
    newest checkpoint if there is one. Returns the last logged metrics."""
    # Only the loop writes metrics: clu.metric_writers imports TensorFlow (seconds at start-up,
    # and absent from the GPU image that runs bench/train_step.py).
    # pylint: disable=import-outside-toplevel
    from clu import metric_writers, periodic_actions
    from data_pipeline import loader
    from ettin_jax import jsonl_writer
    # pylint: enable=import-outside-toplevel

    config = demo_config(config)
    schedules.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_writer = jax.process_index() == 0

    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.log_mesh(mesh)
    if config.train.global_batch_size % (sharding_lib.data_parallel_size(mesh)
                                         * config.train.grad_accum_steps):
        raise ValueError(
            f"config.train.global_batch_size={config.train.global_batch_size} must split into "
            f"grad_accum_steps={config.train.grad_accum_steps} micro batches whose rows divide "
            f"over data x fsdp = {sharding_lib.data_parallel_size(mesh)} devices")
    setup = make_setup(config, mesh)
    rows_for_step = schedules.rows_schedule(config)
    num_steps = schedules.total_steps(config)
    micro_rows = schedules.micro_batch_size(config)
    batch_keys = BATCH_KEYS[config.objective]
    train_iter = loader.make_train_iterator(config, rows_for_step=rows_for_step)

    save_every = config.checkpoint.every_steps or max(1, math.ceil(
        config.checkpoint.every_tokens / (config.train.global_batch_size * config.train.seq_len)))
    ckpt = checkpoint_lib.Checkpointer(
        workdir, keep_last=config.checkpoint.keep_last,
        keep_every_steps=save_every * config.checkpoint.keep_every_nth,
        async_save=config.checkpoint.async_save)

    abstract = setup.abstract_state
    restored = ckpt.restore_latest(abstract_params=abstract["params"],
                                   abstract_opt_state=abstract["opt_state"], data_iterator=train_iter)
    if restored is not None:
        params, opt_state, meta = restored
        state = {"params": params, "opt_state": opt_state}
        step, tokens = int(meta["step"]), int(meta["tokens_seen"])
    elif config.train.init_from:
        params, opt_state, _ = checkpoint_lib.restore_from_run(
            config.train.init_from, abstract_params=abstract["params"],
            abstract_opt_state=abstract["opt_state"] if config.train.init_optimizer_state else None)
        state = setup.init_state(params) if opt_state is None else {
            "params": params, "opt_state": opt_state}
        step, tokens = 0, 0
    else:
        state = setup.init_state()
        step, tokens = 0, 0
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("%s %s, %s: %s parameters, %d steps of up to %d x %d tokens (%s tokens), "
                 "starting at step %d", config.size, config.objective, config.phase,
                 f"{num_params:,}", num_steps, config.train.global_batch_size,
                 config.train.seq_len, f"{config.schedule.total_tokens:,.0f}", step)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
    writers = [writer] + ([jsonl_writer.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
                          if is_writer else [])
    all_writers = metric_writers.MultiWriter(writers)
    if is_writer:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
    hooks = []
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_secs=config.log.progress_every_secs)
    if is_writer:
        hooks.append(report_progress)
        if config.log.profile_steps > 0:
            hooks.append(periodic_actions.Profile(logdir=workdir,
                                                  num_profile_steps=config.log.profile_steps))

    stop_flag = [False]

    def on_sigterm(signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        stop_flag[0] = True

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    flops_per_row = training_flops_per_row(config)
    peak = device_peak_flops(config) * jax.device_count()
    train_metrics, last = None, {}
    window_start, window_steps, window_rows = time.time(), 0, 0
    run_start = time.time()

    try:   # recorded with each checkpoint, for `python -m ettin_jax.hf export`
        tokenizer = os.path.abspath(loader.tokenizer_path(config))
    except ValueError:
        tokenizer = ""

    def save(at_step):
        ckpt.save(at_step, params=state["params"], opt_state=state["opt_state"],
                  meta={"step": at_step, "tokens_seen": tokens, "phase": config.phase,
                        "objective": config.objective, "init_from": config.train.init_from,
                        "tokenizer": tokenizer},
                  data_iterator=train_iter, config=config)

    try:
        with metric_writers.ensure_flushes(all_writers):
            while step < num_steps:
                rows = rows_for_step(step)
                with report_progress.timed("data", wait_jax_async_dispatch=False):
                    host_batch = next(train_iter)
                batch = host_batch_to_global({k: host_batch[k] for k in batch_keys}, mesh,
                                             num_micro=rows // micro_rows)
                learning_rate = schedules.learning_rate(config, tokens)
                with report_progress.timed("train_step", wait_jax_async_dispatch=False):
                    state, metrics = setup.train_step(state, batch, learning_rate, step)
                train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
                step += 1
                tokens += rows * config.train.seq_len
                window_steps, window_rows = window_steps + 1, window_rows + rows
                for hook in hooks:
                    hook(step)

                is_last = step == num_steps
                scalars = {}
                if step % config.log.every_steps == 0 or is_last:
                    computed = {k: float(v) for k, v in train_metrics.compute().items()}
                    elapsed = time.time() - window_start
                    rows_per_sec = window_rows / elapsed
                    computed.update(
                        learning_rate=learning_rate, batch_size=rows, tokens_seen=tokens,
                        tokens_per_sec=rows_per_sec * config.train.seq_len,
                        steps_per_sec=window_steps / elapsed)
                    if peak:
                        computed["mfu"] = rows_per_sec * flops_per_row / peak
                    if config.objective == "clm":
                        computed["perplexity"] = math.exp(min(computed["loss"], 50.0))
                    scalars.update(computed)
                    eta = (num_steps - step) * elapsed / window_steps
                    logging.info("step %d/%d (%.0f%%): loss %.4f, accuracy %.3f, lr %.3g, "
                                 "%.0f tokens/s, ETA %s", step, num_steps, 100 * step / num_steps,
                                 computed["loss"], computed["accuracy"], learning_rate,
                                 computed["tokens_per_sec"], _format_duration(eta))
                    train_metrics = None
                if config.train.eval_batches and (step % config.train.eval_every_steps == 0
                                                  or is_last):
                    scalars.update(evaluate(setup, state["params"], config))
                if scalars:
                    all_writers.write_scalars(step, scalars)
                    last.update(scalars)
                    window_start, window_steps, window_rows = time.time(), 0, 0

                stop = _stop_requested(stop_flag)
                if step % save_every == 0 or is_last or stop:
                    save(step)
                if stop:
                    ckpt.wait()
                    logging.warning("stopped by SIGTERM at step %d; the checkpoint is saved, "
                                    "rerun the same command to continue", step)
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        signal.signal(signal.SIGTERM, previous_handler)
        all_writers.close()

    if step == num_steps and is_writer:
        logging.info(
            "done: %d steps, %s tokens in %s; last logged loss %.4f, accuracy %.3f%s. "
            "Checkpoints: %s; TensorBoard: tensorboard --logdir %s; metrics: %s; export: "
            "python -m ettin_jax.hf export --checkpoint=%s --out=%s/hf", step, f"{tokens:,}",
            _format_duration(time.time() - run_start), last.get("loss", float("nan")),
            last.get("accuracy", float("nan")),
            f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "",
            ckpt.directory, workdir, os.path.join(workdir, "metrics.jsonl"), workdir, workdir)
    return last
