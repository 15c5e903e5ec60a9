"""The one way to get an EttinModel with weights: from a config, a training run, or a
transformers directory, on one device or placed on a mesh.

    parts = model_parts(model_config)          # graphdefs + abstract params, nothing allocated
    model = from_config(model_config, seed=0)  # fresh initialisation
    loaded = from_run("runs/enc150m")          # Loaded(model, config, tokenizer, meta)
    loaded = from_hf("hf/enc150m")
    model, tokenizer = load_for_inference(checkpoint, hf_dir, tokenizer_path, dtype)

Models read from a run or a transformers directory are in eval mode (dropout off).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from ettin_jax import checkpoint as checkpoint_lib
from ettin_jax import hf as hf_lib
from ettin_jax import model as model_lib
from ettin_jax import sharding as sharding_lib
from ettin_jax.model_config import ModelConfig


@dataclasses.dataclass
class ModelParts:
    """A module's structure without its values (from `nnx.eval_shape`: nothing is allocated).

    graphdef_train / graphdef_eval: the module with dropout on / off, to `nnx.merge` with
    params and an rng state. abstract_params: nnx.State of abstract nnx.Param values (shapes,
    dtypes and logical-axis metadata). rng_layout: the abstract non-Param state (the dropout
    streams' keys and counters), for `fresh_rng_state`.
    """
    graphdef_train: Any
    graphdef_eval: Any
    abstract_params: nnx.State
    rng_layout: nnx.State


def module_parts(make_module: Callable[[], nnx.Module]) -> ModelParts:
    """The ModelParts of the module `make_module()` builds (an EttinModel or a module that
    holds one, such as glue's SequenceClassifier)."""
    abstract = nnx.eval_shape(make_module)
    abstract.train()
    graphdef_train, abstract_params, rng_layout = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    graphdef_eval, _, _ = nnx.split(abstract, nnx.Param, ...)
    return ModelParts(graphdef_train, graphdef_eval, abstract_params, rng_layout)


def model_parts(model_config, *, seed: int = 0) -> ModelParts:
    """The ModelParts of `EttinModel(model_config)`; model_config: a ModelConfig, a
    `config.model` ConfigDict or a dict."""
    config = ModelConfig.from_config(model_config)
    return module_parts(lambda: new_model(config, seed=seed))


def new_model(model_config, *, seed: int = 0) -> model_lib.EttinModel:
    """A freshly initialised EttinModel (train mode) on the default device.

    Separate `params` and `dropout` streams: the train step re-keys dropout with
    `nnx.reseed(model, dropout=key)`, which finds nothing to re-key in a model built on one
    default stream (its masks would then repeat every step)."""
    return model_lib.EttinModel(model_config, rngs=nnx.Rngs(params=seed, dropout=seed))


def init_params(model_config, *, seed: int = 0) -> nnx.State:
    """The fresh params of `new_model` (jit it with out_shardings to create them sharded, and
    call that under `init_lowering()`)."""
    return nnx.split(new_model(model_config, seed=seed), nnx.Param, ...)[1]


def init_lowering():
    """Context to call a jitted init program in (its trace, lowering and compile happen then):
    on a GPU each of its ~100 threefry draws becomes one call of jax's threefry kernel instead
    of twenty hash rounds unrolled into the fused code. Same random bits; XLA's GPU compile of
    the init drops from 14.2 s to 2.3 s for 150m and from 32.5 s to 3.1 s for 1b (H100 target,
    bench/compile_time.py --step=init), where an H200's cold start of 150m waited 119 s for
    its initialised state. CPU and TPU lower as before.

    The option is jax's (`jax_threefry_gpu_kernel_lowering`, not exported as a context
    manager; it is part of jit's cache key). Set per thread, so the train step compiling on
    another thread (ettin_jax.precompile) keeps its fused dropout bits."""
    from jax._src import config as jax_config  # pylint: disable=import-outside-toplevel
    option = getattr(jax_config, "threefry_gpu_kernel_lowering", None)
    return option(True) if option is not None else contextlib.nullcontext()


# config.train.prng_impl -> jax's PRNG implementation of the step's dropout keys. The RBG ones
# draw random bits with the hardware generator (cheaper than threefry's hashing on a GPU);
# they give other masks than threefry, so a run keeps one (a setting in run_identity.json).
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def prng_impl(config) -> str:
    """jax's name of the PRNG implementation `config.train.prng_impl` names."""
    name = config.train.prng_impl
    if name not in PRNG_IMPLS:
        raise ValueError(f"config.train.prng_impl={name!r}: expected one of {sorted(PRNG_IMPLS)}")
    return PRNG_IMPLS[name]


def reseed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """`nnx.reseed(model, dropout=key)` with every stream's key drawn in one call
    (`model.fold_in_each`): dropout stream i (in graph order) gets fold_in(key, i) and count 0,
    as nnx.reseed gives it, with one threefry hash in the train step instead of one per
    stream (with `EttinModel.layer_dropout_keys`, bench/RESULTS.md)."""
    streams = [stream for _, stream in nnx.iter_graph(model)
               if isinstance(stream, nnx.RngStream) and stream.key.tag == "dropout"]
    if not streams:
        return
    keys = model_lib.fold_in_each(key, jnp.arange(len(streams), dtype=jnp.uint32))
    for stream, stream_key in zip(streams, keys):
        stream.key.set_value(stream_key)
        stream.count.set_value(jnp.zeros(stream_key.shape, dtype=jnp.uint32))


def fresh_rng_state(rng_layout: nnx.State, seed: int = 0) -> nnx.State:
    """Concrete dropout RNG state for `rng_layout` (ModelParts.rng_layout): stream i (in the
    order of the state paths) gets key fold_in(key(seed), i), every counter 0. Pure, so it
    also runs inside jit (the layout is not modified)."""
    items = sorted(nnx.to_flat_state(rng_layout), key=lambda kv: str(kv[0]))
    fresh = {}
    for index, (path, variable) in enumerate(items):
        if isinstance(variable, nnx.RngKey):
            value = jax.random.fold_in(jax.random.key(seed), index)
        elif isinstance(variable, nnx.RngCount):
            value = jnp.zeros(variable.get_value().shape, jnp.uint32)
        else:
            raise TypeError(f"unexpected non-parameter state {path} of type "
                            f"{type(variable).__name__}; only dropout RNG streams are expected")
        fresh[path] = variable.replace(value)
    return nnx.from_flat_state(fresh)


def _params_target(abstract_params: nnx.State, mesh) -> nnx.State:
    """ShapeDtypeStructs of the params, placed on `mesh` by their logical axes, or on the
    first local device when mesh is None."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract_params)
    return checkpoint_lib.abstract_like(abstract_params,
                                        sharding_lib.param_shardings(abstract_params, mesh))


def from_config(model_config, *, seed: int = 0, mesh=None) -> model_lib.EttinModel:
    """A freshly initialised EttinModel (train mode, as constructed); with `mesh`, its params
    are created already sharded by their logical axes."""
    config = ModelConfig.from_config(model_config)
    if mesh is None:
        return new_model(config, seed=seed)
    parts = model_parts(config, seed=seed)
    shardings = (sharding_lib.param_shardings(parts.abstract_params, mesh),
                 sharding_lib.replicated(mesh))
    with init_lowering():
        params, rest = jax.jit(lambda: nnx.split(new_model(config, seed=seed), nnx.Param, ...)[1:],
                               out_shardings=shardings)()
    return nnx.merge(parts.graphdef_train, params, rest)


@dataclasses.dataclass
class Loaded:
    """A model with weights and where they came from.

    config: the run's saved config as a dict (from a transformers directory: {"model": ...});
    tokenizer: the tokenizer path saved with the source, or None; meta: the checkpoint's
    meta item (step, tokens seen, ...; {} for a transformers directory).
    """
    model: model_lib.EttinModel
    config: dict
    tokenizer: str | None
    meta: dict


def _with_dtype(config: ModelConfig, dtype: str | None) -> ModelConfig:
    if not dtype:
        return config
    config = dataclasses.replace(config, dtype=dtype)
    config.validate()
    return config


def from_run(workdir: str, *, step: int | None = None, mesh=None, dtype: str | None = None,
             check_config: Callable[[dict, str], None] | None = None) -> Loaded:
    """The model (eval mode) of a training run's checkpoint `step` (default: the newest).

    Params are placed on `mesh` by their logical axes when given, else on one device.
    dtype: compute dtype to use instead of the saved config's. check_config(config, where):
    called with the saved config before any weight is read, to refuse a run early. Raises
    FileNotFoundError for a directory without checkpoints and ValueError naming every
    parameter whose shape differs from the saved config's model.
    """
    manager = checkpoint_lib.read_only_manager(workdir)
    try:
        steps = checkpoint_lib.readable_steps(manager, workdir)
        if step is None:
            step = steps[0]
        elif step not in steps:
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; it has steps "
                                    f"{', '.join(map(str, sorted(steps)))}")
        # The config decides the params' shapes and shardings: read it (and meta) first.
        saved = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        config, meta = saved["config"], saved["meta"] or {}
        if check_config is not None:
            check_config(config, f"{workdir} (step {step})")
        model_config = _with_dtype(ModelConfig.from_config(config["model"]), dtype)
        parts = model_parts(model_config)
        target = _params_target(parts.abstract_params, mesh)
        checkpoint_lib.check_tree_matches(manager.item_metadata(step)["params"], target,
                                          what="parameters", where=f"{workdir} (step {step})")
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
    finally:
        manager.close()
    model = nnx.merge(parts.graphdef_eval, params, fresh_rng_state(parts.rng_layout))
    tokenizer = meta.get("tokenizer") or (config.get("data") or {}).get("tokenizer") or None
    return Loaded(model, config, tokenizer, meta)


def load_hf(path: str, *, dtype: str | None = None) -> tuple[model_lib.EttinModel, ModelConfig]:
    """(EttinModel in eval mode, its ModelConfig) of a transformers directory (config.json +
    model.safetensors, a sharded index or pytorch_model.bin; hf.read_hf translates them).

    dtype: compute dtype; None computes in the directory's stored dtype, as transformers does.
    Raises hf.HFFormatError naming the file and key for anything that does not fit.
    """
    config, values = hf_lib.read_hf(path, dtype=dtype or None)
    parts = model_parts(config)
    flat = dict(nnx.to_flat_state(parts.abstract_params))
    for key, variable in flat.items():
        variable.set_value(jnp.asarray(values[key]))
    model = nnx.merge(parts.graphdef_eval, nnx.from_flat_state(flat),
                      fresh_rng_state(parts.rng_layout))
    return model, config


def from_hf(path: str, *, dtype: str | None = None, mesh=None) -> Loaded:
    """`load_hf`'s model as a Loaded (params placed on `mesh` by their logical axes when given)."""
    model, model_config = load_hf(path, dtype=dtype)
    if mesh is not None:
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.device_put(params, sharding_lib.param_shardings(params, mesh)))
    tokenizer = path if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    return Loaded(model, {"model": dataclasses.asdict(model_config)}, tokenizer, {})


def load_for_inference(checkpoint: str | None, hf_dir: str | None, tokenizer_path: str | None,
                       dtype: str = "", check_config: Callable[[dict, str], None] | None = None):
    """(model in eval mode, tokenizer) from a training run's newest checkpoint or a
    transformers directory (the --checkpoint / --hf / --tokenizer / --dtype flags of cli.py).

    tokenizer_path: None = the tokenizer saved with the run or the directory.
    dtype: compute dtype ("float32", "bfloat16"); "" keeps the run config's, or for a
    transformers directory its stored dtype (as transformers' from_pretrained).
    check_config: as from_run's, for a training run (a transformers directory has no run
    config: check the model instead).
    """
    from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

    if bool(checkpoint) == bool(hf_dir):
        raise ValueError("give exactly one of --checkpoint=RUN_DIR or --hf=HF_DIR")
    loaded = (from_run(checkpoint, dtype=dtype, check_config=check_config) if checkpoint
              else from_hf(hf_dir, dtype=dtype))
    tokenizer_path = tokenizer_path or loaded.tokenizer
    if not tokenizer_path:
        raise ValueError(f"{checkpoint or hf_dir}: no tokenizer saved with the model; pass --tokenizer")
    return loaded.model, tokenizer_lib.load(tokenizer_path)
