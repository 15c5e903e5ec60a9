"""Fused attention kernels behind `ettin_jax.attention.attention(impl=...)`.

`flash_attention`: Pallas (Triton backend) kernels for every Ettin mask, forward and backward.
`cudnn_attention`: cuDNN through jax.nn for the masks it supports (a baseline to beat).
"""
from ettin_jax.kernels.cudnn import cudnn_attention
from ettin_jax.kernels.flash_attention import BlockSizes, flash_attention

__all__ = ["BlockSizes", "cudnn_attention", "flash_attention"]
