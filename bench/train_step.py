"""Throughput of the jitted train step (not part of the test suite).

    python bench/train_step.py --config=configs/ettin_17m.py:mlm --batch=8 --seq_len=512
    python bench/train_step.py --config=configs/ettin_150m.py:mlm --batch=64 --seq_len=1024  # GPU

Times `train.make_setup(...).train_step` (forward, backward, StableAdamW update, one micro
batch) on one device after warm-up, and reports tokens/s and MFU (ettin_jax.train_metrics' FLOP
convention over the device's peak). Batches have the loader's format and MLM statistics
(30% of the positions predicted, rows packed with documents of random lengths) but random
token ids: throughput does not depend on the text. On CPU it also times transformers'
ModernBERT (bench/peer.py: `ModernBertForMaskedLM` with sparse prediction, or
`ModernBertDecoderForCausalLM` for clm; float32 eager on CPU, bf16 autocast + fused AdamW +
torch.compile on a GPU) on the same shape in the same run, the two steps taken in turn (so that
load from other programs slows both alike), and prints the ratio of median step times (wall
and CPU time). `--transformers=only` times the peer alone (on a GPU, in its own process:
JAX keeps the memory it allocated). `--shapes=64x1024,8x8192` times several shapes in one
process. The last line printed per shape is a JSON object; with --results it is also appended
to bench/RESULTS.md as a table row, with --json_out to a JSON-lines file.

    python bench/train_step.py --config=configs/ettin_17m.py:mlm --profile

    python bench/train_step.py --config=configs/ettin_150m.py:mlm --shapes=64x1024 \
        --variants="prng_impl=rbg,unsafe_rbg;loss_vocab_chunk=16384;batch=32,128"

--variants times the baseline and then each listed value of each key changed alone (one at a
time, bench/variants.py), each its own compile, all in this one process (imports and batches
once); a row each, with `variant` in its JSON record and the first step's seconds (compile
plus one step) as compile_s. A variant that fails is recorded with its error and the sweep
goes on; --variants_budget_s stops starting new ones; --profile_out=FILE also profiles the
baseline's compiled step (as --profile below) after timing it. --prng_impl,
--loss_vocab_chunk and --loss_row_chunk set the speed knobs of config.train for every run of
the process.

With --profile it times nothing: it runs one step under `jax.profiler.trace` and prints where
the step's time goes, per XLA operation (each executed thunk named by the JAX operation that
produced it, digits folded so that all layers add up), matmuls and the rest apart.
"""
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position
from bench import hlo_profile, results  # noqa: E402  pylint: disable=wrong-import-position
from bench import variants as variants_lib  # noqa: E402  pylint: disable=wrong-import-position
from bench.batches import make_batch  # noqa: E402  pylint: disable=wrong-import-position


def define_flags():
    config_flags.DEFINE_config_file("config", None, "FILE:ARG, e.g. configs/ettin_17m.py:mlm",
                                    lock_config=False)
    flags.DEFINE_integer("batch", 8, "rows per step")
    flags.DEFINE_integer("seq_len", 512, "tokens per row")
    flags.DEFINE_list("shapes", None, "several ROWSxSEQ_LEN shapes timed one after the other in this "
                      "process (e.g. 64x1024,8x8192); overrides --batch/--seq_len")
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation)")
    flags.DEFINE_string("dtype", "auto", "compute dtype; auto = float32 on CPU, the config's otherwise")
    flags.DEFINE_string("attention_impl", None, "override config.model.attention_impl (the "
                        "library checks the name)")
    flags.DEFINE_string("prng_impl", None, "override config.train.prng_impl (threefry, rbg, "
                        "unsafe_rbg): the dropout keys' PRNG")
    flags.DEFINE_integer("loss_vocab_chunk", None, "override config.train.loss_vocab_chunk")
    flags.DEFINE_integer("loss_row_chunk", None, "override config.train.loss_row_chunk")
    flags.DEFINE_string("variants", None, "one-at-a-time variants after the baseline, "
                        "'KEY=V1,V2;KEY2=V3' (bench/variants.py), e.g. "
                        "'prng_impl=rbg;loss_vocab_chunk=16384;batch=32,128;attention_impl=mosaic'")
    flags.DEFINE_float("variants_budget_s", 0.0, "with --variants: start no variant once less "
                       "than the longest one so far is left of this many seconds (0 = no limit)")
    flags.DEFINE_enum("transformers", "auto", ["auto", "yes", "no", "only"],
                      "also time transformers' ModernBERT (bench/peer.py; auto: on CPU); only: time "
                      "it alone, without ours (its own process on a GPU: JAX keeps its memory)")
    flags.DEFINE_enum("peer_compile", "auto", ["auto", "yes", "no"],
                      "torch.compile the transformers model (auto: on a CUDA device)")
    flags.DEFINE_enum("peer_autocast", "auto", ["auto", "yes", "no"],
                      "bf16 autocast for the transformers model (auto: on a CUDA device)")
    flags.DEFINE_string("json_out", None, "also append each result as a JSON line to this file")
    results.define_flags()
    flags.DEFINE_bool("profile", False, "print the step's time per XLA operation instead of timing it")
    flags.DEFINE_integer("top", 25, "with --profile: entries listed per group")
    flags.DEFINE_string("profile_out", None, "write --profile's listing to this file; without "
                        "--profile, profile one more step of the first timed run (with "
                        "--variants the baseline) after timing it: no extra compile")
    flags.mark_flag_as_required("config")


def ours_step_fn(config, batch):
    """Callables: one train step of ours (blocking), its loss, and the step's compiled HLO."""
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import losses, sharding, train  # pylint: disable=import-outside-toplevel

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = train.make_setup(config, mesh)
    global_batch = sharding.host_batch_to_global(
        {k: batch[k] for k in losses.BATCH_KEYS[config.objective]}, mesh, num_micro=1)
    carry = {"state": setup.init_state(), "step": 0, "metrics": None}

    def step():
        carry["state"], carry["metrics"] = setup.train_step(
            carry["state"], global_batch, config.optimizer.peak_lr, carry["step"])
        carry["step"] += 1
        jax.block_until_ready(carry["metrics"])

    def hlo_text():
        return setup.train_step.lower(carry["state"], global_batch, config.optimizer.peak_lr,
                                      0).compile().as_text()

    return step, lambda: float(carry["metrics"].compute()["loss"]), hlo_text


def time_interleaved(step_fns, steps, warmup):
    """Median wall and CPU seconds per step of each callable, their steps taken in turn so that
    a busy machine slows all of them alike, and the wall seconds of each one's first step
    (compilation included; None without warm-up)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    first = [None] * len(step_fns)
    for round_index in range(warmup):
        for i, step in enumerate(step_fns):
            start_wall = time.perf_counter()
            step()
            if round_index == 0:
                first[i] = time.perf_counter() - start_wall
    wall = [[] for _ in step_fns]
    cpu = [[] for _ in step_fns]
    for _ in range(steps):
        for i, step in enumerate(step_fns):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[i].append(time.perf_counter() - start_wall)
            cpu[i].append(time.process_time() - start_cpu)
    return [(float(np.median(w)), float(np.median(c)), f) for w, c, f in zip(wall, cpu, first)]


def thunk_durations(trace_dir: str) -> collections.Counter:
    """Total microseconds per event name in the perfetto trace written under trace_dir."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0)
    return totals


def op_names(hlo_text: str) -> dict:
    """Instruction name -> its op_name metadata with digits folded (layers grouped), from
    bench/hlo_profile.py's reading of the compiled module."""
    names = {}
    for name, instruction in hlo_profile.Module(hlo_text).by_name.items():
        source = instruction.attribute(r'op_name="([^"]+)"')
        if source:
            names[name] = re.sub(r"\d+", "#", source)
    return names


def profile(config, batch, top: int, out_path: str | None = None, step_fn=None):
    """Prints the thunk time of one step per JAX operation (see the module docstring), and
    writes the same lines to `out_path` when given. `step_fn`: ours_step_fn's triple of a step
    already compiled and warm (a timed run's), else one is built and warmed up here."""
    import jax  # pylint: disable=import-outside-toplevel

    if step_fn is None:
        step_fn = ours_step_fn(config, batch)
        step_fn[0]()
        step_fn[0]()
    step, _, hlo_text = step_fn
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            step()
        totals = thunk_durations(trace_dir)
    # The same computation (jit's in-memory cache: no second compile), to name each thunk.
    names = op_names(hlo_text())
    by_op = collections.Counter()
    for thunk, micros in totals.items():
        if thunk in names:
            by_op[names[thunk]] += micros
    dots = collections.Counter({k: v for k, v in by_op.items() if "dot_general" in k})
    rest = collections.Counter({k: v for k, v in by_op.items() if "dot_general" not in k})
    lines = [f"{config.size}:{config.objective} {batch['input_ids'].shape[0]}x"
             f"{batch['input_ids'].shape[1]} on {jax.devices()[0].device_kind} "
             f"(attention {config.model.attention_impl}, prng {config.train.prng_impl}): matmuls "
             f"{sum(dots.values()) / 1e3:.1f} ms, everything else "
             f"{sum(rest.values()) / 1e3:.1f} ms (thunk time of one step)"]
    for title, group in (("matmuls", dots), ("everything else", rest)):
        lines.append(f"-- {title}")
        lines += [f"{micros / 1e3:9.1f} ms  {name}" for name, micros in group.most_common(top)]
    print("\n".join(lines), flush=True)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def parse_shapes(texts) -> list[tuple[int, int]]:
    """["64x1024", ...] -> [(64, 1024), ...]."""
    shapes = []
    for text in texts:
        rows, _, seq_len = text.lower().partition("x")
        if not (rows.isdigit() and seq_len.isdigit()):
            raise cli.UserError(f"--shapes entry {text!r}: expected ROWSxSEQ_LEN, e.g. 64x1024")
        shapes.append((int(rows), int(seq_len)))
    return shapes


def resolve_auto(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "yes"


def time_shape(config, rows: int, seq_len: int, *, ours: bool, peer: bool,
               profile_out: str | None = None) -> dict:
    """Times ours and/or the peer at one shape (steps interleaved); the result record. With
    `profile_out`, then profiles one more step of ours (the same compiled step) into it."""
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import train_metrics  # pylint: disable=import-outside-toplevel

    F = flags.FLAGS
    config = config.copy_and_resolve_references()
    config.train.global_batch_size = rows
    config.train.seq_len = seq_len
    config.train.grad_accum_steps = 1
    batch = make_batch(config, rows, seq_len)
    tokens = rows * seq_len
    step_fns, loss_fns = [], []
    if ours:
        ours_fns = ours_step_fn(config, batch)
        step_fns.append(ours_fns[0])
        loss_fns.append(ours_fns[1])
    if peer:
        import torch  # pylint: disable=import-outside-toplevel
        from bench import peer as peer_lib  # pylint: disable=import-outside-toplevel
        on_cuda = torch.cuda.is_available()
        peer_compile = resolve_auto(F.peer_compile, on_cuda)
        peer_autocast = resolve_auto(F.peer_autocast, on_cuda)
        step, loss = peer_lib.peer_step_fn(config, batch, compile_model=peer_compile,
                                           bf16_autocast=peer_autocast)
        step_fns.append(step)
        loss_fns.append(loss)
    times = time_interleaved(step_fns, F.steps, F.warmup)
    result = {"config": f"{config.size}:{config.objective}", "batch": rows, "seq_len": seq_len,
              "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    if ours:
        seconds, cpu_seconds, first_seconds = times[0]
        result.update(dtype=config.model.dtype, attention_impl=config.model.attention_impl,
                      prng_impl=config.train.prng_impl,
                      loss_vocab_chunk=config.train.loss_vocab_chunk,
                      loss_row_chunk=config.train.loss_row_chunk, remat=config.model.remat,
                      step_ms=round(seconds * 1e3, 2), step_cpu_ms=round(cpu_seconds * 1e3, 2),
                      tokens_per_sec=round(tokens / seconds, 1), loss=round(loss_fns[0](), 4))
        if first_seconds is not None:
            result["compile_s"] = round(first_seconds, 1)   # first step: compile + one step
        # The allocator's peak over this process so far (every shape timed before this one
        # in it too: jax cannot reset it); None on CPU.
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["device_peak_gb"] = round(stats["peak_bytes_in_use"] / 1e9, 2)
        peak = train_metrics.device_peak_flops(config)
        if peak:
            result["mfu"] = round(train_metrics.training_flops_per_row(config) * rows / seconds
                                  / peak, 4)
        print(f"ettin-jax {result['config']} {rows}x{seq_len}: {result['step_ms']} ms/step "
              f"(median), {result['tokens_per_sec']:,.0f} tokens/s"
              + (f", MFU {result['mfu']:.1%}" if "mfu" in result else "")
              + (f", first step {result['compile_s']} s" if "compile_s" in result else "")
              + (f", peak {result['device_peak_gb']} GB" if "device_peak_gb" in result else "")
              + f" ({result['device']})", flush=True)
    if peer:
        hf_seconds, hf_cpu_seconds, _ = times[-1]
        result.update(transformers_step_ms=round(hf_seconds * 1e3, 2),
                      transformers_step_cpu_ms=round(hf_cpu_seconds * 1e3, 2),
                      transformers_tokens_per_sec=round(tokens / hf_seconds, 1),
                      transformers_loss=round(loss_fns[-1](), 4),
                      transformers_compile=peer_compile,
                      transformers_bf16_autocast=peer_autocast,
                      torch_threads=torch.get_num_threads())
        print(f"transformers {result['config']} {rows}x{seq_len}: "
              f"{result['transformers_step_ms']} ms/step (median), "
              f"{result['transformers_tokens_per_sec']:,.0f} tokens/s (compile={peer_compile}, "
              f"bf16 autocast={peer_autocast})", flush=True)
    if ours and peer:
        result.update(ratio=round(hf_seconds / seconds, 3),
                      cpu_time_ratio=round(hf_cpu_seconds / cpu_seconds, 3))
        print(f"ettin-jax is {result['ratio']}x transformers by wall time, "
              f"{result['cpu_time_ratio']}x by CPU time", flush=True)
    if ours and profile_out:
        try:
            profile(config, batch, F.top, profile_out, step_fn=ours_fns)
        except Exception as e:  # pylint: disable=broad-except  # the timing above stands
            result["profile_error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"profile failed (the timing stands): {result['profile_error']}", flush=True)
    return result


def main(argv):
    del argv
    F = flags.FLAGS
    if F.profile or F.profile_out:   # per-thunk trace events on CPU; read at backend start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax  # pylint: disable=import-outside-toplevel

    config = F.config
    on_cpu = jax.default_backend() == "cpu"
    if F.dtype != "auto" or on_cpu:
        config.model.dtype = "float32" if F.dtype == "auto" else F.dtype
    if F.attention_impl:
        config.model.attention_impl = F.attention_impl
    for key in ("prng_impl", "loss_vocab_chunk", "loss_row_chunk"):
        if F[key].value is not None:
            config.train[key] = F[key].value
    shapes = parse_shapes(F.shapes) if F.shapes else [(F.batch, F.seq_len)]
    if F.profile:
        config.train.global_batch_size, config.train.seq_len = shapes[0]
        config.train.grad_accum_steps = 1
        profile(config, make_batch(config, *shapes[0]), F.top, F.profile_out)
        return
    ours = F.transformers != "only"
    peer = F.transformers in ("yes", "only") or (F.transformers == "auto" and on_cpu)

    def emit(result):
        if F.results and "device" in result:   # a failed or skipped variant has no row
            append_results(result, F.note)
        if F.json_out:
            with open(F.json_out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)

    if F.variants:
        if F.transformers == "only":
            raise cli.UserError("--variants times ours: drop --transformers=only")
        parsed = variants_lib.parse(F.variants)
        sweep = [v for rows, seq_len in shapes
                 for v in variants_lib.one_at_a_time(config, rows, seq_len, parsed)]
        variants_lib.run_all(
            sweep, lambda v: time_shape(
                v.config, v.rows, v.seq_len, ours=True,
                peer=peer and v.name == variants_lib.BASELINE,
                profile_out=F.profile_out if v is sweep[0] else None),
            budget_s=F.variants_budget_s, emit=emit)
        return
    for index, (rows, seq_len) in enumerate(shapes):
        emit(time_shape(config, rows, seq_len, ours=ours, peer=peer,
                        profile_out=F.profile_out if index == 0 else None))


def append_results(result, note):
    """One row of the per-run table; the row names its own machine and command."""
    get = lambda key: result.get(key, "n/a")  # noqa: E731
    results.append(
        "Train step (bench/train_step.py): tokens/s of the jitted step, one device",
        ["date", "config", "batch x seq", "dtype", "tokens/s", "MFU", "transformers tokens/s",
         "ratio (wall)", "ratio (CPU time)", "machine", "command"],
        [[datetime.date.today(), result["config"], f"{result['batch']} x {result['seq_len']}",
          get("dtype"), get("tokens_per_sec"), get("mfu"), get("transformers_tokens_per_sec"),
          get("ratio"), get("cpu_time_ratio"), results.machine(),
          f"`{results.command()}`" + (f" {note}" if note else "")]],
        continue_table=True)


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
