"""Hugging Face interop: transformers directories <-> EttinModel.

    read_hf(path) -> (model_config, {param path: array})  # config.json + model.safetensors
                              # (or its sharded index, or pytorch_model.bin with torch)
    save_hf(model, model_config, path, tokenizer=None)

Building a model from a directory is model_loader's job (`model_loader.load_hf(path)`, or
`from_hf` on a mesh); this module only translates configs and weights, so it imports no loader.

Encoders map to `ModernBertForMaskedLM`, decoders to `ModernBertDecoderForCausalLM`
(recipe §1.6 for the key table). Our tree keeps q, k and v fused for both; the decoder's
`q_proj/k_proj/v_proj` are the three thirds of that fused matrix.

Command line (`__main__.py`):
    python -m ettin_jax.hf export --checkpoint=RUN_DIR --out=HF_DIR [--tokenizer=tokenizer.json]
    python -m ettin_jax.hf export --config=configs/ettin_17m.py:mlm --out=HF_DIR   # fresh init
    python -m ettin_jax.hf import --hf=HF_DIR --out=RUN_DIR
"""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import model as model_lib
from ettin_jax.model_config import DECODER_ARCH, ENCODER_ARCH, HFFormatError, ModelConfig

__all__ = ["DECODER_ARCH", "ENCODER_ARCH", "HFFormatError", "hf_state_dict", "read_hf",
           "read_weights", "save_hf", "save_tokenizer"]

# Keys transformers may write that carry no weights of their own.
_IGNORED_KEYS = ("decoder.weight",)


# --- the key table --------------------------------------------------------------------------

def _weight_table(config: ModelConfig):
    """[(hf_key, our_path, hf_shape, to_hf, from_hf)]: to_hf maps our array to the torch
    layout (Linear weights are [out, in]); from_hf is its inverse."""
    H, I, nH, hd, V = (config.hidden_size, config.intermediate_size, config.num_heads,
                       config.head_dim, config.vocab_size)
    same = (lambda a: a, lambda a: a)
    linear = (lambda a: a.T, lambda a: a.T)            # kernel [in, out] <-> weight [out, in]
    head = "lm_head" if config.causal else "head"
    rows = [
        ("model.embeddings.tok_embeddings.weight", ("tok_embeddings",), (V, H), *same),
        ("model.embeddings.norm.weight", ("embed_norm",), (H,), *same),
        ("model.final_norm.weight", ("final_norm",), (H,), *same),
        (f"{head}.dense.weight", ("head_dense",), (H, H), *linear),
        (f"{head}.norm.weight", ("head_norm",), (H,), *same),
        ("decoder.bias", ("decoder_bias",), (V,), *same),
    ]
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        if i > 0:
            rows.append((f"{p}.attn_norm.weight", ("layers", i, "attn_norm"), (H,), *same))
        rows += [
            (f"{p}.attn.Wo.weight", ("layers", i, "attn_out"), (H, H),
             lambda a: a.reshape(H, H).T, lambda a: a.T.reshape(nH, hd, H)),
            (f"{p}.mlp_norm.weight", ("layers", i, "mlp_norm"), (H,), *same),
            (f"{p}.mlp.Wi.weight", ("layers", i, "mlp_in"), (2 * I, H),
             lambda a: a.reshape(H, 2 * I).T, lambda a: a.T.reshape(H, 2, I)),
            (f"{p}.mlp.Wo.weight", ("layers", i, "mlp_out"), (H, I), *linear),
        ]
        if config.causal:
            # Split views of the fused [H, 3, nH, hd] kernel; assembled again in _qkv_from_split.
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                rows.append((f"{p}.attn.{name}.weight", ("layers", i, "qkv", j), (H, H),
                             (lambda j: lambda a: a[:, j].reshape(H, H).T)(j),
                             lambda a: a.T.reshape(H, nH, hd)))
        else:
            rows.append((f"{p}.attn.Wqkv.weight", ("layers", i, "qkv"), (3 * H, H),
                         lambda a: a.reshape(H, 3 * H).T, lambda a: a.T.reshape(H, 3, nH, hd)))
    return rows


# --- load ------------------------------------------------------------------------------------

# The weight files transformers looks for, in its order of preference: (single file, index).
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _weight_files(path: str) -> list[str]:
    """The weight files of a transformers directory: one file, or every shard its index names."""
    for single, index in _WEIGHT_FILES:
        if os.path.exists(os.path.join(path, single)):
            return [single]
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise HFFormatError(f"{os.path.join(path, index)}: no 'weight_map'")
            return sorted(set(weight_map.values()))
    raise HFFormatError(f"{path}: no weights: expected one of "
                        f"{', '.join(name for pair in _WEIGHT_FILES for name in pair)}")


def _read_one(file: str) -> dict[str, np.ndarray]:
    """The tensors of one weight file, in their stored dtype (ml_dtypes' bfloat16 included)."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        # framework="flax" reads bfloat16 too (numpy has no bfloat16 of its own).
        with safe_open(file, framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise HFFormatError(f"{file}: reading PyTorch pickles needs torch (pip install torch), "
                            "or save the weights as model.safetensors") from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    out = {}
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:   # torch cannot hand numpy a bfloat16 array
            out[key] = tensor.float().numpy().astype(jnp.bfloat16)
        else:
            out[key] = tensor.numpy()
    return out


def read_weights(path: str) -> tuple[dict[str, np.ndarray], str | None]:
    """(tensors by transformers key as float32 arrays, the stored floating dtype's name or None)
    of a directory's model.safetensors, sharded safetensors index, pytorch_model.bin or its
    sharded index. The dtype is the first floating tensor's, as transformers' dtype="auto"
    takes it when config.json names none."""
    tensors, stored = {}, None
    for name in _weight_files(path):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise HFFormatError(f"{file}: named by the weight index but missing")
        for key, array in _read_one(file).items():
            if stored is None and jnp.issubdtype(array.dtype, jnp.floating):
                stored = jnp.dtype(array.dtype).name
            tensors[key] = np.asarray(array, dtype=np.float32)
    return tensors, stored


def read_hf(path: str, *, dtype: str | None = None) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """Reads a transformers directory into (its ModelConfig, {our parameter path: array}).

    dtype: the compute dtype; None computes in the checkpoint's stored dtype as transformers'
    from_pretrained does (config.json `dtype`, else `torch_dtype`, else the weights' own).
    `model_loader.load_hf` builds the model from these. Raises HFFormatError naming the file
    and key for an unknown architecture, a missing or unexpected weight, or a weight of the
    wrong shape.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise HFFormatError(f"{path}: no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    tensors, stored_dtype = read_weights(path)
    if dtype is not None:   # an explicit compute dtype wins over the stored one
        hf = {**hf, "dtype": dtype}
    config = ModelConfig.from_hf_dict(hf, config_path, weights_dtype=stored_dtype)

    values: dict[tuple, np.ndarray] = {}
    split_qkv: dict[tuple, list] = {}
    used = set()
    table = _weight_table(config)
    missing = [f"{k!r} {shape}" for k, _, shape, _, _ in table if k not in tensors]
    if missing:
        raise HFFormatError(f"{path}: missing weights (key, expected shape): {', '.join(missing[:6])}"
                            f"{' ...' if len(missing) > 6 else ''}")
    for hf_key, path_, hf_shape, _, from_hf in table:
        found = tuple(tensors[hf_key].shape)
        if found != hf_shape:
            raise HFFormatError(f"{path}: weight {hf_key!r} has shape {found}, expected {hf_shape} "
                                f"for the config in config.json")
        used.add(hf_key)
        array = from_hf(tensors[hf_key])
        if path_[-1] in (0, 1, 2) and path_[-2] == "qkv":
            split_qkv.setdefault(path_[:-1], [None] * 3)[path_[-1]] = array
        else:
            values[path_] = array
    for path_, parts in split_qkv.items():
        values[path_] = np.stack(parts, axis=1)      # [H, 3, nH, hd]
    unexpected = sorted(k for k in tensors if k not in used and k not in _IGNORED_KEYS)
    if unexpected:
        raise HFFormatError(f"{path}: unexpected weights {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''} for {hf['architectures'][0] if hf.get('architectures') else config}")
    return config, values


# --- save ------------------------------------------------------------------------------------

def hf_state_dict(model: model_lib.EttinModel) -> dict[str, np.ndarray]:
    """Our parameters as transformers' state dict (numpy float32, torch layouts)."""
    config = model.config
    flat = {k: np.asarray(v.get_value(), dtype=np.float32)
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for hf_key, path_, hf_shape, to_hf, _ in _weight_table(config):
        source = flat[path_[:-1]] if path_[-1] in (0, 1, 2) and path_[-2] == "qkv" else flat[path_]
        array = np.ascontiguousarray(to_hf(source))
        assert array.shape == hf_shape, (hf_key, array.shape, hf_shape)
        out[hf_key] = array
    return out


def save_hf(model: model_lib.EttinModel, model_config=None, path: str = ".", tokenizer=None):
    """Writes `config.json` + `model.safetensors` (+ tokenizer files) that transformers'
    AutoModelForMaskedLM / AutoModelForCausalLM load with no missing or unexpected weights.

    tokenizer: None, a `tokenizers.Tokenizer`, a tokenizer.json path, or a directory holding
    tokenizer files (copied as they are).
    """
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    config = ModelConfig.from_config(model_config) if model_config is not None else model.config
    if config.causal != model.config.causal or config.num_layers != model.config.num_layers:
        raise ValueError("save_hf: model_config does not describe this model "
                         f"(causal {config.causal} vs {model.config.causal}, "
                         f"layers {config.num_layers} vs {model.config.num_layers})")
    os.makedirs(path, exist_ok=True)
    hf = config.to_hf_dict()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(hf_state_dict(model), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    if config.causal:
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "pad_token_id": config.pad_token_id}
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, config)


# The files of a transformers tokenizer directory (tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, a vocab or merges file).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges")


def copy_tokenizer_files(source: str, destination: str):
    """Copies the tokenizer files of directory `source` into `destination` (made if missing)."""
    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        if name.startswith(TOKENIZER_FILE_PREFIXES):
            shutil.copy(os.path.join(source, name), os.path.join(destination, name))


def save_tokenizer(tokenizer, path: str, config: ModelConfig):
    """Writes tokenizer.json plus the tokenizer_config.json transformers needs to load it. A
    decoder's tokenizer encodes a text as `[CLS] text`, without the [SEP] that would end the
    document before generation starts (ettin_jax.generate.encode_prompt)."""
    if isinstance(tokenizer, str) and os.path.isdir(tokenizer):
        copy_tokenizer_files(tokenizer, path)
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            if config.causal:
                _open_ended_prompts(path, config)
            return
        tokenizer = os.path.join(tokenizer, "tokenizer.json")
    if isinstance(tokenizer, str):
        from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(f"tokenizer file {tokenizer!r} does not exist")
        tokenizer = Tokenizer.from_file(tokenizer)
    tokenizer.save(os.path.join(path, "tokenizer.json"))

    def token(token_id):
        text = tokenizer.id_to_token(token_id)
        if text is None:
            raise ValueError(f"tokenizer has no token with id {token_id} (from the model config)")
        return text

    # [UNK] has no id in the model config; the token of that name, where the tokenizer has it.
    unk = {"unk_token": "[UNK]"} if tokenizer.token_to_id("[UNK]") is not None else {}
    # mask_token_id -1: a model without [MASK] (an imported config.json's null), as in to_hf_dict
    mask = {"mask_token": token(config.mask_token_id)} if config.mask_token_id >= 0 else {}
    specials = {**unk, "cls_token": token(config.cls_token_id),
                "sep_token": token(config.sep_token_id), "pad_token": token(config.pad_token_id),
                **mask, "bos_token": token(config.bos_token_id),
                "eos_token": token(config.eos_token_id)}
    # No clean-up: it would delete the spaces a byte-level BPE decodes before punctuation.
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": config.max_position_embeddings,
                        "model_input_names": ["input_ids", "attention_mask"], **specials}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    if config.causal:
        _open_ended_prompts(path, config)


def _open_ended_prompts(path: str, config: ModelConfig):
    """Sets the decoder's tokenizer.json in `path` to add `[CLS]` before a text and nothing
    after it (`[CLS] a [SEP] b` for a pair)."""
    from tokenizers import Tokenizer, processors  # pylint: disable=import-outside-toplevel
    file = os.path.join(path, "tokenizer.json")
    tokenizer = Tokenizer.from_file(file)
    bos, sep = tokenizer.id_to_token(config.bos_token_id), tokenizer.id_to_token(config.sep_token_id)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {sep} $B",
        special_tokens=[(bos, config.bos_token_id), (sep, config.sep_token_id)])
    tokenizer.save(file)
