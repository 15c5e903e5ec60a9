"""Hugging Face interop: transformers directories <-> EttinModel.

    load_hf(path) -> (model, model_config)        # config.json + model.safetensors
    save_hf(model, model_config, path, tokenizer=None)

Encoders map to `ModernBertForMaskedLM`, decoders to `ModernBertDecoderForCausalLM`
(recipe §1.6 for the key table). Our tree keeps q, k and v fused for both; the decoder's
`q_proj/k_proj/v_proj` are the three thirds of that fused matrix.

Command line:
    python -m ettin_jax.hf export --checkpoint=RUN_DIR --out=HF_DIR [--tokenizer=tokenizer.json]
    python -m ettin_jax.hf export --config=configs/ettin_17m.py:mlm --out=HF_DIR   # fresh init
    python -m ettin_jax.hf import --hf=HF_DIR --out=RUN_DIR
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from ettin_jax import model as model_lib

ENCODER_ARCH = "ModernBertForMaskedLM"
DECODER_ARCH = "ModernBertDecoderForCausalLM"
_MODEL_TYPES = {"modernbert": ENCODER_ARCH, "modernbert-decoder": DECODER_ARCH}
# Keys transformers may write that carry no weights of their own.
_IGNORED_KEYS = ("decoder.weight",)


class HFFormatError(ValueError):
    """A transformers directory that does not describe a loadable Ettin model."""


# --- the key table --------------------------------------------------------------------------

def _weight_table(config: model_lib.ModelConfig):
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


# --- config.json ------------------------------------------------------------------------------

def hf_config_dict(config: model_lib.ModelConfig) -> dict:
    """The transformers config.json of `config` (fields of HF 4.57 and 5.x alike)."""
    local_attention = config.local_attention
    if config.causal and config.decoder_window == "training":
        # transformers' decoder sees sliding_window = local_attention // 2 keys; Ettin trained
        # with one key more, which transformers expresses as a window two wider.
        local_attention += 2
    layer_types = ["full_attention" if config.is_global(i) else "sliding_attention"
                   for i in range(config.num_layers)]
    out = {
        "architectures": [DECODER_ARCH if config.causal else ENCODER_ARCH],
        "model_type": "modernbert-decoder" if config.causal else "modernbert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "hidden_activation": "gelu",
        "classifier_activation": "gelu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "initializer_cutoff_factor": config.initializer_cutoff_factor,
        "norm_eps": config.norm_eps,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "decoder_bias": True,
        "classifier_bias": False,
        "attention_dropout": 0.0,
        "embedding_dropout": config.embedding_dropout,
        "mlp_dropout": config.mlp_dropout,
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "local_attention": local_attention,
        "layer_types": layer_types,
        "global_rope_theta": config.global_rope_theta,
        "local_rope_theta": config.local_rope_theta,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        "tie_word_embeddings": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "cls_token_id": config.cls_token_id,
        "sep_token_id": config.sep_token_id,
        "torch_dtype": "float32",
    }
    if 0 <= config.mask_token_id < config.vocab_size:
        out["mask_token_id"] = config.mask_token_id
    if config.causal:
        out["use_cache"] = True
    else:
        out.update(classifier_pooling="cls", sparse_prediction=False, sparse_pred_ignore_index=-100)
    return out


def model_config_from_hf(hf: dict, where: str = "config.json") -> ml_collections.ConfigDict:
    """`config.model` (as configs/base.py builds it) of a transformers config.json dict."""
    from configs import base  # pylint: disable=import-outside-toplevel

    arch = (hf.get("architectures") or [None])[0] or _MODEL_TYPES.get(hf.get("model_type"))
    if arch not in (ENCODER_ARCH, DECODER_ARCH):
        raise HFFormatError(
            f"{where}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not "
            f"{ENCODER_ARCH} or {DECODER_ARCH}")
    causal = arch == DECODER_ARCH
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in hf:
            raise HFFormatError(f"{where}: missing key {key!r}")
    for key, expected in (("hidden_activation", "gelu"), ("norm_bias", False),
                          ("attention_bias", False), ("mlp_bias", False),
                          ("decoder_bias", True), ("classifier_bias", False)):
        if hf.get(key, expected) != expected:
            raise HFFormatError(f"{where}: {key}={hf[key]!r} is not supported (Ettin uses {expected!r})")
    if hf.get("tie_word_embeddings", True) is False:
        raise HFFormatError(f"{where}: tie_word_embeddings=false is not supported (Ettin ties them)")
    m = base.model_config(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                          intermediate_size=hf["intermediate_size"],
                          num_heads=hf["num_attention_heads"], vocab_size=hf["vocab_size"])
    m.causal = causal
    m.global_attn_every_n_layers = hf.get("global_attn_every_n_layers", 3)
    m.local_attention = hf.get("local_attention", 128)
    m.decoder_window = "transformers"   # the mask transformers applies is what we reproduce
    rope = hf.get("rope_parameters") or {}
    global_theta = rope.get("full_attention", {}).get("rope_theta", hf.get("global_rope_theta", 160_000.0))
    if "sliding_attention" in rope:
        local_theta = rope["sliding_attention"]["rope_theta"]
    elif causal and str(hf.get("transformers_version", "5")).startswith("4."):
        local_theta = global_theta   # transformers 4.x decoders ignore local_rope_theta
    else:
        local_theta = hf.get("local_rope_theta", 10_000.0)
    m.global_rope_theta = float(global_theta)
    m.local_rope_theta = float(local_theta)
    m.max_position_embeddings = hf.get("max_position_embeddings", 8192)
    m.norm_eps = hf.get("norm_eps", 1e-5)
    m.initializer_range = hf.get("initializer_range", 0.02)
    m.initializer_cutoff_factor = hf.get("initializer_cutoff_factor", 2.0) or 3.0
    m.embedding_dropout = hf.get("embedding_dropout", 0.0)
    m.mlp_dropout = hf.get("mlp_dropout", 0.0)
    for ours, theirs in (("pad_token_id", "pad_token_id"), ("bos_token_id", "bos_token_id"),
                         ("eos_token_id", "eos_token_id"), ("cls_token_id", "cls_token_id"),
                         ("sep_token_id", "sep_token_id"), ("mask_token_id", "mask_token_id")):
        if isinstance(hf.get(theirs), int):
            m[ours] = hf[theirs]
    return m


# --- load ------------------------------------------------------------------------------------

def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFFormatError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    tensors = {}
    for name in files:
        # framework="flax" reads bfloat16 too; everything becomes float32 parameters.
        with safe_open(os.path.join(path, name), framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors


def load_hf(path: str, *, dtype: str | None = None):
    """Reads a transformers directory into `(EttinModel in eval mode, config.model)`.

    Raises HFFormatError naming the file and key for an unknown architecture, a missing
    or unexpected weight, or a weight of the wrong shape.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise HFFormatError(f"{path}: no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    model_config = model_config_from_hf(hf, config_path)
    if dtype is not None:
        model_config.dtype = dtype
    tensors = _read_safetensors(path)
    config = model_lib.ModelConfig.from_config(model_config)

    abstract = nnx.eval_shape(lambda: model_lib.EttinModel(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
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
    for key, variable in flat.items():
        variable.set_value(jax.numpy.asarray(values[key]))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), _fresh_rng_state(rest))
    model.eval()
    return model, model_config


def _fresh_rng_state(rest, seed: int = 0):
    """Concrete dropout RNG state in place of the abstract one `nnx.eval_shape` leaves."""
    flat = dict(nnx.to_flat_state(rest))
    for index, (key, variable) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
        if isinstance(variable, nnx.RngKey):
            variable.set_value(jax.random.fold_in(jax.random.key(seed), index))
        elif isinstance(variable, nnx.RngCount):
            variable.set_value(jax.numpy.zeros(variable.get_value().shape, jax.numpy.uint32))
        else:
            raise TypeError(f"unexpected non-parameter state {key} of type {type(variable).__name__}")
    return nnx.from_flat_state(flat)


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

    config = model_lib.ModelConfig.from_config(model_config) if model_config is not None else model.config
    if config.causal != model.config.causal or config.num_layers != model.config.num_layers:
        raise ValueError("save_hf: model_config does not describe this model "
                         f"(causal {config.causal} vs {model.config.causal}, "
                         f"layers {config.num_layers} vs {model.config.num_layers})")
    os.makedirs(path, exist_ok=True)
    hf = hf_config_dict(config)
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


def save_tokenizer(tokenizer, path: str, config: model_lib.ModelConfig):
    """Writes tokenizer.json plus the tokenizer_config.json transformers needs to load it."""
    if isinstance(tokenizer, str) and os.path.isdir(tokenizer):
        for name in os.listdir(tokenizer):
            if name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")):
                shutil.copy(os.path.join(tokenizer, name), os.path.join(path, name))
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
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

    specials = {"unk_token": token(config.cls_token_id - 1), "cls_token": token(config.cls_token_id),
                "sep_token": token(config.sep_token_id), "pad_token": token(config.pad_token_id),
                "mask_token": token(config.mask_token_id), "bos_token": token(config.bos_token_id),
                "eos_token": token(config.eos_token_id)}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
                        "model_max_length": config.max_position_embeddings,
                        "model_input_names": ["input_ids", "attention_mask"], **specials}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)


# --- command line ------------------------------------------------------------------------------

def _export(flags_):
    if bool(flags_.checkpoint) == bool(flags_.config):
        raise app_usage_error("export needs exactly one of --checkpoint=RUN_DIR or --config=FILE:ARG")
    if flags_.checkpoint:
        from ettin_jax import checkpoint  # pylint: disable=import-outside-toplevel
        model, model_config, tokenizer = checkpoint.restore_for_export(flags_.checkpoint, step=flags_.step)
    else:
        model_config = flags_.config.model
        model = model_lib.EttinModel(model_config, rngs=nnx.Rngs(flags_.config.seed))
        tokenizer = None
    tokenizer = flags_.tokenizer or tokenizer
    save_hf(model, model_config, flags_.out, tokenizer=tokenizer)
    kind = "decoder" if model.config.causal else "encoder"
    print(f"wrote {kind} with {model_lib.count_params(model):,} parameters to {flags_.out}"
          f"{' (with tokenizer)' if tokenizer else ''}")


def _import(flags_):
    from ettin_jax import checkpoint  # pylint: disable=import-outside-toplevel
    model, model_config = load_hf(flags_.hf)
    checkpoint.save_imported(model, model_config, flags_.out)
    print(f"wrote {model_lib.count_params(model):,} parameters from {flags_.hf} to {flags_.out}; "
          f"continue training with --config.train.init_from={flags_.out}")


def app_usage_error(message):
    from absl import app  # pylint: disable=import-outside-toplevel
    return app.UsageError(message)


def main(argv=None):
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    sys.path.insert(0, os.getcwd())   # `configs/...` files import `configs.base`
    flags.DEFINE_string("checkpoint", None, "export: a training run's workdir (its latest checkpoint)")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
    config_flags.DEFINE_config_file("config", None, "export: FILE:ARG to export a freshly "
                                    "initialised model, e.g. configs/ettin_17m.py:mlm")
    flags.DEFINE_string("tokenizer", None, "export: tokenizer.json or a directory of tokenizer "
                        "files to write beside the weights")
    flags.DEFINE_string("out", None, "export: the transformers directory to write; "
                        "import: the run directory to write", required=True)
    flags.DEFINE_string("hf", None, "import: a transformers directory (config.json + model.safetensors)")

    def run(args):
        if len(args) != 2 or args[1] not in ("export", "import"):
            raise app.UsageError("usage: python -m ettin_jax.hf {export|import} [flags]; "
                                 "--helpfull lists the flags")
        try:
            if args[1] == "export":
                _export(flags.FLAGS)
            else:
                if not flags.FLAGS.hf:
                    raise app.UsageError("import needs --hf=HF_DIR")
                _import(flags.FLAGS)
        except (HFFormatError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
