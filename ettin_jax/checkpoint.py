"""Orbax checkpoints of a training run: save, resume, and restore from another run.

A run's workdir holds `checkpoints/<step>/` with five items:
  params     the model's nnx.Param state (float32, sharded as in training)
  opt_state  the optimizer state (moments sharded like their params)
  meta       JSON: step, tokens seen in this phase, the phase, where it was initialised from
  data       the Grain iterator state of every process (resume continues the same batches)
  config     JSON: the full config of the run (export rebuilds the model from it)

Which checkpoints are kept for good (every `keep_every_steps`) is decided when one is saved
and recorded in `<workdir>/kept_for_good.json` before it is written (beside checkpoints/, which
holds only what Orbax writes); retention reads the
record, so a later change of the checkpoint interval cannot delete them.

Resuming restores all five into abstract targets that carry this run's shardings, so a run
may resume on a different mesh. A checkpoint that fails to restore is set aside as
`<step>.damaged` when an older one restores, which is used, with a warning. When none
restores, nothing is set aside and the run stops with an error: that is a changed setting
(the data iterator's state depends on data.num_workers, data.worker_group_rows and the number
of processes) or a storage fault more often than damage to every checkpoint. A later phase or a
cross-objective run restores params (and, where the recipe keeps it, the optimizer state)
from another run's latest checkpoint; a tree or shape mismatch names the parameter.
"""
from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from data_pipeline import shards
from ettin_jax import processes
from ettin_jax.model_config import ModelConfig

def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers(with_data: bool = True):
    handlers = dict(params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
    if with_data:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    return handlers


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed by `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


KEPT_FOR_GOOD_NAME = "kept_for_good.json"


class RestoreError(ValueError):
    """No checkpoint of a run restores (each failed); the message lists them and their errors."""


class SaveError(ValueError):
    """A checkpoint could not be written (e.g. a full disk); the message names its step, the
    error and the newest complete checkpoint."""


class RecordedSteps(ocp.checkpoint_managers.PreservationPolicy):
    """Preserves the steps recorded in `<workdir>/kept_for_good.json` ({"steps": [...]}).

    `add` records a step (atomically, process 0 writes) before its checkpoint is saved.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), KEPT_FOR_GOOD_NAME)
        self.steps: set[int] = set()
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.steps = {int(step) for step in json.load(f)["steps"]}
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise ValueError(
                    f"{self.path}: not a readable record of the checkpoints kept for good "
                    f"({type(e).__name__}: {e}); it should read {{\"steps\": [...]}}: restore "
                    "it, or write the steps of the checkpoints to keep (every step that is a "
                    "multiple of the checkpoint.keep_every_nth-th save)") from None

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def add(self, *steps: int):
        """Records `steps` (none: writes the record as it is, so that its absence means a
        workdir from before it)."""
        self.steps.update(steps)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            shards.write_json_atomic(self.path, {"steps": sorted(self.steps)})

    def should_preserve(self, checkpoints, *, context):  # pylint: disable=unused-argument
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """The checkpoints of one run (`workdir/checkpoints`).

    Saves are asynchronous (`save` returns once the arrays are copied off the devices);
    `wait` blocks until the last one is on disk. Keeps the newest `keep_last` checkpoints,
    plus for good every checkpoint whose step was a multiple of `keep_every_steps` (0 = none)
    when it was saved (RecordedSteps).
    """

    def __init__(self, workdir: str, *, keep_last: int, keep_every_steps: int = 0,
                 async_save: bool = True, abstract_state: dict | None = None):
        self.directory = checkpoint_dir(workdir)
        self.keep_every_steps = keep_every_steps
        self.saving_step = None   # of the newest save (async: on disk only after `wait`)
        self.kept_for_good = RecordedSteps(workdir)
        policies = [ocp.checkpoint_managers.LatestN(keep_last), self.kept_for_good]
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers())
        steps = sorted(self.manager.all_steps())
        if not self.kept_for_good.exists():
            # A workdir from before the record: a checkpoint older than the newest keep_last
            # survived because it was kept for good; record those so that none is lost. A
            # new run records none, and then has its record: a resume with a smaller
            # keep_last would otherwise take its older checkpoints for kept ones.
            older, newest = steps[:-keep_last] if keep_last else steps, steps[-keep_last:]
            self.kept_for_good.add(*older, *(s for s in newest if self._for_good(s)))
        if abstract_state is not None and jax.process_index() == 0:
            warn_if_no_room(self.directory, abstract_state)

    def _for_good(self, step: int) -> bool:
        return self.keep_every_steps > 0 and step % self.keep_every_steps == 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, params, opt_state, meta: dict, data_iterator, config):
        if self._for_good(step):
            self.kept_for_good.add(step)
        self.wait()    # Orbax would wait for the previous save too, but raise its error bare
        self.saving_step = step
        saved = self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_to_json(config))), force=True)
        if saved:
            logging.info("checkpoint of step %d is being written to %s", step, self.directory)

    def describe_latest(self) -> str:
        """`<directory>/<step>` of the newest checkpoint on disk (after pending saves), for messages."""
        self.wait()
        step = self.latest_step()
        return "none yet" if step is None else f"{self.directory}/{step}"

    def wait(self):
        """Blocks until the newest save is on disk; SaveError if it failed (raised once)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except  # the save thread's error
            latest = self.latest_step()    # Orbax has dropped the failed step from its list
            rerun = ("no checkpoint of this run is complete; make room (or fix the cause) and "
                     "rerun the same command to start again" if latest is None else
                     f"the newest complete one is {self.directory}/{latest}; make room (or fix "
                     "the cause) and rerun the same command to resume there")
            raise SaveError(f"the checkpoint of step {self.saving_step} could not be written to "
                            f"{self.directory} ({type(e).__name__}: {str(e)[:500]}); "
                            f"{rerun}") from e

    def raise_failed_save(self):
        """SaveError on every process when a finished asynchronous save failed on any (a
        collective): a run stops at its next log line, not a checkpoint interval later at its
        next save, having trained on for nothing. A save still being written is not waited for."""
        error = None
        if not self.manager.is_saving_in_progress():
            try:
                self.wait()
            except SaveError as e:
                error = e
        if processes.any_process(error is not None):
            raise error or SaveError(f"another process of this run could not write the "
                                     f"checkpoint of step {self.saving_step} (its log says why)")

    def close(self):
        self.manager.close()

    def restore_latest(self, *, abstract_params, abstract_opt_state, data_iterator):
        """Restores the newest readable checkpoint into the abstract targets.

        Returns (params, opt_state, meta), or None when there is no checkpoint. The data
        iterator's state is set in place. A checkpoint whose tree or shapes differ from the
        targets raises ValueError (the config changed); one that fails to restore is set aside
        when an older one restores, and when none does RestoreError names them all.
        """
        failed = []   # (step, error) of the newer checkpoints that did not restore
        for step in sorted(self.manager.all_steps(), reverse=True):
            where, error = f"{self.directory}/{step}", None
            try:
                metadata = self.manager.item_metadata(step)
                saved_params, saved_opt_state = metadata["params"], metadata["opt_state"]
                if saved_params is None or saved_opt_state is None:
                    raise ValueError("params or opt_state item missing")
                self._restore_data_state(step, data_iterator)
            except Exception as e:  # pylint: disable=broad-except  # unreadable: damaged?
                error = e
            if self._failed_anywhere(step, error, failed):
                continue
            # A readable checkpoint of another shape is no damage but a changed config: stop.
            check_tree_matches(saved_params, abstract_params, what="parameters", where=where)
            check_tree_matches(saved_opt_state, abstract_opt_state, what="optimizer states",
                               where=where)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except  # any failure: try the previous one
                error = e
            # Agreed only where Orbax's restore failed alike everywhere, or after its last
            # collective; a process failing inside it leaves the others waiting there.
            if self._failed_anywhere(step, error, failed):
                continue
            data_iterator.start_prefetch()
            for bad_step, _ in failed:   # so that this run's saves of those steps can be written
                self._set_aside(bad_step)
            logging.info("resumed from %s/%d (tokens seen %s)", self.directory, step,
                         restored["meta"].get("tokens_seen"))
            return restored["params"], restored["opt_state"], restored["meta"]
        if failed:
            raise RestoreError(
                f"{self.directory}: none of its checkpoints restores ("
                + "; ".join(f"step {step}: {error}" for step, error in failed)
                + "). Nothing was set aside. When every checkpoint fails, a setting that shapes "
                "the saved data iterator state most likely changed (data.num_workers, "
                "data.worker_group_rows, the number of processes): resume as the run was "
                "started. To start this run again from scratch, move the checkpoints away")
        return None

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step`; returns their steps, ascending.

        For a pair (ettin_jax.pairs): both sides resume at the newest step they both saved, and
        the side that saved further recomputes the same steps, whose saves would collide.
        """
        newer = sorted(s for s in self.manager.all_steps() if s > step)
        for newer_step in newer:
            logging.warning("deleting %s/%d: newer than step %d, where this run resumes (its "
                            "pair partner has no checkpoint after it); the steps are trained again",
                            self.directory, newer_step, step)
            self.manager.delete(newer_step)
        return newer

    def _restore_data_state(self, step: int, data_iterator):
        """Sets `data_iterator` to this process's saved state (the file grain's checkpoint
        handler writes), the one part of a checkpoint only this process reads: restored
        before Orbax's restore, whose collectives a process failing in it would leave the
        others waiting in, so that a bad state is agreed on like a damaged step."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        with open(os.path.join(self.directory, str(step), "data", name), encoding="utf-8") as f:
            data_iterator.set_state(json.load(f))

    def _failed_anywhere(self, step: int, error: Exception | None, failed: list) -> bool:
        """Whether `step` failed on some process (then noted in `failed`). Every process
        resumes at the same step: one that cannot read its part (e.g. its data iterator's
        file) makes all of them try the previous one."""
        if not processes.any_process(error is not None):
            return False
        failed.append(self._failed(step, error or RestoreError(
            "another process of this run could not restore it (its log says why)")))
        return True

    def _failed(self, step: int, error: Exception) -> tuple[int, str]:
        what = f"{type(error).__name__}: {str(error)[:500]}"
        logging.warning("checkpoint %s/%d cannot be restored (%s); trying the previous one",
                        self.directory, step, what)
        return step, what

    def _set_aside(self, step: int):
        """Renames a damaged `<step>` to `<step>.damaged`, so that no save collides with it."""
        logging.warning("setting aside %s/%d as damaged (an older checkpoint restored)",
                        self.directory, step)
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            target = path + ".damaged"
            suffix = 1
            while os.path.exists(target):
                target, suffix = f"{path}.damaged{suffix}", suffix + 1
            os.rename(path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()


def warn_if_no_room(directory: str, abstract_state: dict) -> bool:
    """Warns when `directory`'s disk has less room than a checkpoint of `abstract_state` takes
    (its arrays' bytes): a rerun on a disk still full trained a whole checkpoint interval
    before its first save failed. Returns whether it warned."""
    needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    try:
        disk = os.statvfs(directory)
    except OSError:     # not a local path (a bucket): nothing to ask
        return False
    free = disk.f_bavail * disk.f_frsize
    if free >= needed:
        return False
    logging.warning("%s has %.3g GB free, a checkpoint of this run takes about %.3g GB: its "
                    "next save will fail unless room is made", directory, free / 1e9,
                    needed / 1e9)
    return True


def _path_name(path) -> str:
    """'layers/0/qkv' for a tree path, without the trailing Variable `value` key."""
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(part))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_tree_matches(saved_tree, target_tree, *, what: str, where: str):
    """Raises ValueError naming every parameter whose presence or shape differs."""
    saved, target = _shapes(saved_tree), _shapes(target_tree)
    problems = [f"{name}: {saved[name]} in the checkpoint, {target[name]} in this run"
                for name in sorted(set(saved) & set(target)) if saved[name] != target[name]]
    problems += [f"{name}: in the checkpoint only" for name in sorted(set(saved) - set(target))]
    problems += [f"{name}: in this run only" for name in sorted(set(target) - set(saved))]
    if problems:
        listed = "; ".join(problems[:12]) + (f"; ... ({len(problems)} in all)" if len(problems) > 12 else "")
        raise ValueError(f"{where}: the {what} do not match this run's config: {listed}")


def runs_inside(directory: str) -> list[str]:
    """Names of the subdirectories of `directory` that hold a run's checkpoints/, sorted: a
    pair's workdir (ettin_jax.pairs) holds its two runs one level down."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(n for n in names if os.path.isdir(checkpoint_dir(os.path.join(directory, n))))


def newest_saved_json(workdir: str, item: str) -> tuple[int | None, dict | None]:
    """(step, JSON item ("config", "meta")) of the run's newest checkpoint, read from its file
    without a manager (no Orbax warning); (None, None) without checkpoints, (step, None) where
    the item cannot be read."""
    steps = saved_steps(workdir) if os.path.isdir(workdir) else []
    if not steps:
        return None, None
    try:
        with open(os.path.join(checkpoint_dir(workdir), str(steps[-1]), item, "metadata"),
                  encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return steps[-1], None
    return steps[-1], value if isinstance(value, dict) else None


def has_optimizer_state(workdir: str, step: int) -> bool:
    """Whether checkpoint `step` of the run at `workdir` holds an optimizer state item (a run
    imported from transformers holds params only). Read from the directory: opening a
    manager to read it logs Orbax's read-only warning in a dry run."""
    return os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), "opt_state"))


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager that reads (never writes or cleans up) a run's `checkpoints/`.

    Every item's handler is registered, the data iterator's too (never restored here):
    without it Orbax warns of an unrestorable "data" item whenever it lists the items."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        runs = runs_inside(workdir)
        hint = (f"; the runs in it: {', '.join(os.path.join(workdir, r) for r in runs)}"
                if runs else "")
        raise FileNotFoundError(f"{workdir}: no checkpoints/ directory; expected a training run's "
                                f"workdir (config.train.init_from, --checkpoint){hint}")
    # read_only turns saving and directory creation off, warning of each unless already off.
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def saved_steps(workdir: str) -> list[int]:
    """The steps of a run's finished checkpoints, ascending ([] when it has no checkpoints/).
    Listed as a CheckpointManager lists them, without one: a run asks this of its own workdir,
    where a read-only manager's warning would alarm for nothing."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


def readable_steps(manager, workdir: str) -> list[int]:
    """The run's checkpoint steps, newest first; FileNotFoundError when there is none."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}: the run has no checkpoint yet")
    return steps


def restore_from_run(workdir: str, *, abstract_params, abstract_opt_state=None):
    """Params (and the optimizer state if `abstract_opt_state` is given) of another run's
    newest readable checkpoint, for a new phase or objective (config.train.init_from).

    Returns (params, opt_state or None, meta of the source checkpoint). The optimizer state
    is None when the source has none (e.g. a run imported from Hugging Face).
    """
    manager = read_only_manager(workdir)
    errors = []
    for step in readable_steps(manager, workdir):
        where = f"config.train.init_from={workdir} (step {step})"
        try:
            metadata = manager.item_metadata(step)
            if metadata.get("params") is None:
                raise ValueError("no params item")
        except Exception as e:  # pylint: disable=broad-except  # unreadable: try the previous one
            logging.warning("%s cannot be read (%s: %s); trying the previous checkpoint",
                            where, type(e).__name__, str(e)[:500])
            errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
            continue
        # A readable checkpoint of another shape is no damage but a mismatched model: stop.
        check_tree_matches(metadata["params"], abstract_params, what="parameters", where=where)
        want_opt = abstract_opt_state is not None and metadata.get("opt_state") is not None
        if want_opt:
            check_tree_matches(metadata["opt_state"], abstract_opt_state, what="optimizer states",
                               where=where)
        items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        if want_opt:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except  # a damaged one: try the previous
            logging.warning("%s cannot be restored (%s: %s); trying the previous checkpoint",
                            where, type(e).__name__, str(e)[:500])
            errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
            continue
        if abstract_opt_state is not None and not want_opt:
            logging.warning("%s has no optimizer state; starting a fresh optimizer", where)
        logging.info("initialised %s from %s", "params and optimizer state" if want_opt else "params",
                     where)
        return restored["params"], restored.get("opt_state"), restored["meta"]
    raise FileNotFoundError(f"{workdir}: no readable checkpoint ({'; '.join(errors)})")


def save_imported(model, model_config, workdir: str, tokenizer: str | None = None):
    """Writes `model`'s params as step 0 of a run at `workdir`, for config.train.init_from;
    `tokenizer` (a path) is recorded as a training run records its own."""
    params = nnx.state(model, nnx.Param)
    model_json = dataclasses.asdict(ModelConfig.from_config(model_config))
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_handlers(False))
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": 0, "tokens_seen": 0, "imported": True,
                                "tokenizer": tokenizer or ""}),
        config=ocp.args.JsonSave(json.loads(json.dumps({"model": model_json}, default=_json_default)))))
    manager.wait_until_finished()
    manager.close()


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")
