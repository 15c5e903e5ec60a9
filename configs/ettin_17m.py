"""Ettin 17m: 7 layers, hidden 256, GeGLU 384, 4 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=7, hidden_size=256, intermediate_size=384, num_heads=4)
    return base.get_config_for_size(
        arg, size="17m", model=model, peak_lr=0.003, weight_decay=0.0003,
        lr_warmup_tokens=4e9, batch_warmup_tokens=125e9)
