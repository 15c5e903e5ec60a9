"""bench/gpu.sh --dry_run: the script parses and prints every command it would run."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(tmp_path, *args):
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench")))
    assert out.returncode == 0, out.stderr
    assert "dry run: nothing ran" in out.stdout
    assert not (tmp_path / "gpubench" / "train_step.jsonl").exists()   # nothing ran
    return out.stdout


def command_of(stdout, name):
    """The printed command of `name`, split as a shell would split it."""
    line = next(l for l in stdout.splitlines() if l.startswith(f"+ [{name},"))
    return shlex.split(line.split("] ", 1)[1])


def names_in_order(stdout):
    return [l.split(",")[0][3:] for l in stdout.splitlines() if l.startswith("+ [")]


def test_gpu_sh_dry_run_prints_every_command(tmp_path):
    stdout = dry_run(tmp_path)
    for name in ("ours_150m_mlm", "ours_1b_mlm", "ours_150m_clm", "peer_150m_mlm", "peer_1b_mlm",
                 "peer_150m_clm", "attention_check", "attention", "attention_mosaic", "startup",
                 "tune_150m_mlm"):
        assert f"[{name}," in stdout, (name, stdout)
    assert "memory_" not in stdout          # opt-in: --stages=...,memory
    assert "--check" in command_of(stdout, "attention_check")

    def impls(name):
        words = command_of(stdout, name)
        return set(words[words.index("--impls") + 1].split(","))
    # The Mosaic kernels (never run on a GPU yet) in a process of their own, after the others.
    assert impls("attention") == {"pallas", "cudnn"}
    assert impls("attention_mosaic") == {"mosaic", "mosaic-triton-bwd"}
    names = names_in_order(stdout)
    assert names.index("attention") < names.index("attention_mosaic")


def test_gpu_sh_tune_runs_one_profiled_sweep_only(tmp_path):
    """--tune: the variants sweep (its baseline profiled), nothing else; the command reads
    back as one --variants argument that names every knob, with a budget under its timeout."""
    stdout = dry_run(tmp_path, "--tune")
    assert names_in_order(stdout) == ["tune_150m_mlm"], stdout
    args = dict(a.split("=", 1) for a in command_of(stdout, "tune_150m_mlm") if "=" in a)
    for knob in ("prng_impl=rbg,unsafe_rbg", "attention_impl=mosaic", "loss_vocab_chunk=",
                 "loss_row_chunk=", "batch=32,128", "scan_layers=true",
                 "remat=dots,dots_attention", "qkv_projection=qk_v",
                 "xla_options=xla_gpu_autotune_level=0",
                 "xla_options=xla_gpu_experimental_enable_fusion_autotuner=false"):
        assert knob in args["--variants"], args
    # One process times every variant: the Mosaic kernels go last, so a fault of theirs on
    # the GPU loses no other variant.
    assert args["--variants"].split(";")[-1] == "attention_impl=mosaic"
    timeout = int(stdout.split("[tune_150m_mlm, timeout ")[1].split("s]")[0])
    assert 0 < int(args["--variants_budget_s"]) < timeout
    assert args["--profile_out"].endswith("gpubench/profile_150m_mlm.txt")


def test_gpu_sh_full_mode_times_a_cold_start_without_autotuning(tmp_path):
    def runs(stdout):
        return next(a for a in command_of(stdout, "startup") if a.startswith("--runs="))
    assert runs(dry_run(tmp_path)) == \
        "--runs=cold,warm,new_program,cold_no_autotune,cold_no_fusion_autotuner"
    assert runs(dry_run(tmp_path, "--quick")) == "--runs=cold,warm"


def test_gpu_sh_full_mode_times_the_start_up_at_1024_and_8192(tmp_path):
    def shape(stdout, name):
        words = command_of(stdout, name)
        return [w for w in words if w.startswith(("--rows=", "--seq_len="))]
    full = dry_run(tmp_path, "--stages=startup")
    assert names_in_order(full) == ["startup", "startup_long", "startup_scanned"]
    assert shape(full, "startup") == ["--rows=64", "--seq_len=1024"]
    assert shape(full, "startup_long") == ["--rows=8", "--seq_len=8192"]
    assert shape(full, "startup_scanned") == ["--rows=64", "--seq_len=1024"]
    assert "--runs=cold_scanned,warm_scanned" in command_of(full, "startup_scanned")
    assert names_in_order(dry_run(tmp_path, "--stages=startup", "--quick")) == ["startup"]


def test_gpu_sh_stages_pick_the_commands_and_their_order(tmp_path):
    stdout = dry_run(tmp_path, "--stages=startup,memory,ours", "--quick")
    assert names_in_order(stdout) == ["startup", "memory_150m", "memory_1b", "ours_150m_mlm"]
    default = names_in_order(dry_run(tmp_path, "--skip_peer"))
    assert default[:3] == ["ours_150m_mlm", "ours_1b_mlm", "ours_150m_clm"]
    assert not any(name.startswith("peer_") for name in default)
    assert default[-1] == "tune_150m_mlm"
    assert "tune_150m_mlm" not in names_in_order(dry_run(tmp_path, "--quick"))


def test_gpu_sh_refuses_an_unknown_stage_before_running_anything(tmp_path):
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", "--stages=ours,atention"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench")))
    assert out.returncode == 2
    assert "unknown stage 'atention'" in out.stderr and out.stdout == ""


def test_gpu_sh_help_names_every_option_and_runs_nothing(tmp_path):
    """--help prints the header, which names every option the argument loop accepts, and
    exits 0 before touching the log directory; an unknown option points to it."""
    env = dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench"))
    out = subprocess.run(["bash", "bench/gpu.sh", "--stages=ours", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("The GPU bench table in one go")
    with open(os.path.join(ROOT, "bench", "gpu.sh")) as script:
        loop = script.read().split('for arg in "$@"; do', 1)[1].split("done", 1)[0]
    options = set(re.findall(r"^\s*(?:-h\|)?(--[a-z_]+)(?:=\*)?\)", loop, re.M))
    assert {"--help", "--dry_run", "--cpu_smoke", "--stages", "--tune_s"} <= options
    for option in options:
        assert option in out.stdout, option
    assert not (tmp_path / "gpubench").exists()
    bad = subprocess.run(["bash", "bench/gpu.sh", "--budget=60"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--budget=60" in bad.stderr and "--help" in bad.stderr


def test_gpu_sh_tune_s_caps_the_tune_stage_so_later_stages_run(tmp_path):
    stdout = dry_run(tmp_path, "--stages=tune,ours", "--tune_s=200", "--budget_s=540")
    assert names_in_order(stdout)[:2] == ["tune_150m_mlm", "ours_150m_mlm"]
    assert "[tune_150m_mlm, timeout 200s]" in stdout
    args = dict(a.split("=", 1) for a in command_of(stdout, "tune_150m_mlm") if "=" in a)
    assert 0 < int(args["--variants_budget_s"]) < 200
    for bad, message in (("--tune_s=60", "needs 120 s at least"), ("--tune_s=2m", "whole seconds")):
        out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", bad], cwd=ROOT,
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench")))
        assert out.returncode == 2 and message in out.stderr and out.stdout == "", bad


def test_startup_runs_share_a_cache_dir_per_variant():
    from bench import startup  # pylint: disable=import-outside-toplevel
    suffix = {run: startup.cache_suffix(run) for run in startup.RUNS}
    assert suffix["cold"] == suffix["warm"] == ""
    assert suffix["cold_scanned"] == suffix["warm_scanned"] != ""
    assert startup.RUNS["cold_scanned"] == startup.RUNS["warm_scanned"]
    # A run with main.py flags of its own never reads or empties the plain runs' cache.
    for run, extra_flags in startup.RUNS.items():
        assert (suffix[run] == "") == (not extra_flags), run
    assert len({suffix["cold"], suffix["cold_no_autotune"], suffix["cold_no_fusion_autotuner"],
                suffix["cold_scanned"]}) == 4


def test_startup_new_program_drops_compiled_programs_and_keeps_xla_caches(tmp_path):
    """bench/startup.py end to end on the tiny model (CPU): a cold run fills the cache dir,
    new_program removes jax's programs (not XLA's caches, named xla_gpu_*) and starts again;
    both log one loss at step 1, the same step on the same data."""
    import json  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    cache = tmp_path / "cache"
    kept = cache / "xla_gpu_per_fusion_autotune_cache_dir"
    kept.mkdir(parents=True)
    (kept / "fusion.textproto").write_text("kept\n")
    shared = tmp_path / "shared"          # bench/gpu.sh's cache for the other stages
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(shared))
    # XLA's backend optimisation off, as the other main.py tests: 27 s instead of 40 s alone.
    out = subprocess.run(
        [sys.executable, "bench/startup.py", "--config=configs/ettin_tiny.py:mlm", "--rows=4",
         "--seq_len=64", "--runs=warm,new_program", f"--cache_dir={cache}", "--timeout=200",
         "--override=--config.train.xla_options=xla_backend_optimization_level=0",
         f"--run_logs={tmp_path / 'logs'}", f"--json_out={tmp_path / 'startup.jsonl'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "startup.jsonl").read_text().splitlines()]
    assert [r["run"] for r in records] == ["warm", "new_program"]
    removed = int(out.stdout.split("new_program: removed ")[1].split()[0])
    assert removed >= 2                   # the train step and the params init, at least
    assert (kept / "fusion.textproto").read_text() == "kept\n"
    losses = [r["first_loss"] for r in records]
    assert losses[0] is not None and losses[0] == losses[1], losses
    # The run compiled its train step again (a miss writes the program back to the dir).
    assert any(name.startswith("jit_train_step-") for name in os.listdir(cache))
    assert all(r["rc"] == 0 for r in records), records
    assert not shared.exists()            # the runs used their own dir, not the stages' one


def test_gpu_sh_stages_share_one_compilation_cache_and_start_up_keeps_its_own(tmp_path):
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", "--stages=startup"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench")))
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "gpubench" / "xla_cache"
    assert (f"compilation cache shared by the stages: {cache} (XLA caches: all)"
            in out.stdout.splitlines())
    # The start-up runs get caches of their own: bench/startup.py sets the dir of each run
    # (test_startup_new_program_drops_compiled_programs_and_keeps_xla_caches checks it).
    assert "--cache_dir" not in " ".join(command_of(out.stdout, "startup"))
    off = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", "--stages=startup"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, GPUBENCH_LOG=str(tmp_path / "gpubench"),
                                  GPUBENCH_CACHE=""))
    assert "compilation cache shared by the stages: off" in off.stdout.splitlines()


_STARTUP_PROBE = """
import signal, sys, time
from bench import startup
signal.signal(signal.SIGTERM, startup._end_runs_and_exit)
# a silent run: the watchdog ends it after 1 s however little it prints
print(startup.time_run([sys.executable, "-c", "import time; time.sleep(60)"], {}, 1.0,
                       sys.argv[1])["rc"], flush=True)
startup.time_run([sys.executable, "-c", "import os, sys, time; "
                  "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)", sys.argv[2]],
                 {}, 60.0, sys.argv[1])
"""


def test_startup_runs_end_on_their_timeout_and_with_the_script(tmp_path):
    """A main.py run that prints nothing is still cut at --timeout (the check used to wait
    for a line), and a SIGTERM to bench/startup.py (gpu.sh's timeout) ends the run it started
    in a session of its own, which would otherwise go on using the GPU."""
    import signal  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    probe = subprocess.Popen(
        [sys.executable, "-c", _STARTUP_PROBE, str(tmp_path / "run.log"), str(tmp_path / "pid")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    started = time.monotonic()
    assert probe.stdout.readline().strip() == "timeout"
    assert time.monotonic() - started < 30
    child = None
    while child is None and time.monotonic() - started < 60:   # the run's pid, once written
        text = (tmp_path / "pid").read_text() if (tmp_path / "pid").exists() else ""
        if text.strip():
            child = int(text.split()[0])
        else:
            time.sleep(0.1)
    probe.send_signal(signal.SIGTERM)
    assert probe.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{child}") or \
        open(f"/proc/{child}/stat").read().split()[2] == "Z", "the run outlived the script"


def test_gpu_sh_killed_mid_stage_still_hands_back_its_logs(tmp_path):
    """The device tool's timeout may end bench/gpu.sh mid-stage: its SIGTERM trap still puts
    the logs (the commands so far, the stages done) in $OUT, as every finished stage does."""
    import signal  # pylint: disable=import-outside-toplevel
    import tarfile  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    out, log = tmp_path / "out", tmp_path / "gpubench"
    out.mkdir()
    script = subprocess.Popen(["bash", "bench/gpu.sh", "--cpu_smoke", "--stages=ours"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True,
                              env=dict(os.environ, GPUBENCH_LOG=str(log), OUT=str(out)))
    try:
        started = time.monotonic()
        while not (log / "ours_150m_mlm.log").exists() and time.monotonic() - started < 60:
            time.sleep(0.2)
        assert (log / "ours_150m_mlm.log").exists(), script.stdout.read()
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=30) == 143
    finally:
        try:
            os.killpg(script.pid, signal.SIGKILL)   # the stage's command, if still running
        except ProcessLookupError:
            pass
    with tarfile.open(out / "gpubench_logs.tar.gz") as archive:
        names = archive.getnames()
    assert "gpubench/commands.tsv" in names and "gpubench/ours_150m_mlm.log" in names


def test_a_dry_run_leaves_the_default_log_directory_alone(tmp_path):
    """Without GPUBENCH_LOG a dry run wrote cache.txt and commands.tsv into /tmp/gpubench,
    over the last real run's logs. TMPDIR moves mktemp's directory (and /tmp/gpubench is
    checked for the run's own files only where it exists)."""
    default = "/tmp/gpubench"
    before = {name: os.path.getmtime(os.path.join(default, name))
              for name in os.listdir(default)} if os.path.isdir(default) else None
    env = {k: v for k, v in os.environ.items() if k != "GPUBENCH_LOG"}
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", "--stages=startup"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(env, TMPDIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    after = {name: os.path.getmtime(os.path.join(default, name))
             for name in os.listdir(default)} if os.path.isdir(default) else None
    assert after == before
    assert os.listdir(tmp_path) == []                    # its own directory is removed
    # It prints the commands a real run executes, logging into the default directory.
    assert "--run_logs=/tmp/gpubench/startup" in out.stdout.replace('"', "")
