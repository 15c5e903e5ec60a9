"""Phases end to end on the tiny config: mlm -> mlm_ext -> mlm_decay, the same for clm, and both
cross-objective runs, through `train.train_and_evaluate` with the real model and loader (the
stdlib demo corpus). Checks the LR of every step against the recipe's curves (recipe §3.2,
§3.3, transcribed here independently of ettin_jax.schedules), that each phase starts from the
previous phase's parameters, and that the optimizer state is carried over where the recipe
keeps it (extension, decay) and fresh where it does not (cross-objective)."""
import json
import math
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from configs import ettin_tiny
from ettin_jax import checkpoint, demo, model as model_lib, train


ROWS, SEQ = 8, 64
PEAK = 3e-3                     # configs/ettin_tiny.py
STEPS = {"pretrain": 4, "ext": 3, "decay": 3, "cross": 4}


def tiny_config(arg, *, init_from=""):
    config = ettin_tiny.get_config(arg)
    phase = config.phase
    config.demo.data.num_workers = 0
    config.demo.train.global_batch_size = ROWS
    config.demo.train.seq_len = SEQ
    config.demo.schedule.total_tokens = STEPS[phase] * ROWS * SEQ
    if config.demo.optimizer.lr_warmup_tokens > 0:      # pre-training and cross: 2-step warmup
        config.demo.optimizer.lr_warmup_tokens = 2 * ROWS * SEQ
    config.demo.log.every_steps = 1
    config.demo.train.eval_every_steps = 1000           # eval once, at the last step
    config.demo.checkpoint.every_steps = 2
    config.demo.train.eval_batches = 0                  # eval has its own test
    config.train.xla_options = "xla_backend_optimization_level=0"  # compile fast
    config.train.init_from = init_from
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def recipe_lr(phase, tokens_before, total):
    """The recipe's LR curves (§3.2, §3.3), written out from the table, not from the code."""
    warmup = 2 * ROWS * SEQ
    if phase == "pretrain":      # linear warmup from ~0 to peak, then constant
        return PEAK * min(1.0, 1e-10 + (1 - 1e-10) * tokens_before / warmup)
    if phase == "ext":           # 1-sqrt from peak to peak/2 over the phase
        return PEAK * (0.5 + 0.5 * (1 - math.sqrt(tokens_before / total)))
    if phase == "decay":         # 1-sqrt from peak/2 to peak/50
        return PEAK / 2 * (0.04 + 0.96 * (1 - math.sqrt(tokens_before / total)))
    # cross-objective: WSD at the decay LR (peak/2), linear decay over the last 10B of 50B
    # tokens, i.e. the last fifth, down to 2%
    base = PEAK / 2
    if tokens_before < warmup:
        return base * (1e-10 + (1 - 1e-10) * tokens_before / warmup)
    decay_start = total * (1 - 10 / 50)
    if tokens_before < decay_start:
        return base
    return base * (1 - (tokens_before - decay_start) / (total - decay_start) * 0.98)


def run(arg, workdir, init_from=""):
    config = tiny_config(arg, init_from=init_from)
    train.train_and_evaluate(config, str(workdir))
    metrics = read_metrics(workdir)
    phase = config.phase
    total = STEPS[phase] * ROWS * SEQ
    assert sorted(metrics) == list(range(1, STEPS[phase] + 1))
    for step, record in metrics.items():
        expected = recipe_lr(phase, (step - 1) * ROWS * SEQ, total)
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), (arg, step)
        assert np.isfinite(record["loss"])
    return metrics


def saved_state(workdir, arg):
    """(params, optimizer step count) of a run's newest checkpoint, on one device."""
    config = demo.apply_demo(tiny_config(arg))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    setup = train.make_setup(config, mesh)
    params, opt_state, _ = checkpoint.restore_from_run(
        str(workdir), abstract_params=setup.abstract_state["params"],
        abstract_opt_state=setup.abstract_state["opt_state"])
    return params, int(opt_state.count)


def param_distance(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    out = {}
    for objective in ("mlm", "clm"):
        out[objective] = run(objective, root / objective)
        out[f"{objective}_ext"] = run(f"{objective}_ext", root / f"{objective}_ext",
                                      init_from=str(root / objective))
        out[f"{objective}_decay"] = run(f"{objective}_decay", root / f"{objective}_decay",
                                        init_from=str(root / f"{objective}_ext"))
    out["mlm_from_clm"] = run("mlm_from_clm,mntp=true", root / "mlm_from_clm",
                              init_from=str(root / "clm"))
    out["clm_from_mlm"] = run("clm_from_mlm", root / "clm_from_mlm", init_from=str(root / "mlm"))
    out["root"] = root
    return out


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_phase_chain_carries_params_and_optimizer(runs, objective):
    root = runs["root"]
    pre, pre_count = saved_state(root / objective, objective)
    ext, ext_count = saved_state(root / f"{objective}_ext", f"{objective}_ext")
    decay, decay_count = saved_state(root / f"{objective}_decay", f"{objective}_decay")
    # Extension and decay continue the previous phase's optimizer (its step count goes on).
    assert pre_count == STEPS["pretrain"]
    assert ext_count == STEPS["pretrain"] + STEPS["ext"]
    assert decay_count == STEPS["pretrain"] + STEPS["ext"] + STEPS["decay"]
    # Each phase starts where the last one ended: its first logged parameter norm is within a
    # few updates of the previous phase's last one, far from a fresh initialisation's.
    fresh = nnx.state(model_lib.EttinModel(ettin_tiny.get_config(objective).model,
                                           rngs=nnx.Rngs(params=99, dropout=99)), nnx.Param)
    assert param_distance(pre, ext) < 0.1 * param_distance(pre, fresh)
    assert param_distance(ext, decay) < 0.1 * param_distance(ext, fresh)
    for before, after in ((objective, f"{objective}_ext"), (f"{objective}_ext", f"{objective}_decay")):
        last_norm = runs[before][max(runs[before])]["param_norm"]
        assert runs[after][1]["param_norm"] == pytest.approx(last_norm, rel=0.02)


@pytest.mark.parametrize("arg,source", [("mlm_from_clm", "clm"), ("clm_from_mlm", "mlm")])
def test_cross_objective_restores_params_only(runs, arg, source):
    root = runs["root"]
    _, count = saved_state(root / arg, arg)
    assert count == STEPS["cross"]              # a fresh optimizer
    last_norm = runs[source][max(runs[source])]["param_norm"]
    assert runs[arg][1]["param_norm"] == pytest.approx(last_norm, rel=0.02)


def test_restore_names_mismatched_parameters(runs):
    """A model of another width cannot continue the tiny run: the error names the tensors."""
    config = tiny_config("mlm_ext")
    config.model.hidden_size = 32
    wider = nnx.eval_shape(lambda: model_lib.EttinModel(config.model, rngs=nnx.Rngs(0)))
    abstract = nnx.split(wider, nnx.Param, ...)[1]
    with pytest.raises(ValueError, match=r"layers/0/qkv: \(64, 3, 4, 16\) in the checkpoint, "
                                         r"\(32, 3, 4, 8\) in this run"):
        checkpoint.restore_from_run(str(runs["root"] / "mlm"), abstract_params=abstract)


def test_init_from_must_hold_the_objective_it_continues(runs, caplog):
    """An extension from the other objective's run is refused before compiling, pointing at
    the cross-objective config; a phase other than the recipe's previous one is only warned
    about (an ablation may skip one), as is a cross-objective run from a pre-training run."""
    from ettin_jax import workdir as workdir_lib
    with pytest.raises(workdir_lib.RunIdentityError,
                       match=r"init_from=.*/clm holds a clm run .*run_identity\.json\); a mlm ext "
                             r"run continues a mlm run\. .* \(mlm_from_clm\)"):
        workdir_lib.check_init_from(tiny_config("mlm_ext", init_from=str(runs["root"] / "clm")))
    with pytest.raises(workdir_lib.RunIdentityError, match=r"holds a mlm run .* continues a clm"):
        workdir_lib.check_init_from(tiny_config("mlm_from_clm",
                                                init_from=str(runs["root"] / "mlm")))
    with caplog.at_level("WARNING"):
        workdir_lib.check_init_from(tiny_config("mlm_decay", init_from=str(runs["root"] / "mlm")))
        workdir_lib.check_init_from(tiny_config("mlm_ext", init_from=str(runs["root"] / "mlm")))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "holds a pretrain-phase run; a decay run usually continues "\
        "the ext phase" in warnings[0]


def test_init_from_an_unfinished_run_is_warned_about(runs, tmp_path, caplog):
    """A source whose newest checkpoint is before its last step (stopped or preempted, not
    resumed) starts the next phase with a warning naming both steps."""
    from ettin_jax import workdir as workdir_lib, workdir_lock
    source = tmp_path / "mlm"
    shutil.copytree(runs["root"] / "mlm", source)
    saved = checkpoint.saved_steps(str(source))
    assert saved[-1] == STEPS["pretrain"] and len(saved) >= 2
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(str(source)), str(saved[-1])))
    with caplog.at_level("WARNING"):
        workdir_lib.check_init_from(tiny_config("mlm_ext", init_from=str(source)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and (f"stopped at step {saved[-2]} of its {STEPS['pretrain']} "
                                   "(its newest checkpoint): this run continues an unfinished "
                                   "pretrain phase") in warnings[0]
    # Still being trained (its LOCK held by a live process, here this one): not "stopped".
    caplog.clear()
    with workdir_lock.WorkdirLock(str(source)), caplog.at_level("WARNING"):
        workdir_lib.check_init_from(tiny_config("mlm_ext", init_from=str(source)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "stopped" not in warnings[0]
    assert (f"is at step {saved[-2]} of its {STEPS['pretrain']} (its newest checkpoint) and its "
            f"LOCK names pid {os.getpid()} on host") in warnings[0]
    assert "may still be training it" in warnings[0] and "Wait for that run to end" in warnings[0]
    # A LOCK left behind by a process that has ended (SIGKILL) is not a running trainer.
    with open(source / "LOCK", "w") as f:
        json.dump({"host": socket.gethostname(), "pid": _ended_pid()}, f)
    caplog.clear()
    with caplog.at_level("WARNING"):
        workdir_lib.check_init_from(tiny_config("mlm_ext", init_from=str(source)))
    assert [r.getMessage() for r in caplog.records if "stopped at step" in r.getMessage()]


def _ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_resume_does_not_need_the_source_it_started_from(runs, tmp_path):
    """A later phase, stopped after its first step, resumes from its own checkpoint: its
    source (moved away since, e.g. to free disk) is not read, and not asked for."""
    source = tmp_path / "mlm"
    shutil.copytree(runs["root"] / "mlm", source)
    config = tiny_config("mlm_ext", init_from=str(source))
    steps = train.train_steps(config, str(tmp_path / "ext"))
    progress = next(steps)
    with pytest.raises(StopIteration):
        while True:
            progress = steps.send("a test" if progress.stage == "step" else None)
    assert checkpoint.saved_steps(str(tmp_path / "ext")) == [1]
    shutil.rmtree(source)
    # A pair restarting its sides before that checkpoint (resume_at_most) starts from the
    # source: it is checked first, and nothing is deleted.
    from ettin_jax import workdir as workdir_lib
    with pytest.raises(workdir_lib.RunIdentityError, match="mlm: no such directory"):
        next(train.train_steps(config, str(tmp_path / "ext"), resume_at_most=0))
    assert checkpoint.saved_steps(str(tmp_path / "ext")) == [1]
    train.train_and_evaluate(config, str(tmp_path / "ext"))
    assert checkpoint.saved_steps(str(tmp_path / "ext"))[-1] == STEPS["ext"]
    assert read_metrics(tmp_path / "ext")[STEPS["ext"]]["loss"] == pytest.approx(
        read_metrics(runs["root"] / "mlm_ext")[STEPS["ext"]]["loss"], rel=1e-5)


def test_a_run_refuses_an_init_from_that_holds_no_run(runs, tmp_path):
    """train_and_evaluate, not only main.py, checks init_from before compiling: a missing
    directory, and a pair's workdir, where the error names the side to continue."""
    with pytest.raises(ValueError, match="init_from=.*/missing: no such directory"):
        train.train_and_evaluate(tiny_config("mlm_ext", init_from=str(tmp_path / "missing")),
                                 str(tmp_path / "a"))
    pair = tmp_path / "pair"
    os.makedirs(pair)
    os.symlink(runs["root"] / "clm", pair / "clm")
    with pytest.raises(ValueError, match=f"this run continues one side, --config.train.init_from="
                                         f"{pair / 'clm'}"):
        train.train_and_evaluate(tiny_config("mlm_from_clm", init_from=str(pair)),
                                 str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
