"""Sequence classification head on an Ettin backbone, as transformers' ModernBert(Decoder)
ForSequenceClassification (the head layout is described in ettin_jax/glue/__init__.py)."""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from ettin_jax import model as model_lib


POOLINGS = ("cls", "mean", "last")


class SequenceClassifier(nnx.Module):
    """Ettin backbone + pooling + head + classifier (module docstring: "Head").

    `classifier(input_ids, mask)` -> `[batch, num_outputs]` float32; input_ids, mask
    `[batch, seq]` int32, mask 1 for tokens and 0 for right padding.
    """

    def __init__(self, backbone: model_lib.EttinModel, num_outputs: int, *, pooling: str,
                 dropout: float, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling={pooling!r}: expected one of {POOLINGS}")
        config = backbone.config
        if pooling == "cls" and config.causal:
            raise ValueError("--pooling=cls does not suit a decoder (the first token sees nothing "
                             "else); use last or mean")
        H = config.hidden_size
        c = config.initializer_cutoff_factor
        self.backbone = backbone
        self.pooling = pooling
        self.eps = config.norm_eps
        if config.causal:   # the CLM head predicts tokens; transformers starts a new one
            std_out = config.initializer_range / math.sqrt(2.0 * config.num_layers)
            self.head_dense = nnx.Param(model_lib._truncated_normal(rngs, (H, H), std_out, c))  # pylint: disable=protected-access
            self.head_norm = nnx.Param(jnp.ones((H,)))
        else:
            self.head_dense = nnx.Param(jnp.array(backbone.head_dense[...]))
            self.head_norm = nnx.Param(jnp.array(backbone.head_norm[...]))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Param(model_lib._truncated_normal(rngs, (H, num_outputs), H ** -0.5, c))  # pylint: disable=protected-access
        self.classifier_bias = None if config.causal else nnx.Param(jnp.zeros((num_outputs,)))

    def pool(self, hidden, mask):
        """hidden `[batch, seq, H]`, mask `[batch, seq]` -> `[batch, H]`."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
            return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        weights = mask.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    def __call__(self, input_ids, mask):
        hidden = self.backbone.hidden_states(input_ids, segment_ids=mask)
        dtype = self.backbone.config.compute_dtype
        pooled = self.pool(hidden, mask)
        h = jnp.dot(pooled.astype(dtype), self.head_dense[...].astype(dtype))
        h = model_lib.layer_norm(model_lib.gelu(h), self.head_norm, self.eps)
        logits = jnp.dot(self.dropout(h), self.classifier[...], preferred_element_type=jnp.float32)
        if self.classifier_bias is not None:
            logits = logits + self.classifier_bias[...]
        return logits
