"""The plan of a run, as `python main.py --config=... --workdir=W --dry_run` prints it.

    plan = make_plan(config, workdir)   # dict: the run's figures (keys below)
    print(format_plan(plan))            # readable lines, then the dict as one JSON line

Made without compiling, training or writing anything: the workdir is only read (a stored
tokens-per-step figure and its checkpoints), the data is read to measure its mean sequence
length (data_pipeline.lengths) exactly as the first start of the run would (ettin_jax.step_tokens;
a workdir that already has the figure keeps it, as a resume does), and the parameter count
comes from the model's shapes (`nnx.eval_shape`: nothing allocated). Rows per step are rounded
for the data-parallel groups of `config.mesh` over `num_devices` (default: this machine's
devices, i.e. where the command runs).

JSON keys: size, objective, phase, seq_len, rows_per_step, tokens_per_step,
mean_sequence_length (null for the demo), figure_assumed (the mean was given, not measured:
main.py --plan_mean_length), mixture, sequences_per_step, total_tokens, total_steps,
schedule, lr_start, lr_end, peak_lr (the highest LR of this phase: optimizer.peak_lr x
schedule.lr_fraction), lr_warmup_tokens, batch_warmup_tokens, batch_warmup_steps,
first_step_rows, warmup_micro_rows_per_device (the first step's micro batches:
schedules.warmup_split), grad_accum_steps (micro batches per full step), micro_rows_per_device,
max_micro_rows (its limit when grad_accum_steps is auto, from train.max_micro_tokens; else
null), global_rope_theta, local_rope_theta, mask_ratio (MLM runs),
decoder_window_keys (CLM runs), data_seed, model_seed, sources (path, token_share, measured
mean), demo, tokenizer, checkpoint_every_steps, checkpoint_every_tokens, num_params,
data_parallel, num_devices, figure_stored, restore (what a real run would start from:
workdir / init_from / fresh; from init_from, whether its optimizer state comes too),
init_from, tokens_per_sec_estimate, estimated_wall_seconds.
"""
from __future__ import annotations

import json
import os

from flax import nnx

from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import demo
from ettin_jax import model as model_lib
from ettin_jax import model_loader
from ettin_jax import optimizer as optimizer_lib
from ettin_jax import schedules
from ettin_jax import sharding as sharding_lib
from ettin_jax import step_tokens
from ettin_jax import workdir as workdir_lib
from ettin_jax import xla_options
from ettin_jax.model_config import ModelConfig


def _restore(config, workdir: str) -> dict:
    """What a real run starts from, in train._restore_or_init's order."""
    own = checkpoint_lib.saved_steps(workdir)
    if own:
        return {"from": "workdir", "path": checkpoint_lib.checkpoint_dir(workdir),
                "step": own[-1]}
    init_from = workdir_lib.init_source(config)      # "" for none or "scratch"
    if init_from:
        steps = checkpoint_lib.saved_steps(init_from)
        optimizer_state = bool(config.train.init_optimizer_state)
        if optimizer_state and steps:   # a run imported from transformers has none
            optimizer_state = checkpoint_lib.has_optimizer_state(init_from, steps[-1])
        return {"from": "init_from", "path": os.path.abspath(init_from),
                "step": steps[-1] if steps else None, "optimizer_state": optimizer_state,
                "source_has_no_optimizer_state": optimizer_state != bool(
                    config.train.init_optimizer_state)}
    return {"from": "fresh"}


def _decoder_window_keys(config) -> int:
    """Keys a decoder's local layer sees (the query's own included)."""
    model = ModelConfig.from_config(config.model)
    local = next(i for i in range(model.num_layers) if not model.is_global(i))
    return model.window_size(local)[0] + 1


def make_plan(config, workdir: str, *, num_devices: int | None = None,
              assumed_mean_length: float | None = None) -> dict:
    """The figures of the run `config` would train in `workdir` (module docstring).

    assumed_mean_length: plan without the data (it need not exist yet), as if its mean
    sequence length were this (e.g. ~610 tokens for Ettin's phase-1 data, ~543 after); the
    config is planned at full scale even with no data.mixture set, and no data is read."""
    demo_run = not config.data.mixture and assumed_mean_length is None
    config = (demo.demo_variant(config) if assumed_mean_length is None
              else config.copy_and_resolve_references())
    demo.validate(config, demo_run=demo_run)
    # What train.make_setup refuses before compiling (the model's shape: new_model below).
    model_loader.prng_impl(config)
    optimizer_lib.check_config(config.optimizer)
    xla_options.compiler_options(config.train.xla_options)    # names too: one tiny compile
    if num_devices is None:
        import jax  # pylint: disable=import-outside-toplevel
        num_devices = jax.device_count()
    data, fsdp, _ = sharding_lib.mesh_shape(config.mesh, num_devices)
    data_parallel = data * fsdp

    tokenizer, figure_in_workdir = "", None
    if assumed_mean_length is not None:
        if not assumed_mean_length > 0:
            raise ValueError(f"assumed mean sequence length {assumed_mean_length}: must be > 0")
        # A run already there resumes with its own figure, whatever this plan assumes (and
        # refuses a record it cannot use, as this plan does).
        figure_in_workdir = (step_tokens.read_for(config, workdir) or {}).get(
            "mean_sequence_length")
        record = {"mean_sequence_length": float(assumed_mean_length), "stored": False,
                  "assumed": True, "sources": []}
    else:
        if not demo_run:   # what the loader checks first: sources open, tokenizer fits the model
            from data_pipeline import loader  # pylint: disable=import-outside-toplevel
            tokenizer = os.path.abspath(loader.resolve_sources(config)[2])
        record = dict(step_tokens.for_run(config, workdir, demo=demo_run), assumed=False)
    mean = record["mean_sequence_length"]
    seq_len = int(config.train.seq_len)
    rows = schedules.rows_per_step(config, mean, data_parallel)
    accum = schedules.checked_grad_accum_steps(config, mean, data_parallel)
    total_steps = schedules.total_steps(config, mean, data_parallel)
    rows_for_step = schedules.rows_schedule(config, mean, data_parallel)
    warmup_steps = min(total_steps, schedules.batch_warmup_steps(config, mean, data_parallel))
    every_steps = schedules.checkpoint_every_steps(config, mean, data_parallel)
    total_tokens = float(config.schedule.total_tokens)
    num_params = model_lib.count_params(
        nnx.eval_shape(lambda: model_loader.new_model(config.model, seed=config.seed)))
    estimate = float(config.log.tokens_per_sec_estimate)

    plan = {
        "size": config.size, "objective": config.objective, "phase": config.phase,
        "demo": demo_run, "seq_len": seq_len,
        "sequences_per_step": int(config.train.global_batch_size),
        "mean_sequence_length": mean, "rows_per_step": rows, "tokens_per_step": rows * seq_len,
        "figure_stored": record["stored"], "figure_path": step_tokens.path(workdir),
        "figure_assumed": record["assumed"], "figure_in_workdir": figure_in_workdir,
        "mixture": config.data.mixture,
        "total_tokens": total_tokens, "total_steps": total_steps,
        "schedule": config.schedule.name,
        "peak_lr": config.optimizer.peak_lr * config.schedule.lr_fraction,
        "lr_start": schedules.learning_rate(config, 0.0),
        "lr_end": schedules.learning_rate(config, total_tokens),
        "lr_warmup_tokens": float(config.optimizer.lr_warmup_tokens),
        "batch_warmup_tokens": float(config.optimizer.batch_warmup_tokens),
        "batch_warmup_steps": warmup_steps, "first_step_rows": rows_for_step(0),
        "warmup_micro_rows_per_device": (schedules.micro_rows_schedule(
            config, mean, data_parallel)(rows_for_step(0)) // data_parallel),
        "grad_accum_steps": accum, "micro_rows_per_device": rows // accum // data_parallel,
        "max_micro_rows": (None if config.train.grad_accum_steps != schedules.AUTO
                           else schedules.max_micro_rows(config)),
        "global_rope_theta": float(config.model.global_rope_theta),
        "local_rope_theta": float(config.model.local_rope_theta),
        "data_seed": int(config.data.seed), "model_seed": int(config.seed),
        "sources": [{"path": s["path"], "token_share": s["token_share"],
                     "mean_sequence_length": s["mean_sequence_length"]}
                    for s in record["sources"]],
        "tokenizer": tokenizer,
        "checkpoint_every_steps": every_steps,
        "checkpoint_every_tokens": every_steps * rows * seq_len,
        "num_params": num_params, "num_devices": num_devices, "data_parallel": data_parallel,
        "restore": _restore(config, workdir), "init_from": config.train.init_from,
        "tokens_per_sec_estimate": estimate,
        "estimated_wall_seconds": total_tokens / estimate if estimate > 0 else None,
    }
    if config.objective == "mlm":
        plan["mask_ratio"] = float(config.train.mask_ratio)
        plan["mntp"] = bool(config.train.mntp)
    else:
        plan["decoder_window_keys"] = _decoder_window_keys(config)
    return plan


def _amount(x: float) -> str:
    """2.5e11 -> '250B', 2.82e6 -> '2.82M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


def _restore_line(plan: dict) -> str:
    r = plan["restore"]
    if r["from"] == "workdir":
        line = f"resumes from {r['path']}/{r['step']} (this workdir's newest checkpoint)"
        if plan["init_from"]:
            line += f"; train.init_from={plan['init_from']} is not used on a resume"
        return line
    if r["from"] == "init_from":
        found = (f"newest checkpoint step {r['step']}" if r["step"] is not None
                 else "NO checkpoint there yet: a real run would fail to start")
        what = "params and optimizer state" if r["optimizer_state"] else "params only"
        if r["source_has_no_optimizer_state"]:
            what += " (the source has no optimizer state: a fresh optimizer)"
        return f"train.init_from={r['path']} ({found}), restoring {what}"
    if plan["init_from"] == workdir_lib.SCRATCH:
        return f"fresh initialisation (train.init_from={workdir_lib.SCRATCH}: on purpose)"
    if plan["phase"] in workdir_lib.PHASES_WITH_A_SOURCE:   # train.py checks it at start
        return (f"NONE: phase {plan['phase']} continues another run, so a real run refuses "
                "to start; set --config.train.init_from=WORKDIR (the previous run) or "
                f"--config.train.init_from={workdir_lib.SCRATCH}")
    return "fresh initialisation (train.init_from is not set)"


def format_plan(plan: dict) -> str:
    """Readable lines, then `plan` as one JSON object on the last line."""
    p = plan
    if p["mean_sequence_length"] is None:
        step = (f"{p['rows_per_step']} rows x {p['seq_len']} = {p['tokens_per_step']:,} tokens "
                "(demo: one row per sequence)")
    else:
        where = (f"assumed (--plan_mean_length); this workdir's run resumes with its stored "
                 f"{p['figure_in_workdir']:.1f} ({p['figure_path']})" if p["figure_in_workdir"]
                 else "assumed (--plan_mean_length); a run measures the data" if p["figure_assumed"]
                 else f"stored in {p['figure_path']}" if p["figure_stored"]
                 else f"measured now; a run stores it in {p['figure_path']}")
        step = (f"{p['sequences_per_step']} sequences x mean length "
                f"{p['mean_sequence_length']:.1f} -> {p['rows_per_step']} rows x {p['seq_len']} "
                f"= {p['tokens_per_step']:,} tokens ({where})")
    lines = [
        f"run        {p['size']} {p['objective']}, phase {p['phase']}"
        + (" (demo: no data configured)" if p["demo"] else ""),
        f"model      {p['num_params']:,} parameters; RoPE theta global {p['global_rope_theta']:g}, "
        f"local {p['local_rope_theta']:g}; seed {p['model_seed']}",
    ]
    if "mask_ratio" in p:
        lines.append(f"objective  MLM, mask ratio {p['mask_ratio']:g}" + (" (MNTP)" if p["mntp"] else ""))
    else:
        lines.append(f"objective  CLM, decoder local window {p['decoder_window_keys']} keys")
    lines += [
        f"step       {step}",
        f"devices    {p['num_devices']}, {p['data_parallel']} data-parallel groups; "
        f"{p['grad_accum_steps']} micro batches of {p['micro_rows_per_device']} rows per "
        "device a step" + ("" if p["max_micro_rows"] is None else
                           f" (auto: the fewest within {p['max_micro_rows']} rows)"),
        f"length     {_amount(p['total_tokens'])} tokens in {p['total_steps']:,} steps",
        f"lr         {p['schedule']}: {p['lr_start']:.3g} at start, peak {p['peak_lr']:.3g}, "
        f"{p['lr_end']:.3g} at the end; warmup {_amount(p['lr_warmup_tokens'])} tokens",
        f"batch      warmup {_amount(p['batch_warmup_tokens'])} tokens: "
        + (f"{p['batch_warmup_steps']:,} steps from {p['first_step_rows']} rows"
           + ("" if p["warmup_micro_rows_per_device"] == p["micro_rows_per_device"] else
              f", in micro batches of {p['warmup_micro_rows_per_device']} rows per device")
           if p["batch_warmup_steps"] else "none (full steps from the start)"),
        f"data       seed {p['data_seed']}; "
        + ("the stdlib demo corpus (built by the first run)" if p["demo"] else
           f"not read (--plan_mean_length); mixture {p['mixture'] or '(none set)'}"
           if p["figure_assumed"] else
           ", ".join(f"{s['path']} ({100 * s['token_share']:.1f}% of tokens, mean "
                     f"{s['mean_sequence_length']:.1f})" for s in p["sources"])),
    ]
    if p["tokenizer"]:
        lines.append(f"tokenizer  {p['tokenizer']}")
    lines += [
        f"checkpoint every {p['checkpoint_every_steps']:,} steps "
        f"({_amount(p['checkpoint_every_tokens'])} tokens)",
        f"start      {_restore_line(p)}",
        "wall time  " + (f"{_duration(p['estimated_wall_seconds'])} at "
                         f"{_amount(p['tokens_per_sec_estimate'])} tokens/s"
                         if p["estimated_wall_seconds"] else
                         "unknown (set --config.log.tokens_per_sec_estimate=TOKENS_PER_SEC)"),
        json.dumps(p, sort_keys=True),
    ]
    return "\n".join(lines)
