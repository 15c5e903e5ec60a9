"""One command-line style for every entry point (ettin_jax/cli.py): `--help` exits 0 with the
tool's usage, a user error is ONE `error:` line and exit 1 (before JAX starts, for main.py),
a bug keeps its traceback; the hf import/export refusals; main.py's compilation cache."""
import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import ettin_tiny
from data_pipeline import tokenizer as tokenizer_lib
from ettin_jax import checkpoint, cli, hf, model_loader
from ettin_jax import workdir as workdir_lib
from ettin_jax.hf import __main__ as hf_cli

import train_testlib
from test_train_resume import FLAGS as TRAIN_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*command, env=None, timeout=300):
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or dict(os.environ, JAX_PLATFORMS="cpu"))


def assert_one_error_line(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --- main.py -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["--config=configs/nope.py:mlm"], ["--config=configs/nope.py:mlm", "no config file"]),
    (["--config=configs/ettin_tiny.py:mlm", "--config.train.sequence_len=64"],
     ["--config.train.sequence_len", "config.train has no key 'sequence_len'"]),
    (["--config=configs/ettin_tiny.py:mlm_ext", "--config.train.init_from=/no/such/run"],
     ["config.train.init_from=/no/such/run", "no such directory"]),
    (["--config=configs/ettin_tiny.py:mxm"], ["--config=configs/ettin_tiny.py:mxm",
                                              "objective 'mxm' is not one of"]),
    (["--config=configs/ettin_tiny.py:clm_decay"], ["--config.train.init_from=<workdir",
                                                    "init_from=scratch"]),
    (["--config=configs/ettin_tiny.py:mlm", "--workdir=gs://bucket/runs/x"],
     ["--workdir=gs://bucket/runs/x", "local or mounted path"]),
    (["--config=configs/ettin_tiny.py:mlm",
      "--config.train.compilation_cache_xla_caches=xla_gpu_kernel_cache"],
     ["config.train.compilation_cache_xla_caches", "unknown 'xla_gpu_kernel_cache'"]),
    (["--config=configs/ettin_tiny.py:mlm",
      "--config.train.compilation_cache_xla_caches=all,xla_gpu_kernel_cache_file"],
     ["compilation_cache_xla_caches='all,xla_gpu_kernel_cache_file'",
      "\"all\" cannot be combined"]),
    (["--config=configs/ettin_tiny.py:mlm,window=transformers+clm"],
     ["mlm,window=transformers", "window applies only to clm runs"]),
    (["--config=configs/base.py:mlm"], ["--config=configs/base.py:mlm",
                                        "configs/base.py does not load", "get_config"]),
    (["--config=configs/ettin_tiny.py:mlm", "--plan_devices=4"],
     ["--plan_devices plans a run: it needs --dry_run"]),
    (["--config=configs/ettin_tiny.py:mlm", "--plan_mean_length=0", "--dry_run"],
     ["--plan_mean_length=0.0: must be > 0"]),
    # a pair checks its own --workdir (empty: it would train in ./mlm and ./clm) first
    (["--config=configs/ettin_tiny.py:mlm+clm", "--workdir=", "--dry_run"],
     ["--workdir is empty"]),
])
def test_main_user_errors_are_one_line_before_jax_starts(tmp_path, args, fragments):
    result = run("main.py", f"--workdir={tmp_path / 'w'}", *args)
    assert_one_error_line(result, *fragments)
    assert "JAX process" not in result.stderr     # failed before JAX started
    assert not (tmp_path / "w").exists()


def test_a_config_file_that_does_not_load_is_named_with_its_line(tmp_path):
    """A KeyError inside get_config (ml_collections passes it through, and the missing-key
    hint parsed the file again inside the handler: two tracebacks) and a SyntaxError."""
    (tmp_path / "keys.py").write_text("def get_config(arg=None):\n    return {}['x']\n")
    (tmp_path / "syntax.py").write_text("x = 1\ndef get_config(arg=None)\n    return x\n")
    for name, line, error in (("keys.py", 2, "KeyError: 'x'"), ("syntax.py", 2, "SyntaxError")):
        path = tmp_path / name
        result = run("main.py", f"--workdir={tmp_path / 'w'}", f"--config={path}:mlm")
        assert_one_error_line(result, f"--config={path}:mlm", f"{path}, line {line} does not "
                              f"load: {error}")


@pytest.mark.parametrize("args,fragments", [
    # the demo's keys are named in a dry run as in a real one (the demo ignores config.train.*)
    (["--config.demo.train.grad_accum_steps=3"], ["config.demo.train.global_batch_size=16",
                                                  "config.demo.train.grad_accum_steps=3"]),
    (["--config.demo.train.seq_len=0"], ["config.demo.train.seq_len=0: must be >= 1"]),
    (["--config.demo.train.global_batch_size=0"],
     ["config.demo.train.global_batch_size=0: must be >= 1"]),
])
def test_a_demo_dry_run_names_the_demo_keys(tmp_path, args, fragments):
    result = run("main.py", f"--workdir={tmp_path / 'w'}", "--config=configs/ettin_tiny.py:mlm",
                 "--dry_run", *args)
    assert_one_error_line(result, *fragments)


def test_a_pairs_dry_run_plans_a_phase_whose_source_pair_does_not_exist_yet(tmp_path):
    """As a single run's dry run does: each side's plan says a real run finds nothing there."""
    result = run("main.py", f"--workdir={tmp_path / 'w'}", "--dry_run",
                 "--config=configs/ettin_tiny.py:mlm_ext+clm_ext",
                 f"--config.train.init_from={tmp_path / 'previous'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("NO checkpoint there yet") == 2, result.stdout
    assert str(tmp_path / "previous" / "clm") in result.stdout
    assert not (tmp_path / "w").exists()


def test_a_pair_refuses_a_workdir_that_is_a_file_before_jax_starts(tmp_path):
    (tmp_path / "file").write_text("")
    result = run("main.py", f"--workdir={tmp_path / 'file'}",
                 "--config=configs/ettin_tiny.py:mlm+clm")
    assert_one_error_line(result, f"--workdir={tmp_path / 'file'} is a file, not a directory")
    assert "JAX process" not in result.stderr


@pytest.mark.parametrize("arg,side", [("mlm_ext", "mlm"), ("clm_decay", "clm"),
                                      ("mlm_from_clm", "clm")])
def test_init_from_a_pair_workdir_names_the_side_to_continue(tmp_path, arg, side):
    """The side is the run's objective, the other one for a cross-objective run; main.py says
    so in its one error line (once, for the cross-objective case: a subprocess costs ~8 s)."""
    for objective in ("mlm", "clm"):
        os.makedirs(tmp_path / "pair" / objective / "checkpoints")
    config = ettin_tiny.get_config(arg)
    config.train.init_from = str(tmp_path / "pair")
    with pytest.raises(workdir_lib.RunIdentityError,
                       match=rf"no checkpoints/ directory .* it is a pair's workdir .*"
                             rf"--config.train.init_from={re.escape(str(tmp_path / 'pair' / side))}$"):
        workdir_lib.check_init_from(config)
    if arg == "mlm_from_clm":
        result = run("main.py", f"--config=configs/ettin_tiny.py:{arg}",
                     f"--workdir={tmp_path / 'run'}",
                     f"--config.train.init_from={tmp_path / 'pair'}")
        assert_one_error_line(result, "no checkpoints/ directory", "it is a pair's workdir",
                              f"--config.train.init_from={tmp_path / 'pair' / side}")
    os.rmdir(tmp_path / "pair" / side / "checkpoints")
    with pytest.raises(workdir_lib.RunIdentityError,
                       match=rf"no checkpoints/ directory .*none for the {side} side"):
        workdir_lib.check_init_from(config)


def test_init_from_an_import_of_the_other_objective_or_another_size_is_refused(tmp_path):
    """An import has no run_identity.json: a decoder's import trained silently as an encoder,
    and a source of another size failed only after the train step compiled. Both are read
    from the model the checkpoint saved; a dry run checks a source that is there too."""
    decoder = model_loader.new_model(ettin_tiny.get_config("clm").model)
    checkpoint.save_imported(decoder, decoder.config, str(tmp_path / "imported_clm"))
    config = ettin_tiny.get_config("mlm_ext")
    config.train.init_from = str(tmp_path / "imported_clm")
    with pytest.raises(workdir_lib.RunIdentityError, match=r"imported_clm \(step 0\) holds a "
                       r"clm model; a mlm ext run continues a mlm model.*\(mlm_from_clm\)"):
        workdir_lib.check_init_from(config)
    workdir_lib.check_init_from(_with_init_from("clm_ext", str(tmp_path / "imported_clm")))
    bigger = _with_init_from("clm_ext", str(tmp_path / "imported_clm"), size="17m")
    with pytest.raises(workdir_lib.RunIdentityError,
                       match=r"holds a model of another shape: vocab_size 512 \(this run: "
                             r"50368\), hidden_size 64 \(this run: 256\)"):
        workdir_lib.check_init_from(bigger)
    # The same parameter shapes, cut into other heads: it would load, and compute another model.
    other_heads = _with_init_from("clm_ext", str(tmp_path / "imported_clm"))
    other_heads.model.num_heads = 2
    with pytest.raises(workdir_lib.RunIdentityError, match=r"num_heads 4 \(this run: 2\)"):
        workdir_lib.check_init_from(other_heads)
    result = run("main.py", f"--workdir={tmp_path / 'w'}", "--config=configs/ettin_17m.py:clm_ext",
                 f"--config.train.init_from={tmp_path / 'imported_clm'}", "--dry_run")
    assert_one_error_line(result, "holds a model of another shape")


def test_init_from_a_run_of_another_tokenizer_is_refused(tmp_path):
    """A later phase on data of another tokenizer trained on silently (ids meaning other
    strings); the tokenizer the source's checkpoint records is compared by fingerprint."""
    def tokenizer_at(name, text):
        tok = tokenizer_lib.train_bpe([text] * 30, vocab_size=512, unk_id=500)
        return tokenizer_lib.save(tok, str(tmp_path / name))
    ours = tokenizer_at("ours", "the cat sat on the mat")
    same = tokenizer_at("same", "the cat sat on the mat")         # another path, same ids
    other = tokenizer_at("other", "zebras quietly yodel in xylophone valleys")
    encoder = model_loader.new_model(ettin_tiny.get_config("mlm").model)
    checkpoint.save_imported(encoder, encoder.config, str(tmp_path / "run"), tokenizer=ours)
    config = _with_init_from("mlm_ext", str(tmp_path / "run"))
    workdir_lib.check_source_tokenizer(config, ours)
    workdir_lib.check_source_tokenizer(config, same)
    with pytest.raises(workdir_lib.RunIdentityError, match=r"trained with the tokenizer .*ours "
                       r"\(fingerprint \w+\); this run's data is tokenized with .*other"):
        workdir_lib.check_source_tokenizer(config, other)


def _with_init_from(arg, source, size="tiny"):
    from configs import ettin_17m  # pylint: disable=import-outside-toplevel
    config = (ettin_tiny if size == "tiny" else ettin_17m).get_config(arg)
    config.train.init_from = source
    return config


def test_main_init_from_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "previous").mkdir()
    result = run("main.py", f"--workdir={tmp_path / 'w'}", "--config=configs/ettin_tiny.py:mlm_ext",
                 f"--config.train.init_from={tmp_path / 'previous'}")
    assert_one_error_line(result, "no checkpoints/ directory")


def test_main_help_exits_0_with_the_usage():
    result = run("main.py", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Trains an Ettin model")
    assert "--workdir" in result.stdout and "--[no]verbose" in result.stdout


_RUNNER = """
import sys
from ettin_jax import cli
def main(argv):
    kind = argv[1]
    if kind == "bug":
        raise KeyError("a bug")
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise ValueError("bad value\\nsecond line")
cli.run(main, usage="a test tool", positional=True)
"""


def test_runner_bug_keeps_traceback_user_error_does_not():
    bug = run("-c", _RUNNER, "bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
    assert not any(line.startswith("error:") for line in bug.stderr.splitlines())
    user = run("-c", _RUNNER, "user")
    assert_one_error_line(user, "bad value")
    assert "  second line" in user.stderr
    verbose = run("-c", _RUNNER, "user", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    interrupted = run("-c", _RUNNER, "interrupt")
    assert interrupted.returncode == cli.EXIT_INTERRUPTED
    assert interrupted.stderr.strip() == "interrupted"


def test_tools_without_positional_arguments_refuse_them():
    """A stray word (e.g. a flag missing its `--`) is an error line, not silently ignored."""
    result = run("bench/compile_time.py", "--config=configs/ettin_tiny.py:mlm", "step=train")
    assert_one_error_line(result, "unexpected arguments ['step=train']")
    result = run("main.py", "--config=configs/ettin_tiny.py:mlm", "--workdir=/tmp/x",
                 "train.seq_len=64")
    assert_one_error_line(result, "unexpected arguments", "overrides are --config.KEY=VALUE")


# --- every other entry point --------------------------------------------------------------------

ENTRY_POINTS = [   # (command, first words of its usage, a bad invocation, words of its error)
    (["-m", "ettin_jax.hf"], "Command line of the transformers interop",
     ["export", "--out=/tmp/x"], "exactly one of --checkpoint"),
    (["-m", "ettin_jax.glue"], "Command line of GLUE fine-tuning",
     ["--workdir=/tmp/x", "--data_dir=/no/such/dir", "--hf=/no/such/dir", "--lrs=1e-5,abc"],
     "--lrs='1e-5,abc': expected comma-separated numbers"),
    (["-m", "ettin_jax.generate"], "Text generation with an Ettin decoder",
     ["--hf=/no/such/dir"], "/no/such/dir"),
    (["-m", "ettin_jax.compare"], "Encoder vs decoder",
     ["/no/such/run"], "/no/such/run"),
    (["-m", "data_pipeline.prepare"], "Prepare raw text into ArrayRecord",
     ["--input=/no/such/*.jsonl", "--output=/tmp/x", "--tokenizer=x"], "matches no file"),
    (["-m", "data_pipeline.tokenizer"], "BPE tokenizers with the ModernBERT",
     ["show", "/no/such/tokenizer"], "no such tokenizer"),
    (["-m", "data_pipeline.demo_corpus"], "A small real corpus",
     ["--vocab_size=x"], "--vocab_size"),
    (["-m", "data_pipeline.inspect"], "Shows what the model will see",
     ["--config=configs/ettin_tiny.py:mlm", "--config.data.mixture=/no/such/data"],
     "/no/such/data"),
    (["bench/compile_time.py"], "Compile time of the model", ["--config.x=1"], "config.x"),
    (["bench/loader.py"], "Loader throughput", ["--rows=many"], "--rows"),
    (["bench/train_step.py"], "Throughput of the jitted train step", [], "--config is required"),
    (["bench/attention.py"], "Attention forward+backward benchmark", ["--seqs"], "--seqs"),
    (["bench/memory.py"], "Largest micro batch", [], "--config is required"),
    (["bench/startup.py"], "Start-up time of a training run", [], "--config is required"),
    (["bench/gpu_report.py"], "Turns bench/gpu.sh's log dir", [], "--bench_logs is required"),
]


@pytest.mark.parametrize("command,usage,bad,error", ENTRY_POINTS,
                         ids=[c[-1] for c, *_ in ENTRY_POINTS])
def test_entry_point_help_and_one_line_errors(command, usage, bad, error):
    helped = run(*command, "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith(usage) and "--[no]verbose" in helped.stdout
    assert_one_error_line(run(*command, *bad), error)


# --- hf import / export ---------------------------------------------------------------------------

def _tiny_hf_dir(path):
    config = ettin_tiny.get_config("mlm")
    model = model_loader.from_config(config.model, seed=0)
    hf.save_hf(model, model.config, str(path))
    return model


def _export_flags(**overrides):
    values = dict(checkpoint=None, config=None, step=None, tokenizer=None, out=None,
                  overwrite=False, hf=None)
    return types.SimpleNamespace(**{**values, **overrides})


def test_hf_import_refuses_a_run_with_checkpoints_and_export_overwrite_rules(tmp_path):
    _tiny_hf_dir(tmp_path / "hf")
    run_dir = str(tmp_path / "run")
    hf_cli._import(_export_flags(hf=str(tmp_path / "hf"), out=run_dir))
    assert os.listdir(checkpoint.checkpoint_dir(run_dir)) == ["0"]
    with pytest.raises(cli.UserError, match="already holds checkpoints"):
        hf_cli._import(_export_flags(hf=str(tmp_path / "hf"), out=run_dir))
    with pytest.raises(cli.UserError, match="import reads only --hf and --out, not --tokenizer"):
        hf_cli._import(_export_flags(hf=str(tmp_path / "hf"), out=str(tmp_path / "run2"),
                                     tokenizer="tok.json"))
    with pytest.raises(cli.UserError, match="--step picks a checkpoint of --checkpoint"):
        hf_cli._export(_export_flags(config=ettin_tiny.get_config("mlm"), step=3,
                                     out=str(tmp_path / "export")))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; it has steps 0"):
        hf_cli._export(_export_flags(checkpoint=run_dir, step=3, out=str(tmp_path / "export")))

    out = tmp_path / "export"
    hf_cli._export(_export_flags(checkpoint=run_dir, out=str(out)))
    hf_cli._export(_export_flags(checkpoint=run_dir, out=str(out)))   # over its own files: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(cli.UserError, match=r"holds files an export does not write \(notes.txt\)"):
        hf_cli._export(_export_flags(checkpoint=run_dir, out=str(out)))
    hf_cli._export(_export_flags(checkpoint=run_dir, out=str(out), overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()

    # An export with a tokenizer, then one without: the first one's tokenizer files go.
    decoder = tmp_path / "decoder"
    tokenizer = tokenizer_lib.train_bpe(["the cat sat on the mat"] * 20,
                                        vocab_size=ettin_tiny.VOCAB_SIZE, unk_id=ettin_tiny.UNK_ID)
    tokenizer_dir = tokenizer_lib.save(tokenizer, str(tmp_path / "tokenizer"))
    hf_cli._export(_export_flags(config=ettin_tiny.get_config("clm"), out=str(decoder),
                                 tokenizer=tokenizer_dir))
    assert (decoder / "generation_config.json").exists() and (decoder / "tokenizer.json").exists()
    # An export that fails half way (its tokenizer does not parse) leaves the previous one whole.
    before = {name: (decoder / name).read_bytes() for name in os.listdir(decoder)}
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(Exception, match="key must be a string"):   # tokenizers' own error
        hf_cli._export(_export_flags(config=ettin_tiny.get_config("mlm"), out=str(decoder),
                                     tokenizer=str(tmp_path / "broken.json")))
    assert {name: (decoder / name).read_bytes() for name in os.listdir(decoder)} == before
    hf_cli._export(_export_flags(config=ettin_tiny.get_config("mlm"), out=str(decoder)))
    assert sorted(os.listdir(decoder)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == sorted(                 # no staging directory left
        ["broken.json", "decoder", "export", "hf", "run", "tokenizer"])

    # import keeps a copy of the transformers directory's tokenizer with the run: an export of
    # the run writes it even after that directory is gone.
    with pytest.raises(cli.UserError, match="import reads only --hf and --out, not --overwrite"):
        hf_cli._import(_export_flags(hf=str(decoder), out=str(tmp_path / "r"), overwrite=True))
    hf_cli._export(_export_flags(config=ettin_tiny.get_config("mlm"), out=str(decoder),
                                 tokenizer=tokenizer_dir))
    hf_cli._import(_export_flags(hf=str(decoder), out=str(tmp_path / "imported")))
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    written = {name: (decoder / name).read_bytes() for name in names}
    shutil.rmtree(decoder)
    hf_cli._export(_export_flags(checkpoint=str(tmp_path / "imported"), out=str(decoder)))
    assert {name: (decoder / name).read_bytes() for name in names} == written


def test_hf_export_prints_its_result_without_orbax_chatter(tmp_path):
    """Every entry point drops Orbax's INFO lines (cli.QuietOrbaxInfo, installed by cli.run):
    an export printed ~40 of them. Orbax's warnings stay; of those, a read-only restore now
    leaves only its unconditional notice."""
    _tiny_hf_dir(tmp_path / "hf")
    run_dir = str(tmp_path / "run")
    hf_cli._import(_export_flags(hf=str(tmp_path / "hf"), out=run_dir))
    result = run("-m", "ettin_jax.hf", "export", f"--checkpoint={run_dir}",
                 f"--out={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {tmp_path / 'export'}" in result.stdout + result.stderr
    # Python's log lines (absl: `<level><date> <time> <thread> <file>.py:<line>] `): the one
    # left is Orbax's notice (an export logs nothing of its own).
    logged = [line for line in result.stderr.splitlines()
              if re.match(r"[IWE]\d{4} \S+ \d+ \S+\.py:\d+\] ", line)]
    assert logged and all(line.startswith("W") and "Given directory is read only" in line
                          for line in logged), logged


def test_quiet_orbax_info_keeps_warnings_and_other_libraries_info():
    quiet = cli.QuietOrbaxInfo()
    orbax_file = ocp.checkpoint_manager.__file__
    record = lambda path, level: logging.LogRecord("absl", level, path, 1, "message", None, None)
    assert not quiet.filter(record(orbax_file, logging.INFO))
    assert quiet.filter(record(orbax_file, logging.WARNING))
    assert quiet.filter(record(hf.__file__, logging.INFO))


def test_hf_export_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    model = _tiny_hf_dir(tmp_path / "hf")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    value = np.array(flat[("final_norm",)].get_value())
    value[0] = np.nan
    flat[("final_norm",)].set_value(jax.numpy.asarray(value))
    nnx.update(model, nnx.from_flat_state(flat))
    run_dir = str(tmp_path / "run")
    checkpoint.save_imported(model, model.config, run_dir)
    out = tmp_path / "export"
    with pytest.raises(cli.UserError, match=r"tensor 'model.final_norm.weight' has 1 non-finite"):
        hf_cli._export(_export_flags(checkpoint=run_dir, out=str(out)))
    assert not out.exists()


def test_hf_export_checks_the_tokenizer_first_and_a_failed_export_leaves_no_out(tmp_path):
    out = tmp_path / "export"
    # Named before the run is read (its restore is slow for a large model): the run is absent.
    with pytest.raises(cli.UserError, match=r"--tokenizer=\S*nope.json does not exist"):
        hf_cli._export(_export_flags(checkpoint=str(tmp_path / "absent"), out=str(out),
                                     tokenizer=str(tmp_path / "nope.json")))
    # A tokenizer that fails when written: the export fails, and --out is not left empty.
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Exception, match="key must be a string"):   # tokenizers' own error
        hf_cli._export(_export_flags(config=ettin_tiny.get_config("mlm"), out=str(out),
                                     tokenizer=str(tmp_path / "bad.json")))
    assert os.listdir(tmp_path) == ["bad.json"]       # no --out, no staging directory


# --- main.py: the persistent compilation cache -------------------------------------------------

_LOG_TIME = re.compile(r"^[IWE]\d{4} (\d\d:\d\d:\d\d\.\d+)")


def _seconds_to_first_step(log: str) -> float:
    """From the `JAX process` line (JAX started) to the first `step 1/` line (first step done)."""
    def time_of(marker):
        line = next(line for line in log.splitlines() if marker in line and _LOG_TIME.match(line))
        clock = datetime.datetime.strptime(_LOG_TIME.match(line).group(1), "%H:%M:%S.%f")
        return clock.hour * 3600 + clock.minute * 60 + clock.second + clock.microsecond / 1e6
    return (time_of("step 1/") - time_of("JAX process")) % 86400


def test_second_start_reads_compiled_programs_from_the_cache(tmp_path):
    env = train_testlib.subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)     # the config key decides, not the tests' cache
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    cache = tmp_path / "xla"
    flags = [flag for flag in TRAIN_FLAGS if "total_tokens" not in flag]
    flags = [flag for flag in flags if "eval_batches" not in flag]
    flags += ["--config.demo.schedule.total_tokens=512",         # 1 step of 8 x 64
              "--config.demo.train.eval_batches=0",
              f"--config.train.compilation_cache_dir={cache}",
              "--config.train.compilation_cache_min_compile_secs=0"]
    times, compiles, clock_steps = [], [], []
    for name in ("first", "second"):
        wall, monotonic = time.time(), time.perf_counter()
        result = run("main.py", f"--workdir={tmp_path / name}", *flags, env=env, timeout=600)
        # The log's timestamps are wall-clock; a paused and resumed VM sets that clock forward
        # (seen in bench/compile_time.py's profiles), the monotonic one not.
        clock_steps.append((time.time() - wall) - (time.perf_counter() - monotonic))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"compilation cache {cache}" in result.stderr
        times.append(_seconds_to_first_step(result.stderr))
        # The step's compile, and its trace + lower (paid again on the cache hit), logged apart.
        compiled, lowered = map(float, re.search(
            r"train step compiled in ([0-9.]+) s \(traced and lowered in ([0-9.]+) s",
            result.stderr).groups())
        assert lowered <= compiled
        compiles.append(compiled)
        if name == "first":
            entries = len(os.listdir(cache))
            assert entries > 0
    print(f"seconds from JAX start to the first step: {times}, step compiles: {compiles}, "
          f"system clock steps: {clock_steps}")
    assert times[1] - max(0.0, clock_steps[1]) < times[0], (times, clock_steps)
    assert compiles[1] < compiles[0], compiles


# What jax hands XLA once main.py has set the cache up: read back from jax's compile options.
_COMPILE_OPTIONS = """
import sys
from absl import flags
import main
main.define_flags()
flags.FLAGS(["main.py", "--config=configs/ettin_tiny.py:mlm", "--workdir=unused", *sys.argv[1:]])
main.start_jax(flags.FLAGS.config)
from jax._src import compiler
compile_options = compiler.get_compile_options(1, 1)   # kept: debug_options points into it
options = compile_options.executable_build_options.debug_options
print("kernels=" + options.xla_gpu_kernel_cache_file)
print("autotune=" + options.xla_gpu_per_fusion_autotune_cache_dir)
"""


@pytest.mark.parametrize("setting,env_setting,kernels,autotune", [
    (None, None, True, True),                                      # the default: "all"
    ("", None, False, False),
    ("xla_gpu_per_fusion_autotune_cache_dir", None, False, True),   # jax's own default
    ("", "xla_gpu_kernel_cache_file", True, False),                  # the environment wins
])
def test_xla_caches_go_to_the_compilation_cache_dir(tmp_path, setting, env_setting, kernels,
                                                    autotune):
    env = train_testlib.subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", None)
    if env_setting is not None:
        env["JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES"] = env_setting
    cache = tmp_path / "xla"
    args = [f"--config.train.compilation_cache_dir={cache}"]
    if setting is not None:
        args.append(f"--config.train.compilation_cache_xla_caches={setting}")
    result = run("-c", _COMPILE_OPTIONS, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert paths["kernels"] == (str(cache / "xla_gpu_kernel_cache_file") if kernels else "")
    assert paths["autotune"] == (str(cache / "xla_gpu_per_fusion_autotune_cache_dir")
                                 if autotune else "")


_COMPILE_ONE = """
import sys
from absl import flags
import jax
import main
main.define_flags()
flags.FLAGS(["main.py", "--config=configs/ettin_tiny.py:mlm", "--workdir=unused", *sys.argv[1:]])
main.start_jax(flags.FLAGS.config)
print(jax.jit(lambda x: x * 3 + 1)(2.0))
"""


def test_empty_compilation_cache_entries_are_removed_and_written_again(tmp_path):
    """jax writes a cache entry in place and never writes one that exists: after a full disk
    left entries empty, every start compiled those programs cold. main.py removes them (only
    older ones: a young empty entry may be another process's write under way)."""
    env = train_testlib.subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    cache = tmp_path / "xla"
    args = [f"--config.train.compilation_cache_dir={cache}",
            "--config.train.compilation_cache_min_compile_secs=0"]
    assert run("-c", _COMPILE_ONE, *args, env=env).returncode == 0
    entries = sorted(p for p in cache.iterdir() if p.name.endswith("-cache"))
    assert entries
    for entry in entries:                       # as a full disk leaves them, an hour ago
        entry.write_bytes(b"")
        os.utime(entry, (time.time() - 3600,) * 2)
    young = cache / "young-cache"
    young.write_bytes(b"")
    result = run("-c", _COMPILE_ONE, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed {len(entries)} empty entries of the compilation cache" in result.stderr
    assert all(entry.stat().st_size > 0 for entry in entries)    # compiled and written again
    assert young.exists()
