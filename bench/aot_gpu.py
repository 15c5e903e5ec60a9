"""A compile-only GPU device on a machine without a GPU: XLA's GPU compiler, run ahead of time.

    aot_gpu.host_on_cpu()                 # first, before jax starts its backends
    device = aot_gpu.device("h100")       # a jax Device that compiles for an H100 80GB
    mesh = sharding.make_mesh({...}, devices=[device])
    with aot_gpu.building_on(mesh):       # our kernels built for that card
        compiled = jitted.lower(*args_sharded_on_mesh).compile()
    compiled.memory_analysis()            # the H100's allocation plan of the program

Used by bench/memory.py --target and bench/compile_time.py --target. XLA compiles for the
card described below (its streaming multiprocessors, memory, caches and CUDA/cuDNN
versions) without touching one: buffer assignment, fusion and the Triton kernels are those
of the real card, but nothing is autotuned (no device to time candidates on), as with
`--xla_gpu_autotune_level=0` on a GPU. Needs jax's CUDA plugin, which installs and loads
without a GPU or driver (about 180 MB):

    pip install jax-cuda12-plugin==$JAX_VERSION jax-cuda12-pjrt==$JAX_VERSION
"""
from __future__ import annotations

import contextlib

import jax

from ettin_jax import cli

# XLA's GpuTargetConfigProto (text format) of an NVIDIA H100 80GB HBM3 (SXM): 132 SMs of
# compute capability 9.0 at 1.98 GHz, 79.1 GiB of HBM3 at 3.35 TB/s, 50 MiB of L2, 228 KiB
# of shared memory per SM (227 KiB per block opted in); the CUDA (12.8) and cuDNN (9.10)
# versions the compiler may assume.
H100_80GB = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

TARGETS = {"h100": H100_80GB}


def host_on_cpu():
    """Runs jax on the CPU backend only. Call before jax starts its backends (the first
    `jax.devices()`, array or jit): otherwise the CUDA plugin's start-up looks for a CUDA
    runtime to check its version against, fails without one, and is not loaded at all, so no
    GPU topology can be made. Same as JAX_PLATFORMS=cpu in the environment."""
    jax.config.update("jax_platforms", "cpu")


def device(target: str) -> jax.Device:
    """A compile-only device of `target` (a key of TARGETS). Raises cli.UserError naming the
    install line when jax's CUDA plugin is missing."""
    if target not in TARGETS:
        raise cli.UserError(f"--target={target!r}: expected one of {sorted(TARGETS)}")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                                topology="1x1x1")
    except (RuntimeError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
        raise cli.UserError(
            f"cannot compile for --target={target} without a GPU here ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it needs jax's CUDA plugin: "
            f"pip install jax-cuda12-plugin=={jax.__version__} "
            f"jax-cuda12-pjrt=={jax.__version__}, and jax on the CPU backend "
            f"(JAX_PLATFORMS=cpu, or bench/aot_gpu.host_on_cpu() before jax starts)") from None
    return topology.devices[0]


@contextlib.contextmanager
def building_on(mesh):
    """Traces and lowers inside the block for the compile-only GPU of `mesh` (devices from
    `device()`): our kernels built for a GPU (ettin_jax.kernels.target), and from jax 0.11
    with that card's abstract mesh in context. Pallas' Triton lowering there reads the card
    (its compute capability) from the context's abstract device and, without one, from the
    default device, a CPU here ("No supported GPU devices found"). jax 0.10 assumes a
    Hopper card and is left as it was: the context renames and reorders its lowered code."""
    from ettin_jax.kernels.target import building_for  # pylint: disable=import-outside-toplevel
    with contextlib.ExitStack() as stack:
        stack.enter_context(building_for("gpu"))
        if jax.__version_info__ >= (0, 11):
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
        yield
