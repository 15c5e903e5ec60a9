"""Mosaic GPU attention (ettin_jax/kernels/mosaic_*.py) in Mosaic GPU's CPU interpreter against
the XLA reference, its cuda lowering on this CPU-only machine, and attention(impl="mosaic")'s
routing."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

from ettin_jax.attention import attention, attention_mask, xla_attention
from ettin_jax.kernels import flash_attention, mosaic_attention
from ettin_jax.kernels.intervals import attention_intervals
from ettin_jax.kernels.mosaic_attention import InterpretGPUParams, tile_ranges
from ettin_jax.kernels.mosaic_common import COMPUTE_WARPGROUPS, LOG2E, MosaicBlocks
from ettin_jax.kernels.mosaic_forward import forward

# 64-key forward tiles: a 256-row sequence has 4 key tiles, so the 2-slot ring wraps around.
BLOCKS = MosaicBlocks(block_kv=64)
TOLERANCE = 1e-2  # relative (Frobenius) error of bfloat16 outputs and gradients


@pytest.fixture(scope="module", autouse=True)
def _compile_interpreter_threads_once():
    """jax 0.10's Mosaic GPU interpreter recompiles every simulated thread's program for every
    CTA (its per-call closure defeats jax's compilation cache), ~3 s each here. jax 0.11 made the
    function top-level; this backports that for this module (same programs, ~10x faster)."""
    try:
        # pylint: disable-next=import-outside-toplevel
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        yield
        return
    if tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11) or hasattr(thread_map,
                                                                                "_run"):
        yield
        return

    def run(jaxpr, consts, *args):
        jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr(jaxpr, consts, *args):
        jax.jit(run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()(
            consts, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(thread_map, "_run_jaxpr", run_jaxpr)
        yield


def _segments(seq):
    """`[2, seq]`: row 0 has a document boundary inside a key tile (40), a document spanning
    tiles ([40, 150)) and padding (0) at the end; row 1 has a boundary on a tile edge (128)."""
    ids = np.ones((2, seq), np.int32)
    ids[0, 40:150], ids[0, 150:seq - 10], ids[0, seq - 10:] = 2, 3, 0
    ids[1, 128:] = 2
    return jnp.asarray(ids)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _out_and_grads(attention_fn, q, k, v, d_out):
    """`[out, dq, dk, dv]` of `attention_fn(q, k, v)` for the cotangent `d_out`, from one jitted
    call that is waited for. The interpreter's callbacks dispatch jax operations on the CPU
    device while its kernels run; eager operations dispatched from the test's thread meanwhile
    (the vjp's glue, the reference) deadlocked with them in 7 of 12 runs with the windowed cases
    here, before they ran this way."""
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attention_fn, q, k, v)
        return [out, *vjp(d_out)]
    return jax.block_until_ready(jax.jit(run)(q, k, v, d_out))


def _inputs(seq, count=4, seed=0):
    rng = np.random.RandomState(seed)
    return [jnp.asarray(rng.randn(2, seq, 2, 64), jnp.bfloat16) for _ in range(count)]


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (False, (32, 32)), (True, (48, 0))])
def test_output_and_gradients_match_reference(causal, window, capfd):
    """Forward and dq/dk/dv (Mosaic backward) against xla_attention in float32 math on bf16
    inputs: packed documents with padding, seq 200 (padded to 256 inside), batch 2, 2 heads;
    global layers and windows narrower than a 64-key tile (local layers: the same kernels on
    narrower intervals, so a CTA's rows mix visible, partly visible and invisible key tiles).
    The causal global case also runs the interpreter's race detector over all three kernels:
    it orders SMEM loads/stores and TMA copies by the barriers (not wgmma operand reads), so a
    ring slot released before its lse/delta are read is caught."""
    q, k, v, d_out = _inputs(200)
    kw = dict(segment_ids=_segments(200), causal=causal, window_size=window)
    detect_races = causal and window == (-1, -1)
    params = InterpretGPUParams(detect_races=detect_races)
    out, *grads = _out_and_grads(lambda q, k, v: mosaic_attention(
        q, k, v, block_sizes=BLOCKS, interpret=params, **kw), q, k, v, d_out)
    if detect_races:  # the detector prints each race it finds; its state is per kernel
        assert not gpu_callbacks.get_races().races_found
        assert "RACE DETECTED" not in capfd.readouterr().out
    expected = _out_and_grads(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v, d_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], [out, *grads], expected):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _rel(a, b) <= TOLERANCE, (name, _rel(a, b))
    padding = np.asarray(kw["segment_ids"]) == 0
    assert (np.asarray(out, np.float32)[padding] == 0).all()  # rows that see nothing are 0
    assert (np.asarray(grads[0], np.float32)[padding] == 0).all()


def test_windowed_layers_visit_only_the_tiles_near_the_diagonal():
    """At 8192 a (64, 64) window leaves each forward CTA (128 query rows) at most 3 key tiles
    of 128, where a global layer visits all 64."""
    seq = 8192
    spans = {}
    for window in [(-1, -1), (64, 64)]:
        k_start, k_end, _, _ = (jnp.broadcast_to(x, (1, seq)) for x in attention_intervals(
            seq, seq, window_size=window))
        ranges = np.asarray(tile_ranges(k_start, k_end, COMPUTE_WARPGROUPS * 64, 128))
        spans[window] = ranges[..., 3] - ranges[..., 0]
    assert (spans[(-1, -1)] == seq // 128).all()
    assert spans[(64, 64)].max() == 3 and spans[(64, 64)].min() == 2  # first and last tiles


def test_forward_lse_matches_reference():
    """The saved log-sum-exp (log2 units, +inf for rows that see no key) of a causal packed
    sequence, against the reference logits' logsumexp."""
    seq = 256
    q, k, v = _inputs(seq, 3, seed=1)
    segment_ids = _segments(seq)
    k_start, k_end, _, _ = (jnp.broadcast_to(x, (2, seq)) for x in attention_intervals(
        seq, seq, segment_ids=segment_ids, causal=True))
    ranges = tile_ranges(k_start, k_end, COMPUTE_WARPGROUPS * BLOCKS.block_q, BLOCKS.block_kv)
    out, lse = jax.block_until_ready(forward(q, k, v, k_start, k_end, ranges, scale=0.125,
                                             blocks=BLOCKS, interpret=InterpretGPUParams()))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * 0.125
    visible = attention_mask(seq, seq, segment_ids=segment_ids, causal=True)[:, None]
    expected = jax.nn.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1) * LOG2E
    seen = np.asarray(jnp.broadcast_to(visible.any(-1), expected.shape))
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(expected)[seen], atol=2e-3)
    assert (np.asarray(lse)[~seen] == np.inf).all()
    ref = xla_attention(q, k, v, segment_ids=segment_ids, causal=True, sm_scale=0.125)
    assert _rel(out, ref) <= TOLERANCE


def test_unpacked_causal_with_triton_backward_matches_reference():
    """No segment_ids (one document per row), causal, a length that is a multiple of the tiles,
    default forward tiles, and the Triton backward fed with the Mosaic forward's residuals."""
    q, k, v, d_out = _inputs(256, seed=2)
    blocks = MosaicBlocks(backward="triton")
    results = _out_and_grads(lambda q, k, v: mosaic_attention(q, k, v, causal=True,
                                                              block_sizes=blocks), q, k, v, d_out)
    expected = _out_and_grads(lambda q, k, v: xla_attention(q, k, v, causal=True), q, k, v, d_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], results, expected):
        assert _rel(a, b) <= TOLERANCE, (name, _rel(a, b))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [1024, 8192])
def test_forward_and_backward_lower_for_cuda(seq, causal):
    """The real GPU path (interpret=False) goes through Mosaic GPU's lowering (layouts,
    transforms, TMA shapes) on this CPU-only machine: forward, dK/dV and dQ kernels."""
    q = jax.ShapeDtypeStruct((2, seq, 12, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def loss(q, k, v, seg):
        out = mosaic_attention(q, k, v, segment_ids=seg, causal=causal, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3


def test_impl_mosaic_routes_local_layers_to_triton():
    """attention(impl='mosaic'): windowed layers give exactly flash_attention's (Triton kernel,
    interpret mode) output, global layers exactly mosaic_attention's."""
    q, k, v = (x[:1, :, :1] for x in _inputs(128, 3, seed=3))
    for window in [(64, 64), (64, 0)]:
        kw = dict(causal=window[1] == 0, window_size=window)
        np.testing.assert_array_equal(attention(q, k, v, impl="mosaic", **kw),
                                      flash_attention(q, k, v, **kw))
    # Jitted and waited for (see _out_and_grads).
    routed = jax.block_until_ready(jax.jit(
        lambda q, k, v: attention(q, k, v, impl="mosaic", causal=True))(q, k, v))
    direct = jax.block_until_ready(jax.jit(
        lambda q, k, v: mosaic_attention(q, k, v, causal=True))(q, k, v))
    np.testing.assert_array_equal(routed, direct)


@pytest.mark.parametrize("args,match", [
    (dict(dim=32), "multiple of 64"),
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
])
def test_unsupported_arguments_raise(args, match):
    q = jnp.zeros((1, 128, 1, args.pop("dim", 64)), args.pop("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=match):
        mosaic_attention(q, q, q, **args)
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicBlocks(block_kv=96).check()
