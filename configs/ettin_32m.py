"""Ettin 32m: 10 layers, hidden 384, GeGLU 576, 6 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=10, hidden_size=384, intermediate_size=576, num_heads=6)
    return base.get_config_for_size(
        arg, size="32m", model=model, peak_lr=0.003, weight_decay=0.0003,
        lr_warmup_tokens=4e9, batch_warmup_tokens=100e9)
