"""Scanned layer groups (config.model.scan_layers=True) against the unrolled layer loop.

The unrolled loop (scan_layers=False) is the reference: the same parameters must give the
same logits and parameter gradients, in eval mode and with dropout in train mode, for
depths that fill whole (local, local, global) groups after layer 0 and depths that leave
layers over, under every rematerialisation policy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ettin_tiny
from ettin_jax.kernels.flash_attention import FORWARD
from ettin_jax.model import EttinModel

from gradient_testlib import assert_gradients_close, named_leaves

SEQ = 48


def _model(arg, num_layers, *, scan_layers, remat="none", dropout=0.0, seed=0):
    config = ettin_tiny.get_config(arg).model
    config.num_layers, config.scan_layers, config.remat = num_layers, scan_layers, remat
    config.embedding_dropout = config.attn_out_dropout = config.mlp_dropout = dropout
    # A "dropout" stream, as train.py builds it: nnx.reseed(dropout=...) re-keys only that.
    return EttinModel(config, rngs=nnx.Rngs(params=seed, dropout=seed))


def _packed_batch():
    """Two rows: two packed documents + padding, and one document filling the row."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 500, (2, SEQ)).astype(np.int32)
    segment_ids = np.stack([np.repeat([1, 2, 0], [20, 22, 6]), np.ones(SEQ)]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(20), np.arange(22), np.zeros(6)]),
                          np.arange(SEQ)]).astype(np.int32)
    weights = rng.normal(size=(2, SEQ, ettin_tiny.VOCAB_SIZE)).astype(np.float32)
    return tuple(map(jnp.asarray, (ids, segment_ids, positions, weights)))


@nnx.jit
def _logits_and_grads(model, ids, segment_ids, positions, weights):
    """Logits and the gradient of a weighted logit sum with respect to every parameter."""
    def loss(model):
        logits = model(ids, segment_ids, positions)
        return jnp.sum(logits * weights), logits

    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads


def _run(model, key=None):
    if key is not None:
        nnx.reseed(model, dropout=key)
    logits, grads = _logits_and_grads(model, *_packed_batch())
    return np.asarray(logits), named_leaves(grads)


def _assert_same(actual, expected):
    (logits, grads), (ref_logits, ref_grads) = actual, expected
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert_gradients_close(grads, ref_grads, rtol=1e-5, atol_of_largest=1e-6)


@functools.lru_cache(maxsize=None)
def _unrolled(arg, num_layers):
    return _run(_model(arg, num_layers, scan_layers=False))


# Remat wraps the scanned group's body, whatever the depth: it is tested at 8 layers, the
# depth whose scan carries across two groups and leaves a layer over (4 and 5 add nothing).
@pytest.mark.parametrize("num_layers, remat", [(4, "none"), (5, "none"), (8, "none"),
                                               (8, "full"), (8, "dots")])
@pytest.mark.parametrize("arg", ["mlm", "clm"])
def test_scanned_equals_unrolled(arg, num_layers, remat):
    model = _model(arg, num_layers, scan_layers=True, remat=remat)
    _assert_same(_run(model), _unrolled(arg, num_layers))


def _gradient_primitives(remat, *names):
    """How often each primitive in `names` (or pallas_call of that kernel name) appears in the
    gradient program of an 8-layer model with scanned groups, dropout on and the Pallas
    kernels: the forward scan's body, the backward's and the layers outside the scan."""
    ids = jnp.zeros((1, 128), jnp.int32)
    model = _model("mlm", 8, scan_layers=True, remat=remat, dropout=0.1)
    model.attention_impl = "pallas"
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    # The dropout streams advance inside the trace, so they enter it as fresh variables.
    loss = lambda params: jnp.sum(nnx.merge(graph, params, jax.tree.map(lambda x: x, rest))
                                  .hidden_states(ids))
    counts = dict.fromkeys(names, 0)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for name in names:
                counts[name] += eqn.primitive.name == name or eqn.params.get("name") == name
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                        walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    return counts


def test_dots_attention_keeps_what_dots_recomputes():
    """The attention forward kernel and the dropout masks' random bits appear in the gradient
    program as often as without remat under "dots_attention" (kept from the forward), and
    more often under "dots", whose backward runs them again for each scanned layer."""
    names = (FORWARD, "random_bits")
    without = _gradient_primitives("none", *names)
    assert min(without.values()) > 0
    assert _gradient_primitives("dots_attention", *names) == without
    recomputed = _gradient_primitives("dots", *names)
    assert all(recomputed[name] > without[name] for name in names), (recomputed, without)


def test_dropout_masks_equal_unrolled_and_follow_the_key():
    """Train mode: the reseeded key alone fixes the masks (a resumed run repeats them), each
    layer draws its own (the unrolled reference keeps one stream per layer), another key
    gives other masks. Under remat="dots_attention" the kept masks are the ones drawn. The
    encoder only: the layers and their dropouts are the decoder's (the mask alone differs,
    which test_scanned_equals_unrolled covers for both), and each objective cost ~28 s here."""
    scanned = _model("mlm", 8, scan_layers=True, dropout=0.1)
    kept = _model("mlm", 8, scan_layers=True, remat="dots_attention", dropout=0.1)
    unrolled = _model("mlm", 8, scan_layers=False, dropout=0.1)
    for model in (scanned, kept, unrolled):
        model.train()
    key, other_key = jax.random.key(7), jax.random.key(8)
    first = _run(scanned, key)
    reference = _run(unrolled, key)
    _assert_same(first, reference)
    _assert_same(_run(kept, key), reference)
    again = _run(scanned, key)
    np.testing.assert_array_equal(first[0], again[0])
    other = _run(scanned, other_key)
    assert np.abs(other[0] - first[0]).max() > 1e-3        # so dropout was on, too


def test_layers_draw_distinct_dropout_keys():
    model = _model("mlm", 8, scan_layers=True, dropout=0.1)
    model.train()
    nnx.reseed(model, dropout=jax.random.key(3))
    keys = [jax.random.key_data(key) for pair in model.layer_dropout_keys() for key in pair]
    assert len(keys) == 2 * 8
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == len(keys)


@pytest.mark.parametrize("jitted", [False, True])
def test_layer_dropout_keys_are_what_each_dropout_would_draw(jitted):
    """The vectorised draw against each dropout's own stream (`dropout.rngs()`, flax's):
    the same keys, None where a dropout is off, and the streams advanced alike (a second
    draw agrees too)."""
    model = _model("mlm", 5, scan_layers=False, dropout=0.1)
    model.train()
    model.layers[2].mlp_dropout.rate = 0.0                   # one off: no key, no draw
    nnx.reseed(model, dropout=jax.random.key(11))

    def both(model):
        reference = nnx.clone(model)
        ours = [model.layer_dropout_keys() for _ in range(2)]
        theirs = [[tuple(None if d.rate == 0.0 else d.rngs() for d in block.dropouts())
                   for block in reference.layers] for _ in range(2)]
        as_data = lambda draws: jax.tree.map(jax.random.key_data, draws)
        return as_data(ours), as_data(theirs)

    ours, theirs = nnx.jit(both)(model) if jitted else both(model)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert ours[0][2][1] is None and ours[0][2][0] is not None
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ours[0][0][0], ours[1][0][0])   # the second draw moved on


@pytest.mark.parametrize("num_layers, length", [(4, 1), (5, 1), (8, 2), (22, 7)])
def test_one_scan_over_the_whole_groups(num_layers, length):
    """The program holds one scan over the groups (and none when unrolled)."""
    assert _scans(num_layers, scan_layers=True) == [length]
    assert _scans(num_layers, scan_layers=False) == []


@pytest.mark.parametrize("remat, policy", [
    ("full", jax.checkpoint_policies.nothing_saveable),
    ("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)])
def test_remat_wraps_the_group_body(remat, policy):
    """Equal results alone would not show that the group is rematerialised at all."""
    body = _scan_equations(8, scan_layers=True, remat=remat)[0].params["jaxpr"].jaxpr
    policies = [eqn.params["policy"] for eqn in body.eqns if "policy" in eqn.params]
    assert policies == [policy]
    none_body = _scan_equations(8, scan_layers=True)[0].params["jaxpr"].jaxpr
    assert not [eqn for eqn in none_body.eqns if "policy" in eqn.params]


def _scan_equations(num_layers, **overrides):
    ids = jnp.zeros((1, 16), jnp.int32)
    model = nnx.eval_shape(lambda: _model("mlm", num_layers, **overrides))
    graph, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graph, s).hidden_states(ids))(state)
    return [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def _scans(num_layers, **overrides):
    return [eqn.params["length"] for eqn in _scan_equations(num_layers, **overrides)]


def test_remat_names_are_checked():
    with pytest.raises(ValueError, match=r"config.model.remat='some'"):
        _model("mlm", 4, scan_layers=True, remat="some")
    with pytest.raises(ValueError, match="config.model.scan_layers=True"):
        _model("mlm", 4, scan_layers=False, remat="full")


def _gradient_producers(num_layers, **overrides):
    """{parameter path: the primitive that produces its gradient} in the gradient program."""
    ids = jnp.zeros((1, 16), jnp.int32)
    model = nnx.eval_shape(lambda: _model("mlm", num_layers, **overrides))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda params: jnp.sum(nnx.merge(graph, params, rest).hidden_states(ids))
    closed = jax.make_jaxpr(jax.grad(loss))(params)
    producer = {var: eqn.primitive.name for eqn in closed.jaxpr.eqns for var in eqn.outvars}
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    return dict(zip(paths, (producer.get(var) for var in closed.jaxpr.outvars)))


def test_scanned_layers_gradients_leave_the_scan_as_buffers_of_their_own():
    """Each scanned layer's gradient comes out of an optimization barrier, not as a slice of
    the stacked gradient: otherwise XLA fuses the optimizer updates that slice one buffer into
    one kernel per parameter kind whose code grows with depth (bench/RESULTS.md, "Why the
    scanned step's code generation grows with depth")."""
    scanned = _gradient_producers(7, scan_layers=True)
    layer_grads = {path: p for path, p in scanned.items() if path.startswith("['layers']")}
    in_scan = {path: p for path, p in layer_grads.items() if not path.startswith("['layers'][0]")}
    assert len(in_scan) == 6 * 6                  # layers 1-6, six parameters each
    assert set(in_scan.values()) == {"optimization_barrier"}
    unrolled = _gradient_producers(7, scan_layers=False)
    assert "optimization_barrier" not in unrolled.values()
