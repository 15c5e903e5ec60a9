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
                                       "batch=2", "scan_layers=true", "model.remat=full"]
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
                                               {"model.scan_layers"}, {"model.remat"}]
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
    import time
    config = ettin_tiny.get_config("mlm")
    built = variants.one_at_a_time(config, 4, 64, variants.parse(
        "attention_impl=mosaic;batch=8;prng_impl=rbg"))

    def time_variant(v):
        if v.config.model.attention_impl == "mosaic":
            raise ValueError("model.attention_impl='mosaic': unknown")
        time.sleep(1.0 if v.rows == 8 else 0.0)
        return {"config": "tiny:mlm", "batch": v.rows, "seq_len": v.seq_len,
                "tokens_per_sec": 100.0 * v.rows, "step_ms": 1.0}

    emitted = []
    # 1.5 s: the first two (and the collections after them) take far less, so batch=8 runs;
    # after its 1 s less than 1 s is left, so prng_impl=rbg is skipped.
    records = variants.run_all(built, time_variant, budget_s=1.5, emit=emitted.append)
    assert emitted == records
    assert [r["variant"] for r in records] == ["baseline", "attention_impl=mosaic", "batch=8",
                                               "prng_impl=rbg"]
    assert "mosaic" in records[1]["error"] and "tokens_per_sec" in records[2]
    assert "budget" in records[3]["skipped"]
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
