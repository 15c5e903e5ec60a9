"""The model's pieces for functional training: graph definitions, abstract parameters and the
layout of its dropout RNG state, without allocating any array.

    model_parts(model_config, seed=...) -> ModelParts
    fresh_rng_state(rng_layout, seed=0) -> nnx.State   # keys and counters of the dropouts
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ettin_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """graphdef_train/graphdef_eval: the model with dropout on / off; abstract_params: the
    nnx.State of Params as ShapeDtypeStructs; rng_layout: ShapeDtypeStructs of the dropout
    streams' RNG state (what `fresh_rng_state` fills)."""
    graphdef_train: Any
    graphdef_eval: Any
    abstract_params: nnx.State
    rng_layout: nnx.State


def model_parts(model_config, *, seed: int) -> ModelParts:
    """`model_config`: a ModelConfig or the `config.model` ConfigDict."""
    abstract_model = nnx.eval_shape(lambda: model_lib.EttinModel(
        model_config, rngs=nnx.Rngs(params=seed, dropout=seed)))
    abstract_model.train()
    graphdef_train, abstract_params, rng_layout = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()
    graphdef_eval, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    return ModelParts(graphdef_train=graphdef_train, graphdef_eval=graphdef_eval,
                      abstract_params=abstract_params, rng_layout=rng_layout)


def fresh_rng_state(rng_layout: nnx.State, seed: int = 0) -> nnx.State:
    """An RNG state of `rng_layout`: every key `jax.random.key(seed)`, every counter 0.

    Training re-keys the dropouts per micro batch (`nnx.reseed`), so only the layout matters.
    """
    return jax.tree.map(
        lambda x: jax.random.key(seed) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else jnp.zeros(x.shape, x.dtype), rng_layout)
