"""Support for the tests/test_train_*.py files that start `main.py` subprocesses.

The compilation cache shared by the whole test run (tests/conftest.py sets
JAX_COMPILATION_CACHE_DIR before jax is imported) reaches the subprocesses through the
inherited environment, so each distinct train step is compiled once per run.
"""
import os

# Text size of the demo corpus the `demo` fixture (conftest.py) builds for the tiny layout.
DEMO_MAX_BYTES = 300_000


def subprocess_env(*, devices: int = 4) -> dict:
    """The environment for a `main.py` subprocess on `devices` host CPU devices."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def config_from_flags(flags: list[str]):
    """The config `main.py` builds from `flags` (`--config=FILE:ARG` and `--config.a.b=VALUE`),
    for in-process `train.train_and_evaluate` runs that match a subprocess run."""
    import functools
    import importlib
    config = None
    for flag in flags:
        name, _, value = flag.removeprefix("--").partition("=")
        if name == "config":
            path, _, arg = value.partition(":")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            config = module.get_config(arg)
            continue
        *sections, key = name.removeprefix("config.").split(".")
        section = functools.reduce(getattr, sections, config)
        old = getattr(section, key)
        if isinstance(old, bool):
            new = value.lower() in ("1", "true")
        else:
            new = type(old)(float(value) if isinstance(old, int) and "e" in value else value)
        setattr(section, key, new)
    return config
