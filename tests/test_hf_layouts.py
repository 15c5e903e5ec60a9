"""Published checkpoints in and out: the config.json layouts transformers 4.4x-4.5x wrote,
sharded and PyTorch weight files, the stored dtype, and lossless export -> import -> export.

The reference is the pinned transformers (5.x) loading the same directory with no arguments.
The legacy layouts are written by hand from transformers 4.5x's ModernBertConfig /
ModernBertDecoderConfig (their __init__ attributes as `to_dict` dumps them: no
rope_parameters, global/local_rope_theta, the decoder's sliding_window and layer_types but no
local_attention), with weights we save.
"""
import dataclasses
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from configs import ettin_tiny
from ettin_jax import hf
from ettin_jax import model_loader
from ettin_jax.model import EttinModel
from ettin_jax.model_config import ModelConfig

forward = nnx.jit(lambda model, ids: model(ids))
SEQ = 70    # longer than every local window below (8..9 keys a side)


def _ours(objective, **changes):
    config = dataclasses.replace(
        ModelConfig.from_config(ettin_tiny.get_config(objective).model), num_layers=5,
        global_rope_theta=500.0, local_rope_theta=2000.0, **changes)
    model = EttinModel(config, rngs=nnx.Rngs(3))
    model.eval()
    # Far from init, so that attention is sharp and the window and RoPE thetas show in the
    # logits (at init the scores are near zero and attention near uniform).
    rng = np.random.default_rng(0)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + 0.1 * rng.standard_normal(p.shape), jnp.float32),
        params))
    return model, config


def _ids(seed, vocab_size):
    return np.random.RandomState(seed).randint(0, vocab_size, size=(2, SEQ))


def _torch_logits(directory, causal, ids):
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    torch_model = auto.from_pretrained(str(directory)).eval()   # no arguments: its defaults
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()


def _assert_parity(directory, causal, seed=0):
    """load_hf(directory) with no arguments computes what transformers computes."""
    model, config = model_loader.load_hf(str(directory))
    ids = _ids(seed, config.vocab_size)
    ours = np.asarray(forward(model, jnp.asarray(ids)))
    theirs = _torch_logits(directory, causal, ids)
    assert np.abs(ours - theirs).max() <= 1e-4
    return config


def _legacy_common(config, version):
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "hidden_activation": "gelu",
        "max_position_embeddings": 7999, "initializer_range": 0.02,
        "initializer_cutoff_factor": 2.0, "norm_eps": 1e-5, "norm_bias": False,
        "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id, "cls_token_id": config.cls_token_id,
        "sep_token_id": config.sep_token_id, "attention_bias": False, "attention_dropout": 0.0,
        "embedding_dropout": 0.0, "mlp_bias": False, "mlp_dropout": 0.0, "decoder_bias": True,
        "classifier_dropout": 0.0, "classifier_bias": False, "classifier_activation": "gelu",
        "torch_dtype": "float32", "transformers_version": version,
    }


def _write_legacy(directory, model, config_json):
    hf.save_hf(model, model.config, str(directory))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)


def test_legacy_encoder_layout(tmp_path):
    model, config = _ours("mlm")
    legacy = {**_legacy_common(config, "4.48.0"),
              "architectures": [hf.ENCODER_ARCH], "model_type": "modernbert",
              "global_rope_theta": 500.0, "local_rope_theta": 2000.0,
              "global_attn_every_n_layers": 3, "local_attention": 16,
              "classifier_pooling": "mean", "deterministic_flash_attn": False,
              "sparse_prediction": False, "sparse_pred_ignore_index": -100,
              "repad_logits_with_grad": False}
    _write_legacy(tmp_path, model, legacy)
    loaded = _assert_parity(tmp_path, causal=False)
    assert (loaded.classifier_pooling, loaded.max_position_embeddings, loaded.dtype) == (
        "mean", 7999, "float32")
    assert (loaded.global_rope_theta, loaded.local_rope_theta) == (500.0, 2000.0)


# (sliding_window, layer_types' full-attention period, global_attn_every_n_layers written):
# transformers' 8-key window; an odd 9-key window with layer_types that disagree with
# global_attn_every_n_layers (transformers follows layer_types).
DECODER_LAYOUTS = [(8, 3, 3), (9, 2, 3)]


@pytest.mark.parametrize("keys,period,every", DECODER_LAYOUTS,
                         ids=[f"window{k}_period{p}" for k, p, _ in DECODER_LAYOUTS])
def test_legacy_decoder_layout(tmp_path, keys, period, every):
    model, config = _ours("clm")
    legacy = {**_legacy_common(config, "4.54.0.dev0"),
              "architectures": [hf.DECODER_ARCH], "model_type": "modernbert-decoder",
              "global_rope_theta": 500.0, "local_rope_theta": 2000.0,
              "global_attn_every_n_layers": every, "use_cache": True, "reference_compile": False,
              "layer_types": ["sliding_attention" if i % period else "full_attention"
                              for i in range(config.num_layers)],
              "sliding_window": keys}
    _write_legacy(tmp_path, model, legacy)
    loaded = _assert_parity(tmp_path, causal=True)
    assert loaded.global_attn_every_n_layers == period
    assert loaded.window_size(1) == (keys - 1, 0)
    # transformers 5.x reads a 4.x decoder's local_rope_theta (4.57 used the global one).
    assert (loaded.global_rope_theta, loaded.local_rope_theta) == (500.0, 2000.0)


@pytest.mark.parametrize("layer_types", [
    ["full_attention", "sliding_attention", "full_attention", "sliding_attention",
     "sliding_attention"],
    ["sliding_attention"] * 5,     # no full layer: it divided by a period of 0
])
def test_irregular_layer_types_name_the_key(tmp_path, layer_types):
    model, config = _ours("clm")
    legacy = {**_legacy_common(config, "4.54.0.dev0"), "architectures": [hf.DECODER_ARCH],
              "layer_types": layer_types}
    _write_legacy(tmp_path, model, legacy)
    with pytest.raises(hf.HFFormatError, match=r"config.json: layer_types=.*full_attention at "
                                               r"layers 0, n, 2n"):
        model_loader.load_hf(str(tmp_path))


def _transformers_encoder(dtype=torch.float32):
    config = transformers.ModernBertConfig(
        vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
        num_attention_heads=2, local_attention=16, pad_token_id=96, bos_token_id=97,
        eos_token_id=98, cls_token_id=97, sep_token_id=98, global_rope_theta=1000.0,
        local_rope_theta=300.0)
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():   # away from init so that norms and biases matter too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def test_sharded_safetensors(tmp_path):
    _transformers_encoder().save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
    assert _assert_parity(tmp_path, causal=False).dtype == "float32"


def test_pytorch_model_bin_and_its_dtype(tmp_path):
    torch_model = _transformers_encoder()
    torch_model.config.save_pretrained(tmp_path)
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_parity(tmp_path, causal=False)

    # bfloat16 weights and a config.json naming no dtype: transformers computes in the
    # weights' dtype, and so do we.
    with open(tmp_path / "config.json") as f:
        config_json = json.load(f)
    config_json.pop("dtype", None), config_json.pop("torch_dtype", None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_json, f)
    torch.save(torch_model.to(torch.bfloat16).state_dict(), tmp_path / "pytorch_model.bin")
    reference = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path))
    assert reference.dtype == torch.bfloat16
    model, config = model_loader.load_hf(str(tmp_path))
    assert config.dtype == "bfloat16"
    np.testing.assert_array_equal(   # bfloat16 values read exactly
        np.asarray(model.tok_embeddings[...]),
        reference.model.embeddings.tok_embeddings.weight.detach().float().numpy())
    # An explicit dtype still wins, through model_loader too.
    assert model_loader.from_hf(str(tmp_path), dtype="float32").model.config.dtype == "float32"


def test_pytorch_model_bin_without_torch(tmp_path, monkeypatch):
    torch_model = _transformers_encoder()
    torch_model.config.save_pretrained(tmp_path)
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError
    with pytest.raises(hf.HFFormatError, match=r"pytorch_model.bin: .*pip install torch"):
        model_loader.load_hf(str(tmp_path))


@pytest.mark.parametrize("config_json,expected", [
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "bfloat16"),
    ({"torch_dtype": "float16"}, "float16"),
])
def test_stored_dtype_names_as_transformers_reads_them(config_json, expected):
    reference = transformers.ModernBertConfig(**TINY_CONFIG_JSON, **config_json).dtype
    assert reference == getattr(torch, expected)
    assert ModelConfig.from_hf_dict({**TINY_CONFIG_JSON, **config_json}).dtype == expected


# ModernBERT's special ids (transformers' defaults, as ours) need a vocabulary that holds them.
TINY_CONFIG_JSON = {"architectures": [hf.ENCODER_ARCH], "vocab_size": 50368, "hidden_size": 8,
                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}


@pytest.mark.parametrize("key,value", [("pad_token_id", None), ("eos_token_id", [98, 99]),
                                       ("cls_token_id", "97")])
def test_a_special_id_that_is_not_one_integer_is_refused(key, value):
    """transformers allows a null pad id and a list of eos ids; no default may stand in."""
    with pytest.raises(hf.HFFormatError, match=rf"{key}={re.escape(repr(value))}: expected one "
                                               "integer token id"):
        ModelConfig.from_hf_dict({**TINY_CONFIG_JSON, key: value}, where="x/config.json")
    assert ModelConfig.from_hf_dict({**TINY_CONFIG_JSON, "mask_token_id": None}).mask_token_id == -1
    assert ModelConfig.from_hf_dict(dict(TINY_CONFIG_JSON)).pad_token_id == \
        transformers.ModernBertConfig(**TINY_CONFIG_JSON).pad_token_id


def test_special_ids_outside_the_vocabulary_are_refused():
    """Else the export writes a config transformers cannot load (padding_idx out of range)."""
    with pytest.raises(ValueError, match=r"pad_token_id=50283 is not a token id of the "
                                         r"vocabulary \(vocab_size=101\)"):
        ModelConfig.from_hf_dict({**TINY_CONFIG_JSON, "vocab_size": 101})
    small = {**TINY_CONFIG_JSON, "vocab_size": 101, "pad_token_id": 96, "bos_token_id": 97,
             "eos_token_id": 98, "cls_token_id": 97, "sep_token_id": 98}
    config = ModelConfig.from_hf_dict(small)
    assert config.mask_token_id == 50284 and "mask_token_id" not in config.to_hf_dict()


@pytest.mark.parametrize("objective,window", [("mlm", "transformers"), ("clm", "transformers"),
                                              ("clm", "training")])
def test_export_import_export_is_lossless(tmp_path, objective, window):
    # The recipe's numbers: a 128-wide local window, 64 (transformers) or 65 (training) keys.
    model, config = _ours(objective, local_attention=128, decoder_window=window,
                          classifier_pooling="mean" if objective == "mlm" else "cls",
                          max_position_embeddings=7999, dtype="bfloat16")
    first, second = tmp_path / "first", tmp_path / "second"
    hf.save_hf(model, config, str(first))
    loaded, loaded_config = model_loader.load_hf(str(first))
    assert loaded_config.dtype == "float32"     # the stored weights' dtype
    assert loaded_config.decoder_window == window and loaded_config.local_attention == 128
    hf.save_hf(loaded, loaded_config, str(second))
    assert sorted(os.listdir(first)) == sorted(os.listdir(second))
    for name in os.listdir(first):
        if name.endswith(".json"):
            with open(first / name) as f, open(second / name) as g:
                assert json.load(f) == json.load(g), name
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    if objective == "clm":
        expected_keys = 64 if window == "transformers" else 65
        assert transformers.AutoConfig.from_pretrained(str(first)).sliding_window == expected_keys
    else:
        assert transformers.AutoConfig.from_pretrained(str(first)).classifier_pooling == "mean"
