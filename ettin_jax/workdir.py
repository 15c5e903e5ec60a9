"""What keeps a training workdir to one run: its recorded identity (its lock:
ettin_jax.workdir_lock).

    check_identity(config, workdir)    `<workdir>/run_identity.json`: refuses a different run
    check_init_from(config)            phases 2-3 and cross-objective runs name their start,
                                       a local init_from holds a run's checkpoints/ of the
                                       objective it continues

The identity splits the config in two. Structural keys (size, objective, phase, the model's
shape, tokenizer and special ids, data mixture) define what the checkpoints are: a re-run
that differs in one is refused (use a new --workdir). Settings (optimizer, schedule,
intervals, eval, logging) are recorded too; changing one is refused unless
config.train.allow_config_change is True, which records the new values. Keys that only
change how a run executes (RUNTIME_KEYS, RUNTIME_SECTIONS) are not recorded; the data loader's
worker count and group size are recorded settings, as the saved data state depends on them.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Callable

import jax
from absl import logging

from data_pipeline import shards
from data_pipeline.fingerprint import OBJECTIVES
from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import cli
from ettin_jax import step_tokens
from ettin_jax.workdir_lock import running_holder

IDENTITY_NAME = "run_identity.json"
SCRATCH = "scratch"                    # config.train.init_from: random init on purpose
PHASES_WITH_A_SOURCE = ("ext", "decay", "cross")

# How a run executes, not what it trains: never recorded, free to change on resume.
RUNTIME_SECTIONS = ("mesh", "demo")
RUNTIME_KEYS = frozenset({
    "model.attention_impl", "model.dtype", "model.scan_layers", "model.remat",
    "model.qkv_projection",
    "train.xla_options", "train.allow_config_change",
    "train.compilation_cache_dir", "train.compilation_cache_min_compile_secs",
    "train.compilation_cache_xla_caches", "train.loss_vocab_chunk", "train.loss_row_chunk",
    "train.max_micro_tokens", "data.worker_buffer_groups", "data.mds_cache_dir",
    "checkpoint.async_save",
    "log.progress_every_secs", "log.device_peak_flops", "log.profile_steps",
})
# What the checkpoints are: a change means another run.
STRUCTURAL_KEYS = ("size", "objective", "phase", "data.mixture", "data.tokenizer",
                   "data.unk_token_id")
STRUCTURAL_SECTIONS = ("model",)


class RunIdentityError(ValueError):
    """The config is not the run the workdir holds (or a later phase names no start)."""


# --- the identity -------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_identity(config) -> dict:
    """{"structural": {key: value}, "settings": {key: value}} of `config` (dotted keys)."""
    flat = _flatten(checkpoint_lib.config_to_json(config))
    structural, settings = {}, {}
    for key, value in sorted(flat.items()):
        section = key.split(".", 1)[0]
        if section in RUNTIME_SECTIONS or key in RUNTIME_KEYS:
            continue
        if key in STRUCTURAL_KEYS or section in STRUCTURAL_SECTIONS:
            structural[key] = value
        else:
            settings[key] = value
    return {"structural": structural, "settings": settings}


_ABSENT = "(absent)"
# Keys added after runs were recorded without them: the value the code used before, so a run
# recorded earlier resumes unchanged (and one that sets another value is refused as a change).
BEFORE_THE_KEY = {"train.prng_impl": "threefry", "optimizer.batch_warmup_start_fraction": 0.125}
# Recorded settings that runs recorded earlier left out (they were runtime keys then) with no
# single value to assume: absent from the record, whatever the run now says is taken. The
# data iterator's saved state depends on them: a resume that changes them restores no
# checkpoint (ettin_jax.checkpoint), so a change is refused up front.
UNRECORDED_BEFORE = ("data.num_workers", "data.worker_group_rows")


def _differences(old: dict, new: dict) -> list[str]:
    def recorded(key):
        if key not in old and key in UNRECORDED_BEFORE:
            return new.get(key, _ABSENT)
        return old.get(key, BEFORE_THE_KEY.get(key, _ABSENT))
    return [f"{key}: {recorded(key)!r} -> {new.get(key, _ABSENT)!r}"
            for key in sorted(set(old) | set(new)) if recorded(key) != new.get(key, _ABSENT)]


def check_identity(config, workdir: str) -> Callable[[], None]:
    """Refuses a re-run of another run (raises RunIdentityError listing each differing key,
    old -> new). Call before compiling.

    Returns the function that records the identity (on first start) or the changed settings
    (allow_config_change): call it once the start has got past its other checks and its
    restore: a start refused later (num_heads=5, a misspelled PRNG name) leaves the record as
    it was, and the corrected command is not refused as another run."""
    path = os.path.join(workdir, IDENTITY_NAME)
    new = run_identity(config)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as e:
        raise RunIdentityError(f"{path} cannot be read ({e}); it records which run this workdir "
                               "holds. Restore it, or delete it to record this config") from e
    if old is not None:
        structural = _differences(old.get("structural", {}), new["structural"])
        if structural:
            raise RunIdentityError(
                f"{workdir} holds a different run (recorded in {path}); differing keys "
                f"(old -> new): {'; '.join(structural)}. Use a new --workdir for this run")
        settings = _differences(old.get("settings", {}), new["settings"])
        new["changes"] = old.get("changes", [])
        if settings and not config.train.allow_config_change:
            raise RunIdentityError(
                f"{workdir}: settings differ from the ones this run recorded in {path} "
                f"(old -> new): {'; '.join(settings)}. Pass "
                "--config.train.allow_config_change=True to continue with the new settings, "
                "or use a new --workdir")
        if settings:
            logging.warning("%s: continuing with changed settings (config.train."
                            "allow_config_change): %s", workdir, "; ".join(settings))
            new["changes"].append(
                {"at": datetime.datetime.now().isoformat(timespec="seconds"), "changed": settings})
            return functools.partial(_write_identity, path, new)
        if set(new["settings"]) <= set(old.get("settings", {})):
            return lambda: None   # the same run; a record from before some keys gets them added
    return functools.partial(_write_identity, path, new)


def _write_identity(path: str, identity: dict):
    if jax.process_index() == 0:
        shards.write_json_atomic(path, identity)


def resumes(workdir: str | None, resume_at_most: int | None = None) -> bool:
    """Whether a run in `workdir` resumes from its own checkpoints (those up to
    `resume_at_most`, where a pair restarts its sides: the later ones are deleted)."""
    return bool(workdir) and any(resume_at_most is None or step <= resume_at_most
                                 for step in checkpoint_lib.saved_steps(workdir))


def check_init_from(config, workdir: str | None = None, resume_at_most: int | None = None):
    """A later phase or cross-objective run must start from another run, or say "scratch"; a
    local init_from must hold a run's checkpoints (given a pair's workdir, the error names the
    side to continue). Raises RunIdentityError. Imports no backend: main.py calls it first. A
    resume (`workdir` has checkpoints) never reads the source, which may be gone: not checked."""
    if config.phase in PHASES_WITH_A_SOURCE and not config.train.init_from:
        raise RunIdentityError(
            f"a {config.objective} {config.phase} run continues another run: set "
            "--config.train.init_from=<workdir of the previous run>, or "
            f"--config.train.init_from={SCRATCH} to start it from a random initialisation")
    source = init_source(config)
    if not source or cli.is_remote(source) or resumes(workdir, resume_at_most):
        return
    if not os.path.isdir(source):
        raise RunIdentityError(f"config.train.init_from={source}: no such directory (expected "
                               "the workdir of the previous run)")
    if not os.path.isdir(checkpoint_lib.checkpoint_dir(source)):
        raise RunIdentityError(f"config.train.init_from={source}: no checkpoints/ directory in "
                               "it; expected a training run's workdir (or a `python -m "
                               f"ettin_jax.hf import` output){_pair_hint(config, source)}")
    _check_source_run(config, source)


# The phase a run of each phase continues (recipe §3.2-3.3): a cross-objective run continues
# the other objective's finished (decayed) model.
PREVIOUS_PHASE = {"ext": "pretrain", "decay": "ext", "cross": "decay"}


# The model's shape: what must agree for a source's parameters to load at all.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


def _check_source_model(config, source: str):
    """The model saved with the source's newest checkpoint (an import's too, which has no
    run_identity.json) must be of the objective this run continues and of this run's shape:
    an import of a decoder trained silently as an encoder, and a source of another size
    failed only after the train step had compiled."""
    step, config_json = checkpoint_lib.newest_saved_json(source, "config")
    saved = (config_json or {}).get("model")
    if not isinstance(saved, dict):
        return          # none or unreadable: the restore reports it
    where = f"config.train.init_from={source} (step {step})"
    wanted = source_objective(config)
    if "causal" in saved and bool(saved["causal"]) != (wanted == "clm"):
        held = "clm" if saved["causal"] else "mlm"
        raise RunIdentityError(
            f"{where} holds a {held} model; a {config.objective} {config.phase} run continues "
            f"a {wanted} model" + (". To continue it with the other objective, use the "
                                   f"cross-objective config ({config.objective}_from_{held})"
                                   if config.phase != "cross" else ""))
    differ = [f"{key} {saved[key]} (this run: {config.model[key]})" for key in SHAPE_KEYS
              if key in saved and key in config.model and saved[key] != config.model[key]]
    if differ:
        raise RunIdentityError(f"{where} holds a model of another shape: {', '.join(differ)}; "
                               f"this run is {config.size} (--config=configs/ettin_SIZE.py)")


def check_source_tokenizer(config, tokenizer: str, workdir: str = "",
                           resume_at_most: int | None = None):
    """The tokenizer this run reads its data with (a path) must give the token ids the run it
    continues was trained with (the tokenizer its newest checkpoint records, compared by
    fingerprint): another one trained on silently, its ids meaning other strings. Skipped on
    a resume and where either cannot be read (a hub name offline, a moved file)."""
    source = "" if resumes(workdir, resume_at_most) else init_source(config)
    recorded = (checkpoint_lib.newest_saved_json(source, "meta")[1] or {}).get("tokenizer") \
        if source else None
    if not recorded or not tokenizer or os.path.abspath(recorded) == tokenizer:
        return
    from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    try:
        theirs = tokenizer_lib.fingerprint(tokenizer_lib.load(recorded))
        ours = tokenizer_lib.fingerprint(tokenizer_lib.load(tokenizer))
    except Exception:  # pylint: disable=broad-except  # unreadable: tokenizers' errors vary
        return
    if theirs != ours:
        raise RunIdentityError(
            f"config.train.init_from={source} was trained with the tokenizer {recorded} "
            f"(fingerprint {theirs}); this run's data is tokenized with {tokenizer} "
            f"(fingerprint {ours}): its token ids would mean other strings. Prepare the data "
            "with the source's tokenizer (--config.data.tokenizer)")


def _check_source_run(config, source: str):
    """The run recorded at `source` (its run_identity.json; an import has none) must be of the
    objective this run continues; another phase than the recipe's previous one is allowed (an
    ablation may skip one) but warned about."""
    path = os.path.join(source, IDENTITY_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f).get("structural", {})
    except (OSError, ValueError, AttributeError):
        recorded = {}   # none (an import) or unreadable: the saved model is checked below
    objective, phase = recorded.get("objective"), recorded.get("phase")
    wanted = source_objective(config)
    if objective and objective != wanted:
        raise RunIdentityError(
            f"config.train.init_from={source} holds a {objective} run ({path}); a "
            f"{config.objective} {config.phase} run continues a {wanted} run"
            + (". To continue it with the other objective, use the cross-objective config "
               f"({config.objective}_from_{objective})" if config.phase != "cross" else ""))
    _check_source_model(config, source)
    previous = PREVIOUS_PHASE.get(config.phase)
    if phase and previous and phase != previous:
        logging.warning("config.train.init_from=%s holds a %s-phase run; a %s run usually "
                        "continues the %s phase", source, phase, config.phase, previous)
    try:
        last_step = ((step_tokens.read(source) or {}).get("split") or {}).get("num_steps")
    except ValueError:
        last_step = None       # the source's own resume reports its record
    saved = checkpoint_lib.saved_steps(source)
    if last_step and saved and saved[-1] < last_step:
        running = running_holder(source)
        state = (f"is at step {saved[-1]} of its {last_step} (its newest checkpoint) and its "
                 f"LOCK names {running}, which may still be training it" if running else
                 f"stopped at step {saved[-1]} of its {last_step} (its newest checkpoint)")
        logging.warning("config.train.init_from=%s %s: this run continues an unfinished %s "
                        "phase. %s unless this is on purpose", source, state, phase or "previous",
                        "Wait for that run to end" if running else "Resume that run first")


def _pair_hint(config, source: str) -> str:
    """For an init_from holding runs one level down (a pair's workdir, ettin_jax.pairs): the
    side this single run continues (the other objective's for a cross-objective run)."""
    runs = checkpoint_lib.runs_inside(source)
    if not runs:
        return ""
    objective = source_objective(config)
    if objective not in runs:
        return f"; it holds runs in {'/, '.join(runs)}/, none for the {objective} side"
    return (f"; it is a pair's workdir (runs in {'/, '.join(runs)}/): this run continues one "
            f"side, --config.train.init_from={os.path.join(source, objective)}")


def source_objective(config) -> str:
    """The objective of the run that config.train.init_from continues: its own, or the other
    one for a cross-objective run (the side of a pair's workdir it reads)."""
    if config.phase != "cross":
        return config.objective
    return next(o for o in OBJECTIVES if o != config.objective)


def init_source(config) -> str:
    """The workdir config.train.init_from names, "" for none or "scratch"."""
    return "" if config.train.init_from == SCRATCH else config.train.init_from
