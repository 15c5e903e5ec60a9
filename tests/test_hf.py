"""Hugging Face interop: logits parity with transformers (torch, float32, eager) both ways."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import ettin_tiny
from ettin_jax import hf, model_loader
from ettin_jax.model import EttinModel

# (hidden, heads, layers, local_attention, seq): head_dim 24/16/64, layer counts not a
# multiple of 3, sequences longer than the local window and not multiples of 64.
SHAPES = [
    dict(hidden_size=48, num_attention_heads=2, num_hidden_layers=4, local_attention=16, seq=45),
    dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=5, local_attention=32, seq=77),
    dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, local_attention=128, seq=150),
]
VOCAB = 101
forward = nnx.jit(lambda model, *args: model(*args))


def _hf_model(shape, causal, seed=0):
    shape = dict(shape)
    shape.pop("seq")
    kw = dict(vocab_size=VOCAB, intermediate_size=40, pad_token_id=96, bos_token_id=97,
              eos_token_id=98, cls_token_id=97, sep_token_id=98, global_rope_theta=1000.0,
              local_rope_theta=300.0, max_position_embeddings=512, **shape)
    if causal:
        cls, config = transformers.ModernBertDecoderForCausalLM, transformers.ModernBertDecoderConfig(**kw)
    else:
        cls, config = transformers.ModernBertForMaskedLM, transformers.ModernBertConfig(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():   # away from init so that every weight matters (norms, biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cls, model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s['hidden_size']}L{s['num_hidden_layers']}s{s['seq']}")
def test_transformers_to_ours(tmp_path, shape, causal):
    _, torch_model = _hf_model(shape, causal)
    torch_model.save_pretrained(tmp_path)
    model, model_config = model_loader.load_hf(str(tmp_path), dtype="float32")
    assert model_config.causal == causal
    ids = np.random.RandomState(1).randint(0, 96, size=(2, shape["seq"]))
    diff = np.abs(np.asarray(forward(model, jnp.asarray(ids))) - _torch_logits(torch_model, ids)).max()
    assert diff <= 1e-4



@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_gradients_match_transformers(tmp_path, causal):
    """Every parameter's gradient (norm scales moved away from 1 included) equals
    transformers' autograd of the same loss: the norms feeding a matmul have their scale
    folded into its weight, which must change nothing but where the gradient is reduced."""
    shape = SHAPES[1]
    _, torch_model = _hf_model(shape, causal)
    torch_model.save_pretrained(tmp_path)
    model, _ = model_loader.load_hf(str(tmp_path), dtype="float32")
    model.eval()
    rng = np.random.RandomState(4)
    ids = rng.randint(0, 96, size=(2, shape["seq"]))
    weights = rng.normal(size=(2, shape["seq"], VOCAB)).astype(np.float32)
    (torch_model(torch.tensor(ids)).logits * torch.tensor(weights)).sum().backward()
    expected = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}

    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)) * weights))(model)
    nnx.update(model, grads)                       # the gradient in the parameters' places
    ours = hf.hf_state_dict(model)                 # ... and in transformers' names and layouts
    assert set(ours) <= set(expected)
    assert any("norm" in name for name in ours)
    for name, grad in ours.items():
        scale = np.abs(expected[name]).max()
        assert np.abs(grad - expected[name]).max() <= 1e-4 * max(scale, 1.0), name


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("window", ["transformers", "training"])
def test_ours_to_transformers(tmp_path, causal, window):
    config = ettin_tiny.get_config("clm" if causal else "mlm").model
    config.decoder_window = window
    config.num_layers = 5
    config.global_rope_theta, config.local_rope_theta = 500.0, 2000.0
    model = EttinModel(config, rngs=nnx.Rngs(3))
    model.eval()
    hf.save_hf(model, config, str(tmp_path))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    torch_model, info = auto.from_pretrained(str(tmp_path), output_loading_info=True,
                                             attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(torch_model).__name__ == (hf.DECODER_ARCH if causal else hf.ENCODER_ARCH)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["rope_parameters"]["sliding_attention"]["rope_theta"] == 2000.0
    assert saved["pad_token_id"] == ettin_tiny.PAD_ID and saved["bos_token_id"] == ettin_tiny.CLS_ID
    ids = np.random.RandomState(2).randint(0, 500, size=(2, 70))   # window is 8+8 keys
    diff = np.abs(np.asarray(forward(model, jnp.asarray(ids))) - _torch_logits(torch_model.eval(), ids)).max()
    assert diff <= 1e-4


def test_training_window_sees_one_key_more():
    """The 65-key option differs from transformers' 64 keys exactly at the window's edge."""
    config = ettin_tiny.get_config("clm,window=transformers").model
    a = EttinModel(config, rngs=nnx.Rngs(0))
    config.decoder_window = "training"
    b = EttinModel(config, rngs=nnx.Rngs(0))
    a.eval(), b.eval()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, size=(1, 40)))
    la, lb = np.asarray(forward(a, ids)), np.asarray(forward(b, ids))
    half = config.local_attention // 2
    # Up to position half-1 every key is inside both windows (and layer 0 is global).
    np.testing.assert_array_equal(la[:, :half], lb[:, :half])
    assert np.abs(la[:, half:] - lb[:, half:]).max() > 1e-4


def test_bad_files_name_the_key(tmp_path):
    _, torch_model = _hf_model(SHAPES[0], causal=False)
    torch_model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)

    config["intermediate_size"] = 41
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.HFFormatError, match=r"model.layers.0.mlp.Wi.weight.*\(80, 48\).*\(82, 48\)"):
        model_loader.load_hf(str(tmp_path))

    config["intermediate_size"] = 40
    config["architectures"] = ["BertForMaskedLM"]
    config["model_type"] = "bert"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.HFFormatError, match="BertForMaskedLM"):
        model_loader.load_hf(str(tmp_path))

    config["architectures"] = [hf.DECODER_ARCH]   # an encoder's file read as a decoder
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.HFFormatError, match=r"missing weights.*'lm_head.dense.weight'.*'model.layers.0.attn.q_proj.weight'"):
        model_loader.load_hf(str(tmp_path))


def test_export_cli_loads_in_transformers(tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "ettin_jax.hf", "export", "--config=configs/ettin_tiny.py:clm",
         f"--out={out}"], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    torch_model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model, _ = model_loader.load_hf(str(out), dtype="float32")
    ids = np.arange(30)[None] % 500
    diff = np.abs(np.asarray(forward(model, jnp.asarray(ids))) - _torch_logits(torch_model.eval(), ids)).max()
    assert diff <= 1e-4


def test_cli_usage_errors_exit_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ettin_jax.hf", "export", f"--out={tmp_path}"],
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode != 0
    assert "exactly one of --checkpoint" in result.stderr
