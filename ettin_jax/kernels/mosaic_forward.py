"""Mosaic GPU (Hopper, FA3-style) attention forward kernel; `mosaic_attention.py` is the entry.

One CTA per (head, 2 * block_q query rows, batch): two compute warpgroups of `block_q` rows and
a memory warpgroup streaming K^T/V tiles through the SMEM ring (`mosaic_common.py`). Compute
warpgroups do S = Q K^T and O += P V with wgmma (P from registers) and the online softmax in
float32, base 2, ping-ponging (FA3) so that one's softmax overlaps the other's matmuls.

The CTA visits key tiles `[lo, hi)` of its rows' intervals and masks element-wise only on
`[lo, full_lo)` and `[full_hi, hi)`. Rows that see no key give 0 and lse = +inf. The lse
convention (log2 units, `[batch, heads, seq]`) is the Triton kernel's (`flash_attention.py`),
so either backward can consume it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ettin_jax.kernels.mosaic_common import (COMPUTE_REGISTERS, COMPUTE_WARPGROUPS, LOG2E,
                                             MosaicBlocks, interval_mask, load_vector, matmul,
                                             matmul_from_registers, smem_transforms,
                                             stream_tiles, visit_tiles, zeros)


def _forward_kernel(q_ref, kt_ref, v_ref, ranges_ref, ks_ref, ke_ref, o_ref, lse_ref,
                    q_smem, kt_smem, v_smem, p_smem, ks_smem, ke_smem, lse_smem,
                    q_ready, k_ready, v_ready, consumed, schedule, *, scale: float, block_q: int,
                    block_kv: int, stages: int, interpret: bool):
    """One CTA. q_ref, v_ref, o_ref: `[batch, seq, heads, D]`; kt_ref: `[batch, heads, D, seq]`;
    ranges_ref: `[batch, seq // (2 * block_q), 4]` key-tile bounds; ks_ref, ke_ref:
    `[batch, seq]` key intervals; lse_ref: `[batch, heads, seq]`."""
    head, batch = lax.axis_index("heads"), lax.axis_index("batch")
    # Last query tiles first: under a causal mask they visit the most key tiles, and starting
    # the longest CTAs first shortens the tail of the launch.
    tile = ranges_ref.shape[1] - 1 - lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    ranges = tuple(ranges_ref[batch, tile, i] for i in range(4))
    lo, hi = ranges[0], ranges[3]
    head_dim = q_smem.shape[-1]
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        def issue(step, slot):
            keys = pl.ds(step * block_kv, block_kv)
            plgpu.copy_gmem_to_smem(kt_ref.at[batch, head, :, keys], kt_smem.at[slot],
                                    k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_smem.at[slot],
                                    v_ready.at[slot])
        stream_tiles(issue, lo, hi, stages, consumed)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        rows = pl.ds(tile * (COMPUTE_WARPGROUPS * block_q) + wg * block_q, block_q)
        my_q = q_smem.at[wg]
        my_p = p_smem.at[wg] if interpret else None
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], my_q, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(ks_ref.at[batch, rows], ks_smem.at[wg], q_ready.at[wg])
        plgpu.copy_gmem_to_smem(ke_ref.at[batch, rows], ke_smem.at[wg], q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        k_start = load_vector(ks_smem.at[wg], row_layout, interpret)
        k_end = load_vector(ke_smem.at[wg], row_layout, interpret)
        qk_scale = scale * LOG2E  # logits in log2 units: exp2 instead of exp

        # Ping-pong (FA3): the two compute warpgroups meet on `schedule` twice per key tile,
        # with warpgroup 1 one meeting behind, so that one's softmax overlaps the other's
        # matmuls. Each warpgroup arrives and waits 2 * tiles + 1 times.
        def meet():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        pl.when(wg == 1)(meet)

        def step(masked: bool, i, carry):
            acc, m, l = carry
            slot = lax.rem(i - lo, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            s = matmul(my_q, kt_smem.at[slot], (block_q, block_kv), while_running=meet)
            s = s * qk_scale
            if masked:
                visible = interval_mask(k_start, k_end, i * block_kv, s.shape, interpret)
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # A row that has seen no key keeps m = -inf: exponentiate against 0 then, so that
            # -inf - -inf never makes a NaN (its p and alpha are exactly 0).
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
            l = alpha * l + jnp.sum(p, axis=1)
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)  # the other warpgroup's QK^T is issued: our turn
            pv = matmul_from_registers(p.astype(my_q.dtype), my_p, v_smem.at[slot],
                                       (block_q, head_dim), interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        m0 = zeros((block_q,), interpret, row_layout) - jnp.inf
        acc, m, l = visit_tiles(step, ranges, (zeros((block_q, head_dim), interpret), m0,
                                               zeros((block_q,), interpret, row_layout)))
        pl.when(wg == 0)(meet)
        empty = l == 0.0  # rows that see no key: output 0, lse +inf (exp2(s - lse) == 0)
        safe_l = jnp.where(empty, 1.0, l)
        my_q[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(my_q.dtype)
        lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(safe_l) * LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, o_ref.at[batch, rows, head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, k_start, k_end, ranges, *, scale: float, blocks: MosaicBlocks,
            interpret):
    """Attention forward on padded inputs.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]` bf16/f16, seq a multiple of `blocks.seq_multiple`.
      k_start, k_end: `[batch, seq]` int32 key intervals (`intervals.attention_intervals`).
      ranges: `[batch, seq // (2 * block_q), 4]` int32 key-tile bounds (`tile_ranges`).
      interpret: an `InterpretGPUParams` to run in Mosaic GPU's interpreter, or False.
    Returns:
      `(out [batch, seq, heads, head_dim], lse [batch, heads, seq] float32, log2 units)`.
    """
    batch, seq, heads, head_dim = q.shape
    bq, bkv, wgs = blocks.block_q, blocks.block_kv, COMPUTE_WARPGROUPS
    stages = max(1, min(blocks.stages, seq // bkv))
    kt = jnp.transpose(k, (0, 2, 3, 1))  # [batch, heads, D, seq]: the B operand of Q K^T
    tr = smem_transforms()

    def interpreter_only(scratch):  # the GPU feeds P to wgmma from registers
        return scratch if interpret else None

    return plgpu.kernel(
        functools.partial(_forward_kernel, scale=scale, block_q=bq, block_kv=bkv,
                          stages=stages, interpret=bool(interpret)),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((wgs, bq, head_dim), q.dtype, transforms=tr),        # Q, then O
            plgpu.SMEM((stages, head_dim, bkv), q.dtype, transforms=tr),    # K^T ring
            plgpu.SMEM((stages, bkv, head_dim), q.dtype, transforms=tr),    # V ring
            interpreter_only(plgpu.SMEM((wgs, bq, bkv), q.dtype, transforms=tr)),  # P
            plgpu.SMEM((wgs, bq), jnp.int32),                               # k_start
            plgpu.SMEM((wgs, bq), jnp.int32),                               # k_end
            plgpu.SMEM((wgs, bq), jnp.float32),                             # lse
            plgpu.Barrier(num_arrivals=3, num_barriers=wgs),                # Q, k_start, k_end
            plgpu.Barrier(num_barriers=stages),                             # K^T landed
            plgpu.Barrier(num_barriers=stages),                             # V landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),           # slot consumed
            plgpu.Barrier(num_arrivals=wgs),                                # ping-pong
        ],
        grid=(heads, seq // (wgs * bq), batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, kt, v, ranges, k_start, k_end)
