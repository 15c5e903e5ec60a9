"""Turns bench/gpu.sh's log dir into one RESULTS.md section (called by gpu.sh at its end).

    python bench/gpu_report.py --bench_logs=$OUT/gpubench --mode=gpu --append_to=bench/RESULTS.md

Reads commands.tsv (name, exit code, seconds, command), gpu.txt (nvidia-smi), cache.txt (the
compilation cache the stages shared), the JSON lines
of train_step.jsonl, tune.jsonl (the one-at-a-time variants of bench/variants.py), memory.jsonl
and startup.jsonl, attention.md, profile_150m_mlm.txt and skipped.txt; writes the section to
LOG_DIR/results_section.md and appends it to --append_to. The section opens with the GPU
issue's goals, each met, missed or not measured by this run (`goals_table`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position
from bench import startup as startup_runs  # noqa: E402  # pylint: disable=wrong-import-position


def read_lines(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_json_lines(path: str) -> list:
    return [json.loads(line) for line in read_lines(path)]


def fmt(value, spec=""):
    return "n/a" if value is None else format(value, spec)


def train_step_table(records: list) -> list:
    """Ours and the peer (separate records of one shape) joined into one row per shape."""
    rows = {}
    for r in records:
        row = rows.setdefault((r["config"], r["batch"], r["seq_len"]), {})
        row.update(r)
    lines = ["| config | rows x seq | ours ms/step | ours tokens/s | MFU | transformers ms/step | "
             "transformers tokens/s | ours / transformers speed | attention | dtype | "
             "ours peak GB (process so far) |",
             "| --- " * 11 + "|"]
    for (config, batch, seq), r in rows.items():
        ratio = (round(r["transformers_step_ms"] / r["step_ms"], 3)
                 if "step_ms" in r and "transformers_step_ms" in r else None)
        lines.append(f"| {config} | {batch} x {seq} | {fmt(r.get('step_ms'))} | "
                     f"{fmt(r.get('tokens_per_sec'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('transformers_step_ms'))} | "
                     f"{fmt(r.get('transformers_tokens_per_sec'), ',.0f')} | {fmt(ratio)} | "
                     f"{r.get('attention_impl', 'n/a')} | {r.get('dtype', 'n/a')} | "
                     f"{fmt(r.get('device_peak_gb'))} |")
    return lines


def variants_table(records: list) -> list:
    """One row per variant record (bench/train_step.py --variants), its speed against the
    baseline its sweep timed first; failed and skipped variants say why."""
    base = None
    lines = ["| config | rows x seq | variant | ms/step | tokens/s | MFU | tokens/s vs baseline | "
             "first step s | attention | prng | loss chunks (vocab/rows) | note |",
             "| --- " * 12 + "|"]
    for r in records:
        if r.get("variant") == "baseline":
            base = r if "tokens_per_sec" in r else None
        speed = (f"{r['tokens_per_sec'] / base['tokens_per_sec'] - 1:+.1%}"
                 if base and "tokens_per_sec" in r and r is not base else "")
        note = r.get("error") or r.get("skipped") or ""
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq_len']} | {r['variant']} | "
                     f"{fmt(r.get('step_ms'))} | {fmt(r.get('tokens_per_sec'), ',.0f')} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {speed} | {fmt(r.get('compile_s'))} | "
                     f"{r.get('attention_impl', '')} | {r.get('prng_impl', '')} | "
                     f"{r.get('loss_vocab_chunk', '')}/{r.get('loss_row_chunk', '')} | "
                     f"{note.replace('|', '/').splitlines()[0] if note else ''} |")
    return lines


def memory_table(records: list) -> list:
    lines = ["| config | seq | remat | max micro rows | peak GB | next row GB | probes | "
             "grad_accum_steps (1 dev) | (8 dev) | global rows |", "| --- " * 10 + "|"]
    for r in sorted(records, key=lambda r: (r["config"], r["seq_len"], r["remat"])):
        cap = " (cap)" if r["capped"] else ""
        accum = r["grad_accum_steps"]
        lines.append(f"| {r['config']} | {r['seq_len']} | {r['remat']} | {r['max_micro_rows']}{cap}"
                     f" | {r.get('peak_gb', 'n/a')} | {r.get('next_peak_gb', 'n/a')} | "
                     f"{r['probes']} | {accum.get('1')} | {accum.get('8')} | {r['global_rows']} |")
    return lines


def startup_table(records: list) -> list:
    """The start-up runs, then whether the runs of each shape and cache dir (bench/startup.py's
    variants: cold, warm and new_program share one) logged one loss at step 1: the same program
    on the same data, so a cached program, kernel or autotuning choice that computes something
    else differs there."""
    lines = ["| run | config | rows x seq | JAX started s | state ready s | step compiled s "
             "(its compile s; of it trace + lower s) | first step s | loss at step 1 | exit s | "
             "rc | cache MB |",
             "| --- " * 11 + "|"]
    losses = {}
    for r in records:
        lines.append(f"| {r['run']} | {r['config']} | {r['rows']} x {r['seq_len']} | "
                     f"{fmt(r.get('jax_started_s'))} | {fmt(r.get('state_ready_s'))} | "
                     f"{fmt(r.get('step_compiled_s'))} ({fmt(r.get('step_compile_s'))}; "
                     f"{fmt(r.get('step_lower_s'))}) | "
                     f"{fmt(r['first_step_s'])} | {fmt(r.get('first_loss'))} | {r['exit_s']} | "
                     f"{r['rc']} | {r['cache_mb']} |")
        if r.get("first_loss") is not None:
            key = (r["config"], r["rows"], r["seq_len"], startup_runs.cache_suffix(r["run"]))
            losses.setdefault(key, {})[r["run"]] = r["first_loss"]
    for (config, rows, seq_len, _), by_run in losses.items():
        if len(by_run) > 1:
            agree = len(set(by_run.values())) == 1
            lines += ["", f"Loss at step 1, {config} {rows} x {seq_len}, "
                      f"{' / '.join(by_run)}: "
                      + ("the same in every run" if agree else "DIFFERS: " + ", ".join(
                          f"{run} {loss}" for run, loss in by_run.items()))]
    return lines


# The GPU issue's goals (one H100/H200, bf16, the recipe's 150m and 1b), as the summary
# checks them: throughput per (config, rows, seq) from train_step.jsonl (the tune sweep's
# baseline stands in for a shape `ours` did not reach); start-up from startup.jsonl;
# attention from attention.md (ours = the fastest of our kernels, against cuDNN).
THROUGHPUT_GOALS = [("150m:mlm", 64, 1024, "tokens_per_sec", 450_000),
                    ("150m:mlm", 8, 8192, "tokens_per_sec", 320_000),
                    ("1b:mlm", 32, 1024, "mfu", 0.55)]
CLM_WITHIN = 0.10            # CLM tokens/s within 10% of MLM's at 150m 64 x 1024
STARTUP_GOALS = {"cold": 30.0, "warm": 10.0}
STARTUP_SHAPES = [(64, 1024), (8, 8192)]
OUR_KERNELS = ("pallas", "mosaic", "mosaic-triton-bwd")


def attention_rows(lines: list) -> dict:
    """`{(seq, layer, impl): ms}` of the timed rows of attention.md's tables."""
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            try:
                rows[(int(cells[0]), cells[2], cells[3])] = float(cells[4])
            except ValueError:   # "n/a": that implementation failed or is missing
                pass
    return rows


# A row bench/attention.py prints as it times it: seq, batch, layer, impl, ms, TFLOP/s.
_ATTENTION_LOG_ROW = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([\d.]+) ms\s+([\d.]+) TFLOP/s\s*$")


def attention_rows_from_logs(log_dir: str, have: dict) -> list:
    """Markdown rows of the timings bench/attention.py printed in its logs that `have`
    (attention_rows of attention.md) lacks: a command cut by its timeout writes no table."""
    rows = []
    for name in ("attention.log", "attention_mosaic.log"):
        for line in read_lines(os.path.join(log_dir, name)):
            match = _ATTENTION_LOG_ROW.match(line)
            if match and (int(match[1]), match[3], match[4]) not in have:
                rows.append(f"| {match[1]} | {match[2]} | {match[3]} | {match[4]} | {match[5]} "
                            f"| {match[6]} |")
    if not rows:
        return []
    return ["", "## attention rows printed by commands their timeout cut (from their logs)", "",
            "| seq | batch | layer | impl | ms (fwd+bwd) | TFLOP/s (visible pairs) |",
            "|---|---|---|---|---|---|", *rows]


def goals_table(train: list, tune: list, startup: list, attention: list) -> list:
    """One row per goal of the GPU issue: what this run measured against it, and whether it is
    met ("not measured" where the run has no figure for it)."""
    baselines = [r for r in tune if r.get("variant") == "baseline"]

    def measured(config, rows, seq):
        found = [r for r in train + baselines if "tokens_per_sec" in r
                 and (r.get("config"), r.get("batch"), r.get("seq_len")) == (config, rows, seq)]
        return found[0] if found else None

    lines = ["| goal | measured | met |", "| --- | --- | --- |"]

    def add(goal, value, met):
        verdict = "not measured" if met is None else ("yes" if met else "no")
        lines.append(f"| {goal} | {value} | {verdict} |")

    for config, rows, seq, key, target in THROUGHPUT_GOALS:
        r = measured(config, rows, seq)
        shown = (f">= {target:.0%} MFU" if key == "mfu" else f">= {target:,} tokens/s")
        add(f"{config} {rows} x {seq} {shown}",
            "" if r is None else
            f"{r['tokens_per_sec']:,.0f} tokens/s, {fmt(r.get('mfu'), '.1%')} MFU",
            None if r is None or r.get(key) is None else r[key] >= target)
    mlm, clm = measured("150m:mlm", 64, 1024), measured("150m:clm", 64, 1024)
    ratio = clm["tokens_per_sec"] / mlm["tokens_per_sec"] if mlm and clm else None
    add(f"150m:clm 64 x 1024 within {CLM_WITHIN:.0%} of MLM's tokens/s",
        "" if ratio is None else
        f"{clm['tokens_per_sec']:,.0f} vs {mlm['tokens_per_sec']:,.0f} ({ratio:.3f}x)",
        None if ratio is None else ratio >= 1 - CLM_WITHIN)
    for rows, seq in STARTUP_SHAPES:
        for run, limit in STARTUP_GOALS.items():
            found = [r for r in startup if r.get("run") == run
                     and "ettin_150m" in r.get("config", "")
                     and (r.get("rows"), r.get("seq_len")) == (rows, seq)]
            first = found[0].get("first_step_s") if found else None
            add(f"150m start-up {rows} x {seq}, {run} cache, <= {limit:.0f} s to the first step",
                "" if not found else (f"{first} s" if first is not None
                                      else f"no first step (rc {found[0].get('rc')})"),
                None if not found else (first is not None and first <= limit))
    timed = attention_rows(attention)
    for seq in (1024, 8192):
        for layer in ("enc-global", "dec-global", "enc-local", "dec-local"):
            ours = {impl: timed[(seq, layer, impl)] for impl in OUR_KERNELS
                    if (seq, layer, impl) in timed}
            cudnn = timed.get((seq, layer, "cudnn"))
            best = min(ours, key=ours.get) if ours else None
            add(f"attention {layer} {seq}: ours fwd+bwd <= cuDNN's",
                "" if best is None or cudnn is None else
                f"{best} {ours[best]:.3f} ms vs cuDNN {cudnn:.3f} ms ({cudnn / ours[best]:.2f}x)",
                None if best is None or cudnn is None else ours[best] <= cudnn)
    return lines


def section(log_dir: str, mode: str) -> str:
    import jax  # pylint: disable=import-outside-toplevel
    gpu = " / ".join(read_lines(os.path.join(log_dir, "gpu.txt"))) or (
        f"no GPU ({platform.machine()} cpu, {os.cpu_count()} cores)")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"\n## bench/gpu.sh ({mode}), {gpu}, jax {jax.__version__}, "
           f"Python {platform.python_version()}, {now}\n",
           "Commands (exit code, seconds; `bg` = background, stopped before start-up):\n"]
    for line in read_lines(os.path.join(log_dir, "commands.tsv")):
        name, rc, secs, command = line.split("\t", 3)
        out.append(f"- {name} (rc {rc}, {secs} s): `{command}`")
    skipped = read_lines(os.path.join(log_dir, "skipped.txt"))
    out.append("\nSkipped or incomplete: " + ("; ".join(skipped) if skipped else "nothing") + "\n")
    cache = read_lines(os.path.join(log_dir, "cache.txt"))
    if cache and not cache[0].endswith(": off"):
        out.append(cache[0][0].upper() + cache[0][1:] + ". First-step seconds after the "
                   "run's first compile reuse its cached programs, kernels and autotuning, so "
                   "they are not cold compiles (the start-up runs keep caches of their own).\n")
    train = read_json_lines(os.path.join(log_dir, "train_step.jsonl"))
    tune = read_json_lines(os.path.join(log_dir, "tune.jsonl"))
    startup = read_json_lines(os.path.join(log_dir, "startup.jsonl"))
    attention = read_lines(os.path.join(log_dir, "attention.md"))
    attention += attention_rows_from_logs(log_dir, attention_rows(attention))
    parts = [("The GPU issue's goals against this run (bench/gpu_report.py THROUGHPUT_GOALS, "
              "STARTUP_GOALS, attention: the fastest of our kernels against cuDNN)",
              goals_table(train, tune, startup, attention)),
             ("Train step (bench/train_step.py; ours pallas attention, the peer bf16 autocast + "
              "fused AdamW + torch.compile in its own process)",
              train_step_table(train)),
             ("Tuning: the train step with one knob changed at a time (bench/train_step.py "
              "--variants; first step = compile + one step)",
              variants_table(tune)),
             ("Start-up, process start to first step (bench/startup.py)",
              startup_table(startup)),
             ("Largest micro batch (bench/memory.py; XLA's allocation plan on this backend, "
              "compiled with autotuning off)",
              memory_table(read_json_lines(os.path.join(log_dir, "memory.jsonl"))))]
    for title, lines in parts:
        if len(lines) > 2:
            out += [f"**{title}**\n", *lines, ""]
    profile = read_lines(os.path.join(log_dir, "profile_150m_mlm.txt"))
    if profile:
        out += ["**Profile of one step of the tuning baseline (bench/train_step.py "
                "--profile_out)**\n", "```",
                *profile, "```", ""]
    if attention:
        out += ["**Attention (bench/attention.py)**",
                *[line.replace("## ", "") for line in attention], ""]
    return "\n".join(out) + "\n"


def define_flags():
    flags.DEFINE_string("bench_logs", None, "bench/gpu.sh's log dir")
    flags.DEFINE_string("mode", "gpu", "gpu or cpu_smoke, optionally ,quick")
    flags.DEFINE_string("append_to", "", "append the section to this file (e.g. bench/RESULTS.md)")
    flags.mark_flag_as_required("bench_logs")


def main(argv):
    args = flags.FLAGS
    text = section(args.bench_logs, args.mode)
    with open(os.path.join(args.bench_logs, "results_section.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if args.append_to:
        with open(args.append_to, "a", encoding="utf-8") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
