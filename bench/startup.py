"""Start-up time of a training run: process start to the end of its first step, `main.py` on
the demo corpus, with a persistent compilation cache that starts empty (cold) and is then
reused (warm); `new_program` is a start on that cache with its compiled programs removed but
XLA's kernel and autotuning caches kept (main.py's config.train.compilation_cache_xla_caches):
what a changed program pays when its kernels were compiled before (a config edit, the other
objective, the next phase), at most; `cold_no_autotune` is a cold start without XLA's GPU
autotuning, `cold_no_fusion_autotuner` one without its autotuning of every fusion (on by
default: on jax 0.11 it costs 6 s of a 25 s compile here even with nothing to time,
bench/RESULTS.md), GEMMs still autotuned; `cold_scanned` / `warm_scanned` are both with the
layer groups scanned. Not part of the test suite.

    python bench/startup.py --config=configs/ettin_150m.py:mlm --rows=64 --seq_len=1024

Each run is a fresh `python main.py` in a fresh workdir whose demo variant is set to one step
of `rows x seq_len` (no eval; one checkpoint at the end, after the timed part), logging every
step; the time is taken when the process prints `step 1/1`, which it does after the step's
metrics are back on the host. The demo corpus is built before the first run (not timed), so
cold and warm differ only in the cache: `JAX_COMPILATION_CACHE_DIR` (every compilation
cached, however short). Prints one JSON object per run; --json_out appends them to a file.
Each record also says when main.py logged that JAX started (imports done), that the state was
restored or initialized, and that the train step (compiled on a thread meanwhile) was ready,
with that compilation's own seconds and the trace + lower part of them, and the loss of the
first step: runs of one shape compute the same step from the same data and initialisation, so
a cached executable, kernel or autotuning choice that computed something else shows there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from absl import flags  # noqa: E402  # pylint: disable=wrong-import-position

from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position
FIRST_STEP = re.compile(r"\bstep 1/\d+")
FIRST_LOSS = re.compile(r"\bstep 1/\d+ \([^)]*\): loss ([-+.\w]+)")
# --runs entries: main.py flags each adds. A cold start compiles with autotuning (every GEMM
# fusion timed on the device); on CPU the option is accepted and changes nothing. The scanned
# pair asks whether compiling one layer group instead of every layer (config.model.scan_layers)
# shortens a start on a GPU: XLA's compile grows with depth (bench/RESULTS.md), and a GPU cache
# hit may too (XLA rebuilds the executable's thunks from the whole optimized module).
SCANNED = ["--config.model.scan_layers=true"]
RUNS = {"cold": [], "warm": [], "new_program": [],
        "cold_no_autotune": ["--config.train.xla_options=xla_gpu_autotune_level=0"],
        "cold_no_fusion_autotuner": [
            "--config.train.xla_options=xla_gpu_experimental_enable_fusion_autotuner=false"],
        "cold_scanned": SCANNED, "warm_scanned": SCANNED}


def cache_suffix(run: str) -> str:
    """The cache dir suffix of a --runs entry: runs with other main.py flags make other cache
    keys, so each variant (the part after cold_/warm_) has its own dir, shared by its cold and
    warm runs; a variant's cold run never empties the plain runs' dir. new_program uses the
    plain runs' dir."""
    return "-" + run.split("_", 1)[1] if run.startswith(("cold_", "warm_")) else ""


def drop_executables(cache_dir: str) -> list[str]:
    """Removes jax's compiled programs from a compilation cache dir, keeping XLA's own caches
    (jax names them after their XLA options, `xla_gpu_*`); returns the names removed."""
    removed = []
    for name in sorted(os.listdir(cache_dir)):
        if name.startswith("xla_gpu_"):
            continue
        path = os.path.join(cache_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(name)
    return removed


# Where the time to the first step goes, from main.py's own log lines (seconds since process
# start at which each first appears): imports and backend start, state restored or
# initialized (the train step compiles on a thread meanwhile), the step's compilation done.
STAGES = {"jax_started_s": re.compile(r"JAX process \d+ of \d+"),
          "state_ready_s": re.compile(r"parameters, \d+ steps of"),
          "step_compiled_s": re.compile(r"train step compiled in")}
COMPILE_SECONDS = re.compile(r"train step compiled in ([0-9.]+) s")
LOWER_SECONDS = re.compile(r"train step compiled in .*traced and lowered in ([0-9.]+) s")


def demo_flags(rows: int, seq_len: int) -> list[str]:
    """main.py overrides that make the demo run one logged step of rows x seq_len."""
    return [f"--config.demo.train.global_batch_size={rows}",
            f"--config.demo.train.seq_len={seq_len}",
            f"--config.demo.schedule.total_tokens={rows * seq_len}",
            "--config.demo.log.every_steps=1",
            "--config.demo.train.eval_batches=0",
            "--config.demo.data.num_workers=0"]


def build_demo_corpus(config_arg: str):
    """Builds the demo corpus main.py will use (its first run would otherwise time it)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    from data_pipeline import demo_corpus  # pylint: disable=import-outside-toplevel
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("startup_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo_corpus.configure(module.get_config(arg or None).copy_and_resolve_references())


# Process groups of the main.py runs alive now: a SIGTERM to this script (bench/gpu.sh's
# timeout) ends them too, or a run in its own session would go on compiling on the GPU.
_RUNNING = set()


def _end_runs_and_exit(signum, frame):  # pylint: disable=unused-argument
    for pid in list(_RUNNING):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def time_run(command: list[str], env: dict, timeout: float, log_path: str) -> dict:
    """Runs `command`; seconds to its first-step line and to its exit, and its exit code
    ("timeout" when a watchdog ended it after `timeout` s, silent or not)."""
    start = time.perf_counter()
    first_step = None
    stages = {name: None for name in STAGES}
    compile_s = lower_s = first_loss = None
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _RUNNING.add(process.pid)
        timed_out = threading.Event()

        def watchdog():
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, watchdog)
        timer.start()
        try:
            for line in process.stdout:
                log.write(line)
                if first_step is None and FIRST_STEP.search(line):
                    first_step = time.perf_counter() - start
                for name, pattern in STAGES.items():
                    if stages[name] is None and pattern.search(line):
                        stages[name] = round(time.perf_counter() - start, 1)
                if compile_s is None and (match := COMPILE_SECONDS.search(line)):
                    compile_s = float(match.group(1))
                if lower_s is None and (match := LOWER_SECONDS.search(line)):
                    lower_s = float(match.group(1))
                if first_loss is None and (match := FIRST_LOSS.search(line)):
                    first_loss = float(match.group(1))
            rc = process.wait()
        finally:
            timer.cancel()
            _RUNNING.discard(process.pid)
        if timed_out.is_set():
            rc = "timeout"
    return {"first_step_s": None if first_step is None else round(first_step, 1),
            "exit_s": round(time.perf_counter() - start, 1), "rc": rc, **stages,
            "step_compile_s": compile_s, "step_lower_s": lower_s, "first_loss": first_loss}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def define_flags():
    flags.DEFINE_string("config", None, "main.py's --config, e.g. configs/ettin_150m.py:mlm")
    flags.DEFINE_integer("rows", 64, "rows of the one step")
    flags.DEFINE_integer("seq_len", 1024, "tokens per row")
    flags.DEFINE_string("runs", "cold,warm", "runs in order: cold empties the cache dir first, "
                        "warm reuses it, new_program reuses it without its compiled "
                        "programs (XLA's kernel and autotuning caches kept), "
                        "cold_no_autotune is cold with XLA's GPU autotuning "
                        "off (train.xla_options=xla_gpu_autotune_level=0: how much of a cold "
                        "start it is), cold_no_fusion_autotuner is cold without its "
                        "autotuning of non-GEMM fusions (xla_gpu_experimental_enable_fusion_"
                        "autotuner=false), cold_scanned / warm_scanned are cold and warm with the "
                        "layer groups scanned (model.scan_layers=true; their own cache dir)")
    flags.DEFINE_string("cache_dir", "", "compilation cache dir (default: a fresh temporary one)")
    flags.DEFINE_multi_string("override", [], "extra main.py flag, e.g. "
                              "--override=--config.model.remat=full (repeatable)")
    flags.DEFINE_float("timeout", 240.0, "seconds per run")
    flags.DEFINE_string("run_logs", "", "where each run's output goes (default: a temporary dir)")
    flags.DEFINE_string("json_out", "", "also append each result to this file")
    flags.mark_flag_as_required("config")


def main(argv):
    args = flags.FLAGS
    signal.signal(signal.SIGTERM, _end_runs_and_exit)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ettin-startup-cache-")
    log_dir = args.run_logs or tempfile.mkdtemp(prefix="ettin-startup-logs-")
    os.makedirs(log_dir, exist_ok=True)
    start = time.perf_counter()
    build_demo_corpus(args.config)
    print(f"demo corpus ready ({time.perf_counter() - start:.1f} s, not timed)", flush=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
    for run in args.runs.split(","):
        if run not in RUNS:
            raise cli.UserError(f"--runs entry {run!r}: expected one of {', '.join(RUNS)}")
        run_cache = cache_dir + cache_suffix(run)
        if run.startswith("cold"):
            shutil.rmtree(run_cache, ignore_errors=True)
        os.makedirs(run_cache, exist_ok=True)
        if run == "new_program":
            print(f"new_program: removed {len(drop_executables(run_cache))} compiled programs "
                  f"from {run_cache}, kept {os.listdir(run_cache)}", flush=True)
        run_env = dict(env, JAX_COMPILATION_CACHE_DIR=run_cache)
        workdir = tempfile.mkdtemp(prefix=f"ettin-startup-{run}-")
        command = [sys.executable, "main.py", f"--config={args.config}", f"--workdir={workdir}",
                   *demo_flags(args.rows, args.seq_len), *RUNS[run], *args.override]
        result = {"run": run, "config": args.config, "rows": args.rows, "seq_len": args.seq_len,
                  **time_run(command, run_env, args.timeout, os.path.join(log_dir, f"{run}.log")),
                  "cache_mb": round(dir_bytes(run_cache) / 1e6, 1),
                  "command": " ".join(command[1:])}
        shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(result), flush=True)
        if args.json_out:
            with open(args.json_out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        if result["first_step_s"] is None:
            print(f"no first step in {run} run (rc {result['rc']}); its output: "
                  f"{os.path.join(log_dir, run + '.log')}", flush=True)


    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
