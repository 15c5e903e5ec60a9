"""A long run never loses good work: the divergence guard, workdir identity and lock, kept-for-good
checkpoints across an interval change, and Ctrl-C. Tiny config on the demo corpus with the flags
of tests/test_train_resume.py; in-process `train.train_and_evaluate` runs, and `main.py`
subprocesses where exit codes and signals matter."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging

import train_testlib
from test_train_resume import FLAGS, losses, read_log, start, wait_for_step
from data_pipeline import loader
from ettin_jax import checkpoint, demo, divergence, model_loader, sharding, train
from ettin_jax import workdir as workdir_lib
from ettin_jax import workdir_lock

STEPS = 8
# Every 2nd save (steps 4, 8, ...) is kept for good; besides those, the newest 2.
RELIABILITY_FLAGS = FLAGS + ["--config.checkpoint.keep_every_nth=2", "--config.checkpoint.keep_last=2"]


def make_config(*extra, flags=RELIABILITY_FLAGS):
    return train_testlib.config_from_flags(list(flags) + list(extra))


def steps_with(steps: int) -> str:
    return f"--config.demo.schedule.total_tokens={steps * 8 * 64}"


def checkpoint_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def assert_every_checkpoint_finite(workdir, abstract_params):
    manager = checkpoint.read_only_manager(str(workdir))
    steps = checkpoint_steps(workdir)
    for step in steps:
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]
        assert divergence.params_finite(params), f"checkpoint {step} has non-finite params"
    manager.close()
    return steps


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """An 8-step run saved every 2 steps: checkpoints 4 (kept for good), 6, 8 (kept for good)."""
    workdir = tmp_path_factory.mktemp("reliability") / "good"
    train.train_and_evaluate(make_config(), str(workdir))
    assert checkpoint_steps(workdir) == [4, 6, 8]
    with open(workdir / checkpoint.KEPT_FOR_GOOD_NAME) as f:
        assert json.load(f)["steps"] == [4, 8]
    assert not (workdir / workdir_lock.LOCK_NAME).exists()      # released at exit
    return workdir, losses(workdir)


@pytest.fixture(scope="module")
def setup():
    config = demo.apply_demo(make_config())
    return config, train.make_setup(config, sharding.make_mesh(config.mesh))


def copy_run(good_run, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(good_run[0], workdir)
    return workdir


# --- 1. divergence -----------------------------------------------------------------------------

def test_skipped_step_leaves_state_bit_identical(setup):
    """A step whose loss is NaN (embeddings at 1e30: the norms overflow) or whose LR is
    infinite returns the state it got, bit for bit, and counts one skipped step; one whose
    new params' norm overflows (LR 1e30) keeps the params while the moments move on; a
    normal step changes the params and counts none."""
    config, s = setup
    host = next(loader.make_train_iterator(config))
    keys = train.losses.BATCH_KEYS[config.objective]
    batch = sharding.host_batch_to_global({k: host[k] for k in keys}, s.mesh, num_micro=1)

    def run_step(state, learning_rate):
        before = jax.tree.map(np.asarray, state)
        after, metrics = s.train_step(state, batch, learning_rate, 0)
        return before, jax.tree.map(np.asarray, after), metrics

    before, after, metrics = run_step(s.init_state(), 1e-3)
    assert float(metrics.skipped_steps.compute()) == 0.0
    assert np.isfinite(float(metrics.compute()["loss"]))
    assert not np.array_equal(before["params"]["tok_embeddings"][...],
                              after["params"]["tok_embeddings"][...])

    state = s.init_state()
    embeddings = state["params"]["tok_embeddings"]
    embeddings[...] = embeddings[...] * 1e30
    for state, learning_rate in ((state, 1e-3), (s.init_state(), float("inf"))):
        before, after, metrics = run_step(state, learning_rate)
        assert float(metrics.skipped_steps.compute()) == 1.0
        for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
            assert got.tobytes() == want.tobytes()

    before, after, metrics = run_step(s.init_state(), 1e30)
    assert float(metrics.skipped_steps.compute()) == 1.0
    for got, want in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
        assert got.tobytes() == want.tobytes()
    # The moments (not only the step count) took in the finite gradient.
    moved = {jax.tree_util.keystr(path) for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(after["opt_state"]),
        jax.tree.leaves(before["opt_state"])) if not np.array_equal(got, want)}
    assert any(".mu" in path for path in moved) and any(".nu" in path for path in moved), moved


def test_nan_run_exits_nonzero_naming_the_step(tmp_path, setup):
    """peak_lr=1e9: the loss turns NaN, three skipped steps in a row stop `main.py` with a
    non-zero exit naming the step; no checkpoint with non-finite params is ever written."""
    _, s = setup
    env = train_testlib.subprocess_env()
    workdir = tmp_path / "nan"
    process = start(workdir, env, *RELIABILITY_FLAGS[len(FLAGS):],
                    "--config.optimizer.peak_lr=1e9")
    assert process.wait(timeout=600) != 0
    log = read_log(workdir)
    # one `error:` line (main.py's runner), no traceback
    assert "\nerror: training diverged at step " in log and "Traceback" not in log, log[-3000:]
    first = int(log.split("training diverged at step ")[1].split(":")[0])
    assert "skipped (3 in a row" in log and f"step {first}: the loss" in log
    assert losses(workdir)[first] is None       # NaN at that step, written as JSON's null
    assert max(losses(workdir)) == first + 2                          # stopped at the third
    saved = assert_every_checkpoint_finite(workdir, s.abstract_state["params"])
    assert all(step < first for step in saved)
    assert f"Last good checkpoint (finite params): {workdir / 'checkpoints'}/{max(saved)}" in log
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


def test_resumed_good_run_then_nan_keeps_the_good_checkpoints(tmp_path, good_run, setup):
    _, s = setup
    workdir = copy_run(good_run, tmp_path)
    config = make_config(steps_with(16), "--config.optimizer.peak_lr=1e9",
                         "--config.train.allow_config_change=True")
    with pytest.raises(divergence.DivergenceError,
                       match=r"diverged at step \d+: .*Last good checkpoint .*checkpoints/8\b"):
        train.train_and_evaluate(config, str(workdir))
    saved = assert_every_checkpoint_finite(workdir, s.abstract_state["params"])
    assert {4, 6, 8} <= set(saved), saved


def test_a_skipped_last_step_still_saves_the_run(tmp_path, good_run, caplog):
    """The good run resumed for one more step at an infinite LR: step 9 is skipped (params
    kept) and is the last; the run saves it (the kept params) instead of ending unsaved."""
    workdir = copy_run(good_run, tmp_path)
    config = make_config(steps_with(9), "--config.optimizer.peak_lr=inf",
                         "--config.train.allow_config_change=True")
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, str(workdir))
    assert "step 9: " in caplog.text and "not saving step 9" not in caplog.text
    assert checkpoint_steps(workdir)[-1] == 9
    manager = checkpoint.read_only_manager(str(workdir))
    kept = [manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
            ["params"] for step in (8, 9)]
    manager.close()
    for a, b in zip(jax.tree.leaves(kept[0]), jax.tree.leaves(kept[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_spike_is_warned_naming_the_step(caplog):
    config = make_config()
    guard = divergence.DivergenceGuard(config, lambda: "none")
    with caplog.at_level(logging.WARNING):
        for step, loss in enumerate([6.0, 5.0, 4.0, 11.0, 16.0, float("nan"), 4.5], start=1):
            guard.check_loss(step, loss)
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    # mean(6, 5, 4) = 5: 11 < 15 passes; mean(6, 5, 4, 11) = 6.5: 16 < 19.5 passes too
    assert spikes == []
    guard.check_loss(8, 3.0 * float(np.mean(guard.recent_losses)) + 0.01)
    assert "loss spike at step 8" in caplog.records[-1].getMessage()


def test_reading_a_run_for_inference_leaves_no_orbax_warning_of_ours(good_run, caplog):
    """A training checkpoint also holds the data iterator's state. Readers (hf export,
    generate, GLUE) had not registered its handler, so Orbax warned that "data" could not be
    restored each time it listed the items, and warned of the read-only options it set itself.
    What stays is its one notice of a read-only manager."""
    with caplog.at_level(logging.logging.WARNING):
        loaded = model_loader.from_run(str(good_run[0]))
    assert loaded.meta["step"] == 8
    orbax = [r.getMessage() for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
    assert orbax and all(m.startswith("Given directory is read only") for m in orbax), orbax


# --- 2. workdir identity -----------------------------------------------------------------------

def test_identity_refuses_another_run_and_changed_settings(tmp_path, good_run):
    workdir = copy_run(good_run, tmp_path)
    metrics_before = file_bytes(workdir / "metrics.jsonl")
    clm = [f.replace("ettin_tiny.py:mlm", "ettin_tiny.py:clm") for f in RELIABILITY_FLAGS]
    with pytest.raises(workdir_lib.RunIdentityError) as refused:
        train.train_and_evaluate(make_config(flags=clm), str(workdir))
    message = str(refused.value)
    assert "objective: 'mlm' -> 'clm'" in message and "model.causal: False -> True" in message
    assert "new --workdir" in message

    with pytest.raises(workdir_lib.RunIdentityError,
                       match=r"optimizer\.peak_lr: 0\.003 -> 0\.001.*"
                             r"--config\.train\.allow_config_change=True"):
        train.train_and_evaluate(make_config("--config.optimizer.peak_lr=1e-3"), str(workdir))
    assert file_bytes(workdir / "metrics.jsonl") == metrics_before

    train.train_and_evaluate(make_config("--config.optimizer.peak_lr=1e-3",
                                         "--config.train.allow_config_change=True"), str(workdir))
    with open(workdir / workdir_lib.IDENTITY_NAME) as f:
        assert json.load(f)["settings"]["optimizer.peak_lr"] == 1e-3
    train.train_and_evaluate(make_config("--config.optimizer.peak_lr=1e-3"), str(workdir))

    os.remove(workdir / workdir_lib.IDENTITY_NAME)       # a workdir from before the record
    train.train_and_evaluate(make_config(), str(workdir))
    assert (workdir / workdir_lib.IDENTITY_NAME).exists()


def test_what_the_checkpoints_are_is_refused_even_with_allow_config_change(tmp_path):
    """The objective, the data mixture and the model are not settings: a re-run that changes
    one is refused, naming the key, with --config.train.allow_config_change=True too (it
    accepts changed settings only)."""
    config = demo.apply_demo(make_config())
    workdir_lib.check_identity(config, str(tmp_path))()           # the first start records
    for key, value in (("data.mixture", config.data.mixture + ":0.5"), ("model.num_layers", 2),
                       ("objective", "clm")):
        changed = config.copy_and_resolve_references()
        section, _, name = key.rpartition(".")
        setattr(changed[section] if section else changed, name, value)
        changed.train.allow_config_change = True
        with pytest.raises(workdir_lib.RunIdentityError, match=re.escape(key)):
            workdir_lib.check_identity(changed, str(tmp_path))


def test_a_first_start_refused_by_its_config_records_no_identity(tmp_path):
    """A bad value found when the model and optimizer are built leaves no run recorded, so the
    corrected command starts (it was refused as another run, model.num_heads: 5 -> 4)."""
    workdir = tmp_path / "w"
    for flag, message in (("--config.model.num_heads=5", "not a multiple of num_heads=5"),
                          ("--config.train.prng_impl=bogus", "config.train.prng_impl='bogus'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train.train_and_evaluate(make_config(flag), str(workdir))
        assert not os.path.exists(workdir / workdir_lib.IDENTITY_NAME)


def test_later_phase_needs_init_from_or_scratch(tmp_path):
    ext = [f.replace("ettin_tiny.py:mlm", "ettin_tiny.py:mlm_ext") for f in RELIABILITY_FLAGS]
    one_step = [steps_with(1), "--config.demo.train.eval_batches=0"]
    with pytest.raises(workdir_lib.RunIdentityError, match="--config.train.init_from=scratch"):
        train.train_and_evaluate(make_config(*one_step, flags=ext), str(tmp_path / "ext"))
    assert os.listdir(tmp_path / "ext") == []
    train.train_and_evaluate(make_config(*one_step, "--config.train.init_from=scratch", flags=ext),
                             str(tmp_path / "ext"))
    assert sorted(losses(tmp_path / "ext")) == [1]


# --- 3. the lock -------------------------------------------------------------------------------

def write_lock(workdir, pid):
    with open(workdir / workdir_lock.LOCK_NAME, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": pid, "since": "2026-01-01T00:00:00",
                   "command": "main.py"}, f)


HOLD_LOCK = """
import sys, time
from ettin_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(workdir):
    """A process holding `workdir`'s lock (until killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)],
                              env=train_testlib.subprocess_env(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_live_lock_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path, good_run, caplog):
    workdir = copy_run(good_run, tmp_path)
    metrics_before = file_bytes(workdir / "metrics.jsonl")
    holder = hold_lock(workdir)
    try:
        lock_before = file_bytes(workdir / workdir_lock.LOCK_NAME)
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=f"pid {holder.pid} on host {socket.gethostname()} since "):
            train.train_and_evaluate(make_config(), str(workdir))
        assert file_bytes(workdir / "metrics.jsonl") == metrics_before
        assert file_bytes(workdir / workdir_lock.LOCK_NAME) == lock_before
    finally:
        holder.kill()                                    # SIGKILL: its LOCK file stays behind
        holder.wait()
    assert file_bytes(workdir / workdir_lock.LOCK_NAME) == lock_before
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(make_config(), str(workdir))
    assert any("taking over the stale lock" in r.getMessage() and str(holder.pid) in r.getMessage()
               for r in caplog.records)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


def test_a_left_lock_naming_a_live_pid_is_taken_over(tmp_path):
    """A pid in a LOCK left behind can belong to another process by now (pids are reused, a
    restarted container's job is often pid 1 again): only a process holding the lock keeps it.
    A lock this process holds refuses a second taker in the same process."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        for pid in (stranger.pid, os.getpid()):
            write_lock(tmp_path, pid)
            lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
            taken = json.loads(file_bytes(tmp_path / workdir_lock.LOCK_NAME))
            assert taken["since"] != "2026-01-01T00:00:00" and taken["pid"] == os.getpid()
            with pytest.raises(workdir_lock.WorkdirLockedError,
                               match=f"pid {os.getpid()} on host.*another --workdir$"):
                workdir_lock.WorkdirLock(str(tmp_path)).acquire()
            lock.release()
            assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
    finally:
        stranger.kill()
        stranger.wait()


RACE_TO_LOCK = """
import os, sys, time
from ettin_jax import workdir_lock
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):             # start together
    time.sleep(0.001)
try:
    workdir_lock.WorkdirLock(sys.argv[1]).acquire()
except workdir_lock.WorkdirLockedError:
    print("refused", flush=True)
else:
    print("took", flush=True)
    time.sleep(3)                                  # hold it while the others try
"""


def test_of_several_takers_of_a_left_lock_exactly_one_wins(tmp_path):
    write_lock(tmp_path, 2**22 + 17)                # a pid no process has
    go = tmp_path / "go"
    takers = [subprocess.Popen([sys.executable, "-c", RACE_TO_LOCK, str(tmp_path), str(go)],
                               env=train_testlib.subprocess_env(), stdout=subprocess.PIPE,
                               text=True) for _ in range(3)]
    for taker in takers:
        assert taker.stdout.readline().strip() == "ready"
    go.touch()
    said = sorted(taker.communicate(timeout=120)[0].strip() for taker in takers)
    assert said == ["refused", "refused", "took"]


def test_without_file_locks_the_lock_is_a_pid_file(tmp_path, monkeypatch, caplog):
    """Filesystems without flock: an O_EXCL pid file, taken over when its pid is gone from
    this host or is this process's own pid while this process does not hold it."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(tmp_path, live.pid)
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=f"pid {live.pid} on host.*if no such process runs, delete"):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()
    for pid in (live.pid, os.getpid()):
        write_lock(tmp_path, pid)
        with caplog.at_level(logging.WARNING):
            lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
        assert any("has no file locks" in r.getMessage() for r in caplog.records)
        assert json.loads(file_bytes(tmp_path / workdir_lock.LOCK_NAME))["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
        lock.release()
        assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


# --- 4. kept for good --------------------------------------------------------------------------

def test_interval_change_keeps_the_kept_for_good_checkpoints(tmp_path, good_run):
    """Resumed with saves every 3 steps (kept for good: every 6th), Orbax's EveryNSteps would
    delete 4 and 8; the record keeps them. 6 goes (neither kept nor among the newest 2)."""
    workdir = copy_run(good_run, tmp_path)
    train.train_and_evaluate(make_config(steps_with(12), "--config.demo.checkpoint.every_steps=3",
                                         "--config.train.allow_config_change=True"), str(workdir))
    assert checkpoint_steps(workdir) == [4, 8, 9, 12]


# --- 5. Ctrl-C ---------------------------------------------------------------------------------

def test_sigint_saves_and_resumes_and_a_second_process_is_refused(tmp_path, good_run):
    """Ctrl-C: a checkpoint at the step it stopped, exit 0. While it runs, a second training
    process on the workdir fails at once naming it. Resumed, the losses are the good run's
    (a 40-step run: the LR of steps 1-8 does not depend on the total, still in warmup)."""
    _, reference = good_run
    env = train_testlib.subprocess_env()
    workdir = tmp_path / "interrupted"
    process = start(workdir, env, *RELIABILITY_FLAGS[len(FLAGS):], steps_with(40))
    wait_for_step(workdir, process, 2)
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {process.pid} on host"):
        train.train_and_evaluate(make_config(steps_with(40)), str(workdir))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 0, read_log(workdir)[-3000:]
    stopped = max(losses(workdir))
    assert stopped < 40, "the run ended before SIGINT arrived"
    assert f"stopped by SIGINT at step {stopped}" in read_log(workdir)
    assert stopped in checkpoint_steps(workdir)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with open(metrics_path) as f:
        lines_before = len(f.readlines())
    train.train_and_evaluate(make_config(steps_with(40)), str(workdir))
    with open(metrics_path) as f:   # resumed at the checkpoint: only the steps after it again
        resumed_steps = [json.loads(line)["step"] for line in f.readlines()[lines_before:]]
    assert resumed_steps == list(range(stopped + 1, 41))
    got = losses(workdir)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step


SIGNAL_PROBE = """
import os, signal, sys, time
from ettin_jax import stop_signals
# The handlers of an interactive Python (a test worker's subprocess may inherit SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
stop = stop_signals.StopOnSignal()
os.kill(os.getpid(), signal.SIG{name})
time.sleep(0.2)   # Python runs the handler between bytecodes; give it the chance
print("requested", stop.requested(), flush=True)
try:
    os.kill(os.getpid(), signal.SIG{name})
    time.sleep(5)
    print("survived a second SIG{name}", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_a_second_stop_signal_exits_without_waiting_for_the_step(name):
    """The first SIGTERM / Ctrl-C only asks for a save after the step; a process hung in a
    collective never gets there, so the second one must end it: SIGTERM's default action
    (killed by signal 15), Ctrl-C's KeyboardInterrupt."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_PROBE.format(name=name)],
                            env=train_testlib.subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert "requested True" in result.stdout, result.stderr[-2000:]
    assert "survived" not in result.stdout
    if name == "TERM":
        assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    else:
        assert "KeyboardInterrupt" in result.stdout and result.returncode == 3


def test_a_stop_signal_during_the_setup_ends_the_run_before_its_first_step(tmp_path, caplog):
    """SIGTERM while the run sets up (a demo build, compiling, a restore) is honoured at the
    next stage: no step is trained to be saved (it took the whole setup, then one step and a
    save), the LOCK is released, and the same command then starts the run."""
    import threading  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    config = train_testlib.config_from_flags(FLAGS)
    workdir = tmp_path / "run"

    def signal_once_locked():   # the handler is in place before the LOCK is taken
        while not (workdir / workdir_lock.LOCK_NAME).exists():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
    sender = threading.Thread(target=signal_once_locked)
    sender.start()
    with caplog.at_level(logging.WARNING):
        assert train.train_and_evaluate(config, str(workdir)) == {}
    sender.join()
    assert "stopped by SIGTERM before the first step: nothing was trained" in caplog.text
    assert not (workdir / workdir_lock.LOCK_NAME).exists()
    assert not checkpoint.saved_steps(str(workdir))
    assert not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text()


def stop_resume_and_read_metrics(config, workdir: str, *, stop_after: int) -> list[dict]:
    """Trains `config` in `workdir`, asks the loop to stop after step `stop_after`, resumes
    it to the end; returns metrics.jsonl's lines."""
    run = train.train_steps(config, workdir)
    progress = next(run)
    with pytest.raises(StopIteration):
        while True:
            progress = run.send("a test" if progress.stage == "step"
                                and progress.step == stop_after else None)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_stop_logs_the_steps_since_the_last_line(tmp_path, good_run, caplog):
    """Logging every 4 steps, a stop at step 3 writes steps 1-3's line (loss, fingerprints)
    before it saves: the resumed run logs from step 4 on, so no step's data goes unchecked
    (the good run's fingerprints, one line per step there). A config whose end lies before
    the checkpoint says so and trains nothing."""
    workdir = str(tmp_path / "run")
    config = make_config(steps_with(6), "--config.demo.log.every_steps=4")
    lines = stop_resume_and_read_metrics(config, workdir, stop_after=3)
    assert [(r["step"], len(r["data_fingerprints"])) for r in lines] == [(3, 3), (4, 1), (6, 2)]
    assert all(np.isfinite(r["loss"]) for r in lines)
    with open(os.path.join(good_run[0], "metrics.jsonl")) as f:
        good = [fp for line in f for fp in json.loads(line)["data_fingerprints"]]
    assert [fp for r in lines for fp in r["data_fingerprints"]] == good[:6]
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(make_config(steps_with(5), "--config.demo.log.every_steps=4",
                                             "--config.train.allow_config_change=True"), workdir)
    assert any("checkpoint of step 6 lies past this config's end, step 5" in r.getMessage()
               for r in caplog.records)

    # An eval at step 2 (every 2 steps, lines every 4) writes steps 1-2's train metrics with
    # it: a stop right after it left them unlogged (the eval line took the fingerprints).
    workdir = str(tmp_path / "evaluated")
    config = make_config(steps_with(4), "--config.demo.log.every_steps=4",
                         "--config.demo.train.eval_every_steps=2",
                         "--config.demo.train.eval_batches=1")
    lines = stop_resume_and_read_metrics(config, workdir, stop_after=2)
    assert [(r["step"], len(r["data_fingerprints"])) for r in lines] == [(2, 2), (4, 2)]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["eval_loss"]) for r in lines)


def test_a_demo_runs_bad_value_is_named_by_its_demo_key(tmp_path):
    """A demo run takes its schedule, batch and intervals from config.demo: an error names
    the config.demo key the user sets (config.schedule.total_tokens would be overwritten)."""
    with pytest.raises(ValueError, match=r"^config\.demo\.schedule\.total_tokens=0\.0: must be"):
        train.train_and_evaluate(make_config("--config.demo.schedule.total_tokens=0"),
                                 str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"^config\.demo\.log\.every_steps=0: must be >= 1"):
        train.train_and_evaluate(make_config("--config.demo.log.every_steps=0"),
                                 str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / workdir_lib.IDENTITY_NAME)


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(parent) == pid and state != "Z":
            found.append(int(name))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_data_workers_end_when_the_trainer_is_killed(tmp_path):
    """A trainer killed outright (SIGKILL, the OOM killer) cannot stop its Grain workers: they
    lived on for good, holding memory, shard files and its output pipe (a supervisor reading
    it through `| tee` never saw the end). They now end within seconds."""
    workdir = tmp_path / "run"
    process = start(workdir, train_testlib.subprocess_env(), "--config.demo.data.num_workers=2",
                    "--config.demo.schedule.total_tokens=2000000")
    try:
        wait_for_step(workdir, process, 1)
        workers = [pid for pid in _children(process.pid) if "spawn_main" in _cmdline(pid)]
        assert workers, read_log(workdir)[-2000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_cmdline(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if _cmdline(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"data workers left running 30 s after the trainer's SIGKILL: {left}"


# --- 6. a save that fails ----------------------------------------------------------------------

def test_a_failed_save_ends_the_run_at_the_next_log_line_naming_its_step(tmp_path):
    """An asynchronous save that fails (a full disk; here a file-size limit that the tiny
    model's checkpoint files pass and its logs do not) was noticed only at the next save, a
    checkpoint interval of training later, with Orbax's bare error. The run now ends at the
    next log line, exit 1, naming the step that was not saved."""
    # No compilation cache writes: a cut-off entry would be read by the tests after this one.
    env = dict(train_testlib.subprocess_env(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9")
    workdir = tmp_path / "full"
    limit = 50_000   # bytes per file; the checkpoint of step 10 writes larger ones
    # The limit is set in the child, which then becomes main.py: a preexec_fn would fork this
    # multithreaded (JAX) test process. Its output goes through a pipe: a log file would be cut
    # off by the limit too.
    limited_main = ("import os, resource, sys; "
                    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                    "os.execv(sys.executable, [sys.executable, 'main.py', *sys.argv[1:]])")
    result = subprocess.run(
        [sys.executable, "-c", limited_main, f"--workdir={workdir}", *FLAGS, steps_with(40),
         "--config.demo.checkpoint.every_steps=10"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
        capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "the checkpoint of step 10 could not be written" in errors[0], errors[0]
    assert "no checkpoint of this run is complete" in errors[0]
    last_logged = max(losses(workdir))
    assert 10 <= last_logged < 20, f"trained on to step {last_logged} after the failed save"
    assert checkpoint_steps(workdir) == []


def test_skips_count_in_a_row_only():
    """config.train.max_nonfinite_steps counts skipped steps in a row: a finite step between
    two short streaks starts the count again, and the error names the streak that reached the
    limit."""
    from ettin_jax.train_metrics import TrainMetrics  # pylint: disable=import-outside-toplevel
    config = make_config("--config.train.max_nonfinite_steps=3")
    guard = divergence.DivergenceGuard(config, lambda: "checkpoints/4")

    def metrics(skipped: bool):
        one = np.float32(1.0)
        return TrainMetrics.single_from_model_output(
            loss_sum=one, predictions=one, correct=one, grad_norm=one, param_norm=one,
            applied=np.float32(not skipped), skipped=np.float32(skipped), real_tokens=one,
            tokens=1)

    for step, skipped in enumerate([True, True, False, True, True, False, True, True],
                                   start=5):
        guard.observe(step, metrics(skipped))
    assert guard.total_skipped == 6 and guard.consecutive == 2
    with pytest.raises(divergence.DivergenceError, match="at steps 11-13 .3 in a row"):
        guard.observe(13, metrics(True))
