"""Ettin 68m: 19 layers, hidden 512, GeGLU 768, 8 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=19, hidden_size=512, intermediate_size=768, num_heads=8)
    return base.get_config_for_size(
        arg, size="68m", model=model, peak_lr=0.003, weight_decay=0.0003,
        lr_warmup_tokens=3e9, batch_warmup_tokens=75e9)
