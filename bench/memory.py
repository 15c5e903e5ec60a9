"""Largest micro batch whose compiled train step fits a device's memory, i.e. the config's
`train.max_micro_tokens` (rows x seq_len), and the `train.grad_accum_steps` that follows (not part of the test
suite).

    python bench/memory.py --config=configs/ettin_150m.py:mlm --seq_lens=1024,8192
    python bench/memory.py --config=configs/ettin_1b.py:mlm --remat=none,full,dots --budget_gb=80
    python bench/memory.py --config=configs/ettin_150m.py:mlm --target=h100   # no GPU needed

For each sequence length and `config.model.remat` setting this compiles `train.make_setup(...)
.train_step` (forward, backward and optimizer update of one micro batch, `[1, rows, seq_len]`,
one device, state donated as in training) on abstract inputs and reads XLA's memory analysis:
peak = argument + output - alias + temp bytes (outputs that reuse a donated argument buffer,
the new params and optimizer state, are counted once). Nothing is allocated or run, so it
works on CPU; the figures are the compiler's plan for the backend it ran on (on a GPU the
allocation plan the step will use, on CPU only an estimate: other fusions, XLA attention
instead of the Pallas kernel). --target=h100 compiles for an H100 on a machine without one
(bench/aot_gpu.py): the GPU's own plan, Pallas kernels included, nothing autotuned. The largest fitting row count is searched by interpolation
with bisection steps, assuming memory does not fall as rows grow.

The proposal: `train.max_micro_tokens` = the largest micro batch x seq_len (configs/base.py's
MAX_MICRO_ROWS holds the rows), from which a run with `grad_accum_steps=0` takes the fewest micro batches that fit
(`schedules.grad_accum_steps`); the table shows that count for full rows (4608 rows a step)
on each --data_parallel device count (one device's figure is conservative for FSDP, which
shards the state over the devices).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position
from bench import aot_gpu, results  # noqa: E402  # pylint: disable=wrong-import-position

GB = 1e9


def compiled_step_fn(config, seq_len: int, target: str = ""):
    """rows -> the train step compiled at `[1, rows, seq_len]` (one micro batch, one device,
    state donated as in training) on abstract inputs: nothing is allocated or run.

    One jitted step is built per call of this function; each row count lowers and compiles
    it once more. target: compile for that GPU (bench/aot_gpu.py) instead of this machine's
    first device. Also used by bench/hlo_profile.py."""
    import contextlib  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from bench.batches import make_batch  # pylint: disable=import-outside-toplevel
    from ettin_jax import losses, sharding, train  # pylint: disable=import-outside-toplevel

    config = config.copy_and_resolve_references()
    config.train.seq_len = seq_len
    config.train.grad_accum_steps = 1
    if jax.default_backend() == "cpu" and not target:
        # LLVM's optimisations run after buffer assignment: the memory plan is the same and
        # CPU compiles are ~3x faster without them.
        config.train.xla_options = "xla_backend_optimization_level=0"
    device = aot_gpu.device(target) if target else jax.devices()[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])

    def building():   # every trace of this step happens inside: kernels built for the GPU
        return aot_gpu.building_on(mesh) if target else contextlib.nullcontext()

    setup = train.make_setup(config, mesh)
    batch_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    one_row = make_batch(config, 1, seq_len)
    keys = losses.BATCH_KEYS[config.objective]

    def compiled(rows: int):
        batch = {k: jax.ShapeDtypeStruct((1, rows) + one_row[k].shape[1:], one_row[k].dtype,
                                         sharding=batch_sharding) for k in keys}
        with building():
            return setup.train_step.lower(setup.abstract_state, batch,
                                          config.optimizer.peak_lr, 0).compile()

    return compiled


def step_memory_fn(config, seq_len: int, target: str = ""):
    """rows -> XLA's memory figures (bytes) of the compiled train step at `[1, rows, seq_len]`
    (compiled_step_fn's step; target as there)."""
    import jax  # pylint: disable=import-outside-toplevel
    compile_step = compiled_step_fn(config, seq_len, target)

    def memory(rows: int) -> dict:
        start = time.perf_counter()
        stats = compile_step(rows).memory_analysis()
        if stats is None:
            raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis "
                               "of compiled programs; bench/memory.py cannot size batches here")
        out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
               "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
               "compile_s": round(time.perf_counter() - start, 2)}
        out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
        return out

    return memory


def largest_fitting(bytes_for_rows, budget: float, max_rows: int) -> tuple[int, dict]:
    """(largest n in [1, max_rows] with bytes_for_rows(n) <= budget, 0 if even 1 does not fit;
    {n: bytes} of every probe). bytes_for_rows must not decrease in n.

    Keeps lo (fits; 0 = none known) and hi (does not fit; max_rows + 1 = beyond the cap), probes
    1 and 2, then where the line through the two probes nearest the bracket meets the budget.
    When two such probes in a row landed on the same side of the budget, a probe inside the
    bracket is replaced by its midpoint (bisection); one next to an edge is kept, as it may end
    the search.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1")
    probes = {}
    lo, hi = 0, max_rows + 1
    sides = []   # fits or not, of each interpolated probe since the last bisection
    while hi - lo > 1:
        n = 1 if lo == 0 else min(max(_interpolate(probes, lo, hi, budget), lo + 1), hi - 1)
        # A probe next to the bracket's edge may end the search: always take it.
        if lo + 1 < n < hi - 1 and len(sides) >= 2 and sides[-1] == sides[-2]:
            n, sides = (lo + hi) // 2, []
        probes[n] = bytes_for_rows(n)
        fits = probes[n] <= budget
        lo, hi = (n, hi) if fits else (lo, n)
        if len(probes) > 2:
            sides.append(fits)
    return lo, probes


def _interpolate(probes: dict, lo: int, hi: int, budget: float) -> int:
    """Rows where the line through lo's probe and hi's (or, above every probe, the largest two)
    reaches the budget; twice lo while only one point is known."""
    if len(probes) < 2:
        return 2 * lo
    a, b = (lo, hi) if hi in probes else sorted(probes)[-2:]
    slope = (probes[b] - probes[a]) / (b - a)
    if slope <= 0:
        return (lo + hi) // 2 if hi in probes else 2 * lo
    return a + int((budget - probes[a]) // slope)


def search(config, seq_len: int, remat: str, budget: float, max_rows: int,
           data_parallel=(1, 8), target: str = "") -> dict:
    """One (seq_len, remat) search; its result record. target: as step_memory_fn's."""
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import schedules  # pylint: disable=import-outside-toplevel

    config = config.copy_and_resolve_references()
    config.model.remat = remat
    if remat != "none":     # remat applies to scanned layer groups
        config.model.scan_layers = True
    global_rows = schedules.rows_per_step(config)
    max_rows = max_rows or global_rows
    memory = step_memory_fn(config, seq_len, target)
    figures = {}

    def peak(rows):
        figures[rows] = memory(rows)
        print(f"  {config.size}:{config.objective} seq {seq_len} remat {remat}: {rows} rows -> "
              f"{figures[rows]['peak'] / GB:.2f} GB (temp {figures[rows]['temp'] / GB:.2f}, "
              f"compile {figures[rows]['compile_s']} s)", flush=True)
        return figures[rows]["peak"]

    start = time.perf_counter()
    rows, _ = largest_fitting(peak, budget, max_rows)
    result = {"config": f"{config.size}:{config.objective}", "seq_len": seq_len, "remat": remat,
              "dtype": config.model.dtype, "attention_impl": config.model.attention_impl,
              "backend": "gpu" if target else jax.default_backend(),
              "device": f"{target} (compiled without one)" if target else jax.devices()[0].device_kind,
              "budget_gb": budget / GB, "max_rows_tried": max_rows, "max_micro_rows": rows,
              "capped": rows == max_rows, "probes": len(figures),
              "search_s": round(time.perf_counter() - start, 1), "global_rows": global_rows}
    if rows:
        result.update({f"{k}_gb": round(v / GB, 3) for k, v in figures[rows].items()
                       if k != "compile_s"})
    if rows + 1 in figures:
        result["next_peak_gb"] = round(figures[rows + 1]["peak"] / GB, 3)
    # What the run would take with micro batches of at most the measured rows (schedules),
    # for full rows (no mean known: the most rows a step can have).
    proposal = config.copy_and_resolve_references()
    proposal.train.grad_accum_steps = schedules.AUTO
    proposal.train.seq_len = seq_len
    result["grad_accum_steps"] = {}
    for dp in data_parallel:
        try:
            accum = schedules.grad_accum_steps(proposal, None, dp, max_rows=rows) if rows else None
        except ValueError:    # the step's sequences do not split over dp devices
            accum = None
        result["grad_accum_steps"][str(dp)] = accum
    return result


def append_results(rows: list, note: str):
    import jax  # pylint: disable=import-outside-toplevel
    if flags.FLAGS.target:
        kind = f"XLA's allocation plan for an {flags.FLAGS.target}, compiled on this machine without one"
    elif jax.default_backend() == "cpu":
        kind = "compiler's estimate on CPU, not a GPU figure"
    else:
        kind = "allocation plan"
    dps = flags.FLAGS.data_parallel
    results.append(
        f"Largest micro batch (bench/memory.py), {rows[0]['config']}, budget "
        f"{rows[0]['budget_gb']:g} GB, {kind}, {results.utc_now()}",
        ["seq", "remat", "dtype", "attention", "max rows", "peak GB", "temp GB", "next row GB",
         "probes", "search s", *(f"grad_accum ({dp} dev)" for dp in dps)],
        [[r["seq_len"], r["remat"], r["dtype"], r["attention_impl"],
          f"{r['max_micro_rows']}" + (" (cap)" if r["capped"] else ""),
          r.get("peak_gb", "n/a"), r.get("temp_gb", "n/a"), r.get("next_peak_gb", "n/a"),
          r["probes"], r["search_s"], *(r["grad_accum_steps"][dp] for dp in dps)]
         for r in rows],
        where=results.machine(), note=note)


def define_flags():
    """The command line (defined here, not at import, so tests can import this module)."""
    config_flags.DEFINE_config_file("config", None, "FILE:ARG, e.g. configs/ettin_150m.py:mlm",
                                    lock_config=False)
    flags.DEFINE_list("seq_lens", ["1024"], "tokens per row, each searched apart")
    flags.DEFINE_list("remat", ["none", "full", "dots"], "config.model.remat settings to search")
    flags.DEFINE_float("budget_gb", 80.0, "device memory budget in GB (1e9 bytes; 80 = an H100)")
    flags.DEFINE_integer("max_rows", 0, "largest micro batch tried; 0 = the global rows per step")
    flags.DEFINE_list("data_parallel", ["1", "8"], "device counts the grad_accum_steps proposal is "
                      "made for")
    flags.DEFINE_string("attention_impl", None, "override config.model.attention_impl")
    flags.DEFINE_string("dtype", None, "override config.model.dtype (default: the config's)")
    flags.DEFINE_string("json_out", None, "also append each result as a JSON line to this file")
    flags.DEFINE_enum("target", "", ["", *aot_gpu.TARGETS], "compile for this GPU on a machine "
                      "without one (bench/aot_gpu.py; needs jax's CUDA plugin) instead of for "
                      "this machine's first device")
    results.define_flags()
    flags.mark_flag_as_required("config")


def main(argv):
    del argv
    F = flags.FLAGS
    if F.target:
        aot_gpu.host_on_cpu()
    config = F.config
    if F.attention_impl:
        config.model.attention_impl = F.attention_impl
    if F.dtype:
        config.model.dtype = F.dtype
    found = []
    for seq_len in map(int, F.seq_lens):
        for remat in F.remat:
            result = search(config, seq_len, remat, F.budget_gb * GB, F.max_rows,
                            data_parallel=[int(dp) for dp in F.data_parallel], target=F.target)
            print(json.dumps(result), flush=True)
            found.append(result)
            if F.json_out:
                with open(F.json_out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")
    if F.results:
        append_results(found, F.note)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
