"""Visible-key and visible-query intervals: the whole attention mask as two int32 arrays.

Under `ettin_jax.attention`'s rule (contiguous segment runs, a window, causality) the keys a
query sees form one interval, and so do the queries a key is seen by:

  query i sees keys    [k_start[i], k_end[i])  = run(i) ∩ [i-left, i+right] ∩ (-inf, i]
  key j is seen by     [q_start[j], q_end[j])  = run(j) ∩ [j-right, j+left] ∩ [j, inf)

(the causal terms only when `causal`, a window side only when it is >= 0). The flash kernels
bound their loops by the min/max of these over a tile, so tiles outside every interval of the
tile are never loaded, and mask element-wise with `k_start <= j < k_end` on boundary tiles.

A segment is a *run* of equal non-zero ids: a later run with a repeated id is a new document,
which is what packing produces. Empty intervals (padding, segment 0, positions past the real
sequence length) are written as `[seq, 0)` so that they never widen a tile's min/max.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def segment_runs(segment_ids, length: int):
    """First and one-past-last index of the run each position is in.

    Args:
      segment_ids: `[batch, seq]` int32 (seq may include padding past `length`) or None.
      length: real sequence length; positions >= length belong to no run.
    Returns:
      `(run_start, run_end, valid)`, each `[batch or 1, seq]`; `valid` is False for segment 0
      and for positions >= length.
    """
    if segment_ids is None:
        seq = length
        pos = jnp.arange(seq, dtype=jnp.int32)[None]
        return jnp.zeros_like(pos), jnp.full_like(pos, length), jnp.ones(pos.shape, bool)
    batch, seq = segment_ids.shape
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    ids = segment_ids.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    ends = jnp.concatenate([ids[:, 1:] != ids[:, :-1], jnp.ones((batch, 1), bool)], axis=1)
    run_start = lax.cummax(jnp.where(starts, pos, 0), axis=1)
    run_end = lax.cummin(jnp.where(ends, pos + 1, seq), axis=1, reverse=True)
    valid = (ids != 0) & (pos < length)
    return run_start, run_end, valid


def attention_intervals(seq: int, length: int, *, segment_ids=None, causal: bool = False,
                        window_size=(-1, -1)):
    """Per-query key intervals and per-key query intervals.

    Args:
      seq: padded sequence length of the kernel's arrays (>= length).
      length: real sequence length; positions >= length see nothing and are seen by nothing.
      segment_ids: `[batch, seq]` int32 (already padded with 0 to `seq`) or None.
    Returns:
      `(k_start, k_end, q_start, q_end)`, each `[batch or 1, seq]` int32, empty as `[seq, 0)`.
    """
    left, right = window_size
    if segment_ids is None:
        run_start, run_end, valid = segment_runs(None, length)
        pad = seq - length
        run_start = jnp.pad(run_start, ((0, 0), (0, pad)))
        run_end = jnp.pad(run_end, ((0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    else:
        run_start, run_end, valid = segment_runs(segment_ids, length)
    pos = jnp.arange(seq, dtype=jnp.int32)[None]

    k_start, k_end = run_start, run_end
    q_start, q_end = run_start, run_end
    if left >= 0:
        k_start = jnp.maximum(k_start, pos - left)
        q_end = jnp.minimum(q_end, pos + left + 1)
    if right >= 0:
        k_end = jnp.minimum(k_end, pos + right + 1)
        q_start = jnp.maximum(q_start, pos - right)
    if causal:
        k_end = jnp.minimum(k_end, pos + 1)
        q_start = jnp.maximum(q_start, pos)

    def normalize(start, end):
        empty = ~valid | (end <= start)
        return (jnp.where(empty, seq, start).astype(jnp.int32),
                jnp.where(empty, 0, end).astype(jnp.int32))

    k_start, k_end = normalize(k_start, k_end)
    q_start, q_end = normalize(q_start, q_end)
    return k_start, k_end, q_start, q_end
