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
