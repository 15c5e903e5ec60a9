"""Attention forward+backward benchmark on a GPU (not part of the test suite).

For each Ettin layer kind (encoder global/local, decoder global/local, and a packed-documents
variant) at seq 1024 and 8192, times forward+backward of every available implementation:
`pallas` (ettin_jax.kernels.flash_attention), `mosaic` (the Mosaic GPU kernels of
ettin_jax.kernels.mosaic_attention, on every layer: attention(impl="mosaic") runs them on global
layers and the `pallas` kernels on local ones), `mosaic-triton-bwd` (Mosaic forward + Triton
backward), `cudnn` (jax.nn, masks it supports), `xla` (ettin_jax.attention.xla_attention,
dense), and jax's own Pallas ops where they apply
(`jax-triton-mha`: causal/bidirectional, no window; `jax-mgpu`: bidirectional only).
TFLOP/s count only visible (unmasked) query-key pairs: 4*D flops per pair forward, 2.5x that
backward (FlashAttention's convention, the dq recomputation not counted).

Usage (on the GPU machine):
  python bench/attention.py --check          # kernel vs XLA reference on the GPU, fwd + grads
  python bench/attention.py --results        # the table, appended to bench/RESULTS.md
  python bench/attention.py --sweep          # block-size sweep for the pallas and mosaic kernels
"""
from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402
from bench import results  # noqa: E402
from ettin_jax.attention import xla_attention  # noqa: E402
from ettin_jax.kernels import (BlockSizes, cudnn_attention, flash_attention,  # noqa: E402
                               mosaic_attention)
from ettin_jax.kernels.mosaic_common import MosaicBlocks  # noqa: E402
from ettin_jax.kernels.intervals import attention_intervals  # noqa: E402

HEADS, HEAD_DIM = 12, 64  # ettin-150m: hidden 768 = 12 x 64; every Ettin size has head_dim 64
LAYERS = {  # name: (causal, window_size, packed)
    "enc-global": (False, (-1, -1), False),
    "enc-local": (False, (64, 64), False),
    "dec-global": (True, (-1, -1), False),
    "dec-local": (True, (64, 0), False),
    "enc-global-packed": (False, (-1, -1), True),
}
BATCH = {1024: 16, 8192: 2}  # 16k query rows x 12 heads either way


def packed_segments(batch: int, seq: int, rng) -> np.ndarray:
    """`[batch, seq]` documents of random length 100..seq/2, then ~5% padding (id 0)."""
    ids = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = 0, 1
        end = int(seq * 0.95)
        while pos < end:
            n = int(rng.integers(100, max(101, seq // 2)))
            ids[b, pos:min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return ids


def visible_pairs(batch, seq, segment_ids, causal, window):
    """Number of visible (query, key) pairs of one head over the batch."""
    k_start, k_end, _, _ = attention_intervals(seq, seq, segment_ids=segment_ids, causal=causal,
                                               window_size=window)
    return int(jnp.sum(jnp.broadcast_to(jnp.maximum(k_end - k_start, 0), (batch, seq))))


def implementations():
    impls = {
        "pallas": lambda q, k, v, **kw: flash_attention(q, k, v, **kw),
        "mosaic": lambda q, k, v, **kw: mosaic_attention(q, k, v, **kw),
        "mosaic-triton-bwd": lambda q, k, v, **kw: mosaic_attention(
            q, k, v, block_sizes=MosaicBlocks(backward="triton"), **kw),
        "cudnn": lambda q, k, v, **kw: cudnn_attention(q, k, v, **kw),
        "xla": lambda q, k, v, **kw: xla_attention(q, k, v, **kw),
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_triton

        def jax_triton_mha(q, k, v, *, segment_ids, causal, window_size):
            if window_size != (-1, -1):
                raise ValueError("no window support")
            return jax_triton.mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5,
                                  causal=causal,
                                  block_sizes=jax_triton.BlockSizes(128, 64, 64, 128, 128, 64))
        impls["jax-triton-mha"] = jax_triton_mha
    except ImportError as e:
        print("jax Triton mha unavailable:", e)
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_mgpu

        def jax_mgpu_attention(q, k, v, *, segment_ids, causal, window_size):
            if window_size != (-1, -1) or segment_ids is not None or causal:
                raise ValueError("bidirectional unmasked only (its causal has no backward)")
            config = jax_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                           block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                                           block_kv_dq=64)
            return jax_mgpu.attention(q, k, v, config)
        impls["jax-mgpu"] = jax_mgpu_attention
    except ImportError as e:
        print("jax Mosaic GPU attention unavailable:", e)
    return impls


def time_fn(fn, args, reps=20, rounds=5):
    """Median over rounds of the mean time of `reps` back-to-back calls (seconds)."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps)
    return float(np.median(times))


def fwd_bwd(impl, mask_kw):
    def loss(q, k, v, do):
        out = impl(q, k, v, **mask_kw)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def run_table(impl_names, seqs, layers, dtype, batch_override=0):
    impls = implementations()
    rng = np.random.default_rng(0)
    rows = []
    for seq in seqs:
        batch = batch_override or BATCH.get(seq, max(1, 16384 // seq))
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, do = (jax.random.normal(x, (batch, seq, HEADS, HEAD_DIM), dtype) for x in keys)
        for layer in layers:
            causal, window, packed = LAYERS[layer]
            seg = jnp.asarray(packed_segments(batch, seq, rng)) if packed else None
            pairs = visible_pairs(batch, seq, seg, causal, window)
            flops = 4 * HEAD_DIM * HEADS * pairs * 3.5
            mask_kw = dict(segment_ids=seg, causal=causal, window_size=window)
            for name in impl_names:
                if name not in impls:
                    continue
                # --allow_cpu is a smoke test of the flags (interpreted kernels): time one call.
                reps = 3 if name == "xla" and seq > 4096 else 10
                timing = dict(reps=reps) if jax.default_backend() == "gpu" else dict(reps=1,
                                                                                    rounds=1)
                try:
                    t = time_fn(fwd_bwd(impls[name], mask_kw), (q, k, v, do), **timing)
                    rows.append((seq, batch, layer, name, t * 1e3, flops / t / 1e12))
                    print(f"{seq:6d} {batch:3d} {layer:18s} {name:15s} {t*1e3:9.3f} ms "
                          f"{flops / t / 1e12:7.1f} TFLOP/s", flush=True)
                except Exception as e:  # pylint: disable=broad-except
                    msg = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
                    rows.append((seq, batch, layer, name, None, msg))
                    print(f"{seq:6d} {batch:3d} {layer:18s} {name:15s} n/a: {msg}", flush=True)
    return rows


def write_results(rows, dtype, note):
    results.append(
        f"attention fwd+bwd, {jnp.dtype(dtype).name}, heads {HEADS} x head_dim {HEAD_DIM}, "
        f"{results.utc_now()}",
        ["seq", "batch", "layer", "impl", "ms (fwd+bwd)", "TFLOP/s (visible pairs)"],
        [[seq, batch, layer, name, "n/a" if ms is None else f"{ms:.3f}",
          tflops if ms is None else f"{tflops:.1f}"]
         for seq, batch, layer, name, ms, tflops in rows],
        where=results.machine(), note=note)


def check(dtypes, head_dims):
    """Kernel vs the XLA reference on this GPU: forward and dq/dk/dv, fresh random inputs."""
    ok = True
    seg_np = np.zeros((2, 1000), np.int32)
    seg_np[0, :300], seg_np[0, 300:700], seg_np[0, 700:990] = 1, 2, 3
    seg_np[1, :1000] = 7
    seg_np[1, :77] = 4
    tols = {"float32": 1e-4, "bfloat16": 1e-2}
    for dtype in dtypes:
        tol = tols[jnp.dtype(dtype).name]
        for head_dim in head_dims:
            for causal, window, packed in [(False, (-1, -1), False), (False, (64, 64), True),
                                           (True, (-1, -1), True), (True, (63, 0), False),
                                           (True, (64, 0), True), (False, (64, 64), False)]:
                keys = jax.random.split(jax.random.key(head_dim + causal), 4)
                q, k, v, do = (jax.random.normal(x, (2, 1000, 4, head_dim), dtype) for x in keys)
                kw = dict(segment_ids=jnp.asarray(seg_np) if packed else None, causal=causal,
                          window_size=window)
                start = time.perf_counter()
                results = []
                # The Mosaic kernels cover 16-bit q, k, v with head_dim % 64 == 0.
                mosaic = head_dim % 64 == 0 and jnp.dtype(dtype) != jnp.float32
                impls = [("pallas", flash_attention)] + ([("mosaic", mosaic_attention)]
                                                         if mosaic else [])
                with jax.default_matmul_precision("float32"):  # no TF32 in the reference
                    for _, impl in impls + [("xla", xla_attention)]:
                        out, vjp = jax.vjp(jax.jit(functools.partial(impl, **kw)), q, k, v)
                        results.append([out, *vjp(do)])
                for (name, _), result in zip(impls, results):
                    errs = []
                    for a, b in zip(result, results[-1]):
                        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                        errs.append(np.linalg.norm(a - b) / np.linalg.norm(b)
                                    if np.isfinite(a).all() else np.inf)
                    good = max(errs) <= tol
                    ok &= good
                    print(f"check {name:6s} {jnp.dtype(dtype).name:8s} d={head_dim} "
                          f"causal={causal!s:5} window={window} packed={packed!s:5} "
                          f"out/dq/dk/dv rel err {' '.join(f'{e:.1e}' for e in errs)} "
                          f"{'ok' if good else 'FAIL'} ({time.perf_counter() - start:.1f} s)",
                          flush=True)
    # f32 bound: Triton f32 dots are IEEE under the float32 matmul precision set above (TF32
    # without it, as XLA's), but exp2 and accumulation order differ.
    print("CHECK", "PASSED" if ok else "FAILED")
    return ok


SWEEP = [
    BlockSizes(),
    BlockSizes(block_k_dkv=128, block_q_dq=128),  # the first default, before the sweep
    BlockSizes(split_loops=False),
    BlockSizes(block_q=128, block_k=128),
    BlockSizes(block_q=64, block_k=64),
    BlockSizes(num_stages=3, num_stages_bwd=3),
    BlockSizes(num_warps=8, num_warps_bwd=8),
    BlockSizes(block_q_dkv=128, block_k_dkv=128, block_q_dq=128, block_k_dq=128,
               num_warps_bwd=8),
    BlockSizes(block_q_dkv=32, block_k_dkv=128, block_q_dq=128, block_k_dq=32),
]


MOSAIC_SWEEP = [
    MosaicBlocks(),
    MosaicBlocks(block_kv=64),
    MosaicBlocks(stages=3),
    MosaicBlocks(block_kv=64, stages=4),
    MosaicBlocks(block_q_bwd=128, block_kv_bwd=64),
    MosaicBlocks(block_q_bwd=64, block_kv_bwd=128),
    MosaicBlocks(stages_bwd=3),
    MosaicBlocks(backward="triton"),
]


def sweep(seqs, layers, dtype):
    """Forward-only and forward+backward times of each BlockSizes in SWEEP, each MosaicBlocks
    in MOSAIC_SWEEP and of jax's mha (global layers)."""
    for seq in seqs:
        batch = BATCH[seq]
        keys = jax.random.split(jax.random.key(1), 4)
        q, k, v, do = (jax.random.normal(x, (batch, seq, HEADS, HEAD_DIM), dtype) for x in keys)
        for layer in layers:
            causal, window, _ = LAYERS[layer]
            if window == (-1, -1):
                from jax.experimental.pallas.ops.gpu import attention as jax_triton
                mha_kw = dict(sm_scale=HEAD_DIM ** -0.5, causal=causal,
                              block_sizes=jax_triton.BlockSizes(128, 64, 64, 128, 128, 64))
                fwd = jax.jit(lambda q, k, v: jax_triton.mha(q, k, v, None, **mha_kw))
                both = fwd_bwd(lambda q, k, v, **_: jax_triton.mha(q, k, v, None, **mha_kw), {})
                print(f"sweep {seq:5d} {layer:11s} fwd {time_fn(fwd, (q, k, v))*1e3:7.3f} ms "
                      f"fwd+bwd {time_fn(both, (q, k, v, do))*1e3:7.3f} ms jax-triton-mha",
                      flush=True)
            kernels = [(flash_attention, blocks) for blocks in SWEEP]
            kernels += [(mosaic_attention, blocks) for blocks in MOSAIC_SWEEP]
            for kernel, blocks in kernels:
                kw = dict(causal=causal, window_size=window, block_sizes=blocks)
                fwd = jax.jit(lambda q, k, v, kernel=kernel, kw=kw: kernel(q, k, v, **kw))
                both = fwd_bwd(lambda q, k, v, kernel=kernel, kw=kw, **_: kernel(q, k, v, **kw),
                               {})
                try:
                    tf = time_fn(fwd, (q, k, v))
                    tb = time_fn(both, (q, k, v, do))
                    print(f"sweep {seq:5d} {layer:11s} fwd {tf*1e3:7.3f} ms fwd+bwd "
                          f"{tb*1e3:7.3f} ms {blocks}", flush=True)
                except Exception as e:  # pylint: disable=broad-except
                    print(f"sweep {seq:5d} {layer:11s} FAILED {blocks}: "
                          f"{str(e).splitlines()[0][:200]}", flush=True)


def define_flags():
    flags.DEFINE_bool("check", False, "correctness vs XLA, then exit")
    flags.DEFINE_string("check_dtypes", "bfloat16,float32", "with --check: dtypes to check")
    flags.DEFINE_string("check_head_dims", "64,128", "with --check: head dims to check")
    flags.DEFINE_bool("sweep", False, "block-size sweep, then exit")
    flags.DEFINE_string("seqs", "1024,8192", "sequence lengths")
    flags.DEFINE_string("layers", ",".join(LAYERS), "layer kinds")
    flags.DEFINE_string("impls", "pallas,mosaic,mosaic-triton-bwd,cudnn,xla,jax-triton-mha,"
                        "jax-mgpu", "implementations")
    flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
    results.define_flags()
    flags.DEFINE_integer("batch", 0, "rows per call (default: 16k query rows: 16 at 1024, 2 at 8192)")
    flags.DEFINE_bool("allow_cpu", False, "run on CPU too (smoke test of the flags: kernels in "
                      "interpret mode; mosaic needs XLA_FLAGS=--xla_force_host_platform_device_"
                      "count=4 on a 2-core machine, see mosaic_attention's interpret)")


def main(argv):
    args = flags.FLAGS
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        raise cli.UserError("bench/attention.py needs a GPU (jax.default_backend() is "
                            f"{jax.default_backend()!r})")
    print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
    seqs = [int(s) for s in args.seqs.split(",")]
    layers = args.layers.split(",")
    dtype = jnp.dtype(args.dtype)
    if args.check:
        head_dims = [int(d) for d in args.check_head_dims.split(",")]
        return 0 if check(args.check_dtypes.split(","), head_dims) else 1
    if args.sweep:
        sweep(seqs, layers, dtype)
        return 0
    rows = run_table(args.impls.split(","), seqs, layers, dtype, args.batch)
    if args.results:
        write_results(rows, dtype, args.note)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
