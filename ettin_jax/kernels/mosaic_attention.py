"""Attention with Mosaic GPU kernels (Hopper, FA3-style).

`mosaic_attention` has `flash_attention`'s arguments and mask rule (`ettin_jax.attention`):
bidirectional or causal, a window or none, packed documents (`segment_ids`, 0 = padding).
`attention(impl="mosaic")` runs it on global layers and sends windowed (local) layers to the
Triton `flash_attention`, the kernel timed on local layers so far (bench/RESULTS.md: the only
fused one for the encoder's bidirectional window); `bench/attention.py` times the Mosaic
kernels on local layers beside it, so that the routing can follow the GPU's figures.

Forward: `mosaic_forward.py` (warp-specialized, TMA ring, wgmma, online softmax).
Backward: `mosaic_backward.py` (dK/dV and dQ kernels) by default; `MosaicBlocks(backward=
"triton")` runs `flash_attention.py`'s Triton backward on the Mosaic forward's output and
log-sum-exp instead (same convention: log2 units, `[batch, heads, seq]`), for comparison on a GPU.

The mask is reduced to intervals once (`intervals.attention_intervals`), and each kernel visits
only the tiles inside its rows' intervals (`flash_attention.tile_loop_ranges`), so packed
documents skip cross-document tiles and causal layers skip the upper triangle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from ettin_jax.kernels.flash_attention import (JIT_STATIC, default_block_sizes, name_residuals,
                                              round_up, tile_loop_ranges)
from ettin_jax.kernels.flash_attention import backward as triton_backward
from ettin_jax.kernels.intervals import attention_intervals
from ettin_jax.kernels.mosaic_common import COMPUTE_WARPGROUPS, MosaicBlocks
from ettin_jax.kernels.mosaic_backward import backward
from ettin_jax.kernels.mosaic_forward import forward
from ettin_jax.kernels.target import target_platform
from ettin_jax.sharding import run_per_shard

try:  # public from jax 0.11 on
    InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:  # jax 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams


def tile_ranges(starts, ends, rows: int, block: int):
    """Loop bounds over the other side's tiles for every tile of `rows` rows.

    Args:
      starts, ends: `[batch, seq]` int32 intervals (`attention_intervals`).
    Returns:
      `[batch, seq // rows, 4]` int32 `(lo, full_lo, full_hi, hi)` in tiles of `block`
      (`flash_attention.tile_loop_ranges`).
    """
    batch, seq = starts.shape
    per_tile = jax.vmap(jax.vmap(lambda s, e: jnp.stack(tile_loop_ranges(s, e, block))))
    return per_tile(starts.reshape(batch, seq // rows, rows),
                    ends.reshape(batch, seq // rows, rows)).astype(jnp.int32)


def _interpret_params(interpret):
    """`InterpretGPUParams` for the Mosaic kernels (True: the defaults), or False."""
    if isinstance(interpret, InterpretGPUParams):
        return interpret
    return InterpretGPUParams() if interpret else False


# Jitted as flash_attention's kernels are (see its JIT_STATIC): the global layers of one shape
# share one trace and lowering.
@functools.partial(jax.jit, static_argnames=JIT_STATIC)
def _forward(q, k, v, intervals, *, scale, blocks, interpret):
    k_start, k_end = intervals[:2]
    ranges = tile_ranges(k_start, k_end, COMPUTE_WARPGROUPS * blocks.block_q, blocks.block_kv)
    return name_residuals(*forward(q, k, v, k_start, k_end, ranges, scale=scale, blocks=blocks,
                                   interpret=_interpret_params(interpret)))


@functools.partial(jax.jit, static_argnames=JIT_STATIC)
def _backward(q, k, v, intervals, out, lse, d_out, *, scale, blocks, interpret):
    if blocks.backward == "triton":
        return triton_backward(q, k, v, *intervals, out, lse, d_out, scale=scale,
                               blocks=default_block_sizes(q.shape[-1], q.dtype),
                               interpret=bool(interpret))
    k_start, k_end, q_start, q_end = intervals
    rows_q = COMPUTE_WARPGROUPS * blocks.block_q_bwd
    rows_kv = COMPUTE_WARPGROUPS * blocks.block_kv_bwd
    ranges = (tile_ranges(k_start, k_end, rows_q, blocks.block_kv_bwd),
              tile_ranges(q_start, q_end, rows_kv, blocks.block_q_bwd))
    return backward(q, k, v, intervals, ranges, out, lse, d_out, scale=scale, blocks=blocks,
                    interpret=_interpret_params(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mosaic(q, k, v, intervals, scale, blocks, interpret):
    return _forward(q, k, v, intervals, scale=scale, blocks=blocks, interpret=interpret)[0]


def _mosaic_fwd(q, k, v, intervals, scale, blocks, interpret):
    out, lse = _forward(q, k, v, intervals, scale=scale, blocks=blocks, interpret=interpret)
    return out, (q, k, v, intervals, out, lse)


def _mosaic_bwd(scale, blocks, interpret, residuals, d_out):
    q, k, v, intervals, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, intervals, out, lse, d_out, scale=scale, blocks=blocks,
                           interpret=interpret)
    return dq, dk, dv, (None,) * 4


_mosaic.defvjp(_mosaic_fwd, _mosaic_bwd)


def check_arguments(q, k, v, segment_ids, window_size):
    """ValueError for what the Mosaic kernels do not cover, naming the way out."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"mosaic_attention: q, k, v must be [batch, seq, heads, head_dim] of "
                         f"equal shapes; got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[-1] % 64:
        raise ValueError(f"mosaic_attention needs head_dim a multiple of 64 (wgmma tiles); got "
                         f"{q.shape[-1]}: use model.attention_impl='pallas'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"mosaic_attention takes bfloat16 or float16 q, k, v (tensor-core "
                         f"operands); got {q.dtype}, {k.dtype}, {v.dtype}: use "
                         f"model.attention_impl='pallas' for float32")
    batch, length = q.shape[:2]
    if segment_ids is not None and segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must be [batch, seq] = {(batch, length)}; "
                         f"got {segment_ids.shape}")


def mosaic_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(-1, -1),
                     sm_scale: float | None = None, block_sizes: MosaicBlocks | None = None,
                     interpret: bool | InterpretGPUParams | None = None):
    """Fused attention of a global layer under `ettin_jax.attention`'s mask rule.

    Runs per shard under an active multi-device mesh, as `flash_attention` does (on a GPU;
    the CPU interpreter hung under a 4-device mesh here, so only unsharded calls are tested).

    Args:
      q, k, v: `[batch, seq, heads, head_dim]` bfloat16/float16, head_dim a multiple of 64.
      segment_ids: `[batch, seq]` int, contiguous runs (packed documents); 0 = padding.
      causal: key j visible to query i only if j <= i.
      window_size: `(left, right)` keys visible on either side of a query, -1 = unbounded.
      sm_scale: logit scale, default `head_dim ** -0.5`.
      block_sizes: `MosaicBlocks`; default `MosaicBlocks()`.
      interpret: run in Mosaic GPU's interpreter (an `InterpretGPUParams` sets its options,
        e.g. `detect_races=True`); None = when the backend is not GPU. The interpreter runs a
        CTA's 3 warpgroups as concurrent XLA CPU computations that block on barriers: with one
        CPU device on a 2-core machine they were seen to hang; more host devices
        (`XLA_FLAGS=--xla_force_host_platform_device_count=4`, as tests/conftest.py sets) avoid
        it.
    Returns:
      `[batch, seq, heads, head_dim]` in q's dtype; rows that see no key are 0.
    """
    check_arguments(q, k, v, segment_ids, window_size)
    return run_per_shard(
        functools.partial(_mosaic_attention_local, causal=causal,
                          window_size=tuple(window_size), sm_scale=sm_scale,
                          block_sizes=block_sizes, interpret=interpret),
        q, k, v, segment_ids)


def _mosaic_attention_local(q, k, v, segment_ids, *, causal, window_size, sm_scale, block_sizes,
                            interpret):
    """mosaic_attention on one device's arrays (see there)."""
    batch, length, _, head_dim = q.shape
    blocks = block_sizes or MosaicBlocks()
    blocks.check()
    seq = round_up(length, blocks.seq_multiple)
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq - length)))
    intervals = [jnp.broadcast_to(x, (batch, seq)) for x in
                 attention_intervals(seq, length, segment_ids=segment_ids, causal=causal,
                                     window_size=window_size)]
    if interpret is None:
        interpret = target_platform() != "gpu"
    scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
    if seq != length:  # padded positions have empty intervals: they see and are seen by nothing
        q, k, v = (jnp.pad(x, ((0, 0), (0, seq - length), (0, 0), (0, 0))) for x in (q, k, v))
    out = _mosaic(q, k, v, tuple(intervals), scale, blocks, _interpret_params(interpret))
    return out[:, :length]
