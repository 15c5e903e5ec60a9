"""Ettin 150m: 22 layers, hidden 768, GeGLU 1152, 12 heads of 64 (recipe §2, §3.1)."""
from configs import base


def get_config(arg=None):
    model = base.model_config(num_layers=22, hidden_size=768, intermediate_size=1152, num_heads=12)
    return base.get_config_for_size(
        arg, size="150m", model=model, peak_lr=0.0008, weight_decay=1e-05,
        lr_warmup_tokens=3e9, batch_warmup_tokens=50e9)
