"""The one attention entry point of the model, and its XLA reference.

Every implementation takes the same arguments and masks by the same rule:
query i sees key j iff
  * both are in the same non-zero segment (`segment_ids`; 0 = padding sees nothing),
  * `i - left <= j <= i + right` for `window_size=(left, right)` (-1 = unbounded),
  * and `j <= i` when `causal`.
A query that sees no key returns zeros (never NaN).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

# Imported here, before any trace, for jit's cache key (see ettin_jax/kernels/__init__.py).
from ettin_jax import kernels
from ettin_jax.kernels.target import target_platform

# "mosaic": Mosaic GPU kernels for global layers, the Triton "pallas" kernels for windowed ones
# (the Mosaic kernels take windows too; which is faster there is not measured yet). jax 0.11
# deprecates Pallas' Triton backend (a DeprecationWarning when the "pallas" kernels lower).
IMPLEMENTATIONS = ("xla", "pallas", "mosaic", "cudnn", "splash")
_MASK_SCOPE = re.compile(r"\battention_(causal|global|(causal_)?window_(-?\d+)_(-?\d+))\b")


def mask_scope(causal: bool, window_size) -> str:
    """The name scope an attention call runs under, naming its mask: `attention_global`,
    `attention_causal`, `attention_window_64_64`, `attention_causal_window_64_0`.

    It reaches the compiled program's op names (forward and backward) and GPU profiler traces,
    where every layer's kernel otherwise has the same name: bench/hlo_profile.py prices a
    kernel's FLOPs by it, and a trace tells global from local layers by it."""
    left, right = window_size
    if (left, right) == (-1, -1):
        return "attention_causal" if causal else "attention_global"
    return f"attention_{'causal_' if causal else ''}window_{left}_{right}"


def mask_from_scope(op_name: str):
    """`(causal, window_size)` of the `mask_scope` in an op name, or None if it has none."""
    match = _MASK_SCOPE.search(op_name)
    if match is None:
        return None
    if match.group(1) in ("causal", "global"):
        return match.group(1) == "causal", (-1, -1)
    return match.group(2) is not None, (int(match.group(3)), int(match.group(4)))


def attention_mask(q_len: int, k_len: int, *, segment_ids=None, causal: bool = False,
                   window_size=(-1, -1), q_offset=0):
    """Boolean visibility `[batch or 1, q_len, k_len]` under the module's rule.

    `q_offset` places the queries at positions q_offset.. of the key sequence (decoding
    with a KV cache: T new queries against a cache of k_len keys); segments need q_offset 0.
    """
    left, right = window_size
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(k_len)[None, :]
    visible = jnp.ones((q_len, k_len), dtype=bool)
    if causal:
        visible &= k_pos <= q_pos
    if left >= 0:
        visible &= k_pos >= q_pos - left
    if right >= 0:
        visible &= k_pos <= q_pos + right
    visible = visible[None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        visible = visible & same & (segment_ids[:, :, None] != 0)
    return visible


def _masked_softmax(logits, visible):
    """Softmax over the last axis of float32 `logits` where `visible`; all-hidden rows give 0."""
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom == 0, 1.0, denom)


def xla_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(-1, -1),
                  sm_scale: float | None = None, q_offset=0):
    """Dense reference attention.

    Args:
      q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, k_len, heads, head_dim]`.
      segment_ids: `[batch, seq]` int32 or None (q_len == k_len).
      q_offset: position of the first query among the keys (see `attention_mask`).
    Returns:
      `[batch, seq, heads, head_dim]` in q's dtype; logits and softmax in float32.
    """
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    visible = attention_mask(q.shape[1], k.shape[1], segment_ids=segment_ids, causal=causal,
                             window_size=window_size, q_offset=q_offset)[:, None]
    probs = _masked_softmax(logits, visible)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


BANDED_BLOCK = 64


def banded_blocks(seq: int, window_size, block: int = BANDED_BLOCK):
    """(key blocks before, key blocks after) each query block of `banded_attention` reads, or
    None when the window does not make that cheaper than dense attention over `seq` keys."""
    left, right = window_size
    if left < 0 or right < 0:
        return None
    before, after = -(-left // block), -(-right // block)
    padded = -(-seq // block) * block
    return (before, after) if (before + 1 + after) * block < padded else None


def banded_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(64, 64),
                     sm_scale: float | None = None, block: int = BANDED_BLOCK):
    """Sliding-window attention in O(seq x window) with XLA ops (the CPU path's local layers).

    Queries are taken `block` at a time; each query block reads only the key blocks its
    window can reach (`banded_blocks`), so a (64, 64) window at seq 512 computes 192 of the
    512 keys per query. Same arguments, mask rule and result as `xla_attention` (tested
    against it); `window_size` must be finite on both sides.
    q, k, v: `[batch, seq, heads, head_dim]` -> `[batch, seq, heads, head_dim]`.
    """
    batch, seq, heads, head_dim = q.shape
    blocks = banded_blocks(seq, window_size, block)
    if blocks is None:
        raise ValueError(f"banded_attention needs a finite window narrower than the sequence; "
                         f"got window_size={window_size} at seq {seq}")
    before, after = blocks
    left, right = window_size
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    num_blocks = -(-seq // block)
    pad = num_blocks * block - seq
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    # Segment 0 hides both the tail padding and the key blocks beyond either end.
    segment_ids = jnp.pad(segment_ids, ((0, 0), (before * block, pad + after * block)))
    positions = jnp.arange(-before * block, (num_blocks + after) * block)

    def key_windows(x):
        """[batch, blocks + before + after, block, ...] -> [batch, num_blocks, keys, ...]."""
        return jnp.concatenate([x[:, j:j + num_blocks] for j in range(before + 1 + after)],
                               axis=2)

    def by_block(x, lead_pad, tail_pad):
        x = jnp.pad(x, [(0, 0), (lead_pad, tail_pad), (0, 0), (0, 0)])
        return x.reshape(batch, -1, block, heads, head_dim)

    k_blocks = key_windows(by_block(k, before * block, pad + after * block))  # [b, n, keys, h, d]
    v_blocks = key_windows(by_block(v, before * block, pad + after * block))
    k_segments = key_windows(segment_ids.reshape(batch, -1, block))   # [b, n, keys]
    k_positions = key_windows(positions.reshape(1, -1, block))[0]     # [n, keys]
    q_blocks = by_block(q, 0, pad)                                    # [b, n, block, h, d]
    q_segments = segment_ids[:, before * block:][:, :num_blocks * block].reshape(batch, num_blocks, block)
    q_positions = jnp.arange(num_blocks * block).reshape(num_blocks, block)

    offset = k_positions[:, None, :] - q_positions[:, :, None]          # [n, block, keys]
    visible = (offset >= -left) & (offset <= right)
    if causal:
        visible &= offset <= 0
    visible = (visible[None] & (q_segments[..., :, None] == k_segments[..., None, :])
               & (q_segments[..., :, None] != 0))                       # [b, n, block, keys]
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q_blocks, k_blocks,
                        preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(logits, visible[:, :, None])
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs.astype(v.dtype), v_blocks,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, num_blocks * block, heads, head_dim)[:, :seq].astype(q.dtype)


def default_implementation() -> str:
    """The attention of the backend being built for (`kernels.target`): Triton kernels on a
    GPU, splash on a TPU, XLA elsewhere."""
    backend = target_platform()
    if backend == "gpu":
        return "pallas"
    if backend == "tpu":
        return "splash"
    return "xla"


def resolve_implementation(name: str) -> str:
    if name == "auto":
        return default_implementation()
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention_impl={name!r}: expected 'auto' or one of {IMPLEMENTATIONS}")
    return name


def attention(q, k, v, *, impl: str = "xla", segment_ids=None, causal: bool = False,
              window_size=(-1, -1), sm_scale: float | None = None):
    """Dispatches to the implementation named by `impl` (see `IMPLEMENTATIONS`)."""
    impl = resolve_implementation(impl)
    kwargs = dict(segment_ids=segment_ids, causal=causal, window_size=tuple(window_size),
                  sm_scale=sm_scale)
    # The mask's name reaches the compiled program's op names (see mask_scope).
    with jax.named_scope(mask_scope(causal, window_size)):
        if impl == "xla":
            if banded_blocks(q.shape[1], window_size) is not None:
                return banded_attention(q, k, v, **kwargs)
            return xla_attention(q, k, v, **kwargs)
        if impl == "mosaic" and tuple(window_size) == (-1, -1):
            return kernels.mosaic_attention(q, k, v, **kwargs)
        if impl in ("pallas", "mosaic"):
            return kernels.flash_attention(q, k, v, **kwargs)
        if impl == "cudnn":
            return kernels.cudnn_attention(q, k, v, **kwargs)
        return kernels.splash_attention(q, k, v, **kwargs)
