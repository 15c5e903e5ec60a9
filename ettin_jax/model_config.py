"""The static architecture of an Ettin model, and its transformers config.json translation.

    ModelConfig.from_config(config.model)     # from the ConfigDict configs/base.py builds
    ModelConfig.from_hf_dict(json.load(...))  # from a transformers config.json
    model_config.to_hf_dict()                 # the config.json transformers reads

Encoders map to `ModernBertForMaskedLM`, decoders to `ModernBertDecoderForCausalLM`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ettin_jax import attention as attention_lib
from ettin_jax.kernels.flash_attention import RESIDUAL_NAMES as ATTENTION_RESIDUALS

ENCODER_ARCH = "ModernBertForMaskedLM"
DECODER_ARCH = "ModernBertDecoderForCausalLM"
_MODEL_TYPES = {"modernbert": ENCODER_ARCH, "modernbert-decoder": DECODER_ARCH}


class HFFormatError(ValueError):
    """A transformers directory that does not describe a loadable Ettin model."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CLASSIFIER_POOLINGS = ("cls", "mean")
# config.json keys of the special token ids; the last, [MASK]'s, may be -1 (none)
SPECIAL_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                   "mask_token_id")
# save_hf writes float32 weights; config.json names this dtype.
STORED_DTYPE = "float32"

# The name (`jax.ad_checkpoint.checkpoint_name`) of a layer's dropout masks (model.dropout).
DROPOUT_MASK = "dropout_mask"
# How a layer computes q, k and v from its one [hidden, 3, heads, head_dim] weight
# (config.model.qkv_projection): one matmul, or q and k in one and v in another.
QKV_PROJECTIONS = ("fused", "qk_v")
# Rematerialisation of the scanned layer group (config.model.remat): what its backward pass
# keeps from the forward. "full" keeps only the group's input; "dots" also keeps the outputs
# of the weight matmuls (dot_generals without batch dimensions: the projections, not the
# attention scores), recomputing norms, activations, dropout masks and attention (the forward
# kernel runs again); "dots_attention" keeps those and what the attention kernels' backward
# reads (their output and log-sum-exp: Pallas kernels only) and the dropout masks, so only
# norms, activations and RoPE are recomputed (bench/RESULTS.md compares the three).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(
            *ATTENTION_RESIDUALS, DROPOUT_MASK)),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture, built from the `config.model` ConfigDict by `from_config`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    causal: bool = False
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    decoder_window: str = "transformers"
    global_rope_theta: float = 10_000.0
    local_rope_theta: float = 10_000.0
    max_position_embeddings: int = 1024
    norm_eps: float = 1e-5
    embedding_dropout: float = 0.0
    attn_out_dropout: float = 0.1
    mlp_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    dtype: str = "bfloat16"
    attention_impl: str = "auto"
    scan_layers: bool = False         # configs/base.py says why (memory traffic of the scan)
    remat: str = "none"
    qkv_projection: str = "fused"     # configs/base.py says what each does
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    mask_token_id: int = 50284
    bos_token_id: int = 50281
    eos_token_id: int = 50282
    # What transformers' ModernBertForSequenceClassification pools (config.json
    # `classifier_pooling`); kept so that an imported encoder exports as it came.
    classifier_pooling: str = "cls"

    @classmethod
    def from_config(cls, config: Any) -> "ModelConfig":
        """Accepts a ModelConfig, an ml_collections ConfigDict or a plain dict."""
        if isinstance(config, cls):
            return config
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config.model has unknown keys {unknown}; known keys: {sorted(known)}")
        result = cls(**values)
        result.validate()
        return result

    def validate(self):
        if self.global_attn_every_n_layers < 1:      # layer i is global iff i % n == 0
            raise ValueError(f"config.model.global_attn_every_n_layers="
                             f"{self.global_attn_every_n_layers}: must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"config.model.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if self.decoder_window not in ("transformers", "training"):
            raise ValueError(f"config.model.decoder_window={self.decoder_window!r}: expected "
                             "'transformers' or 'training'")
        if self.classifier_pooling not in CLASSIFIER_POOLINGS:
            raise ValueError(f"config.model.classifier_pooling={self.classifier_pooling!r}: expected "
                             f"one of {CLASSIFIER_POOLINGS}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"config.model.dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")
        attention_lib.resolve_implementation(self.attention_impl)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={self.remat!r}: expected one of "
                             f"{sorted(REMAT_POLICIES)}")
        if self.qkv_projection not in QKV_PROJECTIONS:
            raise ValueError(f"config.model.qkv_projection={self.qkv_projection!r}: expected one "
                             f"of {QKV_PROJECTIONS}")
        for key in SPECIAL_ID_KEYS[:-1]:   # mask_token_id: -1 (none) is allowed
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise ValueError(f"config.model.{key}={getattr(self, key)} is not a token id of "
                                 f"the vocabulary (vocab_size={self.vocab_size})")
        if self.remat != "none" and not self.scan_layers:
            raise ValueError(f"config.model.remat={self.remat!r} rematerialises the scanned layer "
                             "groups: set config.model.scan_layers=True, or remat='none'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    def window_size(self, layer: int) -> tuple[int, int]:
        """(left, right) keys a query sees around itself in `layer`; -1 = unbounded."""
        if self.is_global(layer):
            return (-1, -1)
        half = self.local_attention // 2
        if not self.causal:
            return (half, half)
        # transformers: keys i-63..i (64 keys); Ettin's training (FA2 (64,64) + causal): i-64..i.
        return (half - 1, 0) if self.decoder_window == "transformers" else (half, 0)

    def rope_theta(self, layer: int) -> float:
        return self.global_rope_theta if self.is_global(layer) else self.local_rope_theta

    @property
    def num_layer_groups(self) -> int:
        """Whole (local, ..., global) groups after layer 0: layers 1 + n*g .. n*(g+1), n =
        global_attn_every_n_layers, share shapes and attention pattern for every group g."""
        return (self.num_layers - 1) // self.global_attn_every_n_layers

    # --- transformers config.json ---------------------------------------------------------

    def to_hf_dict(self) -> dict:
        """The transformers config.json of this config: fields that transformers 4.5x and 5.x
        both read (legacy `global_rope_theta`/`local_rope_theta` beside `rope_parameters`,
        `sliding_window` beside `local_attention`), and every field `from_hf_dict` reads, so
        that to_hf_dict(from_hf_dict(d)) == d for a d this method wrote."""
        local_attention = self.local_attention
        if self.causal:
            # transformers' decoder sees sliding_window = local_attention // 2 keys (itself
            # included); written as 2 * keys so that 4.x, which derives sliding_window from
            # local_attention, and 5.x, which reads sliding_window, agree.
            local_attention = 2 * self.decoder_window_keys
        layer_types = ["full_attention" if self.is_global(i) else "sliding_attention"
                       for i in range(self.num_layers)]
        out = {
            "architectures": [DECODER_ARCH if self.causal else ENCODER_ARCH],
            "model_type": "modernbert-decoder" if self.causal else "modernbert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_activation": "gelu",
            "classifier_activation": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "initializer_cutoff_factor": self.initializer_cutoff_factor,
            "norm_eps": self.norm_eps,
            "norm_bias": False,
            "attention_bias": False,
            "mlp_bias": False,
            "decoder_bias": True,
            "classifier_bias": False,
            # 0.0, as Ettin's released configs: transformers would also drop attention
            # probabilities at this rate, which our attention (output dropout only) does not.
            "attention_dropout": 0.0,
            "embedding_dropout": self.embedding_dropout,
            "mlp_dropout": self.mlp_dropout,
            "global_attn_every_n_layers": self.global_attn_every_n_layers,
            "local_attention": local_attention,
            "layer_types": layer_types,
            "global_rope_theta": self.global_rope_theta,
            "local_rope_theta": self.local_rope_theta,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "cls_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
            # The dtype of the stored weights (save_hf writes float32), under the names of
            # transformers 5.x (`dtype`) and 4.x (`torch_dtype`).
            "dtype": STORED_DTYPE,
            "torch_dtype": STORED_DTYPE,
        }
        if 0 <= self.mask_token_id < self.vocab_size:
            out["mask_token_id"] = self.mask_token_id
        if self.causal:
            out.update(use_cache=True, sliding_window=self.decoder_window_keys)
        else:
            out.update(classifier_pooling=self.classifier_pooling, sparse_prediction=False,
                       sparse_pred_ignore_index=-100)
        return out

    @property
    def decoder_window_keys(self) -> int:
        """Keys a decoder's local layer sees, itself included (transformers' sliding_window)."""
        # window_size's (half - 1, 0) or (half, 0), keys counted with the query itself.
        half = self.local_attention // 2
        return half if self.decoder_window == "transformers" else half + 1

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json", *,
                     weights_dtype: str | None = None) -> "ModelConfig":
        """The ModelConfig of a transformers config.json dict, read as the pinned transformers
        (5.x) reads it, including the layouts 4.4x-4.5x wrote (see _hf_window below).
        weights_dtype: the stored weights' dtype, the compute dtype when config.json
        names none (as transformers' dtype="auto"); float32 when that is None too.

        Raises HFFormatError naming `where` and the key for an architecture or option Ettin
        does not have."""
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
                raise HFFormatError(f"{where}: {key}={hf[key]!r} is not supported "
                                    f"(Ettin uses {expected!r})")
        if hf.get("tie_word_embeddings", True) is False:
            raise HFFormatError(f"{where}: tie_word_embeddings=false is not supported "
                                "(Ettin ties them)")
        num_layers = hf["num_hidden_layers"]
        local_attention, decoder_window = _hf_window(hf, causal, where)
        dtype = hf.get("dtype") or hf.get("torch_dtype") or weights_dtype or STORED_DTYPE
        if dtype not in _DTYPES:
            raise HFFormatError(f"{where}: dtype {dtype!r} is not one of {sorted(_DTYPES)}; "
                                "pass dtype= to model_loader.load_hf (--dtype) to compute in another")
        pooling = "cls" if causal else hf.get("classifier_pooling", "cls")
        if pooling not in CLASSIFIER_POOLINGS:
            raise HFFormatError(f"{where}: classifier_pooling={pooling!r} is not one of "
                                f"{CLASSIFIER_POOLINGS}")
        values = dict(
            num_layers=num_layers, hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], causal=causal,
            global_attn_every_n_layers=_hf_global_every(hf, num_layers, where),
            local_attention=local_attention, decoder_window=decoder_window,
            global_rope_theta=_hf_rope_theta(hf, "full_attention", "global_rope_theta",
                                             160_000.0, where),
            local_rope_theta=_hf_rope_theta(hf, "sliding_attention", "local_rope_theta",
                                            10_000.0, where),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            norm_eps=hf.get("norm_eps", 1e-5),
            initializer_range=hf.get("initializer_range", 0.02),
            initializer_cutoff_factor=hf.get("initializer_cutoff_factor", 2.0) or 3.0,
            embedding_dropout=hf.get("embedding_dropout", 0.0),
            # transformers drops the attention output (and probabilities) at this rate: a
            # model loaded from a directory fine-tunes with it, not with our training default.
            attn_out_dropout=hf.get("attention_dropout", 0.0),
            mlp_dropout=hf.get("mlp_dropout", 0.0), dtype=dtype, classifier_pooling=pooling)
        for key in SPECIAL_ID_KEYS:
            if key not in hf:          # transformers' default is ModernBERT's, as ours
                continue
            if key == "mask_token_id" and hf[key] is None:
                values[key] = -1       # no [MASK] (e.g. a decoder's config)
                continue
            if type(hf[key]) is not int:
                # null or a list of ids: no default may stand in for it silently.
                raise HFFormatError(f"{where}: {key}={hf[key]!r}: expected one integer token "
                                    "id; set it in config.json")
            values[key] = hf[key]
        result = cls(**values)
        result.validate()
        return result


# What transformers 5.x does with each field, from its models/modernbert{,_decoder}/
# configuration_*.py and modeling_*.py (the layouts 4.4x-4.5x wrote have no rope_parameters,
# the 4.x decoder writes sliding_window and layer_types but no local_attention).

def _hf_window(hf: dict, causal: bool, where: str) -> tuple[int, str]:
    """(local_attention, decoder_window) giving the local mask transformers builds.

    Encoder: |i - j| <= sliding_window = local_attention // 2; a `sliding_window` key sets
    local_attention = 2 * sliding_window (the config's property setter), after local_attention.
    Decoder: keys i - sliding_window + 1 .. i; config.json's `sliding_window` overrides the
    local_attention // 2 the config derives (kwargs are set after __post_init__ derives it).
    """
    if not causal:
        if "sliding_window" in hf:
            return 2 * int(hf["sliding_window"]), "transformers"
        return int(hf.get("local_attention", 128)), "transformers"
    keys = hf.get("sliding_window")
    if keys is None:
        local_attention = hf.get("local_attention", 128)
        keys = local_attention // 2 if local_attention else -1
    if not isinstance(keys, int) or keys < 1:
        raise HFFormatError(f"{where}: sliding_window={keys!r} (local_attention="
                            f"{hf.get('local_attention')!r}): a decoder needs a window of >= 1 key")
    # Odd windows are Ettin's training window (local_attention // 2 + 1 keys), even ones
    # transformers' (local_attention // 2): both give the window a whole local_attention.
    return (2 * (keys - 1), "training") if keys % 2 else (2 * keys, "transformers")


def _hf_global_every(hf: dict, num_layers: int, where: str) -> int:
    """global_attn_every_n_layers of the layer pattern transformers uses: `layer_types` when
    config.json has it (5.x ignores global_attn_every_n_layers then), else every n-th layer
    from 0 is full attention."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        if not isinstance(every, int) or every < 1:
            raise HFFormatError(f"{where}: global_attn_every_n_layers={every!r}: expected >= 1")
        return every
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    every = full[1] if len(full) > 1 else max(num_layers, 1)
    expected = ["full_attention" if i % every == 0 else "sliding_attention"
                for i in range(num_layers)]
    if list(layer_types) != expected:
        raise HFFormatError(
            f"{where}: layer_types={layer_types} is not num_hidden_layers={num_layers} layers "
            "with full_attention at layers 0, n, 2n, ... and sliding_attention elsewhere, the "
            "only pattern Ettin's layer groups have")
    return every


def _hf_rope_theta(hf: dict, layer_type: str, legacy_key: str, default: float,
                   where: str) -> float:
    """rope_parameters[layer_type]["rope_theta"], else the 4.x key, else 5.x's default (the
    same rule for encoder and decoder in 5.x: a 4.x decoder's local_rope_theta is used)."""
    if hf.get("rope_scaling"):
        raise HFFormatError(f"{where}: rope_scaling={hf['rope_scaling']!r} is not supported "
                            "(Ettin uses plain RoPE)")
    params = (hf.get("rope_parameters") or {}).get(layer_type) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise HFFormatError(f"{where}: rope_parameters.{layer_type}.rope_type={rope_type!r} is "
                            "not supported (Ettin uses 'default')")
    return float(params.get("rope_theta", hf.get(legacy_key, default)))
