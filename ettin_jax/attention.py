"""The one attention entry point of the model, and its XLA reference.

Every implementation takes the same arguments and masks by the same rule:
query i sees key j iff
  * both are in the same non-zero segment (`segment_ids`; 0 = padding sees nothing),
  * `i - left <= j <= i + right` for `window_size=(left, right)` (-1 = unbounded),
  * and `j <= i` when `causal`.
A query that sees no key returns zeros (never NaN).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "cudnn", "splash")


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
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def run_per_shard(local_attention, q, k, v, segment_ids):
    """Runs `local_attention(q, k, v, segment_ids)` per shard of the active mesh.

    A Pallas kernel is a custom call the compiler cannot partition: left to GSPMD, every
    device would gather the whole batch. Under `jax.set_mesh` with more than one device this
    splits the batch over the mesh's `data`/`fsdp` axes and heads over `tensor` with
    `jax.shard_map`; without a mesh it calls `local_attention` directly.
    q, k, v: `[batch, seq, heads, head_dim]`; segment_ids `[batch, seq]` or None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(mesh.shape[a] == 1 for a in mesh.axis_names):
        return local_attention(q, k, v, segment_ids)
    P = jax.sharding.PartitionSpec
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
    head_axis = "tensor" if "tensor" in mesh.axis_names else None
    qkv_spec, seg_spec = P(batch_axes, None, head_axis, None), P(batch_axes, None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: local_attention(q, k, v, None), mesh=mesh,
                             in_specs=(qkv_spec,) * 3, out_specs=qkv_spec,
                             check_vma=False)(q, k, v)
    # check_vma=False: pallas_call declares no varying mesh axes for its outputs.
    return jax.shard_map(local_attention, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids)


def default_implementation() -> str:
    backend = jax.default_backend()
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
    if impl == "xla":
        return xla_attention(q, k, v, **kwargs)
    if impl == "pallas":
        from ettin_jax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
        return flash_attention(q, k, v, **kwargs)
    if impl == "cudnn":
        from ettin_jax.kernels import cudnn_attention  # pylint: disable=import-outside-toplevel
        return cudnn_attention(q, k, v, **kwargs)
    from ettin_jax.kernels.splash import splash_attention  # pylint: disable=import-outside-toplevel
    return splash_attention(q, k, v, **kwargs)
