"""Paired encoder/decoder runs (ettin_jax.pairs) on the tiny config and the demo corpus: the two
sides see the same rows at every step, a SIGKILLed pair resumes both sides at their common saved
step and ends with the losses of an uninterrupted pair, separately started runs of one data
config match fingerprints (and the pair's losses), another data seed is named by the compare."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

import train_testlib
from configs import base, ettin_tiny
from ettin_jax import compare, pairs, sharding, train, train_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
# The values of tests/test_train_resume.py's FLAGS: the compiled steps are shared.
OVERRIDES = {
    "demo.data.num_workers": 0,
    "demo.train.global_batch_size": 8,
    "demo.train.seq_len": 64,
    "demo.schedule.total_tokens": STEPS * 8 * 64,
    "demo.log.every_steps": 1,
    "demo.train.eval_every_steps": 1000,
    "demo.checkpoint.every_steps": 2,
    "demo.train.eval_batches": 1,
    "train.xla_options": "xla_backend_optimization_level=0",
}
PAIR_FLAGS = ["--config=configs/ettin_tiny.py:mlm+clm",
              *(f"--config.{key}={value}" for key, value in OVERRIDES.items())]


def single_config(run, **extra):
    config = ettin_tiny.get_config(run)
    config.update_from_flattened_dict(dict(OVERRIDES, **extra))
    return config


def records(run_dir):
    """step -> the last logged record of that step (a resumed run logs some steps again)."""
    return {r["step"]: r for r in compare.read_metrics(os.path.join(run_dir, "metrics.jsonl"))[0]}


def fingerprints(run_dir):
    return compare.read_metrics(os.path.join(run_dir, "metrics.jsonl"))[1]


def assert_same_losses(run_dir, reference_dir, steps=STEPS):
    got, want = records(run_dir), records(reference_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), (run_dir, step)


SAVE_SECONDS = 1000.0   # what each checkpoint save of the reference pair takes, on its clock


class _SaveClock:
    """time.time() for ettin_jax.train_metrics, plus SAVE_SECONDS for each save so far: a
    slow (large model's) save, without the wait."""
    offset = 0.0

    @staticmethod
    def time():
        return time.time() + _SaveClock.offset


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted pair, in this process: main.py's path after its flag parsing. Each save
    takes SAVE_SECONDS on the throughput's clock, which no step's throughput may count."""
    workdir = tmp_path_factory.mktemp("runs") / "pair"
    configs = pairs.side_configs(ettin_tiny.get_config, base.split_pair("mlm+clm"), OVERRIDES)
    real_save = train._save

    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)
        _SaveClock.offset += SAVE_SECONDS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "_save", slow_save)
        patch.setattr(train_metrics, "time", _SaveClock)
        metrics = pairs.train_pair(configs, str(workdir))
    assert set(metrics) == {"mlm", "clm"}
    return workdir


def test_throughput_leaves_out_both_sides_saves(reference):
    """From step 3 on every window of either side holds a save (its own or the other side's,
    which runs inside it): the shared pause clock leaves them out. Without it each such window
    would last over SAVE_SECONDS, at most 1 / SAVE_SECONDS steps per second."""
    for side in ("mlm", "clm"):
        rates = {step: r["steps_per_sec"] for step, r in records(reference / side).items()}
        assert sorted(rates) == list(range(1, STEPS + 1))
        assert min(rates.values()) > 10 / SAVE_SECONDS, (side, rates)


def test_a_stop_signal_during_the_setup_ends_the_pair_before_its_first_step(tmp_path, caplog):
    """SIGTERM while the sides set up is honoured before the first step, with nothing saved."""
    import threading  # pylint: disable=import-outside-toplevel
    workdir = tmp_path / "pair"
    configs = pairs.side_configs(ettin_tiny.get_config, base.split_pair("mlm+clm"), OVERRIDES)

    def signal_once_locked():   # the handler is in place before the first LOCK is taken
        while not (workdir / "mlm" / "LOCK").exists():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
    sender = threading.Thread(target=signal_once_locked)
    sender.start()
    with caplog.at_level("WARNING"):
        assert pairs.train_pair(configs, str(workdir)) == {}
    sender.join()
    assert "pair: stopped by SIGTERM before the first step: nothing was trained" in caplog.text
    for side in ("mlm", "clm"):
        assert not committed_steps(workdir / side) and not (workdir / side / "LOCK").exists()


def test_both_sides_of_a_pair_see_the_same_rows_at_every_step(reference, tmp_path, capsys):
    mlm, clm = reference / "mlm", reference / "clm"
    for side, objective in ((mlm, "mlm"), (clm, "clm")):
        with open(side / "config.json") as f:
            assert json.load(f)["objective"] == objective
    assert sorted(fingerprints(mlm)) == list(range(1, STEPS + 1))
    assert fingerprints(mlm) == fingerprints(clm)
    assert len(set(fingerprints(mlm).values())) == STEPS           # every step other rows
    assert records(mlm)[STEPS]["loss"] != records(clm)[STEPS]["loss"]   # two objectives
    assert compare.compare([str(mlm), str(clm)], str(tmp_path / "report")) == 0
    assert f"identical data: {STEPS} steps matched" in capsys.readouterr().out


def committed_steps(side):
    directory = os.path.join(side, "checkpoints")
    return {int(n) for n in os.listdir(directory) if n.isdigit()} if os.path.isdir(directory) else set()


def test_sigkilled_pair_resumes_both_sides_at_their_common_step(reference, tmp_path):
    """main.py on `mlm+clm`, SIGKILLed once a random step is logged; the kill is made to land
    between the sides' saves (the clm side's newest checkpoint is removed) when it did not."""
    kill_after = random.Random().randint(2, 5)
    print(f"SIGKILL once step {kill_after} is logged")
    workdir = tmp_path / "pair"
    log_path = str(workdir) + ".log"
    env = train_testlib.subprocess_env()

    def start():
        with open(log_path, "a") as log:
            return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *PAIR_FLAGS],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    process = start()
    deadline = time.time() + 300
    while not (os.path.exists(workdir / "clm" / "metrics.jsonl") and records(workdir / "clm")
               and max(records(workdir / "clm")) >= kill_after
               and committed_steps(workdir / "mlm") and committed_steps(workdir / "clm")):
        assert process.poll() is None, "the pair ended before it was killed"
        assert time.time() < deadline, "no step logged in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    mlm_steps, clm_steps = committed_steps(workdir / "mlm"), committed_steps(workdir / "clm")
    if max(clm_steps) == max(mlm_steps):
        shutil.rmtree(workdir / "clm" / "checkpoints" / str(max(clm_steps)))
        clm_steps.discard(max(clm_steps))
    common = max(mlm_steps & clm_steps, default=0)
    ahead = sorted(s for s in mlm_steps if s > common)
    assert ahead

    process = start()
    assert process.wait(timeout=600) == 0
    with open(log_path) as f:
        log = f.read()
    for step in ahead:
        assert f"deleting {workdir / 'mlm' / 'checkpoints'}/{step}: newer than step {common}" in log
    assert log.count(f"pair done; compare its sides (identical data, losses, charts): python -m "
                     f"ettin_jax.compare {workdir} --out={workdir / 'report'}") == 1   # not killed
    for side in ("mlm", "clm"):
        if common:
            assert f"resumed from {workdir / side / 'checkpoints'}/{common}" in log
        assert_same_losses(workdir / side, reference / side)
        assert fingerprints(workdir / side) == fingerprints(reference / side)


def test_separate_runs_of_one_data_config_match_and_another_seed_is_named(reference, tmp_path,
                                                                            capsys):
    """Two single runs (no pair) of the pair's first steps (the demo's pre-training LR depends
    on the tokens seen only: warmup, no decay): the same fingerprints, and the losses of the pair's sides (lockstep changes
    nothing); a run with another data seed differs from its first step."""
    steps = STEPS // 2
    for objective in ("mlm", "clm"):
        config = single_config(objective, **{"demo.schedule.total_tokens": steps * 8 * 64})
        train.train_and_evaluate(config, str(tmp_path / objective))
        assert_same_losses(tmp_path / objective, reference / objective, steps)
    assert fingerprints(tmp_path / "mlm") == fingerprints(tmp_path / "clm") == {
        step: fp for step, fp in fingerprints(reference / "mlm").items() if step <= steps}
    assert compare.compare([str(tmp_path / "mlm"), str(tmp_path / "clm")],
                           str(tmp_path / "report")) == 0
    train.train_and_evaluate(single_config("clm", **{"data.seed": base.DATA_SEED + 1,
                                                     "demo.schedule.total_tokens": 3 * 8 * 64}),
                             str(tmp_path / "clm_seed"))
    capsys.readouterr()
    assert compare.compare([str(tmp_path / "mlm"), str(tmp_path / "clm_seed")],
                           str(tmp_path / "report_seed")) == 1
    out = capsys.readouterr().out
    assert "mlm vs clm_seed: data differs at step 1 " in out, out
    assert "3 of 3 steps differ" in out


def test_sides_that_do_not_share_the_data_config_stop_before_training(tmp_path):
    configs = pairs.side_configs(ettin_tiny.get_config, ["mlm", "clm"], OVERRIDES)
    configs[1].data.seed = base.DATA_SEED + 1
    with pytest.raises(pairs.PairError, match=r"config.data differs .* clm: .*'seed': 22"):
        pairs.train_pair(configs, str(tmp_path / "pair"))
    assert not committed_steps(tmp_path / "pair" / "mlm")
    # Saves at other steps would leave the sides no step to resume at together.
    configs = pairs.side_configs(ettin_tiny.get_config, ["mlm", "clm"], OVERRIDES)
    pairs.check_shared(configs, [8, 8])
    configs[1].checkpoint.every_steps += 1
    with pytest.raises(pairs.PairError, match=r"config.checkpoint.every_steps differs"):
        pairs.check_shared(configs, [8, 8])


def test_sides_whose_rows_differ_at_a_step_stop_there():
    """The loaders of both sides make the same rows (the shared keys); should they not (a
    loader bug), the pair stops at the first step whose data fingerprints differ."""
    names = ("mlm", "clm")
    same = [train.Progress("step", step=3, fingerprint="ab12") for _ in names]
    pairs._check_step(names, same)  # pylint: disable=protected-access
    other = [same[0], train.Progress("step", step=3, fingerprint="cd34")]
    with pytest.raises(pairs.PairError, match=r"the data of step 3 differs between the sides "
                                              r"\(mlm ab12, clm cd34\)"):
        pairs._check_step(names, other)  # pylint: disable=protected-access


def test_a_pair_keeps_two_checkpoints_and_never_deletes_both_sides(reference, tmp_path):
    """With one checkpoint per side, a kill between the sides' saves can leave them no step
    in common; a pair needs keep_last >= 2, and sides found that way stop with an error
    instead of resuming at step 0 (which deletes every checkpoint of both)."""
    with pytest.raises(pairs.PairError, match="config.checkpoint.keep_last=1: a pair keeps"):
        pairs.side_configs(ettin_tiny.get_config, ["mlm", "clm"],
                           dict(OVERRIDES, **{"checkpoint.keep_last": 1}))
    workdir = tmp_path / "pair"
    shutil.copytree(reference, workdir)
    mlm, clm = sorted(committed_steps(workdir / "mlm")), sorted(committed_steps(workdir / "clm"))
    assert mlm == clm and len(mlm) >= 2
    for step in mlm[1:]:
        shutil.rmtree(workdir / "mlm" / "checkpoints" / str(step))
    shutil.rmtree(workdir / "clm" / "checkpoints" / str(mlm[0]))
    configs = pairs.side_configs(ettin_tiny.get_config, ["mlm", "clm"], OVERRIDES)
    with pytest.raises(pairs.PairError, match=r"no checkpoint step in common .*nothing was "
                                              "deleted"):
        pairs.train_pair(configs, str(workdir))
    assert sorted(committed_steps(workdir / "mlm")) == mlm[:1]
    assert sorted(committed_steps(workdir / "clm")) == clm[1:]


def test_init_from_names_the_previous_pair(tmp_path):
    previous = tmp_path / "pair"
    for side in ("mlm", "clm"):
        os.makedirs(previous / side / "checkpoints")
    ext = pairs.side_configs(ettin_tiny.get_config, base.split_pair("mlm_ext+clm_ext"),
                             {"train.init_from": str(previous)})
    assert [c.train.init_from for c in ext] == [str(previous / "mlm"), str(previous / "clm")]
    assert [c.pair for c in ext] == ["", ""]
    cross = pairs.side_configs(ettin_tiny.get_config, base.split_pair("mlm_from_clm+clm_from_mlm"),
                               {"train.init_from": str(previous)})
    assert [c.train.init_from for c in cross] == [str(previous / "clm"), str(previous / "mlm")]
    scratch = pairs.side_configs(ettin_tiny.get_config, base.split_pair("mlm_ext+clm_ext"),
                                 {"train.init_from": "scratch"})   # random weights on purpose
    assert [c.train.init_from for c in scratch] == ["scratch", "scratch"]
    with pytest.raises(pairs.PairError, match="single run's workdir"):
        pairs.side_configs(ettin_tiny.get_config, ["mlm_ext", "clm_ext"],
                           {"train.init_from": str(previous / "mlm")})
    with pytest.raises(pairs.PairError, match="--config.train.nope"):
        pairs.side_configs(ettin_tiny.get_config, ["mlm", "clm"], {"train.nope": 1})
    # A plan of the next phase before the previous pair exists names its sides; a run refuses.
    later = tmp_path / "later"
    planned = pairs.side_configs(ettin_tiny.get_config, ["mlm_ext", "clm_ext"],
                                 {"train.init_from": str(later)}, planning=True)
    assert [c.train.init_from for c in planned] == [str(later / "mlm"), str(later / "clm")]
    with pytest.raises(pairs.PairError, match=r"which holds mlm/; no .*later/mlm"):
        pairs.side_configs(ettin_tiny.get_config, ["mlm_ext", "clm_ext"],
                           {"train.init_from": str(later)})


def test_state_bytes_per_device_and_the_memory_check():
    """The layout's bytes per device equal the bytes a device holds once the state exists; a
    device smaller than two states is an error that names the remedies."""
    config = single_config("mlm")
    setup = train.make_setup(config, sharding.make_mesh(config.mesh))
    state = setup.init_state()
    device = jax.devices()[0]
    held = sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
               for shard in leaf.addressable_shards if shard.device == device)
    per_device = pairs.state_bytes_per_device(setup.abstract_state)
    assert per_device == held
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert total / jax.device_count() <= per_device < total      # sharded, some replicated
    sides = {"mlm": per_device, "clm": per_device}
    pairs.check_fits(sides, 2 * per_device, config.mesh)
    pairs.check_fits(sides, None, config.mesh)
    with pytest.raises(pairs.PairError, match=r"config.mesh .*fsdp.*moments_dtype=bfloat16"):
        pairs.check_fits(sides, 2 * per_device - 1, config.mesh)
