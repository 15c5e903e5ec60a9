"""Support for the tests/test_train_*.py files: one persistent XLA compilation cache per test
session, shared by the in-process runs and the `main.py` subprocesses.

Many of those runs compile the very same step (same config, mesh and shapes); with the cache
each is compiled once per session instead of once per run.
"""
import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": 0}


def cache_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.getbasetemp() / "train_jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@contextlib.contextmanager
def persistent_compilation_cache(path: str):
    """Turns the persistent cache on for this process, and back to how it was afterwards."""
    before = {name: getattr(jax.config, name) for name in _OPTIONS}
    for name, value in _OPTIONS.items():
        jax.config.update(name, path if name == "jax_compilation_cache_dir" else value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def subprocess_env(path: str, *, devices: int = 4) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=path,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env
