"""Mosaic GPU attention backward, FlashAttention-2 split (no atomics): a dK/dV and a dQ kernel.

Both recompute the probabilities from the forward's log-sum-exp (log2 units, `[batch, heads,
seq]`) and use delta = rowsum(dO * O) from XLA. Each has the CTA shape of `mosaic_common.py`:

  dK/dV: a CTA per (head, 2 * block_kv key rows, batch); the memory warpgroup streams query-side
    tiles (Q, Q^T, dO, dO^T, lse, delta) over the query tiles inside the keys' query intervals.
    Per tile a compute warpgroup forms S^T = K Q^T and dP^T = V dO^T (keys as rows, so lse and
    delta are column vectors and the mask uses the keys' own `[q_start, q_end)`), then
    dV += P^T dO and dK += dS^T Q.
  dQ: a CTA per (head, 2 * block_q query rows, batch); the memory warpgroup streams K, K^T, V^T;
    S = Q K^T, dP = dO V^T, dQ += dS K.

P^T and dS(^T) are wgmma A operands from registers on the GPU (through SMEM in the
interpreter); the transposed B operands come transposed from XLA (`mosaic_common.py` says why).
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

ROW = plgpu.Layout.WGMMA.reduce(1)   # one value per row of a WGMMA-layout tile
COL = plgpu.Layout.WGMMA.reduce(0)   # one value per column


def _dkv_kernel(k_ref, v_ref, qs_ref, qe_ref, ranges_ref, q_ref, qt_ref, do_ref, dot_ref,
                lse_ref, delta_ref, dk_ref, dv_ref,
                k_smem, v_smem, qs_smem, qe_smem, pt_smem, dst_smem,
                q_smem, qt_smem, do_smem, dot_smem, lse_smem, delta_smem,
                kv_ready, ready, consumed, *, scale: float, block_q: int, block_kv: int,
                stages: int, interpret: bool):
    """One CTA of key rows. k/v/q/do/dk/dv refs: `[batch, seq, heads, D]`; qt/dot refs:
    `[batch, heads, D, seq]`; qs/qe refs: `[batch, seq]` query intervals of each key;
    lse/delta refs: `[batch, heads, seq]`; ranges_ref: `[batch, seq // (2 * block_kv), 4]`."""
    head, tile, batch = (lax.axis_index(n) for n in ("heads", "kv_tiles", "batch"))
    wg = lax.axis_index("wg")
    ranges = tuple(ranges_ref[batch, tile, i] for i in range(4))
    lo = ranges[0]
    head_dim = k_smem.shape[-1]

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        def issue(step, slot):
            rows = pl.ds(step * block_q, block_q)
            for src, dst in ((q_ref.at[batch, rows, head], q_smem),
                             (qt_ref.at[batch, head, :, rows], qt_smem),
                             (do_ref.at[batch, rows, head], do_smem),
                             (dot_ref.at[batch, head, :, rows], dot_smem),
                             (lse_ref.at[batch, head, rows], lse_smem),
                             (delta_ref.at[batch, head, rows], delta_smem)):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], ready.at[slot])
        stream_tiles(issue, lo, ranges[3], stages, consumed)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        keys = pl.ds(tile * (COMPUTE_WARPGROUPS * block_kv) + wg * block_kv, block_kv)
        my_k, my_v = k_smem.at[wg], v_smem.at[wg]
        my_pt, my_dst = (pt_smem.at[wg], dst_smem.at[wg]) if interpret else (None, None)
        for src, dst in ((k_ref.at[batch, keys, head], my_k), (v_ref.at[batch, keys, head], my_v),
                         (qs_ref.at[batch, keys], qs_smem.at[wg]),
                         (qe_ref.at[batch, keys], qe_smem.at[wg])):
            plgpu.copy_gmem_to_smem(src, dst, kv_ready.at[wg])
        plgpu.barrier_wait(kv_ready.at[wg])
        q_start = load_vector(qs_smem.at[wg], ROW, interpret)
        q_end = load_vector(qe_smem.at[wg], ROW, interpret)
        shape = (block_kv, block_q)

        def step(masked: bool, i, carry):
            dk, dv = carry
            slot = lax.rem(i - lo, stages)
            plgpu.barrier_wait(ready.at[slot])
            st = matmul(my_k, qt_smem.at[slot], shape) * (scale * LOG2E)
            lse = load_vector(lse_smem.at[slot], COL, interpret)
            pt = jnp.exp2(st - lax.broadcast_in_dim(lse, shape, [1]))  # lse = inf: empty row
            if masked:
                pt = jnp.where(interval_mask(q_start, q_end, i * block_q, shape, interpret),
                               pt, 0.0)
            dpt = matmul(my_v, dot_smem.at[slot], shape)
            delta = load_vector(delta_smem.at[slot], COL, interpret)
            dst = pt * (dpt - lax.broadcast_in_dim(delta, shape, [1]))
            dv = dv + matmul_from_registers(pt.astype(my_k.dtype), my_pt, do_smem.at[slot],
                                            (block_kv, head_dim), interpret)
            dk = dk + matmul_from_registers(dst.astype(my_k.dtype), my_dst, q_smem.at[slot],
                                            (block_kv, head_dim), interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return dk, dv

        dk, dv = visit_tiles(step, ranges, (zeros((block_kv, head_dim), interpret),
                                            zeros((block_kv, head_dim), interpret)))
        my_k[...] = (dk * scale).astype(my_k.dtype)
        my_v[...] = dv.astype(my_v.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_k, dk_ref.at[batch, keys, head])
        plgpu.copy_smem_to_gmem(my_v, dv_ref.at[batch, keys, head])
        plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, ranges_ref, k_ref, kt_ref,
               vt_ref, dq_ref,
               q_smem, do_smem, lse_smem, delta_smem, ks_smem, ke_smem, ds_smem,
               k_smem, kt_smem, vt_smem,
               q_ready, ready, consumed, *, scale: float, block_q: int, block_kv: int,
               stages: int, interpret: bool):
    """One CTA of query rows. q/do/k/dq refs: `[batch, seq, heads, D]`; kt/vt refs:
    `[batch, heads, D, seq]`; ks/ke refs: `[batch, seq]` key intervals; lse/delta refs:
    `[batch, heads, seq]`; ranges_ref: `[batch, seq // (2 * block_q), 4]`."""
    head, batch = lax.axis_index("heads"), lax.axis_index("batch")
    # Last query tiles first: under a causal mask they visit the most key tiles, and starting
    # the longest CTAs first shortens the tail of the launch.
    tile = ranges_ref.shape[1] - 1 - lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    ranges = tuple(ranges_ref[batch, tile, i] for i in range(4))
    lo = ranges[0]
    head_dim = q_smem.shape[-1]

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        def issue(step, slot):
            keys = pl.ds(step * block_kv, block_kv)
            for src, dst in ((k_ref.at[batch, keys, head], k_smem),
                             (kt_ref.at[batch, head, :, keys], kt_smem),
                             (vt_ref.at[batch, head, :, keys], vt_smem)):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], ready.at[slot])
        stream_tiles(issue, lo, ranges[3], stages, consumed)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        rows = pl.ds(tile * (COMPUTE_WARPGROUPS * block_q) + wg * block_q, block_q)
        my_q, my_do = q_smem.at[wg], do_smem.at[wg]
        my_ds = ds_smem.at[wg] if interpret else None
        for src, dst in ((q_ref.at[batch, rows, head], my_q), (do_ref.at[batch, rows, head], my_do),
                         (lse_ref.at[batch, head, rows], lse_smem.at[wg]),
                         (delta_ref.at[batch, head, rows], delta_smem.at[wg]),
                         (ks_ref.at[batch, rows], ks_smem.at[wg]),
                         (ke_ref.at[batch, rows], ke_smem.at[wg])):
            plgpu.copy_gmem_to_smem(src, dst, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        lse = load_vector(lse_smem.at[wg], ROW, interpret)
        delta = load_vector(delta_smem.at[wg], ROW, interpret)
        k_start = load_vector(ks_smem.at[wg], ROW, interpret)
        k_end = load_vector(ke_smem.at[wg], ROW, interpret)
        shape = (block_q, block_kv)

        def step(masked: bool, j, dq):
            slot = lax.rem(j - lo, stages)
            plgpu.barrier_wait(ready.at[slot])
            s = matmul(my_q, kt_smem.at[slot], shape) * (scale * LOG2E)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [0]))  # lse = inf: empty row
            if masked:
                p = jnp.where(interval_mask(k_start, k_end, j * block_kv, shape, interpret),
                              p, 0.0)
            dp = matmul(my_do, vt_smem.at[slot], shape)
            ds = (p * (dp - lax.broadcast_in_dim(delta, shape, [0]))).astype(my_q.dtype)
            dq = dq + matmul_from_registers(ds, my_ds, k_smem.at[slot], (block_q, head_dim),
                                            interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return dq

        dq = visit_tiles(step, ranges, zeros((block_q, head_dim), interpret))
        my_q[...] = (dq * scale).astype(my_q.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, intervals, ranges, out, lse, d_out, *, scale: float,
             blocks: MosaicBlocks, interpret):
    """dq, dk, dv of the padded attention (`mosaic_attention` pads and slices).

    Args:
      q, k, v, out, d_out: `[batch, seq, heads, head_dim]`.
      intervals: `(k_start, k_end, q_start, q_end)`, each `[batch, seq]` int32.
      ranges: `(dq_ranges [batch, seq // (2 * block_q_bwd), 4],
        dkv_ranges [batch, seq // (2 * block_kv_bwd), 4])` tile bounds (`tile_ranges`).
      lse: `[batch, heads, seq]` float32, log2 units, +inf for rows that see nothing.
      interpret: an `InterpretGPUParams` or False.
    """
    batch, seq, heads, head_dim = q.shape
    k_start, k_end, q_start, q_end = intervals
    dq_ranges, dkv_ranges = ranges
    bq, bkv, wgs = blocks.block_q_bwd, blocks.block_kv_bwd, COMPUTE_WARPGROUPS
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: the softmax-Jacobian term, [b, h, s].
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32))

    def transposed(x):  # [batch, heads, D, seq]: B operands that wgmma would read transposed
        return jnp.transpose(x, (0, 2, 3, 1))

    tr = smem_transforms()
    dtype = q.dtype

    def staged(scratch):  # P^T, dS^T, dS: wgmma reads them from registers on the GPU
        return scratch if interpret else None

    common = dict(num_threads=wgs + 1, thread_name="wg", interpret=interpret,
                  compiler_params=plgpu.CompilerParams(approx_math=True))
    kernel_args = dict(scale=scale, block_q=bq, block_kv=bkv, interpret=bool(interpret))

    dkv_stages = max(1, min(blocks.stages_bwd, seq // bq))
    tile_q = plgpu.SMEM((dkv_stages, bq, head_dim), dtype, transforms=tr)
    tile_qt = plgpu.SMEM((dkv_stages, head_dim, bq), dtype, transforms=tr)
    own_kv = plgpu.SMEM((wgs, bkv, head_dim), dtype, transforms=tr)
    own_kq = plgpu.SMEM((wgs, bkv, bq), dtype, transforms=tr)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, stages=dkv_stages, **kernel_args),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=[
            own_kv, own_kv,                                                # K then dK, V then dV
            plgpu.SMEM((wgs, bkv), jnp.int32), plgpu.SMEM((wgs, bkv), jnp.int32),  # q_start/end
            staged(own_kq), staged(own_kq),                                # P^T, dS^T
            tile_q, tile_qt, tile_q, tile_qt,                              # Q, Q^T, dO, dO^T ring
            plgpu.SMEM((dkv_stages, bq), jnp.float32),                     # lse ring
            plgpu.SMEM((dkv_stages, bq), jnp.float32),                     # delta ring
            plgpu.Barrier(num_arrivals=4, num_barriers=wgs),               # K, V, q_start, q_end
            plgpu.Barrier(num_arrivals=6, num_barriers=dkv_stages),        # a ring slot landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=dkv_stages),      # slot consumed
        ],
        grid=(heads, seq // (wgs * bkv), batch), grid_names=("heads", "kv_tiles", "batch"),
        **common,
    )(k, v, q_start, q_end, dkv_ranges, q, transposed(q), d_out, transposed(d_out), lse, delta)

    dq_stages = max(1, min(blocks.stages_bwd, seq // bkv))
    own_qd = plgpu.SMEM((wgs, bq, head_dim), dtype, transforms=tr)
    own_row = plgpu.SMEM((wgs, bq), jnp.float32)
    own_int = plgpu.SMEM((wgs, bq), jnp.int32)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, stages=dq_stages, **kernel_args),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[
            own_qd, own_qd, own_row, own_row, own_int, own_int,            # Q then dQ, dO, ...
            staged(plgpu.SMEM((wgs, bq, bkv), dtype, transforms=tr)),      # dS
            plgpu.SMEM((dq_stages, bkv, head_dim), dtype, transforms=tr),  # K ring
            plgpu.SMEM((dq_stages, head_dim, bkv), dtype, transforms=tr),  # K^T ring
            plgpu.SMEM((dq_stages, head_dim, bkv), dtype, transforms=tr),  # V^T ring
            plgpu.Barrier(num_arrivals=6, num_barriers=wgs),               # Q, dO, lse, ...
            plgpu.Barrier(num_arrivals=3, num_barriers=dq_stages),         # a ring slot landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=dq_stages),       # slot consumed
        ],
        grid=(heads, seq // (wgs * bq), batch), grid_names=("heads", "q_tiles", "batch"),
        **common,
    )(q, d_out, lse, delta, k_start, k_end, dq_ranges, k, transposed(k), transposed(v))
    return dq, dk, dv
