"""The train step compiles on a thread beside the restore, and the loop's first step reuses
that executable (ettin_jax.precompile): a mismatch of any aval or sharding between the
abstract arguments and the real batch would show as a second compilation on the main thread."""
import contextlib
import logging

import jax
import numpy as np
import pytest

from ettin_jax import train
from test_data_formats import write_mds
from test_plan import make_tokenizer, tiny_data_config


@contextlib.contextmanager
def compile_logs():
    """jax's compile log in every thread (`jax.log_compiles()` is a thread-local context)."""
    jax.config.update("jax_log_compiles", True)
    try:
        yield
    finally:
        jax.config.update("jax_log_compiles", False)


def train_step_compilations(records):
    return [r for r in records if r.getMessage().startswith("Compiling jit(train_step)")]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_first_step_reuses_the_step_compiled_beside_the_restore(tmp_path, caplog, objective):
    rng = np.random.default_rng(0)
    tok = make_tokenizer(tmp_path / "tok", vocab_size=512, unk_id=500)
    write_mds(tmp_path / "docs", [rng.integers(0, 500, n) for n in rng.integers(20, 41, 200)])
    config = tiny_data_config(tmp_path / "docs", tok, steps=2)
    config.objective = objective
    caplog.set_level(logging.WARNING, logger="jax")
    with compile_logs():
        train.train_and_evaluate(config, str(tmp_path / "run"))
    compilations = train_step_compilations(caplog.records)
    assert [r.threadName.startswith("precompile") for r in compilations] == [True], \
        [(r.threadName, r.getMessage()[:200]) for r in compilations]

    # A resume compiles for the step it resumes at, on the thread again.
    caplog.clear()
    config.schedule.total_tokens *= 2
    config.train.allow_config_change = True
    with compile_logs():
        train.train_and_evaluate(config, str(tmp_path / "run"))
    compilations = train_step_compilations(caplog.records)
    assert [r.threadName.startswith("precompile") for r in compilations] == [True]


# A fresh interpreter: in the test process other tests have imported every kernel already.
TWO_STEPS = """
import json, sys
import jax
from bench.batches import make_batch
from configs import ettin_tiny
from ettin_jax import losses, sharding, train
config = ettin_tiny.get_config("mlm")
config.model.attention_impl = "pallas"
config.train.xla_options = "xla_backend_optimization_level=0"
mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
setup = train.make_setup(config, mesh)
host = make_batch(config, 2, 64)
batch = sharding.host_batch_to_global(
    {k: host[k] for k in losses.BATCH_KEYS["mlm"]}, mesh, num_micro=1)
state = setup.init_state()
before = set(sys.modules)
for step in range(2):
    state, metrics = setup.train_step(state, batch, config.optimizer.peak_lr, step)
jax.block_until_ready(metrics)
print(json.dumps({"imported_while_tracing": sorted(
                      m for m in set(sys.modules) - before if m.startswith("ettin_jax")),
                  "executables": setup.train_step._cache_size()}))
"""


def test_second_step_reuses_the_first_steps_executable_with_pallas_kernels():
    """Importing a kernel module inside the step's trace registers Pallas's configuration
    options, which are part of jit's cache key on jax 0.11: the second call then traced and
    compiled the step again (seen on jax 0.11.2). The kernels are imported with the model;
    tracing the step imports none of ours, and two calls leave one executable. (jax's own
    interpret-mode modules still load lazily on CPU; they register no such option.)"""
    import json
    import os
    import subprocess
    import sys
    from train_testlib import subprocess_env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env(devices=1)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", TWO_STEPS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"imported_while_tracing": [], "executables": 1}
