"""cuDNN flash attention through `jax.nn.dot_product_attention`, for the masks cuDNN can express.

cuDNN (via jax's public API) knows no segment ids and supports a window only as a left window
together with causal masking. Everything else raises a ValueError that names the mask, instead
of silently computing another mask (jax's `local_window_size=(L, 0)` without `is_causal`
attends to the future, see ../shared/jax_notes.md §7.1).
"""
from __future__ import annotations

import jax


def cudnn_mask_support(*, segment_ids=None, causal: bool = False, window_size=(-1, -1)):
    """`(is_causal, local_window_size)` for jax.nn.dot_product_attention, or raises ValueError."""
    left, right = (int(w) for w in window_size)
    if segment_ids is not None:
        raise ValueError("attention_impl='cudnn' does not support segment_ids (packed documents "
                         "or padding); use attention_impl='pallas' or 'xla'")
    if causal:
        # With causality a right window >= 0 is moot: j <= i already implies j <= i + right.
        return True, (None if left < 0 else (left, 0))
    if left >= 0 or right >= 0:
        raise ValueError(f"attention_impl='cudnn' does not support the bidirectional window "
                         f"window_size={(left, right)} (cuDNN has only a causal left window); "
                         f"use attention_impl='pallas' or 'xla'")
    return False, None


def cudnn_attention(q, k, v, *, segment_ids=None, causal: bool = False, window_size=(-1, -1),
                    sm_scale: float | None = None):
    """cuDNN attention. q, k, v: `[batch, seq, heads, head_dim]` bfloat16/float16 on a GPU.

    Returns `[batch, seq, heads, head_dim]`. Raises ValueError for masks cuDNN cannot express.
    """
    is_causal, local_window = cudnn_mask_support(segment_ids=segment_ids, causal=causal,
                                                 window_size=window_size)
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=is_causal,
                                        local_window_size=local_window,
                                        implementation="cudnn")
