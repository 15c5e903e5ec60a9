"""What keeps a training workdir to one run: its lock and its recorded identity.

    WorkdirLock(workdir)               context manager: `<workdir>/LOCK` while a run writes there
    check_identity(config, workdir)    `<workdir>/run_identity.json`: refuses a different run
    check_init_from(config)            phases 2-3 and cross-objective runs name their start,
                                       a local init_from holds a run's checkpoints/ of the
                                       objective it continues

The lock is a JSON file {host, pid, since, command} that process 0 (the one that writes)
flock-s before anything is written; a second run fails at once naming the holder, and so do
the other processes of its run. The kernel drops a flock when its process ends: a LOCK left
behind is taken over with a warning. Without file locks it is a pid file (O_EXCL), taken
over when it names a pid gone from this host (or this one's, while this process lacks it).

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
import errno
import fcntl
import functools
import json
import os
import socket
import sys
from typing import Callable

import jax
from absl import logging

from data_pipeline import shards
from data_pipeline.fingerprint import OBJECTIVES
from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import cli
from ettin_jax import processes
from ettin_jax import step_tokens

LOCK_NAME = "LOCK"
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


class WorkdirLockedError(cli.UserError):
    """Another live process holds the workdir's LOCK."""


class RunIdentityError(ValueError):
    """The config is not the run the workdir holds (or a later phase names no start)."""


# --- the lock -----------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # someone else's process: alive
        pass
    return True


def _read_holder(path: str) -> dict | None:
    """The LOCK's JSON, {} when empty or unreadable, None when there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return None if isinstance(e, FileNotFoundError) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (the LOCK file is empty or unreadable)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
            f" ({holder.get('command', '')})")


def running_holder(workdir: str) -> str | None:
    """Its LOCK's holder, described, unless there is no LOCK or it names an ended process of
    this host. Takes no lock: a probe flock could make the holder's own restart fail."""
    holder = _read_holder(os.path.join(workdir, LOCK_NAME))
    pid = (holder or {}).get("pid")
    gone = holder and holder.get("host") == socket.gethostname() and isinstance(pid, int) \
        and not _pid_alive(pid)
    return None if holder is None or gone else _describe(holder)


class _NoFileLocks(Exception):
    """The workdir's filesystem does not support flock (some FUSE and Lustre mounts)."""


# errno values of flock on a filesystem without locks
_NO_LOCKS_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# LOCK files this process holds as pid files (filesystems without flock). A LOCK of this host
# naming this process's pid that is not among them was left by an earlier process that had the
# same pid (a restarted container's job is often pid 1 again): stale.
_HELD_HERE = set()


class WorkdirLock:
    """`<workdir>/LOCK`, held by process 0 from `acquire` (or `with`) until `release`.

    Where the filesystem has file locks, the LOCK is flock-ed: the kernel drops the lock when
    its process ends however it ends, so a LOCK file left behind is free to take and no pid
    is guessed at (a reused pid cannot keep a dead run's workdir locked, and two takers of a
    left-behind LOCK cannot both win). Elsewhere the LOCK is a pid file created with O_EXCL,
    taken over when its pid is gone from this host."""

    def __init__(self, workdir: str):
        self.path = os.path.abspath(os.path.join(workdir, LOCK_NAME))
        self.record = None             # what we wrote, while we hold it
        self.fd = None                 # the flock-ed LOCK, while we hold it

    def _new_record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}

    def _locked_error(self, holder: dict, *, pid_file: bool = False) -> WorkdirLockedError:
        # A flock is held by a live process for sure; a pid file may name a reused pid.
        hint = f"; if no such process runs, delete {self.path}" if pid_file else ""
        return WorkdirLockedError(
            f"{os.path.dirname(self.path)} is in use by another training process: "
            f"{_describe(holder)}. Wait for it to end or stop it, or pass another "
            f"--workdir{hint}")

    def acquire(self) -> "WorkdirLock":
        # Multi-process runs: process 0 writes, so it locks; the others learn its outcome.
        error = None
        if jax.process_index() == 0:
            try:
                try:
                    self._acquire_flock()
                except _NoFileLocks as e:
                    logging.warning("%s: the filesystem has no file locks (%s); using a pid "
                                    "file, which a run on another host cannot check", self.path, e)
                    self._acquire_pid_file()
            except (WorkdirLockedError, OSError) as e:
                error = e
        processes.raise_with_process0(error, lambda: WorkdirLockedError(
            f"{os.path.dirname(self.path)}: process 0 could not lock it (its error says why)"))
        return self

    def _acquire_flock(self):
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._locked_error(_read_holder(self.path) or {}) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_LOCKS_ERRNOS:
                    raise _NoFileLocks(os.strerror(e.errno)) from e
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:          # its holder released (removed) it between open and flock
                os.close(fd)
                continue
            with open(fd, encoding="utf-8", closefd=False) as f:
                left = f.read().strip()
            if left:
                try:
                    holder = json.loads(left)
                except ValueError:
                    holder = {}
                logging.warning("taking over the stale lock %s of %s: no process holds it",
                                self.path, _describe(holder))
            self.record = self._new_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.record).encode("utf-8"), 0)
            self.fd = fd
            return
        raise WorkdirLockedError(f"{self.path}: could not take the lock (other processes keep "
                                 "taking and releasing it)")

    def _acquire_pid_file(self):
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:     # released meanwhile
                    continue
                if attempt == 0 and self._stale(holder):
                    logging.warning("taking over the stale lock %s of %s: that process is gone",
                                    self.path, _describe(holder))
                    # Narrow the race with a second taker-over: remove only the lock we read.
                    if _read_holder(self.path) == holder:
                        os.unlink(self.path)
                    continue
                raise self._locked_error(holder, pid_file=True) from None
            self.record = self._new_record()
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
            _HELD_HERE.add(self.path)
            return
        raise WorkdirLockedError(f"{self.path}: could not take the lock (another process took "
                                 f"it first: {_describe(_read_holder(self.path) or {})})")

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        if holder["pid"] == os.getpid():
            return self.path not in _HELD_HERE
        return not _pid_alive(holder["pid"])

    def release(self):
        if self.record is None:
            return
        if self.fd is not None:
            # Removed while still held: a taker that opened it meanwhile sees it gone once it
            # gets the flock, and opens a new one.
            try:
                os.unlink(self.path)
            except FileNotFoundError:     # deleted by hand while held: nothing to remove
                pass
            os.close(self.fd)
            self.fd = None
        elif _read_holder(self.path) == self.record:   # never remove a lock another took over
            os.unlink(self.path)
        _HELD_HERE.discard(self.path)
        self.record = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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


def check_init_from(config):
    """A later phase or cross-objective run must start from another run, or say "scratch"; a
    local init_from must hold a run's checkpoints (given a pair's workdir, the error names the
    side to continue). Raises RunIdentityError. Imports no backend: main.py calls it first."""
    if config.phase in PHASES_WITH_A_SOURCE and not config.train.init_from:
        raise RunIdentityError(
            f"a {config.objective} {config.phase} run continues another run: set "
            "--config.train.init_from=<workdir of the previous run>, or "
            f"--config.train.init_from={SCRATCH} to start it from a random initialisation")
    source = init_source(config)
    if not source or cli.is_remote(source):
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


def check_source_tokenizer(config, tokenizer: str):
    """The tokenizer this run reads its data with (a path) must give the token ids the run it
    continues was trained with (the tokenizer its newest checkpoint records, compared by
    fingerprint): another one trained on silently, its ids meaning other strings. Skipped
    where either cannot be read (a hub name offline, a moved file)."""
    source = init_source(config)
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
