"""Resume, SIGTERM and damaged-checkpoint fallback of `python main.py`, as subprocesses on the
tiny config and the demo corpus. Every run is compared with one uninterrupted run: the loss of
every step after a restart must match it to 1e-6 (same batches, same masks, same dropout)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_testlib
from test_data_prepare import dir_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
FLAGS = [
    "--config=configs/ettin_tiny.py:mlm",
    "--config.demo.data.num_workers=0",
    "--config.demo.train.global_batch_size=8",
    "--config.demo.train.seq_len=64",
    f"--config.demo.schedule.total_tokens={STEPS * 8 * 64}",
    "--config.demo.log.every_steps=1",
    "--config.demo.train.eval_every_steps=1000",
    "--config.demo.checkpoint.every_steps=2",
    "--config.demo.train.eval_batches=1",
    "--config.train.xla_options=xla_backend_optimization_level=0",
]


@pytest.fixture(scope="module")
def env():
    return train_testlib.subprocess_env()


def start(workdir, env, *extra):
    with open(os.path.join(str(workdir) + ".log"), "a") as log:   # the child keeps its own fd
        return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *FLAGS, *extra],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(workdir, env, *extra):
    process = start(workdir, env, *extra)
    assert process.wait(timeout=600) == 0, read_log(workdir)[-3000:]


def read_log(workdir):
    with open(str(workdir) + ".log") as f:
        return f.read()


def losses(workdir):
    """step -> loss of the last record of each step (a resumed run logs some steps twice)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            out[record["step"]] = record["loss"]
    return out


def wait_for_step(workdir, process, step, timeout=600):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended (rc {process.returncode}) before step {step}")
        if os.path.exists(path) and losses(workdir) and max(losses(workdir)) >= step:
            return max(losses(workdir))
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def committed_steps(workdir):
    """Steps of the finished checkpoints (Orbax writes `<step>.orbax-checkpoint-tmp-*` first)."""
    directory = os.path.join(workdir, "checkpoints")
    return [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []


def assert_same_losses(workdir, reference):
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    finish(workdir, env)
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]                      # it learns
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert {"eval_loss", "eval_accuracy", "tokens_per_sec", "learning_rate", "grad_norm",
            "param_norm", "packing_efficiency", "batch_size", "tokens_seen"} <= set(last)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    return workdir, ref


def test_sigkill_at_a_random_step_then_sigterm_then_finish(tmp_path, env, reference):
    """One run, stopped twice: SIGKILL once a random step is logged (no chance to save), then,
    restarted, SIGTERM (it saves at the step it is at and exits 0), then restarted to the end."""
    _, ref = reference
    kill_after = random.Random().randint(2, 4)
    print(f"SIGKILL once step {kill_after} is logged")
    workdir = tmp_path / "interrupted"
    process = start(workdir, env)
    wait_for_step(workdir, process, kill_after)
    while not committed_steps(workdir):           # so that there is something to resume from
        assert process.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(losses(workdir))
    resume_from = max(committed_steps(workdir))
    assert resume_from < STEPS

    process = start(workdir, env)
    wait_for_step(workdir, process, killed_at + 1)
    assert f"resumed from {workdir / 'checkpoints'}/{resume_from}" in read_log(workdir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0, read_log(workdir)[-3000:]
    stopped = max(losses(workdir))
    assert stopped < STEPS, "the run ended before SIGTERM arrived"
    assert str(stopped) in os.listdir(workdir / "checkpoints")  # saved at the step it stopped
    assert f"stopped by SIGTERM at step {stopped}" in read_log(workdir)

    finish(workdir, env)
    assert f"resumed from {workdir / 'checkpoints'}/{stopped}" in read_log(workdir)
    assert_same_losses(workdir, ref)
    # The closing line tells the run's totals from what this last process trained.
    rows, seq = 8, 64
    assert (f"done: step {STEPS}, {STEPS * rows * seq:,} tokens; this process trained steps "
            f"{stopped + 1}-{STEPS} ({(STEPS - stopped) * rows * seq:,} tokens) in ") \
        in read_log(workdir)


def test_rerun_of_a_finished_run_trains_nothing_and_says_so(tmp_path, env, reference):
    """The same command on a finished workdir exits 0, logs no step, and says the run is done
    instead of reporting a loss it does not have."""
    finished, _ = reference
    workdir = tmp_path / "finished"
    shutil.copytree(finished, workdir)
    before = dir_digest(workdir)
    finish(workdir, env)
    after = dir_digest(workdir)
    assert sorted(after) == sorted(before)       # e.g. no new (empty) TensorBoard events file
    assert after == before
    log = read_log(workdir)
    assert f"nothing to train: the run already reached step {STEPS} of {STEPS}" in log
    assert " nan" not in log
    assert "train step compiled" not in log     # no step to run, so none compiled
    assert "read only" not in log               # Orbax's notice is for tools reading a run
