"""Fused attention kernels behind `ettin_jax.attention.attention(impl=...)`.

`flash_attention`: Pallas (Triton backend) kernels for every Ettin mask, forward and backward.
`mosaic_attention`: Pallas Mosaic GPU kernels (Hopper, FA3-style warp specialization) for
global (windowless) layers, forward and backward (`mosaic_attention.py`); impl="mosaic" pairs
them with `flash_attention` for windowed layers.
`cudnn_attention`: cuDNN through jax.nn for the masks it supports (a baseline to beat).
`splash_attention`: TPU splash kernels (`splash.py`), imported on first use because importing
the TPU ops is not free.
"""
from ettin_jax.kernels.cudnn import cudnn_attention
from ettin_jax.kernels.flash_attention import BlockSizes, flash_attention
from ettin_jax.kernels.mosaic_attention import mosaic_attention

__all__ = ["BlockSizes", "cudnn_attention", "flash_attention", "mosaic_attention",
           "splash_attention"]


def __getattr__(name):
    if name == "splash_attention":
        from ettin_jax.kernels.splash import splash_attention  # pylint: disable=import-outside-toplevel
        return splash_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
