"""Ettin 1b: 28 layers, hidden 1792, GeGLU 3840, 28 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=28, hidden_size=1792, intermediate_size=3840, num_heads=28)
    return base.get_config_for_size(
        arg, size="1b", model=model, peak_lr=0.0005, weight_decay=5e-05,
        lr_warmup_tokens=2e9, batch_warmup_tokens=3e9)
