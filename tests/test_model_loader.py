"""model_loader: a run's checkpoint comes back with the same weights on one device and on a
mesh, a mismatched run is refused naming the parameter, sharded fresh init equals the
unsharded one, the fresh RNG state works inside jit; ModelConfig <-> config.json round trip."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ettin_tiny
from ettin_jax import checkpoint, model_loader
from ettin_jax import sharding as sharding_lib
from ettin_jax.model_config import HFFormatError, ModelConfig


def _tiny_config(objective="mlm", **changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_config(ettin_tiny.get_config(objective).model),
                               attention_impl="xla", **changes)


def _params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _mesh():
    return sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])


def test_from_run_restores_the_saved_weights_on_one_device_and_on_a_mesh(tmp_path):
    config = _tiny_config("clm")
    model = model_loader.from_config(config, seed=5)
    run = str(tmp_path / "run")
    checkpoint.save_imported(model, config, run)
    expected = _params(model)

    loaded = model_loader.from_run(run)
    assert loaded.config["model"]["causal"] is True and loaded.meta["imported"] is True
    assert loaded.tokenizer is None
    assert _params(loaded.model).keys() == expected.keys()
    for key, value in _params(loaded.model).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))

    mesh = _mesh()
    sharded = model_loader.from_run(run, mesh=mesh, dtype="bfloat16")
    assert sharded.model.config.dtype == "bfloat16"
    embeddings = sharded.model.tok_embeddings.get_value()   # [vocab, embed]: tensor x fsdp
    assert embeddings.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    for key, value in _params(sharded.model).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))
    # Eval mode: dropout off, so two calls agree.
    ids = jnp.arange(24, dtype=jnp.int32)[None] % 500
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(forward(loaded.model, ids)),
                                  np.asarray(forward(loaded.model, ids)))


def test_from_run_refuses_another_architecture_naming_the_parameter(tmp_path):
    config = _tiny_config()
    # Weights of a wider MLP saved with a config that does not describe them.
    wide = dataclasses.replace(config, intermediate_size=config.intermediate_size + 8)
    other = str(tmp_path / "other")
    checkpoint.save_imported(model_loader.from_config(wide), config, other)
    with pytest.raises(ValueError, match=r"\(step 0\).*layers/0/mlp_in: \(64, 2, 104\) in the "
                                         r"checkpoint, \(64, 2, 96\) in this run"):
        model_loader.from_run(other)
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory") as missing:
        model_loader.from_run(str(tmp_path / "missing"))
    assert "runs in it" not in str(missing.value)
    # The parent of runs (a pair's workdir holds its two): the error lists them.
    with pytest.raises(FileNotFoundError, match=f"the runs in it: {tmp_path / 'other'}$"):
        model_loader.from_run(str(tmp_path))


def test_sharded_fresh_init_equals_unsharded():
    config = _tiny_config()
    plain, sharded = model_loader.from_config(config, seed=3), model_loader.from_config(
        config, seed=3, mesh=_mesh())
    expected = _params(plain)
    # The same draws: eager ops and one jitted program may round the truncated normal's
    # arithmetic apart (by up to 3e-7 relative with the suite's XLA flags, tests/conftest.py);
    # another key or layout would differ everywhere.
    for key, value in _params(sharded).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-9, err_msg=str(key))
    assert sharded.tok_embeddings.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_fresh_rng_state_in_and_out_of_jit():
    parts = model_loader.model_parts(_tiny_config())
    eager = model_loader.fresh_rng_state(parts.rng_layout, seed=7)
    jitted = jax.jit(lambda: model_loader.fresh_rng_state(parts.rng_layout, seed=7))()
    eager_flat, jitted_flat = dict(nnx.to_flat_state(eager)), dict(nnx.to_flat_state(jitted))
    assert eager_flat.keys() == jitted_flat.keys() and eager_flat
    keys = []
    for path, variable in eager_flat.items():
        other = jitted_flat[path].get_value()
        value = variable.get_value()
        if isinstance(variable, nnx.RngKey):
            np.testing.assert_array_equal(jax.random.key_data(value), jax.random.key_data(other))
            keys.append(tuple(np.asarray(jax.random.key_data(value)).ravel()))
        else:
            assert int(value) == int(other) == 0
    assert len(set(keys)) == len(keys)   # every dropout stream has its own key
    # The layout is left abstract, so the parts can be used again.
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
               for _, v in nnx.to_flat_state(parts.rng_layout))
    # A train-mode model built from the parts runs dropout with the fresh state.
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts.abstract_params)
    model = nnx.merge(parts.graphdef_train, params, eager)
    assert model.layers[0].attn_out_dropout.deterministic is False


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_hf_dict_round_trip(objective):
    # Both decoder windows come back as they were: transformers' 64 keys (even) and the
    # training window's 65 (odd) are told apart by sliding_window (tests/test_hf_layouts.py).
    for window in ("transformers", "training"):
        config = _tiny_config(objective, global_rope_theta=500.0, local_rope_theta=2000.0,
                              max_position_embeddings=256, embedding_dropout=0.1,
                              decoder_window=window, dtype="bfloat16", classifier_pooling="mean")
        back = ModelConfig.from_hf_dict(config.to_hf_dict())
        # config.json carries the stored weights' dtype (float32), no attention implementation,
        # attention_dropout 0.0 (transformers would drop probabilities too), and no pooling
        # for a decoder.
        assert back == dataclasses.replace(
            config, dtype="float32", attention_impl="auto", attn_out_dropout=0.0,
            decoder_window=window if objective == "clm" else "transformers",
            classifier_pooling="mean" if objective == "mlm" else "cls")
    hf = dict(config.to_hf_dict(), attention_dropout=0.1)       # read as transformers reads it
    assert ModelConfig.from_hf_dict(hf).attn_out_dropout == 0.1
    hf = config.to_hf_dict()
    hf["norm_bias"] = True
    with pytest.raises(HFFormatError, match=r"my/config.json: norm_bias=True is not supported"):
        ModelConfig.from_hf_dict(hf, "my/config.json")


def test_train_graph_dropout_follows_reseed():
    """The train step merges model_parts' train graph with fresh_rng_state and re-keys dropout
    with nnx.reseed(dropout=key): a key must change the masks, the same key repeat them."""
    config = _tiny_config("mlm")
    parts = model_loader.model_parts(config, seed=0)
    params = model_loader.init_params(config, seed=0)
    ids = jnp.asarray(np.arange(32, dtype=np.int32).reshape(2, 16) % 400)

    def hidden(key):
        model = nnx.merge(parts.graphdef_train, params, model_loader.fresh_rng_state(parts.rng_layout))
        nnx.reseed(model, dropout=key)
        return np.asarray(model.hidden_states(ids))

    first, again, other = hidden(jax.random.key(1)), hidden(jax.random.key(1)), hidden(jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_init_lowering_draws_each_threefry_block_with_the_gpu_kernel():
    """Under init_lowering() the init program's cuda lowering (made here, on the CPU) calls
    jax's threefry kernel instead of unrolling the hash rounds (their shifts are gone): at
    least one call site per weight shape (calls of one shape share a function), none without
    it. Its CPU lowering is the same either way."""
    import functools
    config = ModelConfig.from_config(ettin_tiny.get_config("mlm").model)
    init = jax.jit(functools.partial(model_loader.init_params, config))

    def lowered(platform):
        return init.trace().lower(lowering_platforms=(platform,)).as_text()

    plain_cuda, plain_cpu = lowered("cuda"), lowered("cpu")
    with model_loader.init_lowering():
        kernel_cuda, kernel_cpu = lowered("cuda"), lowered("cpu")
    matrices = [x for x in jax.tree.leaves(model_loader.model_parts(config).abstract_params)
                if x.ndim >= 2]
    assert "threefry2x32_ffi" not in plain_cuda and "stablehlo.shift_left" in plain_cuda
    assert kernel_cuda.count("cu_threefry2x32_ffi") >= len({x.shape for x in matrices}) > 1
    assert "stablehlo.shift_left" not in kernel_cuda
    assert kernel_cpu == plain_cpu


@pytest.mark.parametrize("jitted", [False, True])
def test_reseed_dropout_gives_every_stream_the_key_nnx_reseed_gives(jitted):
    """model_loader.reseed_dropout against flax's own nnx.reseed: the same key and count in
    every dropout stream, so the same masks (a train-mode forward with dropout on agrees)."""
    config = _tiny_config()
    assert config.attn_out_dropout > 0
    key = jax.random.key(7)
    ids = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 100

    def streams_and_logits(reseed):
        def run(params, rest, key):
            model = nnx.merge(graphdef, params, rest)
            reseed(model, key)
            streams = [(jax.random.key_data(s.key.get_value()), s.count.get_value())
                       for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)]
            return streams, model(ids)
        return (jax.jit(run) if jitted else run)(params, rest, key)

    graphdef, params, rest = nnx.split(model_loader.new_model(config), nnx.Param, ...)
    ours, ours_logits = streams_and_logits(model_loader.reseed_dropout)
    flax_streams, flax_logits = streams_and_logits(lambda m, k: nnx.reseed(m, dropout=k))
    assert len(ours) == len(flax_streams) == 1 + 2 * config.num_layers
    for (key_a, count_a), (key_b, count_b) in zip(ours, flax_streams):
        np.testing.assert_array_equal(key_a, key_b)
        assert int(count_a) == int(count_b) == 0
    np.testing.assert_array_equal(ours_logits, flax_logits)
    # Not the unseeded masks: reseeding changed what the dropouts draw.
    unseeded = nnx.merge(graphdef, params, rest)(ids)
    assert not np.array_equal(ours_logits, unseeded)
