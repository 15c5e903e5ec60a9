"""Flash attention in Pallas (Triton backend) for bidirectional, causal, windowed and packed masks.

The mask is reduced to intervals once per call (`intervals.attention_intervals`): query i sees
keys `[k_start[i], k_end[i])`, key j is seen by queries `[q_start[j], q_end[j])`. Each kernel
program owns one tile and loops only over the tiles of the other side that its interval min/max
can reach, in three ranges: boundary tiles with element masking, interior tiles without any
mask, boundary tiles again. A (64, 64) window thus costs O(seq * window) and packed documents
skip cross-document tiles.

Forward: online softmax in float32, base 2 (`exp2`, logits pre-multiplied by log2(e)), saving
the log-sum-exp per row. Backward: FlashAttention-2 style, one kernel for dk/dv (a program per
key tile, loop over query tiles) and one for dq (a program per query tile, loop over key tiles),
both recomputing probabilities from the saved log-sum-exp; no atomics.

Layout everywhere: `[batch, seq, heads, head_dim]`; the kernels read a head's `[seq, head_dim]`
slice with a stride of `heads * head_dim`, so no transposes are made.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from ettin_jax.kernels.intervals import attention_intervals
from ettin_jax.kernels.target import target_platform
from ettin_jax.sharding import run_per_shard

try:  # The Triton backend is deprecated from jax 0.11 on; import it lazily and say so if gone.
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    pl_triton = None

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shapes and Triton launch parameters (hashable: they are static arguments).

    `block_q`/`block_k`: forward tiles; `*_dkv`: the dk/dv kernel (a program per key tile);
    `*_dq`: the dq kernel (a program per query tile). All must be powers of two >= 16.
    `num_warps=None` picks 4 for head_dim <= 64 and 8 above.
    """
    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2
    # False: one masked loop over all reachable tiles instead of masked/unmasked/masked ranges.
    split_loops: bool = True

    def check(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("block_") and (value < 16 or value & (value - 1)):
                raise ValueError(f"BlockSizes.{field.name}={value}: must be a power of two >= 16")

    @property
    def seq_multiple(self) -> int:
        """Every block divides this, so sequences are padded to a multiple of it."""
        return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv,
                   self.block_q_dq, self.block_k_dq)


def default_block_sizes(head_dim: int, dtype) -> BlockSizes:
    """Tiles by input dtype and head_dim.

    bfloat16/float16 at head_dim 64 (every Ettin size) use the default, the fastest of
    bench/attention.py's sweep on an H100 (64-row backward tiles; bench/RESULTS.md). float32
    dots follow jax's matmul precision, as XLA's matmuls do: TF32 tensor cores by default on a
    GPU, full IEEE precision under `jax.default_matmul_precision("float32")` (bench/attention.py's
    check), which Triton turns into FMA code that compiles slowly with bf16-sized tiles
    (bench/RESULTS.md). So float32 gets small tiles (not yet timed on a GPU; float32 is for
    tests, training runs bfloat16).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return BlockSizes(32, 32, 32, 32, 32, 32, num_warps=4, num_warps_bwd=4)
    if head_dim > 64:
        return BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                          block_q_dq=64, block_k_dq=64, num_warps=8, num_warps_bwd=4)
    return BlockSizes()


def tile_loop_ranges(starts, ends, block: int, split: bool = True):
    """Loop bounds over the other side's tiles for one tile of intervals.

    Args:
      starts, ends: `[tile]` int32 intervals of this tile's rows (empty ones are `[seq, 0)`).
      block: tile size of the other side.
    Returns:
      `(lo, full_lo, full_hi, hi)` tile indices: tiles in `[lo, full_lo)` and `[full_hi, hi)`
      are partly visible (need masking), tiles in `[full_lo, full_hi)` are visible to every row.
    """
    lo = lax.div(jnp.min(starts), block)
    hi = jnp.maximum(lax.div(jnp.max(ends) + (block - 1), block), lo)
    full_lo = jnp.minimum(jnp.maximum(lax.div(jnp.max(starts) + (block - 1), block), lo), hi)
    full_hi = jnp.minimum(jnp.maximum(lax.div(jnp.min(ends), block), full_lo), hi)
    if not split:
        return lo, hi, hi, hi
    return lo, full_lo, full_hi, hi


def _visible(k_start, k_end, first_key: jax.Array, block_k: int):
    """`[rows, block_k]` mask of keys `first_key + arange(block_k)` inside each row's interval."""
    cols = first_key + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    return (cols >= k_start[:, None]) & (cols < k_end[:, None])


def _dot_t(a, b):
    """`a @ b.T` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """`a.T @ b` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# The kernels' names (pallas_call's `name`, which compiled programs and GPU traces show).
FORWARD, BACKWARD_DKV, BACKWARD_DQ = "ettin_flash_fwd", "ettin_flash_dkv", "ettin_flash_dq"
# Dots each kernel runs per (query tile, key tile) it visits, each 2 x tile area x head_dim
# FLOPs: forward q.k and p.v; dk/dv q.k again, p.do, do.v and ds.q; dq q.k, do.v and ds.k.
KERNEL_DOTS = {FORWARD: 2, BACKWARD_DKV: 4, BACKWARD_DQ: 3}


@functools.lru_cache(maxsize=64)
def kernel_flops(batch: int, seq: int, heads: int, head_dim: int, dtype_name: str,
                 causal: bool, window_size: tuple) -> dict:
    """Dot FLOPs of each kernel (keyed by its pallas_call name, KERNEL_DOTS) for `[batch, seq,
    heads, head_dim]` arrays (seq and head_dim as padded for the kernels) in the default tiles
    of `dtype_name`, when every row is one document: the tiles its loops visit, boundary tiles
    whole. Packed rows visit fewer. bench/hlo_profile.py prices the kernels of a compiled step
    with this, the mask read from the op names (`ettin_jax.attention.mask_scope`)."""
    blocks = default_block_sizes(head_dim, jnp.dtype(dtype_name))
    k_start, k_end, q_start, q_end = attention_intervals(seq, seq, causal=causal,
                                                         window_size=tuple(window_size))

    def visited(starts, ends, own_block, other_block):
        """Tiles of the other side visited, summed over this side's tiles."""
        lo, _, _, hi = jax.vmap(lambda s, e: tile_loop_ranges(s, e, other_block))(
            starts.reshape(-1, own_block), ends.reshape(-1, own_block))
        return int(jnp.sum(hi - lo)) * own_block * other_block

    pairs = {FORWARD: visited(k_start, k_end, blocks.block_q, blocks.block_k),
             BACKWARD_DKV: visited(q_start, q_end, blocks.block_k_dkv, blocks.block_q_dkv),
             BACKWARD_DQ: visited(k_start, k_end, blocks.block_q_dq, blocks.block_k_dq)}
    return {name: KERNEL_DOTS[name] * 2 * pairs[name] * head_dim * batch * heads
            for name in KERNEL_DOTS}


# ----------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref, *, scale: float,
                block_k: int, split: bool):
    """One query tile. q_ref, o_ref: `[block_q, D]`; k_ref, v_ref: `[seq, D]`;
    ks_ref, ke_ref, lse_ref: `[block_q]`."""
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    k_start, k_end = ks_ref[...], ke_ref[...]
    qk_scale = scale * LOG2E

    def body(masked: bool, j, carry):
        acc, m, l = carry
        first = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(first, block_k), :]
        v = v_ref[pl.ds(first, block_k), :]
        s = _dot_t(q, k) * qk_scale  # [block_q, block_k], log2 units
        if masked:
            s = jnp.where(_visible(k_start, k_end, first, block_k), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        if masked:
            # A row with nothing visible yet keeps m = -inf; exponentiate against 0 instead so
            # that -inf - -inf never makes a NaN (its p and alpha are then exactly 0).
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    lo, full_lo, full_hi, hi = tile_loop_ranges(k_start, k_end, block_k, split)
    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, False), carry)
    acc, m, l = lax.fori_loop(full_hi, hi, functools.partial(body, True), carry)

    empty = l == 0.0  # rows that see no key: output 0, lse +inf (so exp2(s - lse) == 0)
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _compiler_params(num_warps, num_stages, head_dim):
    if pl_triton is None:
        raise RuntimeError(
            "flash_attention needs Pallas' Triton backend (jax.experimental.pallas.triton), "
            f"which this jax ({jax.__version__}) no longer ships; use "
            "model.attention_impl='cudnn' or 'xla' on this jax.")
    if num_warps is None:
        num_warps = 4 if head_dim <= 64 else 8
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# The kernels run under jax.jit: every layer of one shape calls one traced function, whose
# MLIR lowering jax emits once and calls from each layer (the mask is data, its intervals).
# Unjitted, each call traced and lowered its Triton kernels anew (66 in the 150m train step:
# 2.3 s of its 3.1 s lowering on 2 CPU cores, paid again on every warm start). The compiled
# program still names each call site's ops after it, mask scope included (XLA's inliner).
JIT_STATIC = ("scale", "blocks", "interpret")
# Names of the forward kernel's outputs that its backward reads (`jax.ad_checkpoint`), so a
# remat policy can keep them (model_config.REMAT_POLICIES "dots_attention") instead of running
# the forward kernel again in the backward. They are named inside the jitted forward: named
# outside it, a rematerialised layer in a `lax.scan` still recomputed the kernel (jax 0.10).
RESIDUAL_NAMES = ("attention_out", "attention_lse")


def name_residuals(out, lse):
    """`(out, lse)` under RESIDUAL_NAMES."""
    return tuple(checkpoint_name(x, name) for x, name in zip((out, lse), RESIDUAL_NAMES))


@functools.partial(jax.jit, static_argnames=JIT_STATIC)
def _forward(q, k, v, k_start, k_end, *, scale, blocks: BlockSizes, interpret):
    """Returns `(out [b, s, h, d], lse [b, h, s] float32, log2 units)`."""
    batch, seq, heads, head_dim = q.shape
    bq = blocks.block_q
    grid = (seq // bq, batch, heads)
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    row_tile = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=blocks.block_k,
                          split=blocks.split_loops),
        grid=grid,
        in_specs=[q_tile, kv_full, kv_full, row_tile, row_tile],
        out_specs=[q_tile, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        compiler_params=_compiler_params(blocks.num_warps, blocks.num_stages, head_dim),
        interpret=interpret,
        name=FORWARD,
    )(q, k, v, k_start, k_end)
    return name_residuals(out, lse)


# ---------------------------------------------------------------------------------- backward


def _dkv_kernel(k_ref, v_ref, qs_ref, qe_ref, q_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref,
                dk_ref, dv_ref, *, scale: float, block_q: int, split: bool):
    """One key tile. k_ref, v_ref, dk_ref, dv_ref: `[block_k, D]`; qs_ref, qe_ref: `[block_k]`;
    q_ref, do_ref: `[seq, D]`; lse_ref, delta_ref, ks_ref, ke_ref: `[seq]`."""
    block_k, head_dim = k_ref.shape
    k, v = k_ref[...], v_ref[...]
    first_key = pl.program_id(0) * block_k
    qk_scale = scale * LOG2E

    def body(masked: bool, i, carry):
        dk, dv = carry
        first = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(first, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        p = jnp.exp2(_dot_t(q, k) * qk_scale - lse[:, None])  # [block_q, block_k]
        if masked:
            p = jnp.where(_visible(ks_ref[rows], ke_ref[rows], first_key, block_k), p, 0.0)
        dv = dv + _t_dot(p.astype(do.dtype), do)
        dp = _dot_t(do, v)
        ds = p * (dp - delta[:, None])
        dk = dk + _t_dot(ds.astype(q.dtype), q)
        return dk, dv

    lo, full_lo, full_hi, hi = tile_loop_ranges(qs_ref[...], qe_ref[...], block_q, split)
    carry = (jnp.zeros((block_k, head_dim), jnp.float32),
             jnp.zeros((block_k, head_dim), jnp.float32))
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, False), carry)
    dk, dv = lax.fori_loop(full_hi, hi, functools.partial(body, True), carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, k_ref, v_ref, dq_ref, *,
               scale: float, block_k: int, split: bool):
    """One query tile. q_ref, do_ref, dq_ref: `[block_q, D]`; lse/delta/ks/ke: `[block_q]`;
    k_ref, v_ref: `[seq, D]`."""
    block_q, head_dim = q_ref.shape
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    k_start, k_end = ks_ref[...], ke_ref[...]
    qk_scale = scale * LOG2E

    def body(masked: bool, j, dq):
        first = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(first, block_k), :]
        v = v_ref[pl.ds(first, block_k), :]
        p = jnp.exp2(_dot_t(q, k) * qk_scale - lse[:, None])
        if masked:
            p = jnp.where(_visible(k_start, k_end, first, block_k), p, 0.0)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    lo, full_lo, full_hi, hi = tile_loop_ranges(k_start, k_end, block_k, split)
    dq = jnp.zeros((block_q, head_dim), jnp.float32)
    dq = lax.fori_loop(lo, full_lo, functools.partial(body, True), dq)
    dq = lax.fori_loop(full_lo, full_hi, functools.partial(body, False), dq)
    dq = lax.fori_loop(full_hi, hi, functools.partial(body, True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=JIT_STATIC)
def backward(q, k, v, k_start, k_end, q_start, q_end, out, lse, d_out, *, scale,
             blocks: BlockSizes, interpret):
    """`(dq, dk, dv)`, each `[batch, seq, heads, head_dim]`, of the padded attention."""
    batch, seq, heads, head_dim = q.shape
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: the softmax-Jacobian term, [b, h, s].
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32))
    params = _compiler_params(blocks.num_warps_bwd, blocks.num_stages_bwd, head_dim)

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    k_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    full = pl.BlockSpec((None, seq, None, head_dim), lambda j, b, h: (b, 0, h, 0))
    full_row = pl.BlockSpec((None, None, seq), lambda j, b, h: (b, h, 0))
    full_int = pl.BlockSpec((None, seq), lambda j, b, h: (b, 0))
    k_int = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, split=blocks.split_loops),
        grid=(seq // bk, batch, heads),
        in_specs=[k_tile, k_tile, k_int, k_int, full, full, full_row, full_row, full_int,
                  full_int],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name=BACKWARD_DKV,
    )(k, v, q_start, q_end, q, d_out, lse, delta, k_start, k_end)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    q_row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    q_int = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, split=blocks.split_loops),
        grid=(seq // bq, batch, heads),
        in_specs=[q_tile, q_tile, q_row, q_row, q_int, q_int, full, full],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name=BACKWARD_DQ,
    )(q, d_out, lse, delta, k_start, k_end, k, v)
    return dq, dk, dv


# ------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, k_start, k_end, q_start, q_end, scale, blocks, interpret):
    return _forward(q, k, v, k_start, k_end, scale=scale, blocks=blocks, interpret=interpret)[0]


def _flash_fwd(q, k, v, k_start, k_end, q_start, q_end, scale, blocks, interpret):
    out, lse = _forward(q, k, v, k_start, k_end, scale=scale, blocks=blocks,
                        interpret=interpret)
    return out, (q, k, v, k_start, k_end, q_start, q_end, out, lse)


def _flash_bwd(scale, blocks, interpret, residuals, d_out):
    q, k, v, k_start, k_end, q_start, q_end, out, lse = residuals
    dq, dk, dv = backward(q, k, v, k_start, k_end, q_start, q_end, out, lse, d_out,
                          scale=scale, blocks=blocks, interpret=interpret)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def flash_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(-1, -1),
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None):
    """Fused attention under `ettin_jax.attention`'s mask rule, differentiable in q, k, v.

    Under an active mesh (`jax.set_mesh`) with more than one device the kernels run per shard
    through `jax.shard_map`, batch over the mesh's `data`/`fsdp` axes and heads over `tensor`:
    XLA cannot partition a Triton custom call and would otherwise gather every input.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, bfloat16/float16/float32, same shape.
      segment_ids: `[batch, seq]` int, contiguous runs (packed documents); 0 = padding. A run
        is one document: an id repeated in a later, separate run starts a new document (the
        XLA reference would join the two; packing never repeats an id in a row).
      causal: key j visible to query i only if j <= i.
      window_size: `(left, right)`; key j visible only if i-left <= j <= i+right (-1: no bound).
      sm_scale: logit scale, default `head_dim ** -0.5`.
      block_sizes: `BlockSizes` tiles; default `default_block_sizes(head_dim, dtype)`.
      interpret: run the kernels in Pallas' interpreter; None = when the backend is not GPU.
    Returns:
      `[batch, seq, heads, head_dim]` in q's dtype; rows that see no key are 0.
    """
    return run_per_shard(
        functools.partial(_flash_attention_local, causal=causal, window_size=window_size,
                          sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret),
        q, k, v, segment_ids)


def _flash_attention_local(q, k, v, segment_ids, *, causal, window_size, sm_scale, block_sizes,
                           interpret):
    """flash_attention on one device's arrays (see there)."""
    if q.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}")
    batch, length, _, head_dim = q.shape
    if segment_ids is not None and segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must be [batch, seq] = {(batch, length)}; "
                         f"got {segment_ids.shape}")
    blocks = block_sizes or default_block_sizes(head_dim, q.dtype)
    blocks.check()                     # before a block of 0 divides below
    seq = round_up(length, blocks.seq_multiple)
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq - length)))
    intervals = attention_intervals(seq, length, segment_ids=segment_ids, causal=causal,
                                    window_size=tuple(int(w) for w in window_size))
    return flash_attention_from_intervals(q, k, v, intervals, sm_scale=sm_scale,
                                          block_sizes=blocks, interpret=interpret)


def flash_attention_from_intervals(q, k, v, intervals, *, sm_scale: float | None = None,
                                   block_sizes: BlockSizes | None = None,
                                   interpret: bool | None = None):
    """The kernels for a mask already given as intervals (what flash_attention does after
    `attention_intervals`; the tests use it to run many masks through one compilation).

    Args:
      q, k, v: `[batch, length, heads, head_dim]`, one dtype of bfloat16/float16/float32.
      intervals: `(k_start, k_end, q_start, q_end)`, each `[batch or 1, seq]` int32 from
        `attention_intervals(seq, length, ...)`, seq a multiple of `block_sizes.seq_multiple`.
    Returns:
      `[batch, length, heads, head_dim]` in q's dtype.
    """
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash_attention is self-attention with equal shapes; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16,
                                                               jnp.float32):
        raise ValueError(f"q, k, v must share one of bfloat16/float16/float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    batch, length, _, head_dim = q.shape
    blocks = block_sizes or default_block_sizes(head_dim, q.dtype)
    blocks.check()
    seq = intervals[0].shape[-1]
    if seq % blocks.seq_multiple or seq < length:
        raise ValueError(f"intervals have length {seq}: need a multiple of "
                         f"{blocks.seq_multiple} (the largest block) and >= seq {length}")
    if interpret is None:
        interpret = target_platform() != "gpu"
    scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
    # Pad seq (padded positions have empty intervals) and head_dim to a power of two >= 16
    # (zero columns change neither q.k nor the kept output columns).
    dim = max(16, 1 << (head_dim - 1).bit_length())
    pads = ((0, 0), (0, seq - length), (0, 0), (0, dim - head_dim))
    if pads != ((0, 0),) * 4:
        q, k, v = (jnp.pad(x, pads) for x in (q, k, v))
    intervals = [jnp.broadcast_to(x.astype(jnp.int32), (batch, seq)) for x in intervals]
    out = _flash(q, k, v, *intervals, scale, blocks, bool(interpret))
    return out[:, :length, :, :head_dim]
