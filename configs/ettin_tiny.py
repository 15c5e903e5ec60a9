"""A tiny Ettin for tests and smoke runs: 4 layers (global, local, local, global),
hidden 64, 4 heads of 16, a 512-token vocabulary with the special ids at its top."""
from configs import base

VOCAB_SIZE = 512
UNK_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = 500, 501, 502, 503, 504


def get_config(arg=None):
    model = base.model_config(num_layers=4, hidden_size=64, intermediate_size=96, num_heads=4,
                              vocab_size=VOCAB_SIZE)
    model.pad_token_id, model.cls_token_id, model.sep_token_id = PAD_ID, CLS_ID, SEP_ID
    model.mask_token_id, model.bos_token_id, model.eos_token_id = MASK_ID, CLS_ID, SEP_ID
    model.local_attention = 16            # local layers see |i-j| <= 8: windows matter at seq 64
    model.dtype = "float32"
    config = base.get_config_for_size(
        arg, size="tiny", model=model, peak_lr=3e-3, weight_decay=3e-4,
        lr_warmup_tokens=2e4, batch_warmup_tokens=0.0)
    config.train.seq_len = 128 if config.phase == "pretrain" else 256
    config.train.global_batch_size = 8
    config.train.grad_accum_steps = 1
    return config
