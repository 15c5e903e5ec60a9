"""Compile time of the model's loss + gradient (or of the whole train step) with the layer
groups scanned and unrolled.

    python bench/compile_time.py --config=configs/ettin_150m.py:mlm --batch=1 --seq_len=1024
    python bench/compile_time.py --config=configs/ettin_150m.py:mlm --step=train
    python bench/compile_time.py --config=configs/ettin_150m.py:mlm --step=train --target=h100
    python bench/compile_time.py --config=configs/ettin_150m.py:mlm --step=init --target=h100

Start-up of a run is dominated by XLA compiling the train step, and with
`config.model.scan_layers=False` every layer is traced and compiled apart. For each setting
of --scan (default: off, then on) this builds `jax.jit(jax.value_and_grad(loss))` of the
model in train mode (dropout re-keyed from an argument, as the train step does) with loss =
cross-entropy of the prediction head on every position (`ettin_jax.cross_entropy`, the
train step's loss), then times `.lower(...)` (tracing to StableHLO) and `.compile()` (XLA)
apart on abstract inputs: no parameter is materialised, nothing runs. The persistent
compilation cache is off, so each compile is a cold one. The optimizer update is left out:
its cost grows with the parameter count, not with how the layers are traced. `--step=train`
times the real jitted train step instead (`train.make_setup` on one device: micro-batch
loss and gradients, StableAdamW update, metrics), what a run compiles before its first step;
with --target=h100 XLA's GPU compiler does it for an H100 on this machine, without one
(bench/aot_gpu.py: the GPU compile minus autotuning, on this machine's cores). `--step=init`
times the run's params init program (`Setup.init_params`, no batch, --scan ignored) lowered
under `model_loader.init_lowering()` (threefry as jax's GPU kernel), then plainly.

`--passes=N` compiles each program under `jax.profiler.trace` and prints XLA's N costliest
compile stages by total time over its threads (its trace events: passes such as `priority-fusion`,
`CompileSingleModule` per kernel, `PTX->CUBIN`), to find what a cold start spends its time on.

With --results the figures are appended to bench/RESULTS.md (bench/results.py).
"""
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position
from bench import aot_gpu, results  # noqa: E402  # pylint: disable=wrong-import-position


def define_flags():
    config_flags.DEFINE_config_file("config", None, "FILE:ARG, e.g. configs/ettin_150m.py:mlm",
                                    lock_config=False)
    flags.DEFINE_integer("batch", 1, "rows of the traced batch")
    flags.DEFINE_integer("seq_len", 1024, "tokens per row")
    flags.DEFINE_list("scan", ["false", "true"], "config.model.scan_layers settings to time, in order")
    flags.DEFINE_enum("step", "loss_grad", ["loss_grad", "train", "init"], "what is compiled: "
                      "the model's loss + gradient, the whole train step of train.make_setup, "
                      "or its params init program (under init_lowering, then plain)")
    flags.DEFINE_string("remat", None, "override config.model.remat (none, full, dots)")
    flags.DEFINE_string("dtype", None, "override config.model.dtype (compute dtype)")
    flags.DEFINE_string("target", "", "with --step=train/init: compile for this GPU on a machine "
                        "without one (bench/aot_gpu.py: h100; nothing autotuned)")
    flags.DEFINE_integer("passes", 0, "also print XLA's N costliest compile stages per program")
    results.define_flags()
    flags.mark_flag_as_required("config")


FLAGS = flags.FLAGS


def _lower_and_compile(jitted, args=(), context=None, mesh=None) -> dict:
    """Seconds to lower `jitted(*args)` and to compile it (under `context()` and, with
    --target, building for the GPU of `mesh`), and the sizes of both programs' text."""
    import contextlib  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    with (aot_gpu.building_on(mesh) if FLAGS.target else contextlib.nullcontext(),
          (context or contextlib.nullcontext)()):
        lowered = jitted.lower(*args)
        lowered_at = time.perf_counter()
        compiled = _compile(lowered)
    return {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at,
            "stablehlo_chars": len(lowered.as_text()),
            "optimized_hlo_chars": len(compiled.as_text() or "")}


def _compile(lowered):
    """lowered.compile(); with --passes, under the profiler, printing the costliest stages."""
    if not FLAGS.passes:
        return lowered.compile()
    import tempfile  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from bench.train_step import thunk_durations  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            wall, monotonic = time.time(), time.perf_counter()
            compiled = lowered.compile()
            clock_step = (time.time() - wall) - (time.perf_counter() - monotonic)
        totals = thunk_durations(trace_dir)
    # The profiler stamps events with the system clock (CLOCK_REALTIME). A VM that is paused and
    # resumed has that clock set forward while the monotonic one is not: every stage running
    # across the step then looks that much longer than the compile took.
    if abs(clock_step) > 0.5:
        print(f"  the system clock stepped {clock_step:+.2f} s during this compile: stages "
              "running across it include the step", flush=True)
    # Python frames ("$file:line name") and the enclosing compile calls are not stages.
    stages = [(name, us) for name, us in totals.most_common() if not name.startswith("$")]
    for name, us in stages[:FLAGS.passes]:
        print(f"  {us / 1e6:7.2f} s  {name[:100]}", flush=True)
    return compiled


def _loss_and_grad(model_config):
    """The jitted (params, rest, input_ids, segment_ids, positions, labels, key) -> (loss, grads)
    and abstract arguments for it."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from ettin_jax import cross_entropy, model as model_lib  # pylint: disable=import-outside-toplevel

    def ctor():
        model = model_lib.EttinModel(model_config, rngs=nnx.Rngs(params=0, dropout=0))
        model.train()
        return model

    graphdef, params, rest = nnx.split(nnx.eval_shape(ctor), nnx.Param, ...)

    def loss(params, rest, input_ids, segment_ids, positions, labels, key):
        # Fresh Variables for the RNG state at this trace level, as train.py's step builds
        # them: the ones rebuilt from jit's arguments belong to the outer trace.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        nnx.reseed(model, dropout=key)
        hidden = model.hidden_states(input_ids, segment_ids, positions)
        nll, _ = cross_entropy.cross_entropy(
            model.head_features(hidden), model.tok_embeddings[...], model.decoder_bias[...],
            labels, dtype=model_config.compute_dtype)
        return nll

    tokens = jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.seq_len), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (params, rest, tokens, tokens, tokens, tokens, key)
    return jax.jit(jax.value_and_grad(loss)), args


def _train_step(config):
    """The run's jitted train step (one device), abstract arguments (state, one micro batch
    of --batch x --seq_len in the loader's format, learning rate, step) and its mesh."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from bench.batches import make_batch  # pylint: disable=import-outside-toplevel
    from ettin_jax import losses, sharding, train  # pylint: disable=import-outside-toplevel

    device = aot_gpu.device(FLAGS.target) if FLAGS.target else jax.devices()[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    setup = train.make_setup(config, mesh)
    batch = make_batch(config, FLAGS.batch, FLAGS.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    abstract_batch = {k: jax.ShapeDtypeStruct((1, *np.shape(batch[k])), jnp.int32,
                                              sharding=batch_sharding)
                      for k in losses.BATCH_KEYS[config.objective]}
    args = (setup.abstract_state, abstract_batch, jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32))
    return setup.train_step, args, mesh


def _time_init(config) -> list:
    """The init program compiled under model_loader.init_lowering(), then plainly."""
    import contextlib  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import model_loader, sharding, train  # pylint: disable=import-outside-toplevel
    device = aot_gpu.device(FLAGS.target) if FLAGS.target else jax.devices()[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    rows = []
    # The process's first compile pays one-time set-up: it goes to the kernel variant.
    for name, context in (("init_lowering", model_loader.init_lowering),
                          ("plain", contextlib.nullcontext)):
        init = train.make_setup(config, mesh).init_params
        rows.append(dict(program=f"init ({name})",
                         **_lower_and_compile(init, context=context, mesh=mesh)))
        print(f"{rows[-1]['program']:22} lower {rows[-1]['lower_s']:6.1f} s  compile "
              f"{rows[-1]['compile_s']:6.1f} s", flush=True)
    return rows


def _time(config, scan_layers: bool) -> dict:
    from ettin_jax import model as model_lib  # pylint: disable=import-outside-toplevel
    model = dict(config.model.to_dict(), scan_layers=scan_layers)
    if FLAGS.remat is not None:
        model["remat"] = FLAGS.remat
    if FLAGS.dtype is not None:
        model["dtype"] = FLAGS.dtype
    if not scan_layers:
        model["remat"] = "none"       # remat applies to the scanned groups only
    model_config = model_lib.ModelConfig.from_config(model)
    if FLAGS.step == "train":
        run_config = config.copy_and_resolve_references()
        run_config.model.update(model)
        step, args, mesh = _train_step(run_config)
    else:
        (step, args), mesh = _loss_and_grad(model_config), None
    return {"scan_layers": scan_layers, "remat": model_config.remat,
            **_lower_and_compile(step, args, mesh=mesh)}


def _append_results(config, rows):
    what = {"train": "the train step", "init": "the params init program"}.get(FLAGS.step,
                                                                              "loss + grad")
    if FLAGS.target:
        what += f" for an {FLAGS.target} (compiled on this machine, without one)"
    shape = "" if FLAGS.step == "init" else f", batch {FLAGS.batch} x {FLAGS.seq_len}"
    first = ["program"] if FLAGS.step == "init" else ["scan_layers", "remat"]
    results.append(
        f"Compile time of {what}, {config.size} {config.objective}{shape}, {results.utc_now()}",
        first + ["lower s", "compile s", "StableHLO chars", "optimized HLO chars"],
        [[r[key] for key in first] + [f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}",
                                      f"{r['stablehlo_chars']:,}", f"{r['optimized_hlo_chars']:,}"]
         for r in rows],
        where=results.machine(), note=FLAGS.note)


def main(argv):
    del argv
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_enable_compilation_cache", False)   # cold compiles only
    config = FLAGS.config
    if FLAGS.target:
        aot_gpu.host_on_cpu()
    if FLAGS.target and FLAGS.step == "loss_grad":
        raise cli.UserError("--target goes with --step=train or --step=init (their arguments "
                            "are placed on the target device)")
    if FLAGS.step == "init":
        rows = _time_init(config)
        if FLAGS.results:
            _append_results(config, rows)
        return 0
    rows = []
    for text in FLAGS.scan:
        if text.lower() not in ("true", "false"):
            raise cli.UserError(f"--scan={text!r}: expected a list of true/false")
        row = _time(config, text.lower() == "true")
        print(f"scan_layers={row['scan_layers']!s:5} remat={row['remat']:4} "
              f"lower {row['lower_s']:6.1f} s  compile {row['compile_s']:6.1f} s  "
              f"StableHLO {row['stablehlo_chars']:,} chars  "
              f"optimized HLO {row['optimized_hlo_chars']:,} chars", flush=True)
        rows.append(row)
    if FLAGS.results:
        _append_results(config, rows)


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
