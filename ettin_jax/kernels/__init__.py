"""Fused attention kernels behind `ettin_jax.attention.attention(impl=...)`.

`flash_attention`: Pallas (Triton backend) kernels for every Ettin mask, forward and backward.
`mosaic_attention`: Pallas Mosaic GPU kernels (Hopper, FA3-style warp specialization) for
global (windowless) layers, forward and backward (`mosaic_attention.py`); impl="mosaic" pairs
them with `flash_attention` for windowed layers.
`cudnn_attention`: cuDNN through jax.nn for the masks it supports (a baseline to beat).
`splash_attention`: TPU splash kernels (`splash.py`).

All are imported here, with `ettin_jax.attention`, never inside a trace: importing Pallas
registers configuration options that are part of jit's cache key (jax 0.11:
`pallas_fuser_disable_nested_fuse`), so a first import during a step's trace changes that key
and the step's second call traces and compiles it again.
"""
from ettin_jax.kernels.cudnn import cudnn_attention
from ettin_jax.kernels.flash_attention import BlockSizes, flash_attention
from ettin_jax.kernels.mosaic_attention import mosaic_attention
from ettin_jax.kernels.splash import splash_attention

__all__ = ["BlockSizes", "cudnn_attention", "flash_attention", "mosaic_attention",
           "splash_attention"]

