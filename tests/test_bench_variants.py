"""bench/variants.py: --variants builds the baseline and one change at a time (checked before
anything runs), and a sweep records failures and budget skips without stopping."""
import pytest

from bench import gpu_report
from bench import variants
from configs import ettin_tiny
from ettin_jax import cli


def test_one_at_a_time_changes_one_key_per_variant_and_skips_the_baseline_value():
    config = ettin_tiny.get_config("mlm")
    parsed = variants.parse("prng_impl=threefry,rbg; loss_vocab_chunk=96;batch=4,2;"
                            "scan_layers=true;model.remat=full")
    built = variants.one_at_a_time(config, 4, 64, parsed)
    assert [v.name for v in built] == ["baseline", "prng_impl=rbg", "loss_vocab_chunk=96",
                                       "batch=2", "scan_layers=true",
                                       "model.remat=full+scan_layers=true"]
    baseline = built[0]

    def value(config, dotted):
        section, key = dotted.split(".")
        return config[section][key]

    def differences(v):
        keys = ("train.prng_impl", "train.loss_vocab_chunk", "model.scan_layers", "model.remat")
        changed = {k for k in keys if value(v.config, k) != value(baseline.config, k)}
        return changed | ({"shape"} if (v.rows, v.seq_len) != (4, 64) else set())

    assert [differences(v) for v in built] == [set(), {"train.prng_impl"},
                                               {"train.loss_vocab_chunk"}, {"shape"},
                                               {"model.scan_layers"},
                                               {"model.remat", "model.scan_layers"}]
    assert built[2].config.train.loss_vocab_chunk == 96            # an int, as the config holds
    assert built[4].config.model.scan_layers is True
    assert config.train.prng_impl == "threefry" and not config.model.scan_layers   # not modified


@pytest.mark.parametrize("text,message", [
    ("prng_impl", "expected KEY=VALUE"), ("loss_chunk=4", "not a config key"),
    ("loss_vocab_chunk=big", "expected a int"), ("batch=0", "positive integer"),
    ("scan_layers=maybe", "expected true or false")])
def test_bad_variants_fail_before_anything_runs(text, message):
    with pytest.raises(cli.UserError, match=message):
        variants.one_at_a_time(ettin_tiny.get_config("mlm"), 4, 64, variants.parse(text))


def test_run_all_records_failures_and_budget_skips_and_goes_on():
    """A failing variant is an error record and the next still runs; once the budget left is
    under the longest variant so far, the rest are skipped records. The report's table shows
    each with its speed against the baseline."""
    config = ettin_tiny.get_config("mlm")
    built = variants.one_at_a_time(config, 4, 64, variants.parse(
        "attention_impl=mosaic;batch=8;prng_impl=rbg"))
    # A clock only the variants move: the budget decisions cannot depend on the machine's speed
    # or on the collections between variants (a loaded CI worker once spent the whole budget
    # there, and batch=8 was skipped).
    now = [0.0]

    def time_variant(v):
        if v.config.model.attention_impl == "mosaic":
            now[0] += 0.5
            raise ValueError("model.attention_impl='mosaic': unknown")
        now[0] += 3.0 if v.rows == 8 else 1.0
        return {"config": "tiny:mlm", "batch": v.rows, "seq_len": v.seq_len,
                "tokens_per_sec": 100.0 * v.rows, "step_ms": 1.0}

    emitted = []
    # baseline 1 s and mosaic 0.5 s leave 3.5 of 5 s, more than the longest (1 s): batch=8 runs
    # and takes 3 s; then 0.5 s is left, under its 3 s, so prng_impl=rbg is skipped.
    records = variants.run_all(built, time_variant, budget_s=5.0, emit=emitted.append,
                               clock=lambda: now[0])
    assert emitted == records
    assert [r["variant"] for r in records] == ["baseline", "attention_impl=mosaic", "batch=8",
                                               "prng_impl=rbg"]
    assert "mosaic" in records[1]["error"] and "tokens_per_sec" in records[2]
    assert records[3]["skipped"] == "budget: 0 s left, a variant took 3 s"
    table = gpu_report.variants_table(records)
    assert "| batch=8 |" in table[4] and "+100.0%" in table[4]
    assert "ValueError" in table[3] and "budget" in table[5]


def test_train_step_table_joins_ours_and_the_peer_per_shape():
    """bench/gpu_report.py: ours and the peer (separate processes, separate records) share a
    row per shape; the speed ratio is the peer's ms over ours, and ours' measured peak shows."""
    ours = {"config": "150m:mlm", "batch": 64, "seq_len": 1024, "step_ms": 200.0,
            "tokens_per_sec": 327680.0, "mfu": 0.25, "attention_impl": "pallas",
            "dtype": "bfloat16", "device_peak_gb": 37.95}
    peer = {"config": "150m:mlm", "batch": 64, "seq_len": 1024, "transformers_step_ms": 300.0,
            "transformers_tokens_per_sec": 218453.3}
    other = dict(ours, batch=8, seq_len=8192, device_peak_gb=None)
    table = gpu_report.train_step_table([ours, other, peer])
    assert len(table) == 4                                  # header, rule, two shapes
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells == ["150m:mlm", "64 x 1024", "200.0", "327,680", "25.0%", "300.0", "218,453",
                     "1.5", "pallas", "bfloat16", "37.95"]
    assert table[3].split("|")[-2].strip() == "n/a" and "8 x 8192" in table[3]


def test_goals_table_checks_each_goal_of_the_gpu_issue_against_the_run():
    """bench/gpu_report.py's summary: each goal met, missed or not measured, from the records
    gpu.sh's stages write (figures shaped like the H200 run in bench/RESULTS.md)."""
    train = [{"config": "150m:mlm", "batch": 8, "seq_len": 8192, "tokens_per_sec": 330_000.0,
              "mfu": 0.45},
             {"config": "1b:mlm", "batch": 32, "seq_len": 1024, "tokens_per_sec": 74_548.0,
              "mfu": 0.457},
             {"config": "150m:clm", "batch": 64, "seq_len": 1024, "tokens_per_sec": 340_000.0,
              "mfu": 0.32}]
    # 150m mlm 64 x 1024 only in the tune sweep: its baseline stands in, a variant does not.
    tune = [{"config": "150m:mlm", "batch": 64, "seq_len": 1024, "variant": "baseline",
             "tokens_per_sec": 372_056.0, "mfu": 0.31},
            {"config": "150m:mlm", "batch": 64, "seq_len": 1024, "variant": "batch=128",
             "tokens_per_sec": 999_999.0, "mfu": 0.9}]
    startup = [{"run": "cold", "config": "configs/ettin_150m.py:mlm", "rows": 64,
                "seq_len": 1024, "first_step_s": 121.2, "rc": 0},
               {"run": "warm", "config": "configs/ettin_150m.py:mlm", "rows": 64,
                "seq_len": 1024, "first_step_s": 9.5, "rc": 0},
               {"run": "cold", "config": "configs/ettin_150m.py:mlm", "rows": 8,
                "seq_len": 8192, "first_step_s": None, "rc": "timeout"}]
    attention = ["| seq | batch | layer | impl | ms (fwd+bwd) | TFLOP/s (visible pairs) |",
                 "| --- | --- | --- | --- | --- | --- |",
                 "| 8192 | 2 | enc-global | pallas | 5.195 | 400.0 |",
                 "| 8192 | 2 | enc-global | cudnn | 3.423 | 600.0 |",
                 "| 8192 | 2 | enc-global | mosaic | n/a | some error |",
                 "| 8192 | 2 | dec-local | pallas | 0.258 | 100.0 |",
                 "| 8192 | 2 | dec-local | cudnn | 0.345 | 80.0 |",
                 "| 8192 | 2 | dec-global | mosaic | 1.800 | 300.0 |",
                 "| 8192 | 2 | dec-global | pallas | 2.840 | 200.0 |",
                 "| 8192 | 2 | dec-global | cudnn | 1.920 | 280.0 |"]
    table = gpu_report.goals_table(train, tune, startup, attention)
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.split("|")[1:-1]] for line in table[2:])}
    assert rows["150m:mlm 64 x 1024 >= 450,000 tokens/s"] == [
        "372,056 tokens/s, 31.0% MFU", "no"]
    assert rows["150m:mlm 8 x 8192 >= 320,000 tokens/s"][1] == "yes"
    assert rows["1b:mlm 32 x 1024 >= 55% MFU"] == ["74,548 tokens/s, 45.7% MFU", "no"]
    # 340,000 / 372,056 = 0.914: within 10%.
    assert rows["150m:clm 64 x 1024 within 10% of MLM's tokens/s"] == [
        "340,000 vs 372,056 (0.914x)", "yes"]
    assert rows["150m start-up 64 x 1024, cold cache, <= 30 s to the first step"] == [
        "121.2 s", "no"]
    assert rows["150m start-up 64 x 1024, warm cache, <= 10 s to the first step"][1] == "yes"
    assert rows["150m start-up 8 x 8192, cold cache, <= 30 s to the first step"] == [
        "no first step (rc timeout)", "no"]
    assert rows["150m start-up 8 x 8192, warm cache, <= 10 s to the first step"] == [
        "", "not measured"]
    # 3.423 / 5.195 = 0.66; the failed mosaic row is not a time; the fastest of ours counts.
    assert rows["attention enc-global 8192: ours fwd+bwd <= cuDNN's"] == [
        "pallas 5.195 ms vs cuDNN 3.423 ms (0.66x)", "no"]
    assert rows["attention dec-global 8192: ours fwd+bwd <= cuDNN's"] == [
        "mosaic 1.800 ms vs cuDNN 1.920 ms (1.07x)", "yes"]
    assert rows["attention dec-local 8192: ours fwd+bwd <= cuDNN's"][1] == "yes"
    assert rows["attention enc-global 1024: ours fwd+bwd <= cuDNN's"][1] == "not measured"
    assert len(rows) == 3 + 1 + 4 + 8


def test_startup_table_compares_the_step_1_loss_of_runs_sharing_a_cache_dir():
    def record(run, loss, rows=64):
        return {"run": run, "config": "configs/ettin_150m.py:mlm", "rows": rows, "seq_len": 1024,
                "first_step_s": 10.0, "first_loss": loss, "exit_s": 12.0, "rc": 0,
                "cache_mb": 5.7}
    agree = gpu_report.startup_table([record("cold", 10.9512), record("warm", 10.9512),
                                      record("new_program", 10.9512),
                                      # Its own program (scanned layers): compared apart.
                                      record("cold_scanned", 10.9513),
                                      record("cold", 10.8, rows=8)])
    assert len([line for line in agree if line.startswith("| ")]) == 2 + 5
    notes = [line for line in agree if line.startswith("Loss at step 1")]
    assert notes == ["Loss at step 1, configs/ettin_150m.py:mlm 64 x 1024, cold / warm / "
                     "new_program: the same in every run"]
    differ = gpu_report.startup_table([record("cold", 10.9512), record("new_program", 7.1)])
    assert differ[-1].endswith("cold / new_program: DIFFERS: cold 10.9512, new_program 7.1")


def test_attention_rows_a_timeout_cut_are_read_from_its_log(tmp_path):
    """bench/attention.py writes its table at the end: a command its timeout cut leaves only
    the rows it printed, which the report takes from its log (those of the table win)."""
    (tmp_path / "attention.md").write_text(
        "| seq | batch | layer | impl | ms (fwd+bwd) | TFLOP/s (visible pairs) |\n"
        "|---|---|---|---|---|---|\n| 8192 | 2 | enc-global | cudnn | 3.400 | 99.0 |\n")
    (tmp_path / "attention_mosaic.log").write_text(
        "jax 0.11.2 NVIDIA H200\n"
        "  8192   2 enc-global         cudnn              3.900 ms    80.0 TFLOP/s\n"
        "  8192   2 enc-global         mosaic             3.100 ms   105.2 TFLOP/s\n"
        "  8192   2 enc-local          mosaic     n/a: lowering failed\n")
    have = gpu_report.attention_rows(gpu_report.read_lines(str(tmp_path / "attention.md")))
    extra = gpu_report.attention_rows_from_logs(str(tmp_path), have)
    assert gpu_report.attention_rows(extra) == {(8192, "enc-global", "mosaic"): 3.1}
    section = gpu_report.section(str(tmp_path), "gpu")
    assert "| 8192 | 2 | enc-global | mosaic | 3.100 | 105.2 |" in section
