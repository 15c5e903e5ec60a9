"""What keeps a training workdir to one writer at a time: `<workdir>/LOCK`.

    WorkdirLock(workdir)      context manager: the LOCK while a run writes there
    running_holder(workdir)   who may still be training there (read only, takes no lock)

The lock is a JSON file {host, pid, since, command} that process 0 (the one that writes)
flock-s before anything is written; a second run fails at once naming the holder, and so do
the other processes of its run. The kernel drops a flock when its process ends: a LOCK left
behind is taken over with a warning. Without file locks it is a pid file (O_EXCL), taken
over when it names a pid gone from this host (or this one's, while this process lacks it).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

import jax
from absl import logging

from ettin_jax import cli
from ettin_jax import processes

LOCK_NAME = "LOCK"


class WorkdirLockedError(cli.UserError):
    """Another live process holds the workdir's LOCK."""


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
            except Exception as e:  # pylint: disable=broad-except  # told to the others first
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
            with cli.naming_file(self.path):
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
            with cli.naming_file(self.path), os.fdopen(fd, "w", encoding="utf-8") as f:
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
