"""TPU attention through JAX's Pallas splash attention, for Ettin's masks.

`splash_attention(q, k, v, *, segment_ids, causal, window_size, sm_scale)` has the
signature and the mask rule of `ettin_jax.attention.xla_attention`:

  global encoder layers   window (-1, -1)             -> FullMask
  local encoder layers    window (64, 64)             -> LocalMask((64, 64))
  global decoder layers   causal                      -> CausalMask
  local decoder layers    causal, window (63|64, 0)   -> LocalMask((63|64, 0)) (causal by itself)

Packed documents use splash's runtime `SegmentIds`. Splash lets padding (segment 0) attend
to padding, which keeps every row non-empty (no NaN forward or backward); the wrapper then
zeroes the padding rows, as the reference does. Sequences are padded up to the block size
inside the wrapper. Off TPU the kernel runs in Pallas interpret mode (slow; tests only).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from ettin_jax.kernels.target import target_platform
from ettin_jax.sharding import run_per_shard

DEFAULT_BLOCK = 512   # head_dim 64 at seq 1024 / 8192: two or sixteen tiles per axis


def _mask(seq_len: int, causal: bool, window_size) -> splash.Mask:
    left, right = window_size
    shape = (seq_len, seq_len)
    if left < 0 and right < 0:
        return splash.CausalMask(shape) if causal else splash.FullMask(shape)
    left = None if left < 0 else left
    right = 0 if causal else (None if right < 0 else right)
    return splash.LocalMask(shape, (left, right), offset=0)


@functools.lru_cache(maxsize=64)
def _kernel(seq_len: int, num_heads: int, causal: bool, window_size: tuple, block: int,
            interpret: bool):
    """Splash kernels precompute per-tile mask metadata on the host: build each once."""
    mask = splash.MultiHeadMask([_mask(seq_len, causal, window_size)] * num_heads)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                               block_q_dq=block, block_kv_dq=block)
    # The kernel keeps its mask metadata as arrays: make them concrete even when the first
    # call happens inside a trace, or the cached kernel would hold that trace's tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def splash_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(-1, -1),
                     sm_scale: float | None = None, block_size: int | None = None,
                     interpret: bool | None = None):
    """q, k, v `[batch, seq, heads, head_dim]`; segment_ids `[batch, seq]` int32 (0 = padding).

    Returns `[batch, seq, heads, head_dim]` in q's dtype. Under an active mesh
    (`jax.set_mesh`) the kernel runs per shard through `jax.shard_map`: batch over the
    mesh's `data`/`fsdp` axes, heads over `tensor` (a TPU kernel cannot be partitioned
    by the compiler itself).
    """
    return run_per_shard(
        functools.partial(_splash_local, causal=causal, window_size=window_size,
                          sm_scale=sm_scale, block_size=block_size, interpret=interpret),
        q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, causal, window_size, sm_scale, block_size, interpret):
    batch, seq_len, num_heads, head_dim = q.shape
    if interpret is None:
        interpret = target_platform() != "tpu"
    block = block_size or min(DEFAULT_BLOCK, -(-seq_len // 128) * 128)
    padded_len = -(-seq_len // block) * block
    real = (jnp.ones((batch, seq_len), jnp.int32) if segment_ids is None
            else segment_ids.astype(jnp.int32))
    if padded_len != seq_len:
        pad = [(0, 0), (0, padded_len - seq_len)]
        q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]) for x in (q, k, v))
        real = jnp.pad(real, pad)
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    kernel = _kernel(padded_len, num_heads, bool(causal), tuple(int(w) for w in window_size),
                     block, bool(interpret))

    def one_example(q1, k1, v1, seg1):
        # splash wants [heads, seq, head_dim] and leaves the softmax scale to the caller.
        out = kernel((q1 * scale).astype(q1.dtype).swapaxes(0, 1), k1.swapaxes(0, 1),
                     v1.swapaxes(0, 1), segment_ids=splash.SegmentIds(q=seg1, kv=seg1))
        return out.swapaxes(0, 1)

    out = jax.vmap(one_example)(q, k, v, real)
    out = jnp.where((real != 0)[:, :, None, None], out, 0).astype(q.dtype)
    return out[:, :seq_len]
