"""Ettin 400m: 28 layers, hidden 1024, GeGLU 2624, 16 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=28, hidden_size=1024, intermediate_size=2624, num_heads=16)
    return base.get_config_for_size(
        arg, size="400m", model=model, peak_lr=0.0005, weight_decay=1e-05,
        lr_warmup_tokens=2e9, batch_warmup_tokens=10e9)
