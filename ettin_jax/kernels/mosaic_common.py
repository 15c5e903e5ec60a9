"""Pieces shared by the Mosaic GPU attention kernels (`mosaic_forward.py`, `mosaic_backward.py`).

Every kernel has the same shape: a CTA of two compute warpgroups (`block` rows each) and one
memory warpgroup. The memory warpgroup streams the other side's tiles through a `stages`-deep
SMEM ring (`stream_tiles`: TMA into slot `(step - lo) % stages`, signalling `ready[slot]`,
refilling a slot once both compute warpgroups arrived on `consumed[slot]`); the compute
warpgroups walk the same tiles (`visit_tiles`) with element masks only on boundary tiles.

Written so that Mosaic GPU's CPU interpreter runs the very kernels the GPU runs:
  * transposed operands come transposed from XLA (the interpreter has no `transpose_ref`),
  * wgmma's A operand comes from registers only on the GPU (`matmul_from_registers`; the
    interpreter's wgmma reads SMEM refs only),
  * accumulators are fresh zero `ACC`s whose result is added to registers (no `run_state`),
  * register layouts (`layout_cast`, `plgpu.load`) are applied only for the GPU
    (`on_gpu_layout`, `load_vector`): the interpreter has no layouts,
  * the memory warpgroup also waits for the last `consumed` phases (the interpreter checks
    that a thread waiting on a barrier observed all of its phases).
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
COMPUTE_WARPGROUPS = 2
# The memory warpgroup only issues TMA copies, so the compute warpgroups take its registers:
# (2 * 232 + 40) * 128 threads = 64512 of the SM's 65536.
MEMORY_REGISTERS, COMPUTE_REGISTERS = 40, 232


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Mosaic kernels (static arguments, hence frozen).

    `block_q`: forward query rows per compute warpgroup (a CTA has two); `block_kv`: forward
    keys per ring slot; `stages`: ring depth. Backward: `block_q_bwd` query rows and
    `block_kv_bwd` key rows per warpgroup or ring slot in both the dK/dV and the dQ kernel.
    Every block is a multiple of 64 (wgmma rows, the 128-byte swizzle of 16-bit tiles).
    `backward`: "mosaic" (`mosaic_backward.py`) or "triton" (`flash_attention.py`'s kernels on
    this forward's output and log-sum-exp).
    """
    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    stages_bwd: int = 2
    backward: str = "mosaic"

    def check(self):
        if self.backward not in ("mosaic", "triton"):
            raise ValueError(f"MosaicBlocks.backward={self.backward!r}: 'mosaic' or 'triton'")
        for field in dataclasses.fields(self)[:-1]:
            value = getattr(self, field.name)
            if field.name.startswith("block_") and (value < 64 or value % 64):
                raise ValueError(f"MosaicBlocks.{field.name}={value}: must be a multiple of 64")
            if field.name.startswith("stages") and value < 1:
                raise ValueError(f"MosaicBlocks.{field.name}={value}: must be >= 1")

    @property
    def seq_multiple(self) -> int:
        """Sequences are padded to a multiple of this (every kernel's tiles divide it)."""
        return math.lcm(COMPUTE_WARPGROUPS * self.block_q, self.block_kv,
                        COMPUTE_WARPGROUPS * self.block_q_bwd,
                        COMPUTE_WARPGROUPS * self.block_kv_bwd)


def smem_transforms():
    """(8, 64) tiles with the 128-byte swizzle: the SMEM layout wgmma reads 16-bit operands in."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def on_gpu_layout(x, layout, interpret: bool):
    """`x` cast to a Mosaic GPU register layout; the identity in the interpreter."""
    return x if interpret else plgpu.layout_cast(x, layout)


# jax 0.10's plgpu.load requires an index argument; 0.11 deprecates passing one.
_LOAD_NEEDS_INDEX = (inspect.signature(plgpu.load).parameters["idx"].default
                     is inspect.Parameter.empty)


def load_vector(ref, layout, interpret: bool):
    """A 1-D SMEM vector as registers of `layout` (a row or column vector of the WGMMA layout)."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_INDEX else plgpu.load(
        ref, layout=layout)


def matmul(a_smem, b_smem, shape, while_running=None):
    """`a @ b` on the tensor cores, both operands in SMEM; float32 `[m, n]` registers.
    `while_running()` runs after the wgmma is issued, before its result is awaited."""
    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        if while_running is not None:
            while_running()
        return acc_ref[...]
    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def matmul_from_registers(a, a_smem, b_smem, shape, interpret: bool):
    """`a @ b` for a 16-bit `a` in registers (P or dS): wgmma's register A operand on the GPU,
    as FA3 does for P V. The interpreter's wgmma reads SMEM only, so there `a` is stored to
    `a_smem` first (the GPU path of this one call is checked by the cuda lowering tests)."""
    if interpret:
        a_smem[...] = a
        plgpu.commit_smem()
        return matmul(a_smem, b_smem, shape)

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)
        return acc_ref[...]
    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def interval_mask(starts, ends, first: jax.Array, shape, interpret: bool):
    """`[rows, cols]` bool: column `first + c` lies in row r's `[starts[r], ends[r])`."""
    cols = first + on_gpu_layout(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA,
                                 interpret)
    return (cols >= lax.broadcast_in_dim(starts, shape, [0])) & (
        cols < lax.broadcast_in_dim(ends, shape, [0]))


def zeros(shape, interpret: bool, layout=None):
    """float32 zeros in the WGMMA layout (or `layout`, e.g. a row vector's)."""
    return on_gpu_layout(jnp.zeros(shape, jnp.float32), layout or plgpu.Layout.WGMMA, interpret)


def stream_tiles(issue, lo, hi, stages: int, consumed):
    """Memory warpgroup: `issue(step, slot)` for every step in `[lo, hi)`, slot reuse gated.

    `issue` starts the TMA copies of one step into ring slot `slot`, arriving on that slot's
    ready barrier. A slot is refilled once both compute warpgroups arrived on `consumed[slot]`.
    """
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
    for slot in range(stages):
        pl.when(lo + slot < hi)(lambda slot=slot: issue(lo + slot, slot))

    @pl.loop(lo + stages, hi)
    def _refill(step):
        slot = lax.rem(step - lo, stages)
        plgpu.barrier_wait(consumed.at[slot])
        issue(step, slot)

    # Free on the GPU (nothing is left to do here); the interpreter checks that a thread that
    # waits on a barrier observed every one of its phases.
    @pl.loop(jnp.maximum(hi - stages, lo), hi)
    def _drain(step):
        plgpu.barrier_wait(consumed.at[lax.rem(step - lo, stages)])


def visit_tiles(step, ranges, carry):
    """Compute warpgroup: `carry = step(masked, i, carry)` over tiles `i` in `[lo, hi)`.

    `ranges` = (lo, full_lo, full_hi, hi) (`flash_attention.tile_loop_ranges`): tiles in
    `[full_lo, full_hi)` are visible to every row and skip the element mask.
    """
    lo, full_lo, full_hi, hi = ranges
    carry = lax.fori_loop(lo, full_lo, lambda i, c: step(True, i, c), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda i, c: step(False, i, c), carry)
    return lax.fori_loop(full_hi, hi, lambda i, c: step(True, i, c), carry)
