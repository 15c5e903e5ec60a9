"""The model on its own: packing, parameter counts, initialisation, masks, dropout, dtypes."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

from configs import ettin_17m, ettin_32m, ettin_68m, ettin_150m, ettin_400m, ettin_1b, ettin_tiny
from ettin_jax import attention
from ettin_jax.model import EttinModel, count_params, dropout, layer_norm

from gradient_testlib import assert_gradients_close, named_leaves


# One compiled program per shape instead of hundreds of eagerly dispatched ops.
forward = nnx.jit(lambda model, *args: model(*args))


def _model(arg="mlm", seed=0, **overrides):
    config = ettin_tiny.get_config(arg).model
    for key, value in overrides.items():
        config[key] = value
    model = EttinModel(config, rngs=nnx.Rngs(seed))
    model.eval()
    return model


@pytest.mark.parametrize("arg", ["mlm", "clm"])
def test_packed_documents_equal_documents_alone(arg):
    """Two documents packed in one row (+ padding) give each document's own logits."""
    model = _model(arg)
    rng = np.random.RandomState(0)
    doc_a, doc_b = rng.randint(0, 500, 37), rng.randint(0, 500, 50)   # longer than the window
    pad = 9
    ids = np.concatenate([doc_a, doc_b, np.full(pad, ettin_tiny.PAD_ID)])[None]
    segment_ids = np.concatenate([np.full(37, 1), np.full(50, 2), np.zeros(pad)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(37), np.arange(50), np.zeros(pad)])[None].astype(np.int32)
    packed = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(segment_ids), jnp.asarray(positions)))
    alone_a = np.asarray(forward(model, jnp.asarray(doc_a[None])))
    alone_b = np.asarray(forward(model, jnp.asarray(doc_b[None])))
    np.testing.assert_allclose(packed[0, :37], alone_a[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 37:87], alone_b[0], atol=2e-5)
    assert np.isfinite(packed).all()


EXPECTED_PARAMS = {   # recipe §2, computed from the transformers shapes
    ettin_17m: 16_913_600, ettin_32m: 32_081_344, ettin_68m: 68_457_664,
    ettin_150m: 149_655_232, ettin_400m: 395_881_664, ettin_1b: 1_031_314_112,
}


@pytest.mark.parametrize("size", list(EXPECTED_PARAMS), ids=lambda m: m.__name__.split(".")[-1])
def test_parameter_counts_match_transformers(size):
    config = size.get_config("mlm").model
    ours = count_params(nnx.eval_shape(lambda: EttinModel(config, rngs=nnx.Rngs(0))))
    hf_config = transformers.ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.ModernBertForMaskedLM(hf_config).parameters())
    assert ours == theirs == EXPECTED_PARAMS[size]


def test_full_megatron_initialisation():
    """Truncated normals at +-2 std: in-projections 0.02, out-projections 0.02/sqrt(2L)."""
    config = ettin_tiny.get_config("mlm").model
    config.hidden_size, config.intermediate_size, config.num_heads = 256, 512, 4
    model = EttinModel(config, rngs=nnx.Rngs(0))
    truncated_std = scipy.stats.truncnorm(-2, 2).std()         # independent reference, ~0.88
    std_in, std_out = 0.02, 0.02 / math.sqrt(2 * config.num_layers)
    for name, array, std in [("tok_embeddings", model.tok_embeddings, std_in),
                             ("qkv", model.layers[1].qkv, std_in),
                             ("mlp_in", model.layers[2].mlp_in, std_in),
                             ("attn_out", model.layers[1].attn_out, std_out),
                             ("mlp_out", model.layers[3].mlp_out, std_out),
                             ("head_dense", model.head_dense, std_in)]:
        values = np.asarray(array[...])
        assert abs(values.std() / (std * truncated_std) - 1) < 0.03, name
        assert np.abs(values).max() <= 2 * std + 1e-7, name
    assert (np.asarray(model.decoder_bias[...]) == 0).all()
    assert (np.asarray(model.layers[1].attn_norm[...]) == 1).all()
    assert model.layers[0].attn_norm is None


def _mask_by_rule(n, segment_ids, causal, left, right):
    visible = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            visible[i, j] = (segment_ids[i] != 0 and segment_ids[i] == segment_ids[j]
                             and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                             and (not causal or j <= i))
    return visible


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (False, (3, 3)), (True, (-1, -1)),
                                           (True, (2, 0)), (False, (0, 4))])
def test_attention_mask_follows_the_rule(causal, window):
    segment_ids = np.array([1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0, 0])
    got = np.asarray(attention.attention_mask(14, 14, segment_ids=jnp.asarray(segment_ids[None]),
                                              causal=causal, window_size=window))[0]
    np.testing.assert_array_equal(got, _mask_by_rule(14, segment_ids, causal, *window))


def test_reference_attention_zero_rows_and_softmax():
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(1, 6, 2, 8).astype(np.float32) for _ in range(3))
    segment_ids = np.array([[1, 1, 1, 2, 0, 0]], np.int32)
    out = np.asarray(attention.xla_attention(q, k, v, segment_ids=jnp.asarray(segment_ids)))
    assert (out[0, 4:] == 0).all()                       # padding sees nothing: zeros, not NaN
    # Query 1 (segment 1) by hand: softmax over keys 0..2.
    logits = np.einsum("hd,khd->hk", q[0, 1], k[0, :3]) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, 1], np.einsum("hk,khd->hd", probs, v[0, :3]), rtol=1e-5)


def _packed_segments(rng, batch, seq, padding):
    segment_ids = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        start, segment = 0, 1
        while start < seq - padding:
            length = min(seq - padding - start, int(rng.randint(seq // 6, seq)))
            segment_ids[row, start:start + length] = segment
            start, segment = start + length, segment + 1
    return jnp.asarray(segment_ids)


# Encoder and both decoder windows, an odd asymmetric one, seq a multiple of the 64-query
# block and not, with and without packed segments + tail padding.
@pytest.mark.parametrize("causal,window", [(False, (64, 64)), (True, (63, 0)), (True, (64, 0)),
                                           (False, (5, 70))])
@pytest.mark.parametrize("seq,packed", [(320, True), (301, False), (301, True)])
def test_banded_attention_matches_dense(causal, window, seq, packed):
    rng = np.random.RandomState(seq + window[1])
    q, k, v, d_out = (jnp.asarray(rng.randn(2, seq, 2, 16).astype(np.float32)) for _ in range(4))
    kw = dict(causal=causal, window_size=window,
              segment_ids=_packed_segments(rng, 2, seq, padding=7) if packed else None)
    assert attention.banded_blocks(seq, window) is not None
    out, vjp = jax.vjp(lambda q, k, v: attention.banded_attention(q, k, v, **kw), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: attention.xla_attention(q, k, v, **kw), q, k, v)
    for got, want in zip((out, *vjp(d_out)), (ref, *ref_vjp(d_out))):
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= 1e-5


def test_banded_only_where_it_saves_work():
    assert attention.banded_blocks(512, (-1, -1)) is None          # global layer
    assert attention.banded_blocks(512, (-1, 0)) is None           # causal global
    assert attention.banded_blocks(150, (64, 64)) is None          # 3 key blocks cover 192 >= 150
    assert attention.banded_blocks(512, (64, 64)) == (1, 1)        # 192 of 512 keys
    assert attention.banded_blocks(512, (63, 0)) == (1, 0)
    with pytest.raises(ValueError, match="finite window"):
        attention.banded_attention(*(jnp.zeros((1, 64, 1, 8)),) * 3, window_size=(64, 64))


def test_dropout_only_in_training():
    model = _model()
    ids = jnp.arange(24)[None]
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(model, ids)))
    model.train()
    first, second = np.asarray(forward(model, ids)), np.asarray(forward(model, ids))
    assert np.abs(first - second).max() > 1e-4          # fresh masks each call
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(model, ids)))


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_named_dropout_equals_flax_dropout(rate):
    """model.dropout (its mask named for remat) draws the mask nnx.Dropout draws from the same
    key, in training and (identity) in evaluation."""
    x = jax.random.normal(jax.random.key(1), (2, 7, 16), jnp.bfloat16)
    module = nnx.Dropout(rate, rngs=nnx.Rngs(0))
    for deterministic in (False, True):
        module.deterministic = deterministic
        key = jax.random.key(3)
        np.testing.assert_array_equal(np.asarray(dropout(module, x, key), np.float32),
                                      np.asarray(module(x, rngs=key), np.float32))
    module.deterministic = False
    kept = np.asarray(dropout(module, jnp.ones((64, 64)), jax.random.key(3)))
    assert abs((kept != 0).mean() - (1 - rate)) < 0.05           # the rate, 4096 draws
    if rate < 1:
        np.testing.assert_allclose(kept[kept != 0], 1 / (1 - rate), rtol=1e-6)  # rescaled


def test_bfloat16_compute_tracks_float32():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, (2, 40)))
    f32 = np.asarray(forward(_model(dtype="float32"), ids))
    bf16 = np.asarray(forward(_model(dtype="bfloat16"), ids))
    assert bf16.dtype == np.float32
    assert np.linalg.norm(bf16 - f32) / np.linalg.norm(f32) < 2e-2
    model = _model(dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arg", ["mlm", "clm"])
def test_qk_v_projection_equals_the_fused_one(arg):
    """config.model.qkv_projection="qk_v" (two matmuls) on the fused qkv weight: the same
    parameters, logits and parameter gradients as one matmul."""
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 500, (2, 40)))
    weights = jnp.asarray(np.random.RandomState(2).normal(size=(2, 40, ettin_tiny.VOCAB_SIZE)),
                          jnp.float32)

    @nnx.jit
    def logits_and_grads(model):
        def loss(model):
            logits = model(ids)
            return jnp.sum(logits * weights), logits
        return nnx.grad(loss, has_aux=True)(model)

    results = {}
    for projection in ("fused", "qk_v"):
        model = _model(arg, dtype="float32", qkv_projection=projection)
        grads, logits = logits_and_grads(model)
        results[projection] = (nnx.state(model, nnx.Param), logits, grads)
    (params, logits, grads), (params2, logits2, grads2) = results["fused"], results["qk_v"]
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5)
    assert_gradients_close(named_leaves(grads2), named_leaves(grads), rtol=1e-4,
                           atol_of_largest=1e-5)
    with pytest.raises(ValueError, match=r"config.model.qkv_projection='qkv'"):
        _model(arg, qkv_projection="qkv")
    with pytest.raises(ValueError, match=r"config.model.global_attn_every_n_layers=0: must be "
                                         ">= 1"):      # layers are global every n-th from 0
        _model(arg, global_attn_every_n_layers=0)


def test_sparse_head_equals_dense_logits():
    model = _model()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, (2, 30)))
    hidden = model.hidden_states(ids)
    picks = jnp.asarray([[3, 7, 29], [0, 1, 2]])
    sparse = model.head_logits(jnp.take_along_axis(hidden, picks[..., None], axis=1))
    dense = forward(model, ids)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(jnp.take_along_axis(dense, picks[..., None], 1)),
                               atol=1e-5)


def test_logical_axis_names_on_every_parameter():
    model = nnx.eval_shape(lambda: EttinModel(ettin_tiny.get_config("mlm").model, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    names = {tuple(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    assert ("vocab", "embed") in names and ("embed", None, "heads", "kv") in names
    assert ("embed", None, "mlp") in names and ("mlp", "embed") in names


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        _model(attention_impl="flash")


def test_kv_cache_decoding_equals_full_forward():
    """Prompt then one token at a time through the cache == one causal forward pass,
    across local layers whose window the sequence outgrows."""
    model = _model("clm")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, (2, 30)))
    full = np.asarray(forward(model, ids))
    decode = nnx.jit(lambda model, ids, cache, index: model.decode(ids, cache, index))
    cache = model.init_cache(2, 32)
    logits, cache = decode(model, ids[:, :12], cache, jnp.int32(0))
    steps = [np.asarray(logits)]
    for t in range(12, 30):
        logits, cache = decode(model, ids[:, t:t + 1], cache, jnp.int32(t))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)
    with pytest.raises(ValueError, match="needs a decoder"):
        _model("mlm").decode(ids, cache, 0)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_fold_in_each_equals_fold_in_key_by_key(impl):
    """model.fold_in_each against jax.random.fold_in called per key, for one key and for a
    key array, under each PRNG the train step offers (unsafe_rbg's differs under vmap)."""
    from ettin_jax.model import fold_in_each
    key = jax.random.key(5, impl=impl)
    data = jnp.array([0, 3, 1, 7], dtype=jnp.uint32)
    keys = jnp.stack([jax.random.fold_in(key, 100 + i) for i in range(4)])
    for given, each in ((key, [key] * 4), (keys, list(keys))):
        expected = [jax.random.key_data(jax.random.fold_in(k, d)) for k, d in zip(each, data)]
        got = jax.random.key_data(jax.jit(fold_in_each)(given, data))
        np.testing.assert_array_equal(got, np.stack(expected))


def test_layers_of_one_kind_share_one_traced_block():
    """The unrolled layers run through one jitted block function per kind of layer: 7 layers
    (the first, local ones, global ones after it) lower to 3 block functions called from 7
    places, in the forward and in the backward; XLA inlines the calls. The logits are those of
    the same layers called one by one."""
    model = _model(num_layers=7)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, (1, 32)))

    def loss(params):
        return nnx.merge(graphdef, params, rest)(ids).sum()

    text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    calls = re.findall(r"call @(_block_call\w*)\(", text)
    assert len(calls) == 14 and len(set(calls)) == 6

    def layer_by_layer(model, ids):
        run = dict(positions=jnp.arange(32)[None], segment_ids=None,
                   dtype=model.config.compute_dtype, attention_impl="xla")
        x = model.embed_dropout(layer_norm(jnp.take(model.tok_embeddings[...], ids, axis=0),
                                           model.embed_norm, model.config.norm_eps))
        for block in model.layers:
            x = block(x, **run)
        return model.head_logits(layer_norm(x, model.final_norm, model.config.norm_eps))

    np.testing.assert_allclose(forward(model, ids), nnx.jit(layer_by_layer)(model, ids),
                               atol=1e-5)
