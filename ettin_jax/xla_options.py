"""`config.train.xla_options`: XLA compiler options for the run's own programs.

    --config.train.xla_options=xla_gpu_autotune_level=0
    --config.train.xla_options=xla_backend_optimization_level=0,xla_gpu_enable_triton_gemm=false

Comma-separated NAME=VALUE pairs, each a field of XLA's DebugOptions, passed as
`jax.jit(compiler_options=...)` to the train, eval and params-init programs. Unlike XLA_FLAGS
(read once, when the process starts its backend) they apply per program, so one process can
compile a step both ways (bench/train_step.py --variants=xla_options=...), and they are part of
the persistent compilation cache's key. Values: true/false, integers, floats, else strings.

Start-up is mostly XLA's compile, and on a GPU a cold compile also autotunes every GEMM fusion
on the device; `xla_gpu_autotune_level=0` skips that (bench/startup.py's `cold_no_autotune`
run times the start-up, a `--variants` sweep the step). `xla_backend_optimization_level=0`
skips LLVM's optimisations: the CPU tests compile about 3x faster.
"""
from __future__ import annotations

import re

import jax

_NAME = re.compile(r"^xla_[a-z0-9_]+$")


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse(text: str) -> dict:
    """"a=1,b=false" -> {"a": 1, "b": False}; ValueError naming the bad entry."""
    options = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = (s.strip() for s in entry.partition("="))
        if not eq or not _NAME.match(name) or not value:
            raise ValueError(f"config.train.xla_options={text!r}: entry {entry!r} is not "
                             f"NAME=VALUE with NAME an XLA option (xla_...), e.g. "
                             f"xla_gpu_autotune_level=0")
        options[name] = _value(value)
    return options


def compiler_options(text: str) -> dict | None:
    """The `compiler_options` of jax.jit for `config.train.xla_options` (None when empty),
    checked now on a one-op program: a misspelt option fails here with its config key, not
    minutes later in the train step's compile."""
    options = parse(text)
    if not options:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(0).compile()
    except Exception as e:  # pylint: disable=broad-except  # XLA's own error type varies
        raise ValueError(f"config.train.xla_options={text!r}: XLA refused it: "
                         f"{str(e).splitlines()[0]}") from None
    return options
