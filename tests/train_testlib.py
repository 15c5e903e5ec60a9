"""Support for the tests/test_train_*.py files that start `main.py` subprocesses.

The compilation cache shared by the whole test run (tests/conftest.py sets
JAX_COMPILATION_CACHE_DIR before jax is imported) reaches the subprocesses through the
inherited environment, so each distinct train step is compiled once per run.
"""
import os


def subprocess_env(*, devices: int = 4) -> dict:
    """The environment for a `main.py` subprocess on `devices` host CPU devices."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env
