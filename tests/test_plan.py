"""The run plan (`main.py --dry_run`, ettin_jax.plan) and the tokens-per-step figure a run
stores (ettin_jax.step_tokens): at the recipe's scale on MDS data of known sequence lengths,
against 4608 x their mean computed here with numpy (recipe §3.2.1); the dry run writes nothing;
a short real run logs the plan's tokens per step, and a resume keeps the stored figure when the
data directory changed."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_testlib
from configs import ettin_150m, ettin_tiny
from data_pipeline import tokenizer
from ettin_jax import plan as plan_lib
from ettin_jax import schedules, step_tokens, train
from test_data_formats import write_mds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def main(): return 0", "The capital of France is Paris.", "x = [i for i in y]"] * 20
JSON_KEYS = {"size", "objective", "phase", "seq_len", "rows_per_step", "tokens_per_step",
             "mean_sequence_length", "total_tokens", "total_steps", "global_rope_theta",
             "local_rope_theta", "data_seed", "peak_lr", "checkpoint_every_tokens"}


def make_tokenizer(directory, *, vocab_size, unk_id):
    return tokenizer.save(tokenizer.train_bpe(TEXTS, vocab_size=vocab_size, unk_id=unk_id),
                          str(directory))


def framed_mean(body_lengths, seq_len):
    """Hand rule: the loader adds [CLS]/[SEP] and cuts a document into ceil(n / seq_len) pieces."""
    n = np.asarray(body_lengths) + 2
    return n.sum() / np.ceil(n / seq_len).sum()


def dry_run(workdir, *flags):
    result = subprocess.run(
        [sys.executable, "main.py", f"--workdir={workdir}", *flags, "--dry_run"], cwd=ROOT,
        env=train_testlib.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


@pytest.mark.parametrize("arg,seq_len", [("mlm", 1024), ("mlm_ext", 8192)])
def test_dry_run_at_scale_carries_4608_sequences_of_the_data(tmp_path, arg, seq_len):
    rng = np.random.default_rng(seq_len)
    # web-like lengths, a tail longer than seq_len (split by the loader)
    sizes = rng.lognormal(np.log(seq_len / 3), 1.0, 300).astype(int) + 1
    write_mds(tmp_path / "mds", [rng.integers(0, 50000, n) for n in sizes], per_shard=100)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=50368, unk_id=50280)
    workdir = tmp_path / "run"
    if arg == "mlm":
        workdir.mkdir()                       # an existing, empty workdir stays empty
    lines = dry_run(workdir, f"--config=configs/ettin_150m.py:{arg}",
                    f"--config.data.mixture={tmp_path / 'mds'}", f"--config.data.tokenizer={tok}",
                    "--config.data.eval_documents=0", "--config.log.tokens_per_sec_estimate=1e6",
                    "--config.train.init_from=" + ("" if arg == "mlm" else str(tmp_path / "p1")))
    plan = json.loads(lines[-1])
    assert JSON_KEYS | {"mask_ratio"} <= set(plan)
    assert (os.listdir(workdir) == []) if arg == "mlm" else not workdir.exists()

    known = framed_mean(sizes, seq_len)
    assert plan["mean_sequence_length"] == pytest.approx(known, rel=1e-9)
    assert plan["seq_len"] == seq_len and plan["num_devices"] == 4
    accum = plan["grad_accum_steps"]                           # auto: the fewest that fit
    assert plan["rows_per_step"] % (accum * 4) == 0           # whole micro batches on 4 devices
    assert plan["micro_rows_per_device"] == plan["rows_per_step"] // (accum * 4) \
        <= plan["max_micro_rows"]
    assert plan["tokens_per_step"] == plan["rows_per_step"] * seq_len
    # 4608 sequences' rows, rounded to whole micro batches on the 4 devices
    assert abs(plan["rows_per_step"] - 4608 * known / seq_len) <= accum * 4 / 2
    assert plan["tokens_per_step"] < 4608 * seq_len          # not 4608 full rows
    assert plan["checkpoint_every_steps"] == math.ceil(8.5e9 / plan["tokens_per_step"])
    # 150m by hand: embeddings, 22 layers (layer 0 without attention norm), final norm,
    # head dense + norm, decoder bias (tied weights counted once)
    V, H, I, L = 50368, 768, 1152, 22
    assert plan["num_params"] == V * H + H + L * (4 * H * H + 3 * H * I + 2 * H) - H + H \
        + H * H + H + V
    assert plan["estimated_wall_seconds"] == pytest.approx(plan["total_tokens"] / 1e6)
    assert plan["mask_ratio"] == 0.3 and plan["data_seed"] == 21
    if arg == "mlm":   # 1.7T tokens; the LR warms up from ~0 and holds 8e-4; 50B batch warmup
        assert plan["total_tokens"] == 1.7e12 and plan["global_rope_theta"] == 10_000
        assert plan["lr_start"] == pytest.approx(8e-14) and plan["lr_end"] == pytest.approx(8e-4)
        assert plan["first_step_rows"] == plan["rows_per_step"] // accum * math.ceil(accum / 8)
        assert plan["batch_warmup_steps"] > 0
        assert plan["restore"] == {"from": "fresh"}
    else:              # 250B tokens of full steps; 1-sqrt from 8e-4 to 4e-4; RoPE 160k/160k
        assert plan["total_steps"] == math.ceil(2.5e11 / plan["tokens_per_step"])
        assert (plan["global_rope_theta"], plan["local_rope_theta"]) == (160_000, 160_000)
        assert (plan["lr_start"], plan["lr_end"]) == pytest.approx((8e-4, 4e-4))
        assert plan["restore"]["from"] == "init_from" and plan["restore"]["step"] is None
        assert any("NO checkpoint" in line for line in lines[:-1])   # said, not fatal


def tiny_data_config(mixture, tok, *, steps, rows=8):
    config = ettin_tiny.get_config("mlm")
    config.data.mixture, config.data.tokenizer = str(mixture), str(tok)
    config.data.num_workers, config.data.eval_documents = 0, 0
    config.train.seq_len, config.train.global_batch_size = 64, 16
    config.train.eval_batches = 0
    config.train.xla_options = "xla_backend_optimization_level=0"
    config.schedule.total_tokens = steps * rows * 64
    config.log.every_steps, config.checkpoint.every_steps = 1, 2
    return config


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_a_run_logs_the_plans_tokens_per_step_and_a_resume_keeps_the_stored_figure(tmp_path):
    rng = np.random.default_rng(0)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=512, unk_id=500)
    # 16 sequences of mean ~32 tokens -> 8 rows of 64 on 4 devices; the longer data -> 16 rows
    write_mds(tmp_path / "short", [rng.integers(0, 500, n) for n in rng.integers(20, 41, 200)])
    long_docs = [rng.integers(0, 500, n) for n in rng.integers(50, 61, 200)]
    workdir = tmp_path / "run"
    config = tiny_data_config(tmp_path / "short", tok, steps=4)
    plan = plan_lib.make_plan(config, str(workdir))
    assert not workdir.exists() and not plan["figure_stored"]
    assert plan["rows_per_step"] == 8 and plan["total_steps"] == 4

    train.train_and_evaluate(config, str(workdir))
    records = logged(workdir)
    assert sorted(records) == [1, 2, 3, 4]
    assert {r["batch_size"] for r in records.values()} == {plan["rows_per_step"]}
    assert {r["tokens_per_step"] for r in records.values()} == {plan["tokens_per_step"]}
    assert records[4]["tokens_seen"] == 4 * plan["tokens_per_step"]
    stored = step_tokens.read(str(workdir))
    assert stored["mean_sequence_length"] == plan["mean_sequence_length"]

    # the data changes under the run (the same directory, rewritten with longer documents; a
    # different mixture path would be refused by the workdir's identity): the plan and the
    # resume keep the stored mean
    shutil.rmtree(tmp_path / "short")
    write_mds(tmp_path / "short", long_docs)
    moved = tiny_data_config(tmp_path / "short", tok, steps=6)
    moved.train.allow_config_change = True   # 2 more steps: a deliberate change of the budget
    fresh = step_tokens.measure(moved, demo=False)["mean_sequence_length"]
    assert schedules.rows_per_step(moved, fresh, 4) == 16     # what re-measuring would give
    replan = plan_lib.make_plan(moved, str(workdir))
    assert replan["figure_stored"] and replan["restore"] == {
        "from": "workdir", "path": str(workdir / "checkpoints"), "step": 4}
    assert replan["rows_per_step"] == 8 and replan["total_steps"] == 6
    train.train_and_evaluate(moved, str(workdir))
    records = logged(workdir)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[5]["batch_size"] == records[6]["batch_size"] == 8
    assert records[6]["tokens_seen"] == 6 * plan["tokens_per_step"]
    resumed = step_tokens.read(str(workdir))
    assert resumed == dict(stored, split=dict(stored["split"], num_steps=6))  # the new budget
    stored = resumed

    moved.train.seq_len = 128                              # a mean is valid for its row length
    with pytest.raises(ValueError, match=r"step_tokens\.json.*config\.train\.seq_len=128"):
        step_tokens.for_run(moved, str(workdir), demo=False)

    # The split of the steps is recorded at the first start; a resume whose device count cuts
    # them otherwise is refused (steps replay by index: the run would end at another count).
    assert stored["split"] == {"data_parallel": 4, "rows_per_step": 8,
                               "warmup_split": list(schedules.warmup_split(
                                   config, stored["mean_sequence_length"], 4)),
                               "warmup_steps": schedules.batch_warmup_steps(
                                   config, stored["mean_sequence_length"], 4),
                               "num_steps": 6}
    same = dict(stored["split"], data_parallel=2)
    step_tokens.check_split(str(workdir), same, has_checkpoints=True)
    # Another batch warmup on the same devices would replay a warmup mid-run: refused too.
    warmed = dict(stored["split"], warmup_steps=stored["split"]["warmup_steps"] + 3)
    with pytest.raises(ValueError, match=r"\(batch-size warmup steps \d+ -> \d+\).*resume with "
                                         r"the batch settings it started with.*if they are "
                                         r"unchanged, this code splits the warmup otherwise"):
        step_tokens.check_split(str(workdir), warmed, has_checkpoints=True)
    # As another split of the warmup into micro batches, with the same step counts.
    resplit = dict(stored["split"], warmup_split=stored["split"]["warmup_split"][::-1] + [1])
    with pytest.raises(ValueError, match=r"the batch-size warmup's micro batches"):
        step_tokens.check_split(str(workdir), resplit, has_checkpoints=True)
    # A record from before warmup_steps takes it at the next start.
    record = step_tokens.read(str(workdir))
    del record["split"]["warmup_steps"]
    step_tokens.store(str(workdir), record)
    step_tokens.check_split(str(workdir), stored["split"], has_checkpoints=True)
    assert step_tokens.read(str(workdir))["split"] == stored["split"]
    other = dict(stored["split"], data_parallel=3, rows_per_step=9)
    with pytest.raises(ValueError, match=r"step_tokens\.json: this run's steps would be cut "
                                         r"otherwise than when it started \(rows per step 8 -> 9\)"
                                         r".*: resume on 4 data-parallel devices"):
        step_tokens.check_split(str(workdir), other, has_checkpoints=True)
    step_tokens.check_split(str(workdir), other, has_checkpoints=False)   # nothing to keep
    assert step_tokens.read(str(workdir))["split"] == other


def test_auto_grad_accum_splits_a_real_run_as_its_plan_says(tmp_path):
    """grad_accum_steps=0: the plan and the run take the fewest micro batches within
    max_micro_tokens per device. By hand: 8 rows on 4 devices; 16 sequences split into 1, 2
    or 4 micro batches; one micro batch puts 2 rows of 64 on a device, two put 1 (64 tokens)."""
    rng = np.random.default_rng(0)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=512, unk_id=500)
    write_mds(tmp_path / "short", [rng.integers(0, 500, n) for n in rng.integers(20, 41, 200)])
    config = tiny_data_config(tmp_path / "short", tok, steps=2)
    config.train.grad_accum_steps, config.train.max_micro_tokens = 0, 64
    workdir = str(tmp_path / "run")
    plan = plan_lib.make_plan(config, workdir)
    assert (plan["rows_per_step"], plan["grad_accum_steps"], plan["micro_rows_per_device"],
            plan["max_micro_rows"]) == (8, 2, 1, 1)
    assert "2 micro batches of 1 rows per device a step (auto: the fewest within 1 rows)" in \
        plan_lib.format_plan(plan)
    train.train_and_evaluate(config, workdir)
    records = logged(workdir)
    assert sorted(records) == [1, 2]
    assert {(r["batch_size"], r["micro_batches"]) for r in records.values()} == {(8, 2)}
    config.train.max_micro_tokens = 128      # how the run executes: a resume may change it
    config.schedule.total_tokens *= 2
    config.train.allow_config_change = True  # (the longer schedule is a recorded change)
    train.train_and_evaluate(config, workdir)
    records = logged(workdir)
    assert sorted(records) == [1, 2, 3, 4]
    assert {(r["batch_size"], r["micro_batches"]) for r in (records[3], records[4])} == {(8, 1)}


def test_batch_warmup_of_a_one_micro_batch_step_runs_in_smaller_micro_batches(tmp_path):
    """A step of one micro batch (grad_accum_steps=1) still warms up from half its rows
    (f = 1/2): the warmup steps run as a micro batch of half, rounded down to whole rows per
    device (schedules.warmup_split); the full step as one of its own."""
    rng = np.random.default_rng(0)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=512, unk_id=500)
    write_mds(tmp_path / "short", [rng.integers(0, 500, n) for n in rng.integers(20, 41, 400)])
    config = tiny_data_config(tmp_path / "short", tok, steps=1)
    config.train.global_batch_size, config.train.grad_accum_steps = 64, 1
    config.optimizer.batch_warmup_start_fraction = 1 / 2
    workdir = str(tmp_path / "run")
    full = plan_lib.make_plan(config, workdir)["rows_per_step"]
    half = full // (2 * 4) * 4                         # 4 devices
    # by hand (schedules.warmup_micro_batches): a step after t tokens holds
    # 1 + floor(t / warmup) halves; warmup = 2 halves' tokens gives half, half, then full
    config.optimizer.batch_warmup_tokens = 2 * half * 64
    config.schedule.total_tokens = (2 * half + full) * 64
    plan = plan_lib.make_plan(config, workdir)
    assert plan["grad_accum_steps"] == 1 and plan["first_step_rows"] == half < full
    assert plan["warmup_micro_rows_per_device"] == half // 4
    assert f"from {half} rows, in micro batches of {half // 4} rows per device" in \
        plan_lib.format_plan(plan)
    train.train_and_evaluate(config, workdir)
    records = logged(workdir)
    seen = [(records[s]["batch_size"], records[s]["micro_batches"]) for s in sorted(records)]
    assert seen == [(half, 1), (half, 1), (full, 1)]
    assert records[3]["tokens_seen"] == config.schedule.total_tokens


@pytest.mark.parametrize("init_from,restore_line", [
    ("scratch", "fresh initialisation (train.init_from=scratch: on purpose)"),
    ("", "NONE: phase ext continues another run, so a real run refuses to start"),
])
def test_plan_of_a_later_phase_says_what_it_starts_from(tmp_path, init_from, restore_line):
    """"scratch" is a word, not a workdir: the plan starts fresh, as train.py does; with no
    init_from the plan says that train.py refuses the run."""
    config = ettin_tiny.get_config("mlm_ext")
    config.train.init_from = init_from
    plan = plan_lib.make_plan(config, str(tmp_path / "run"), num_devices=1)
    assert plan["restore"] == {"from": "fresh"} and plan["init_from"] == init_from
    lines = plan_lib.format_plan(plan).splitlines()
    assert any(line.startswith("start") and restore_line in line for line in lines), lines
    assert not any("scratch (NO checkpoint" in line for line in lines)
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "run").exists()


def test_agreed_says_where_the_figure_comes_from(tmp_path, caplog):
    """The demo measures nothing (one sequence per row) and says so; a real run says it measured
    the data the first time and read the stored figure after."""
    caplog.set_level("INFO", logger="absl")
    demo_config = ettin_tiny.get_config("mlm")
    for name in ("demo", "run"):       # as train_steps makes them
        os.makedirs(tmp_path / name)
    assert step_tokens.agreed(demo_config, str(tmp_path / "demo"), demo=True) is None
    assert "mean sequence length none: the demo packs one sequence per row (stored in" \
        in caplog.text and "measured" not in caplog.text

    rng = np.random.default_rng(1)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=512, unk_id=500)
    write_mds(tmp_path / "data", [rng.integers(0, 500, n) for n in rng.integers(20, 41, 50)])
    config = tiny_data_config(tmp_path / "data", tok, steps=4)
    for expected in ("measured on the data, stored in", "stored in"):
        caplog.clear()
        mean = step_tokens.agreed(config, str(tmp_path / "run"), demo=False)
        assert f"mean sequence length {mean} ({expected} " in caplog.text


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "prng_impl", "bogus", "config.train.prng_impl='bogus': expected one of"),
    ("optimizer", "name", "sgd", "config.optimizer.name='sgd': expected"),
    ("optimizer", "moments_dtype", "float8", "config.optimizer.moments_dtype='float8'"),
    ("train", "xla_options", "bogus", "config.train.xla_options='bogus': entry 'bogus'"),
    ("train", "xla_options", "xla_no_such_option=1", "XLA refused it"),
])
def test_a_plan_refuses_what_the_start_would_refuse(tmp_path, section, key, value, message):
    """A dry run passed these, and the real start failed on them after the dry run's 'ok'."""
    config = ettin_tiny.get_config("mlm")
    config[section][key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_lib.make_plan(config, str(tmp_path / "w"), num_devices=1)


def test_a_plan_from_a_run_without_optimizer_state_says_the_optimizer_starts_fresh(tmp_path):
    """A run imported from transformers holds params only: extension from it restores no
    optimizer state (checkpoint.restore_from_run warns so), and its plan says the same."""
    from ettin_jax import checkpoint, model_loader
    config = ettin_tiny.get_config("mlm_ext")
    model = model_loader.new_model(config.model)
    checkpoint.save_imported(model, model.config, str(tmp_path / "imported"))
    config.train.init_from = str(tmp_path / "imported")
    plan = plan_lib.make_plan(config, str(tmp_path / "w"), num_devices=1)
    assert plan["restore"]["step"] == 0 and plan["restore"]["optimizer_state"] is False
    assert ("restoring params only (the source has no optimizer state: a fresh optimizer)"
            in plan_lib.format_plan(plan))


def test_a_plan_without_data_at_the_users_device_count(tmp_path):
    """--plan_mean_length plans the full config with no data (no demo); --plan_devices for the
    machine the run will have. By hand: 4608 x 610 / 1024 = 2745 rows; on 8 devices within
    150m's 103 rows per micro batch the fewest micro batches are 4 (3 would need 2736 / 24 =
    114 rows each), so the rows round to a multiple of 32: 2752, 86 per device."""
    lines = dry_run(tmp_path / "w", "--config=configs/ettin_150m.py:mlm", "--plan_devices=8",
                    "--plan_mean_length=610")
    plan = json.loads(lines[-1])
    assert (plan["demo"], plan["figure_assumed"], plan["mixture"], plan["sources"]) == \
        (False, True, "", [])
    assert (plan["num_devices"], plan["grad_accum_steps"], plan["rows_per_step"],
            plan["micro_rows_per_device"]) == (8, 4, 2752, 86)
    assert "assumed (--plan_mean_length); a run measures the data" in "\n".join(lines)
    assert not (tmp_path / "w").exists()
    # A workdir whose run stored its figure resumes with that one: the plan says so.
    from ettin_jax import step_tokens
    (tmp_path / "w").mkdir()
    step_tokens.store(str(tmp_path / "w"), {"mean_sequence_length": 542.5, "seq_len": 1024})
    plan = plan_lib.make_plan(ettin_150m.get_config("mlm"), str(tmp_path / "w"), num_devices=8,
                              assumed_mean_length=610)
    assert plan["rows_per_step"] == 2752 and plan["figure_in_workdir"] == 542.5
    assert (f"assumed (--plan_mean_length); this workdir's run resumes with its stored 542.5 "
            f"({tmp_path / 'w' / 'step_tokens.json'})") in plan_lib.format_plan(plan)
    # A record the run would refuse (another row length, unreadable) is refused here too.
    config = ettin_150m.get_config("mlm")
    config.train.seq_len = 512
    with pytest.raises(ValueError, match="measured at train.seq_len=1024, but config.train."
                                         "seq_len=512"):
        plan_lib.make_plan(config, str(tmp_path / "w"), num_devices=8, assumed_mean_length=610)
    (tmp_path / "w" / "step_tokens.json").write_text("{cut")
    with pytest.raises(ValueError, match="not a readable tokens-per-step record"):
        plan_lib.make_plan(ettin_150m.get_config("mlm"), str(tmp_path / "w"), num_devices=8,
                           assumed_mean_length=610)
