"""The backend jitted code is built for, which the kernels and `attention_impl="auto"` follow.

    target_platform()              # "gpu", "tpu" or "cpu": jax's default backend, unless...
    with building_for("gpu"):
        compiled = jitted.lower(*abstract_args_on_a_gpu_topology).compile()

Kernels run interpreted unless built for their own backend, and "auto" picks the attention of
the backend. Both were read off `jax.default_backend()`, which is the CPU when a program is
compiled ahead of time for a GPU from a machine without one (bench/memory.py --target): the
kernels would then be compiled as their interpreted emulation. Enter `building_for` before a
function is first traced: jax caches traces without this setting in their key.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

_PLATFORM = contextvars.ContextVar("ettin_jax_target_platform", default=None)


def target_platform() -> str:
    """The backend being built for: the innermost `building_for`'s, else jax's default."""
    return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def building_for(platform_name: str):
    """Builds code traced inside the block for `platform_name` ("gpu", "tpu" or "cpu")."""
    if platform_name not in ("gpu", "tpu", "cpu"):
        raise ValueError(f"platform {platform_name!r}: expected 'gpu', 'tpu' or 'cpu'")
    token = _PLATFORM.set(platform_name)
    try:
        yield
    finally:
        _PLATFORM.reset(token)
