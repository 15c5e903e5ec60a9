"""Pallas flash attention (interpret mode on CPU) and the cuDNN wrapper against the XLA reference,
and the GPU lowering of every variant on this CPU-only machine."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ettin_tiny
from ettin_jax.attention import (attention, attention_mask, mask_from_scope, mask_scope,
                                 xla_attention)
from ettin_jax.kernels import BlockSizes, cudnn_attention, flash_attention
from ettin_jax.kernels.cudnn import cudnn_mask_support
from ettin_jax.kernels.flash_attention import (KERNEL_DOTS, flash_attention_from_intervals,
                                              kernel_flops, tile_loop_ranges)
from ettin_jax.kernels.intervals import attention_intervals
from ettin_jax.model import EttinModel

# {bidirectional, causal} x {no window, the encoder's (64, 64), the decoder's window}: the
# decoder's window is (63, 0) in transformers' semantics and (64, 0) in the original training.
MASKS = {
    "bidir": (False, (-1, -1)), "bidir_local": (False, (64, 64)),
    "bidir_decoder_window": (False, (63, 0)),
    "causal": (True, (-1, -1)), "causal_local": (True, (64, 64)),
    "causal_decoder_window": (True, (63, 0)), "causal_training_window": (True, (64, 0)),
}
# Small tiles so that a 200..256-token sequence has many tiles: loops start and stop inside the
# sequence, and masked and unmasked ranges both occur.
SMALL = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                   block_k_dq=16)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def h100_mesh() -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh of an H100, to lower for a GPU on this CPU-only machine: the
    Triton lowering reads the target's compute capability off a device, which jax >= 0.11 no
    longer assumes without a GPU. Auto axes, as ettin_jax.sharding.make_mesh builds them (jax
    0.11's default is Explicit, under which interpreted Pallas rejects its own block updates)."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                       platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("data",), abstract_device=h100,
                                     axis_types=(jax.sharding.AxisType.Auto,))


def _packed(batch, seq, rng):
    """`[batch, seq]` contiguous documents of random lengths, then padding (0) at the end."""
    ids = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        end = seq - rng.randint(1, seq // 8)
        cuts = np.sort(rng.choice(np.arange(1, end), size=3, replace=False))
        for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end])):
            ids[b, lo:hi] = doc + 1
    return ids


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seq", [256, 200])
def test_intervals_equal_the_mask_rule(seq, packed):
    """k/q intervals describe exactly the reference's mask, including padding and pad-to-block."""
    padded = 256
    seg = jnp.asarray(_packed(2, seq, np.random.RandomState(seq))) if packed else None
    seg_padded = None if seg is None else jnp.pad(seg, ((0, 0), (0, padded - seq)))
    j = np.arange(padded)
    for causal, window in MASKS.values():
        k_start, k_end, q_start, q_end = (np.broadcast_to(np.asarray(x), (2, padded)) for x in
                                          attention_intervals(padded, seq, segment_ids=seg_padded,
                                                              causal=causal, window_size=window))
        rows = (j[None, None] >= k_start[:, :, None]) & (j[None, None] < k_end[:, :, None])
        cols = (j[None, :, None] >= q_start[:, None, :]) & (j[None, :, None] < q_end[:, None, :])
        expected = np.zeros((2, padded, padded), bool)
        expected[:, :seq, :seq] = np.broadcast_to(
            attention_mask(seq, seq, segment_ids=seg, causal=causal, window_size=window),
            (2, seq, seq))
        np.testing.assert_array_equal(rows, expected, err_msg=f"{causal} {window}")
        np.testing.assert_array_equal(cols, expected, err_msg=f"{causal} {window}")
        empty = ~expected.any(axis=2)
        assert (k_start[empty] == padded).all() and (k_end[empty] == 0).all()


@pytest.mark.parametrize("dtype,seq,head_dim", [
    (jnp.float32, 256, 64), (jnp.float32, 200, 128),
    (jnp.bfloat16, 200, 64), (jnp.bfloat16, 256, 128)])
def test_kernel_matches_reference_on_every_mask(dtype, seq, head_dim):
    """Forward and dq/dk/dv against xla_attention for every mask, packed or not, on fresh inputs.

    One compilation serves all masks: the kernels see the mask only as interval arrays."""
    batch, heads = 2, 2

    @jax.jit
    def run(q, k, v, do, intervals):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention_from_intervals(
            q, k, v, intervals, block_sizes=SMALL, interpret=True), q, k, v)
        return out, vjp(do)
    padded = -(-seq // SMALL.seq_multiple) * SMALL.seq_multiple
    rng = np.random.RandomState(seq + head_dim)
    failures = []
    for name, (causal, window) in MASKS.items():
        for packed in (False, True):
            seg = jnp.asarray(_packed(batch, seq, rng)) if packed else None
            q, k, v, do = (jnp.asarray(rng.randn(batch, seq, heads, head_dim), dtype)
                           for _ in range(4))
            kw = dict(segment_ids=seg, causal=causal, window_size=window)
            intervals = attention_intervals(
                padded, seq, causal=causal, window_size=window,
                segment_ids=None if seg is None else jnp.pad(seg, ((0, 0), (0, padded - seq))))
            out, grads = run(q, k, v, do, intervals)
            ref_out, ref_vjp = jax.vjp(lambda q, k, v, kw=kw: xla_attention(q, k, v, **kw),
                                       q, k, v)
            ref_grads = ref_vjp(do)
            for what, a, b in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads]):
                assert a.dtype == b.dtype == dtype
                if not np.isfinite(np.asarray(a, np.float32)).all():
                    failures.append(f"{name} packed={packed} {what}: not finite")
                elif _rel(a, b) > TOLERANCE[dtype]:
                    failures.append(f"{name} packed={packed} {what}: rel err {_rel(a, b):.2e}")
            if packed:  # rows that see no key are exactly zero
                assert (np.asarray(out, np.float32)[np.asarray(seg) == 0] == 0).all(), name
    assert not failures, failures


def test_public_entry_point_with_default_tiles():
    """attention(impl='pallas') -> flash_attention with the default (bf16, head_dim 64) tiles,
    at a length that is not a multiple of them, packed documents and a window, forward and
    gradients. (float32's default tiles are the size of SMALL's, which the test above runs.)"""
    dtype = jnp.bfloat16
    rng = np.random.RandomState(7)
    q, k, v, do = (jnp.asarray(rng.randn(1, 300, 2, 64), dtype) for _ in range(4))
    kw = dict(segment_ids=jnp.asarray(_packed(1, 300, rng)), causal=True, window_size=(64, 0))
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl="pallas", **kw), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v)
    for a, b in zip([out, *vjp(do)], [ref, *ref_vjp(do)]):
        assert _rel(a, b) <= TOLERANCE[dtype]


def test_sm_scale_and_odd_head_dim():
    """sm_scale is honoured, head_dim 40 is padded inside; interpret=None picks the interpreter
    on this CPU machine (the GPU lowering would raise here)."""
    rng = np.random.RandomState(3)
    q, k, v = (jnp.asarray(rng.randn(1, 70, 2, 40), jnp.float32) for _ in range(3))
    kw = dict(causal=False, window_size=(8, 8), sm_scale=0.3)
    assert _rel(flash_attention(q, k, v, block_sizes=SMALL, **kw), xla_attention(q, k, v, **kw)) <= 1e-5


def test_sharded_over_mesh_matches_reference():
    """Under a (data=2, fsdp=1, tensor=2) mesh the kernel runs per shard and still agrees."""
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(2, 100, 2, 64), jnp.float32) for _ in range(3))
    kw = dict(segment_ids=jnp.asarray(_packed(2, 100, rng)), causal=False, window_size=(64, 64))
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_sizes=SMALL, **kw))(q, k, v)
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", None, "tensor")
    assert _rel(out, xla_attention(q, k, v, **kw)) <= 1e-5


@pytest.mark.parametrize("mesh_shape,batch,heads,spec", [
    ((1, 1, 4), 2, 6, ()),          # 32m's 6 heads on tensor=4: heads whole on each shard
    ((4, 1, 1), 2, 2, ()),          # 2 rows on data=4: the batch whole as well
    ((2, 2, 1), 2, 2, ("data",)),   # 2 rows on data=2 x fsdp=2: split over data only
])
def test_sharded_over_a_mesh_that_does_not_divide_the_heads_or_batch(mesh_shape, batch, heads,
                                                                      spec):
    """A mesh axis that does not divide the heads (batch) leaves them whole, as it leaves
    parameters whole (sharding.LOGICAL_RULES), instead of failing in shard_map."""
    rng = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rng.randn(batch, 64, heads, 16), jnp.float32) for _ in range(3))
    kw = dict(segment_ids=jnp.asarray(_packed(batch, 64, rng)), causal=True, window_size=(16, 0))
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_sizes=SMALL, **kw))(q, k, v)
    assert out.shape == q.shape
    assert out.sharding.spec == jax.sharding.PartitionSpec(*spec)
    assert _rel(out, xla_attention(q, k, v, **kw)) <= 1e-5


def test_tiles_outside_the_intervals_are_skipped():
    """A (64, 64) window at 8k visits O(seq * window) tiles; packed documents skip cross-document
    tiles. Counted from the kernels' own loop bounds."""
    seq, block_q, block_k = 8192, 128, 64

    def visited(intervals, row_block, col_block):
        starts, ends = (x.reshape(-1, row_block) for x in intervals)
        ranges = jax.vmap(lambda s, e: jnp.stack(tile_loop_ranges(s, e, col_block)))(starts, ends)
        lo, full_lo, full_hi, hi = np.asarray(ranges).T
        assert (lo <= full_lo).all() and (full_lo <= full_hi).all() and (full_hi <= hi).all()
        return int((hi - lo).sum()), int((hi - lo - (full_hi - full_lo)).sum())

    k_start, k_end, q_start, q_end = (x[0] for x in attention_intervals(
        seq, seq, window_size=(64, 64)))
    tiles, masked = visited((k_start, k_end), block_q, block_k)
    assert tiles <= (seq // block_q) * ((block_q + 128) // block_k + 1)   # 5 of 128 per q tile
    assert masked <= tiles
    tiles, _ = visited((q_start, q_end), block_k, block_q)                  # dk/dv side
    assert tiles <= (seq // block_k) * ((block_k + 128) // block_q + 1)

    docs = np.repeat(np.arange(1, 9), seq // 8)[None]                       # 8 documents of 1k
    k_start, k_end, _, _ = (x[0] for x in attention_intervals(seq, seq, segment_ids=jnp.asarray(docs)))
    tiles, masked = visited((k_start, k_end), block_q, block_k)
    assert tiles == (seq // block_q) * (1024 // block_k) and masked == 0    # 1/8 of all tiles


@pytest.mark.parametrize("mask", list(MASKS))
def test_kernel_flops_count_the_tiles_holding_visible_pairs(mask):
    """kernel_flops against the mask itself: on one-document rows every mask's visible keys
    of a tile are one run of tiles, so the kernels visit exactly the tiles that hold a visible
    pair (counted from attention_mask), each costing its dots over the whole tile."""
    causal, window = MASKS[mask]
    batch, seq, heads, head_dim = 2, 512, 3, 64
    visible = np.asarray(attention_mask(seq, seq, causal=causal, window_size=window))[0]

    def tiles(rows, cols, transpose=False):
        grid = visible.T if transpose else visible
        return int(grid.reshape(seq // rows, rows, seq // cols, cols).any(axis=(1, 3)).sum())

    blocks = BlockSizes()    # bfloat16's default tiles at head_dim 64
    visits = {"ettin_flash_fwd": tiles(blocks.block_q, blocks.block_k) * blocks.block_q * blocks.block_k,
              "ettin_flash_dkv": tiles(blocks.block_k_dkv, blocks.block_q_dkv, transpose=True)
              * blocks.block_k_dkv * blocks.block_q_dkv,
              "ettin_flash_dq": tiles(blocks.block_q_dq, blocks.block_k_dq)
              * blocks.block_q_dq * blocks.block_k_dq}
    flops = kernel_flops(batch, seq, heads, head_dim, "bfloat16", causal, window)
    assert flops == {name: KERNEL_DOTS[name] * 2 * visits[name] * head_dim * batch * heads
                     for name in KERNEL_DOTS}
    # Never less than the visible pairs' work; a full mask is exactly it.
    assert flops["ettin_flash_fwd"] >= 4 * visible.sum() * head_dim * batch * heads
    if mask == "bidir":
        assert flops["ettin_flash_fwd"] == 4 * seq * seq * head_dim * batch * heads


def test_kernel_flops_by_hand():
    """seq 256, tiles (128, 64) forward and (64, 64) backward: a full mask is 2 x 4 forward
    tiles; causal visits 2 + 4 of them, and key tile j of dk/dv is seen by query tiles j..3."""
    full = kernel_flops(1, 256, 1, 64, "bfloat16", False, (-1, -1))
    causal = kernel_flops(1, 256, 1, 64, "bfloat16", True, (-1, -1))
    tile_fwd, tile_bwd = 128 * 64 * 64 * 2, 64 * 64 * 64 * 2
    assert full == {"ettin_flash_fwd": 8 * 2 * tile_fwd, "ettin_flash_dkv": 16 * 4 * tile_bwd,
                    "ettin_flash_dq": 16 * 3 * tile_bwd}
    assert causal == {"ettin_flash_fwd": 6 * 2 * tile_fwd, "ettin_flash_dkv": 10 * 4 * tile_bwd,
                      "ettin_flash_dq": 10 * 3 * tile_bwd}


def test_mask_scope_names_the_mask_in_compiled_op_names():
    """attention() runs under a scope naming its mask; it reaches the forward's and the
    backward's op names (what bench/hlo_profile.py reads) and parses back to the mask."""
    for causal, window in MASKS.values():
        assert mask_from_scope(f"jit(f)/jvp({mask_scope(causal, window)})/dot") == (causal, window)
    assert mask_from_scope("jit(train_step)/transpose(jvp())/add_any") is None

    q = jnp.ones((1, 16, 2, 8), jnp.float32)

    def loss(q):
        return jnp.sum(attention(q, q, q, impl="xla", causal=True, window_size=(4, 0)))

    text = jax.jit(jax.grad(loss)).lower(q).compile().as_text()
    names = set(re.findall(r'op_name="([^"]*)"', text))
    scoped = [n for n in names if mask_from_scope(n) == (True, (4, 0))]
    assert any(n.startswith("jit(loss)/jvp(attention_causal_window_4_0)") for n in scoped)
    assert any("transpose(jvp(attention_causal_window_4_0))" in n for n in scoped)


@pytest.mark.parametrize("dtype,head_dim", [(jnp.bfloat16, 64), (jnp.float32, 128)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_every_variant_lowers_for_gpu(mask, dtype, head_dim):
    """Forward and backward lower to Triton kernels for CUDA on this CPU-only machine: catches
    what interpret mode accepts and the GPU backend rejects."""
    causal, window = MASKS[mask]
    q = jax.ShapeDtypeStruct((2, 300, 2, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def f(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, causal=causal, window_size=window,
                               interpret=False)

    def loss(q, k, v, seg):
        return jnp.sum(f(q, k, v, seg).astype(jnp.float32))

    for fn, kernels in ((f, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
        with jax.sharding.use_abstract_mesh(h100_mesh()):
            text = jax.jit(fn).trace(q, q, q, seg).lower(lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == kernels


@pytest.mark.parametrize("mask", ["bidir", "causal", "causal_local", "causal_decoder_window",
                                  "causal_training_window"])
def test_cudnn_mask_mapping_matches_reference(mask):
    """The arguments cudnn_attention passes to jax.nn express the reference mask (checked with
    jax.nn's XLA implementation, which takes the same arguments, since there is no cuDNN here)."""
    causal, window = MASKS[mask]
    is_causal, local_window = cudnn_mask_support(causal=causal, window_size=window)
    rng = np.random.RandomState(5)
    q, k, v = (jnp.asarray(rng.randn(1, 150, 2, 64), jnp.float32) for _ in range(3))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, local_window_size=local_window,
                                       implementation="xla")
    assert _rel(out, xla_attention(q, k, v, causal=causal, window_size=window)) <= 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(segment_ids=jnp.ones((1, 64), jnp.int32)), "segment_ids"),
    (dict(window_size=(64, 64)), "bidirectional window"),
    (dict(window_size=(63, 0)), "bidirectional window")])
def test_cudnn_rejects_masks_it_cannot_express(kw, match):
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        cudnn_attention(q, q, q, **kw)


def test_bad_arguments_raise():
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        flash_attention(q, q[:, :32], q[:, :32])
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, q, q, segment_ids=jnp.ones((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, block_sizes=BlockSizes(block_q=48))
    with pytest.raises(ValueError, match="block_q=0: must be a power of two"):
        flash_attention(q, q, q, block_sizes=BlockSizes(0, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="bfloat16/float16/float32"):
        flash_attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32))


def test_missing_triton_backend_is_a_clear_error(monkeypatch):
    """jax versions without Pallas' Triton backend get a message naming the alternatives."""
    # The package's `flash_attention` attribute is the function; the module is reached by name.
    monkeypatch.setattr(importlib.import_module("ettin_jax.kernels.flash_attention"),
                        "pl_triton", None)
    jax.clear_caches()   # the kernels are jitted: a trace cached by another test would not ask
    q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="attention_impl='cudnn' or 'xla'"):
        jax.jit(lambda q: flash_attention(q, q, q, interpret=False)).trace(q)


@pytest.mark.parametrize("arg", ["mlm", "clm"])
def test_model_logits_pallas_equal_xla(arg):
    """The tiny model's logits with attention_impl='pallas' (interpret mode) equal 'xla' on a
    packed row with padding; its local layers have windows, so every layer kind is used."""
    model = EttinModel(ettin_tiny.get_config(arg).model, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.RandomState(0)
    segment_ids = _packed(1, 150, rng)
    ids = jnp.asarray(rng.randint(0, 500, (1, 150)))
    positions = np.zeros_like(segment_ids)
    for doc in np.unique(segment_ids[segment_ids > 0]):
        positions[segment_ids == doc] = np.arange((segment_ids == doc).sum())
    logits = {}
    for impl in ("xla", "pallas"):
        model.attention_impl = impl
        # One jit per implementation (the model is a closed-over constant): compiling the whole
        # forward once is much faster than running the interpreted kernels op by op.
        logits[impl] = np.asarray(jax.jit(lambda *args: model(*args))(
            ids, jnp.asarray(segment_ids), jnp.asarray(positions)))
    reference, out = logits["xla"], logits["pallas"]
    real = segment_ids[0] != 0
    np.testing.assert_allclose(out[0, real], reference[0, real], atol=1e-4)


def test_layers_share_one_kernel_lowering_and_keep_their_op_names():
    """Every layer calls the same jitted kernels: the tiny model's gradient, lowered for a GPU,
    holds each Triton kernel (forward, dk/dv, dq) once, not a copy per layer (12, each a
    Triton lowering). The compiled program still names each call site's ops after its own
    layer's mask (what bench/hlo_profile.py prices kernels by)."""
    from ettin_jax.kernels.target import building_for
    model = EttinModel(ettin_tiny.get_config("mlm").model, rngs=nnx.Rngs(0))
    model.attention_impl = "pallas"
    model.eval()   # no dropout: its key count is state the loss would update
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def loss(params, ids, segment_ids):
        logits = nnx.merge(graphdef, params, rest)(ids, segment_ids, ids)
        return jnp.sum(logits.astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(h100_mesh()), building_for("gpu"):
        text = jax.jit(jax.grad(loss)).trace(params, ids, ids).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3

    # Interpreted on this CPU, compiled: two masks, each kernel's ops named after both.
    def stack(x):
        for window in ((-1, -1), (4, 4), (-1, -1), (4, 4)):
            x = attention(x, x, x, impl="pallas", window_size=window)
        return jnp.sum(x)

    compiled = jax.jit(jax.grad(stack)).lower(jnp.ones((1, 32, 1, 16))).compile().as_text()
    names = set(re.findall(r'op_name="([^"]*)"', compiled))
    for kernel in ("ettin_flash_fwd", "ettin_flash_dkv", "ettin_flash_dq"):
        masks = {mask_from_scope(name) for name in names if kernel in name} - {None}
        assert masks == {(False, (-1, -1)), (False, (4, 4))}, kernel


def test_kernels_follow_the_platform_being_built_for():
    """kernels.building_for("gpu") builds the Triton kernels (not their interpreted
    emulation) and makes attention_impl="auto" pick them, though this machine is a CPU: what
    compiling for a GPU from here (bench/aot_gpu.py) needs. Outside it, the CPU defaults."""
    from ettin_jax.attention import default_implementation
    from ettin_jax.kernels.target import building_for, target_platform
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

    def triton_calls(impl):
        fn = lambda q: attention(q, q, q, impl=impl, causal=True)  # noqa: E731
        text = jax.jit(fn).trace(q).lower(lowering_platforms=("cuda",)).as_text()
        return len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text))

    with jax.sharding.use_abstract_mesh(h100_mesh()):
        assert target_platform() == "cpu" and default_implementation() == "xla"
        assert triton_calls("pallas") == 0          # interpreted: plain XLA ops
        with building_for("gpu"):
            assert target_platform() == "gpu" and default_implementation() == "pallas"
            assert triton_calls("pallas") == 1
            assert triton_calls("auto") == 1
            with building_for("tpu"):
                assert default_implementation() == "splash"
            assert target_platform() == "gpu"
        assert target_platform() == "cpu"
    with pytest.raises(ValueError, match="expected 'gpu', 'tpu' or 'cpu'"):
        with building_for("cuda"):
            pass
