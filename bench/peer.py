"""transformers' ModernBERT training step at our shapes: the peer bench/train_step.py times.

    step, loss = peer_step_fn(config, batch, compile_model=..., bf16_autocast=...)

Encoders (`config.objective == "mlm"`) run `ModernBertForMaskedLM` with sparse prediction,
decoders `ModernBertDecoderForCausalLM`; both built from our config through
`ModelConfig.to_hf_dict()` (the same translation the HF export writes), attention through
torch's sdpa. On a GPU the fair peer is bf16 autocast, fused AdamW and `torch.compile`;
on CPU float32, plain AdamW, eager. Documents packed into a row are not separated (the
padding mask only): transformers has no packed-sequence mask for ModernBERT's sdpa path.
"""
from __future__ import annotations


def hf_model_config(config, seq_len: int):
    """The transformers config of `config.model` (encoder or decoder), dropout-free attention."""
    import transformers  # pylint: disable=import-outside-toplevel
    from ettin_jax.model_config import ModelConfig  # pylint: disable=import-outside-toplevel

    hf = ModelConfig.from_config(config.model).to_hf_dict()
    hf.update(max_position_embeddings=max(8192, seq_len), attention_dropout=0.0)
    if config.objective == "mlm":
        hf.update(sparse_prediction=True, reference_compile=False)
        return transformers.ModernBertConfig.from_dict(hf, attn_implementation="sdpa")
    hf.update(use_cache=False)
    return transformers.ModernBertDecoderConfig.from_dict(hf, attn_implementation="sdpa")


def peer_step_fn(config, batch, *, compile_model: bool, bf16_autocast: bool):
    """(step, loss) callables: one blocking AdamW step of the transformers model on `batch`
    (bench/train_step.make_batch's format) and the last step's loss."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = hf_model_config(config, batch["input_ids"].shape[1])
    torch.manual_seed(0)
    model_class = (transformers.ModernBertForMaskedLM if config.objective == "mlm"
                   else transformers.ModernBertDecoderForCausalLM)
    model = model_class(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.peak_lr, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=config.optimizer.weight_decay,
                            fused=device == "cuda")
    if compile_model:
        # Each shape compiled for its own static shape: after a first shape, dynamo would
        # recompile the same model class for the next with symbolic (dynamic) sizes.
        torch._dynamo.reset()  # pylint: disable=protected-access
    forward = torch.compile(model, dynamic=False) if compile_model else model
    if config.objective == "mlm":
        labels = batch["labels"]
    else:
        # transformers shifts causal-LM labels itself: its label at i+1 is our label at i.
        labels = np.full_like(batch["labels"], -100)
        labels[:, 1:] = batch["labels"][:, :-1]
    input_ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    labels = torch.from_numpy(labels).long().to(device)
    attention_mask = torch.from_numpy(batch["segment_ids"] > 0).long().to(device)
    carry = {"loss": None}

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        carry["loss"] = loss.detach().item()   # .item() waits for the GPU

    return step, lambda: carry["loss"]
