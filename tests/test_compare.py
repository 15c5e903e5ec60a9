"""python -m ettin_jax.compare on run directories written here: the data check (identical,
differing from a step, cannot be matched), the charts' data, summary.md, index.html, bad input."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from ettin_jax import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("loss", "eval_loss", "accuracy", "perplexity", "learning_rate", "throughput")


def fingerprint(step, data="a"):
    return hashlib.blake2b(f"{data}/{step}".encode(), digest_size=8).hexdigest()


def make_records(objective, steps, *, every=1, data=lambda step: "a", list_form=False):
    """Lines as the train loop logs them, every `every` steps, with eval every 2nd line."""
    records = []
    for n, step in enumerate(range(every, steps + 1, every)):
        record = {"step": step, "loss": 6.0 - 0.4 * step + (0.05 if objective == "clm" else 0),
                  "learning_rate": 1e-3 * min(1.0, step / 3), "tokens_seen": 1024 * step,
                  "tokens_per_sec": 1000.0 + 10 * step + (500 if n == 0 else 0),
                  "batch_size": 8}
        if objective == "mlm":
            record["accuracy"] = 0.05 * step
        else:
            record["perplexity"] = 2.0 ** (6 - 0.4 * step)
        if n % 2 == 1:
            record["eval_loss"] = 7.0 - 0.3 * step
        fps = [fingerprint(s, data(s)) for s in range(step - every + 1, step + 1)]
        if list_form:
            record["data_fingerprints"] = fps
        else:
            record["data_fingerprint"] = fps[-1]
        records.append(record)
    return records


def write_run(path, objective, records, *, size="tiny", phase="pretrain", lines=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"size": size, "objective": objective, "phase": phase, "model": {}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines or [json.dumps(r) + "\n" for r in records])
    return str(path)


def write_glue(workdir, scores):
    os.makedirs(workdir, exist_ok=True)
    tasks = [{"task": t, "metrics": ["accuracy"], "dev_splits": ["dev"],
              "best": {"lr": 1e-5, "epochs": 2, "seeds": [0], "score": s, "score_std": 0.0,
                       "metrics": {"dev/accuracy": {"mean": s, "std": 0.0}}}, "grid": []}
             for t, s in scores.items()]
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"source": {"checkpoint": "x"}, "tasks": tasks}, f)


def run_main(argv):
    """`python -m ettin_jax.compare ARGV`, in this process."""
    if "glue" not in flags.FLAGS:
        compare.define_flags()
    flags.FLAGS.unparse_flags()
    return compare.main(flags.FLAGS(["compare", *argv]))


def test_identical_runs_give_charts_of_the_logged_series(tmp_path, capsys):
    enc_records = make_records("mlm", 6)
    dec_records = make_records("clm", 6, every=2, list_form=True)
    enc = write_run(tmp_path / "enc", "mlm", enc_records)
    dec = write_run(tmp_path / "dec", "clm", dec_records)
    write_glue(tmp_path / "enc" / "glue", {"sst2": 80.0, "rte": 60.0})
    write_glue(tmp_path / "dec_glue", {"sst2": 70.0})
    out = tmp_path / "report"
    status = run_main([enc, dec, f"--out={out}", f"--glue=dec={tmp_path / 'dec_glue'}"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "phase pretrain: enc vs dec: identical data: 6 steps matched" in printed.out

    expected = {"loss": ("tokens_seen", "loss"), "eval_loss": ("tokens_seen", "eval_loss"),
                "learning_rate": ("tokens_seen", "learning_rate"),
                "throughput": ("step", "tokens_per_sec")}
    for chart in CHARTS:
        png = (out / f"{chart}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 2000, chart
        data = json.loads((out / f"{chart}.json").read_text())
        if chart in expected:
            x, y = expected[chart]
            for name, records in (("enc", enc_records), ("dec", dec_records)):
                kept = [r for r in records if y in r]
                assert data[name] == {"x": [r[x] for r in kept], "y": [r[y] for r in kept]}
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy == {"enc": {"x": [1024 * s for s in range(1, 7)],
                                "y": [r["accuracy"] for r in enc_records]}}
    perplexity = json.loads((out / "perplexity.json").read_text())
    assert list(perplexity) == ["dec"]
    assert perplexity["dec"]["y"] == [r["perplexity"] for r in dec_records]

    summary = (out / "summary.md").read_text()
    # enc: 6 steps, eval at steps 2, 4, 6 -> 6.4, 5.8, 5.2; tokens/s after the first line
    # 1020..1060 -> 1040; GLUE mean (80 + 60) / 2
    assert ("| enc | tiny | mlm | pretrain | 6,144 | 6 | 5.2000 | 5.2000 | 1,040 | 80.00 | "
            "60.00 | 70.00 (2 tasks) |") in summary
    # dec: lines at 2, 4, 6, eval at 4 only -> 5.8; tokens/s 1040, 1060 -> 1,050
    assert "| dec | tiny | clm | pretrain | 6,144 | 6 | 5.8000 | 5.8000 | 1,050 | 70.00 | – | " \
           "70.00 (1 tasks) |" in summary

    page = (out / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {f"{c}.png" for c in CHARTS} <= set(links)
    for link in links:
        assert "://" not in link and not link.startswith(("/", "//")), link
        assert (out / link).is_file(), link
    assert "identical data: 6 steps matched" in page

    # A report of two encoders into the same directory: no perplexity chart of the decoder
    # (an earlier report's) is left beside it.
    enc2 = write_run(tmp_path / "enc2", "mlm", enc_records)
    assert run_main([enc, enc2, f"--out={out}"]) == 0
    assert not (out / "perplexity.png").exists() and not (out / "perplexity.json").exists()
    assert list(json.loads((out / "loss.json").read_text())) == ["enc", "enc2"]


def test_a_pair_workdir_stands_for_its_two_sides(tmp_path, capsys):
    pair = tmp_path / "pair"                    # as ettin_jax.pairs lays it out
    write_run(pair / "mlm", "mlm", make_records("mlm", 4))
    write_run(pair / "clm", "clm", make_records("clm", 4, data=lambda step: "ab"[step > 2]))
    assert run_main([str(pair), f"--out={tmp_path / 'r'}"]) == 1
    printed = capsys.readouterr().out
    assert "phase pretrain: mlm vs clm: data differs at step 3" in printed, printed
    write_run(pair / "clm", "clm", make_records("clm", 4))
    assert run_main([str(pair), f"--out={tmp_path / 'r'}"]) == 0
    assert "mlm vs clm: identical data: 4 steps matched" in capsys.readouterr().out
    (tmp_path / "half").mkdir()                 # one side only: not a pair, not a run
    write_run(tmp_path / "half" / "mlm", "mlm", make_records("mlm", 4))
    assert run_main([str(tmp_path / "half"), f"--out={tmp_path / 'r'}"]) == 1
    (line,) = errors_of(capsys)
    assert "half: no config.json" in line


def test_data_differing_from_step_3_is_named_and_exits_1(tmp_path):
    enc = write_run(tmp_path / "enc", "mlm", make_records("mlm", 6))
    other = make_records("clm", 6, every=2, list_form=True,
                         data=lambda step: "a" if step < 3 else "b")
    dec = write_run(tmp_path / "dec", "clm", other)
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "ettin_jax.compare", enc, dec, f"--out={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert (f"phase pretrain: enc vs dec: data differs at step 3 ({fingerprint(3)} vs "
            f"{fingerprint(3, 'b')}); 4 of 6 steps differ") in result.stdout
    assert (out / "index.html").is_file() and (out / "loss.png").is_file()
    assert "data differs at step 3" in (out / "summary.md").read_text()


def test_phases_are_checked_separately_and_a_resumed_run_keeps_the_later_lines(tmp_path, capsys):
    records = make_records("mlm", 6)
    # resumed from a checkpoint at step 3: steps 4.. logged again, with other values
    again = [dict(r, loss=r["loss"] + 1) for r in records[3:]]
    lines = [json.dumps(r) + "\n" for r in records[:5] + again]
    runs = [write_run(tmp_path / "enc", "mlm", None, lines=lines),
            write_run(tmp_path / "dec", "clm", make_records("clm", 6)),
            write_run(tmp_path / "enc_decay", "mlm", make_records("mlm", 4), phase="decay"),
            write_run(tmp_path / "dec_decay", "clm", make_records("clm", 3, list_form=True),
                      phase="decay")]
    assert run_main([*runs, f"--out={tmp_path / 'r'}"]) == 0
    printed = capsys.readouterr().out
    assert "phase pretrain: enc vs dec: identical data: 6 steps matched" in printed
    assert "phase decay: enc_decay vs dec_decay: identical data: 3 steps matched" in printed
    loss = json.loads((tmp_path / "r" / "loss.json").read_text())
    assert loss["enc"]["y"] == [r["loss"] for r in records[:3] + again]


@pytest.mark.parametrize("list_form", [False, True])
def test_a_resumed_runs_replaced_timeline_leaves_no_fingerprints(tmp_path, capsys, list_form):
    """The first timeline trained other data after step 3 and ran to step 6; resumed from the
    checkpoint at step 3, the run has logged up to step 4 again. Steps 5-6 of the old lines are
    not this run's (a pair resumes both sides at their common step, deleting later ones)."""
    every = 2 if list_form else 1
    first = make_records("mlm", 6, every=every, list_form=list_form,
                         data=lambda step: "a" if step <= 3 else "b")
    resumed = {"step": 4, "loss": 4.0}
    resumed["data_fingerprints" if list_form else "data_fingerprint"] = (
        [fingerprint(4)] if list_form else fingerprint(4))
    lines = [json.dumps(r) + "\n" for r in first + [resumed]]
    runs = [write_run(tmp_path / "enc", "mlm", None, lines=lines),
            write_run(tmp_path / "dec", "clm", make_records("clm", 6))]
    assert run_main([*runs, f"--out={tmp_path / 'r'}"]) == 0
    assert "enc vs dec: identical data: 4 steps matched" in capsys.readouterr().out


def test_a_line_of_a_replaced_timeline_before_the_new_lines_step_is_dropped(tmp_path):
    """Logged every 10 steps, saved every 50: a stop at step 105 wrote its line (steps
    101-105) but not its checkpoint; the rerun from step 100 logs step 110 (steps 101-110).
    The line at 105 is of the replaced timeline although 105 < 110."""
    def line(step, first, loss):
        return json.dumps({"step": step, "loss": loss, "data_fingerprints": [
            fingerprint(s) for s in range(first, step + 1)]}) + "\n"
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join([line(s, s - 9, 3.0) for s in range(10, 101, 10)]
                            + [line(105, 101, 9.9), line(110, 101, 2.9)]))
    records, fingerprints = compare.read_metrics(str(path))
    assert [r["step"] for r in records] == list(range(10, 111, 10))
    assert records[-1]["loss"] == 2.9 and sorted(fingerprints) == list(range(1, 111))


def errors_of(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err), err
    return err


def test_bad_input_is_one_error_line_naming_run_and_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", "mlm", make_records("mlm", 4))
    empty = tmp_path / "no_metrics"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"size": "tiny", "objective": "clm",
                                                   "phase": "pretrain"}))
    lines = [json.dumps(r) + "\n" for r in make_records("clm", 4)]
    lines[2] = '{"step": 3, "loss": 4.1,\n'
    broken = write_run(tmp_path / "broken", "clm", None, lines=lines)
    out = tmp_path / "r"
    assert run_main([good, str(empty), broken, f"--out={out}"]) == 1
    err = errors_of(capsys)
    assert len(err) == 2
    assert f"{empty}: no metrics.jsonl" in err[0]
    assert re.search(re.escape(os.path.join(broken, "metrics.jsonl")) + r":3: not a JSON", err[1])
    assert not out.exists()          # nothing is reported from runs that cannot be read

    lines[2] = b'{"step": 3, "loss": \xff}\n'
    with open(os.path.join(broken, "metrics.jsonl"), "wb") as f:
        f.writelines(l if isinstance(l, bytes) else l.encode() for l in lines)
    assert run_main([good, broken, f"--out={out}"]) == 1
    (line,) = errors_of(capsys)
    assert os.path.join(broken, "metrics.jsonl") + ":3: not UTF-8" in line

    bigger = write_run(tmp_path / "big", "clm", make_records("clm", 4), size="17m")
    assert run_main([good, bigger, f"--out={out}"]) == 1
    (line,) = errors_of(capsys)
    assert bigger in line and "size '17m'" in line and "'tiny'" in line


def test_runs_that_cannot_be_matched_are_errors(tmp_path, capsys):
    enc = write_run(tmp_path / "enc", "mlm", make_records("mlm", 4))
    dec = write_run(tmp_path / "dec", "clm", make_records("clm", 4))
    decay = write_run(tmp_path / "decay", "mlm", make_records("mlm", 4), phase="decay")
    assert run_main([enc, dec, decay, f"--out={tmp_path / 'r'}"]) == 1
    (line,) = errors_of(capsys)
    assert decay in line and "only run of phase 'decay'" in line

    plain = [{k: v for k, v in r.items() if k != "data_fingerprint"}
             for r in make_records("clm", 4)]
    unmarked = write_run(tmp_path / "unmarked", "clm", plain)
    assert run_main([enc, unmarked, f"--out={tmp_path / 'r'}"]) == 1
    (line,) = errors_of(capsys)
    assert unmarked in line and "no \"data_fingerprint\"" in line

    late = make_records("clm", 8)[5:]         # fingerprints of steps 6..8 only
    disjoint = write_run(tmp_path / "late", "clm", late)
    assert run_main([enc, disjoint, f"--out={tmp_path / 'r'}"]) == 1
    (line,) = errors_of(capsys)
    assert disjoint in line and "no fingerprinted step in common" in line

    assert run_main([enc, dec, "--glue=nobody=/x", f"--out={tmp_path / 'r'}"]) == 1
    (line,) = errors_of(capsys)
    assert "--glue=nobody=/x" in line and "'enc'" in line


@pytest.mark.parametrize("value, message", [(["a", 3], "list of strings"),
                                            (["a"] * 5, "more than the steps run")])
def test_malformed_fingerprints_name_the_line(tmp_path, value, message):
    records = make_records("clm", 4)
    records[1]["data_fingerprints"] = value
    records[1].pop("data_fingerprint")
    run = write_run(tmp_path / "run", "clm", records)
    with pytest.raises(compare.CompareError, match=re.escape("metrics.jsonl:2: ") + ".*" + message):
        compare.load_run(run, "run")


def test_null_values_of_a_skipped_window_are_left_out_of_the_summary(tmp_path, capsys):
    """The train loop writes a non-finite loss (a window of skipped steps) as null: the report
    still draws and summarises the run from the other lines."""
    records = make_records("mlm", 6)
    records[3].update(loss=None, eval_loss=None, tokens_per_sec=None)   # step 4
    run = write_run(tmp_path / "enc", "mlm", records)
    out = tmp_path / "report"
    status = run_main([run, f"--out={out}"])
    assert status == 0, capsys.readouterr().err
    # eval at steps 2 and 6 -> 6.4, 5.2; tokens/s after the first line without step 4: 1020,
    # 1030, 1050, 1060 -> 1040
    assert "| enc | tiny | mlm | pretrain | 6,144 | 6 | 5.2000 | 5.2000 | 1,040 |" in (
        out / "summary.md").read_text()
    assert json.loads((out / "loss.json").read_text())["enc"]["y"][3] is None
