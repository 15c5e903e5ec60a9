"""Encoder vs decoder on provably identical data: one process trains both sides of a pair
(configs/base.py: `mlm+clm`, `mlm_ext+clm_ext`, ...) in lockstep.

    side_configs(make_config, runs, overrides) -> [config, config]   # the pair's two runs
    train_pair(configs, workdir) -> {objective: last logged metrics}

Mechanism. Each side is a normal run (ettin_jax.train.train_steps) in `<workdir>/<objective>`
with its own state, optimizer, loader, checkpointer and writers, so resume, export, GLUE and
generation take a side's directory like any run's. The driver advances the sides one step at
a time, first A then B. Both sides have the same data config, so their loaders make the same
packed rows in the same order (the objective only masks or shifts them); the driver compares
the two data fingerprints of every step (data_pipeline.fingerprint) and stops with an error,
before that step is saved, at the first that differ. Both sides save at the same steps, and
SIGTERM stops both after the same step, saved.

Resume. A kill can land between the two sides' saves of a step. On restart both sides resume at
the newest step that both have saved; a side's checkpoints after it are deleted (those steps
are trained again, to the same results: batches, masks and dropout depend only on the step).
A side whose checkpoint turns out damaged falls back further (ettin_jax.checkpoint), and then
the pair restarts both sides at that side's step.

Memory. Both sides' parameters and optimizer states stay on the devices for the whole run; the
steps alternate, so activations are one side's at a time. Per device a pair needs

    state(A) + state(B) + the larger of the two steps' activations and temporaries

Before allocating anything, the driver logs the two states' bytes per device and stops with an
error naming the remedies when they alone exceed a device's memory (where the backend reports
it: GPU and TPU do, CPU does not). The host runs two loaders (twice the data work of a run).

Throughput. Each side's tokens/s and MFU count its own tokens over the pair's stepping time
(either side's restores, evals and saves left out), its share of the devices: the two
sides' MFUs add up to the devices' own.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import jax
from absl import logging

from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import cli
from ettin_jax import stop_signals
from ettin_jax import train
from ettin_jax import train_metrics
from ettin_jax import workdir as workdir_lib

# Config keys the two sides must share: they decide the packed rows of every step
# (data_pipeline.loader), the step count and the steps that are saved.
SHARED_KEYS = ("phase", "data", "train.seq_len", "train.global_batch_size",
               "train.grad_accum_steps", "train.max_micro_tokens", "optimizer.batch_warmup_tokens",
               "optimizer.batch_warmup_start_fraction", "schedule.total_tokens", "model.vocab_size",
               "model.pad_token_id", "checkpoint.every_steps", "checkpoint.every_tokens", "mesh")
# A side whose checkpoint is damaged moves the common start back; each retry sets one aside.
MAX_START_ATTEMPTS = 4


class PairError(ValueError):
    """The two sides cannot train as a pair; the message names the config key or the step."""


# --- configs -----------------------------------------------------------------------------------

def side_configs(make_config: Callable[[str], object], runs: Sequence[str],
                 overrides: dict, *, planning: bool = False) -> list:
    """The configs of a pair's two runs.

    make_config: a config file's `get_config` (one run's arg -> ConfigDict); runs: the pair's
    two run args (configs/base.py split_pair); overrides: the `--config.*` overrides as a flat
    {"train.init_from": value, ...} dict (ml_collections' config_flags.get_override_values),
    applied to both sides. A `train.init_from` names the previous phase's pair workdir: each
    side continues `<init_from>/<objective>` (a cross-objective side the other objective's);
    `planning` (main.py --dry_run) accepts one that does not exist yet, as a single run's plan
    does (the plan says a real run would find no checkpoint there).
    """
    configs = []
    for run in runs:
        config = make_config(run)
        unknown = sorted(k for k in overrides if not _has_key(config, k))
        if unknown:
            raise PairError(f"--config.{unknown[0]}: no such key in the config of the pair's "
                            f"{run!r} side")
        config.update_from_flattened_dict({k: v for k, v in overrides.items() if k != "pair"})
        config.pair = ""                     # each side is a plain run
        configs.append(config)
    objectives = [c.objective for c in configs]
    if configs[0].checkpoint.keep_last < 2:
        # A kill between the sides' saves of step N, after the first side's retention removed
        # its previous one, would leave the sides no step in common.
        raise PairError(f"config.checkpoint.keep_last={configs[0].checkpoint.keep_last}: a pair "
                        "keeps at least 2 checkpoints per side, so that both sides always hold "
                        "a step in common to resume at")
    if sorted(objectives) != ["clm", "mlm"]:
        raise PairError(f"a pair is one mlm and one clm run, got {objectives} (configs/base.py)")
    for config in configs:
        if workdir_lib.init_source(config):           # not "" or "scratch" (random weights)
            config.train.init_from = _side_of(config.train.init_from,
                                              workdir_lib.source_objective(config),
                                              planning=planning)
    return configs


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _side_of(pair_workdir: str, objective: str, *, planning: bool = False) -> str:
    side = os.path.join(pair_workdir, objective)
    if planning and not os.path.exists(pair_workdir):
        return side
    if not cli.is_remote(pair_workdir) and not os.path.isdir(side):
        hint = (" (it is a single run's workdir: a pair continues a pair)"
                if os.path.isdir(checkpoint_lib.checkpoint_dir(pair_workdir)) else "")
        raise PairError(f"config.train.init_from={pair_workdir}: a pair continues the pair "
                        f"workdir of its previous phase, which holds {objective}/; no {side}{hint}")
    return side


def check_shared(configs: Sequence, num_steps: Sequence[int]):
    """PairError naming the first SHARED_KEYS entry (or step count) the two sides differ in."""
    a, b = configs
    for key in SHARED_KEYS:
        value_a, value_b = _get(a, key), _get(b, key)
        if value_a != value_b:
            raise PairError(f"config.{key} differs between the pair's sides ({a.objective}: "
                            f"{value_a}, {b.objective}: {value_b}); a pair's runs must share it "
                            "to train on the same rows")
    if num_steps[0] != num_steps[1]:
        raise PairError(f"the {a.objective} side has {num_steps[0]} steps, the {b.objective} side "
                        f"{num_steps[1]}: a pair's runs must have one schedule")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


# --- memory ------------------------------------------------------------------------------------

def state_bytes_per_device(abstract_state) -> int:
    """Bytes of one device's shards of a state given as ShapeDtypeStructs with shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_state))


def device_memory_bytes() -> int | None:
    """A local device's memory limit, or None where the backend does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_fits(state_bytes: dict[str, int], device_bytes: int | None, mesh_config) -> None:
    """PairError when the two sides' states (bytes per device, by objective) exceed a device."""
    need = sum(state_bytes.values())
    parts = " + ".join(f"{k} {_size(v)}" for k, v in state_bytes.items())
    logging.info("pair: parameters and optimizer states per device: %s = %s (device: %s); "
                 "one side's activations come on top", parts, _size(need),
                 "memory not reported" if device_bytes is None else _size(device_bytes))
    if device_bytes is not None and need > device_bytes:
        raise PairError(
            f"a pair keeps both sides' parameters and optimizer states on every device: {parts} "
            f"= {_size(need)} per device on config.mesh {dict(mesh_config)}, more than a "
            f"device's {_size(device_bytes)}. Shard the states over more devices "
            "(config.mesh.fsdp, more hosts), keep the Adam moments in bfloat16 "
            "(--config.optimizer.moments_dtype=bfloat16), or train the sides as two runs with "
            "one data config (their data_fingerprints still prove identical data: "
            "python -m ettin_jax.compare RUN_A RUN_B)")


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else
            f"{num_bytes / 2**20:.2f} MiB")


# --- the lockstep driver -----------------------------------------------------------------------

def train_pair(configs: Sequence, workdir: str) -> dict[str, dict]:
    """Trains the pair's two sides (side_configs) in lockstep in `<workdir>/<objective>`
    (module docstring); returns each side's last logged metrics by objective."""
    workdir = os.path.abspath(workdir)
    workdirs = [os.path.join(workdir, c.objective) for c in configs]
    saved = [set(checkpoint_lib.saved_steps(w)) for w in workdirs]
    common = set.intersection(*saved)
    if all(saved) and not common:   # resuming at step 0 would delete every checkpoint of both
        raise PairError("the pair's sides hold no checkpoint step in common ("
                        + ", ".join(f"{w}: steps {sorted(s)}" for w, s in zip(workdirs, saved))
                        + "); nothing was deleted. Continue one side as a single run, or move "
                        "the checkpoints away to start the pair again")
    resume_at = max(common, default=0)
    stop = stop_signals.StopOnSignal()
    try:
        for _ in range(MAX_START_ATTEMPTS):
            result = _train_from(configs, workdirs, resume_at, stop)
            if isinstance(result, dict):
                if not stop.requested() and jax.process_index() == 0:   # both sides finished
                    logging.info("pair done; compare its sides (identical data, losses, "
                                 "charts): python -m ettin_jax.compare %s --out=%s", workdir,
                                 os.path.join(workdir, "report"))
                return result
            logging.warning("pair: the sides restored different steps; restarting both at "
                            "step %d", result)
            resume_at = result
        raise PairError(f"pair {workdirs}: the sides did not restore one common step in "
                        f"{MAX_START_ATTEMPTS} attempts (damaged checkpoints?)")
    finally:
        stop.restore()


def _train_from(configs, workdirs, resume_at: int, stop) -> dict[str, dict] | int:
    """Runs both sides from at most step `resume_at` to the end (or SIGTERM): their metrics by
    objective; or, when they restored different steps, the smaller one to restart from."""
    # One clock of pauses: a side's throughput leaves out the other side's restore, evals and
    # saves, which happen inside its windows; each side's tokens/s is then its share of the
    # devices' time, and the two sides' MFUs add up to the devices' own.
    pauses = train_metrics.Pauses()
    runs = [train.train_steps(c, w, resume_at_most=resume_at, pauses=pauses)
            for c, w in zip(configs, workdirs)]
    names = [c.objective for c in configs]
    try:
        setups = [next(run) for run in runs]
        resolved = [p.config for p in setups]
        check_shared(resolved, [p.num_steps for p in setups])
        check_fits({n: state_bytes_per_device(p.abstract_state) for n, p in zip(names, setups)},
                   device_memory_bytes(), resolved[0].mesh)
        if stop.requested_in_setup("pair: "):
            return {}
        starts = [run.send(None).step for run in runs]
        if stop.requested_in_setup("pair: "):
            return {}
        if len(set(starts)) > 1:
            return min(starts)
        logging.info("pair: %s in lockstep from step %d, in %s", " and ".join(names), starts[0],
                     " and ".join(workdirs))
        # XLA:CPU runs the collectives of every queued program on one shared thread pool: with
        # both sides' steps in flight the pool can fill with participants of one program
        # waiting for a participant of the other (an all-gather rendezvous timed out, aborting
        # a demo pair on 4 CPU devices). GPUs and TPUs run each device's programs in order.
        serialize_steps = jax.default_backend() == "cpu"
        stopping, metrics = False, {}
        while True:
            progress = []
            for name, run in zip(names, runs):
                try:
                    progress.append(run.send(stopping))
                except StopIteration as done:
                    metrics[name] = done.value
                    continue
                if serialize_steps:
                    jax.block_until_ready(progress[-1].metrics)
            if len(metrics) == len(runs):
                return metrics
            if metrics:
                raise PairError(f"pair: the {', '.join(metrics)} side ended while the other did "
                                f"not (step {progress[0].step})")
            _check_step(names, progress)
            stopping = (stop.name or "a signal") if stop.requested() else False
    finally:
        for run in runs:
            run.close()


def _check_step(names, progress):
    (a, b), (name_a, name_b) = progress, names
    if a.step != b.step:
        raise PairError(f"pair: the sides are at steps {a.step} ({name_a}) and {b.step} ({name_b})")
    if a.fingerprint != b.fingerprint:
        raise PairError(
            f"pair: the data of step {a.step} differs between the sides ({name_a} "
            f"{a.fingerprint}, {name_b} {b.fingerprint}); stopped before saving it. The sides' "
            "loaders made different rows: check config.data of both (SHARED_KEYS are equal)")
