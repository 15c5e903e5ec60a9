"""Throughput of the jitted train step (not part of the test suite).

    python bench/train_step.py --config=configs/ettin_17m.py:mlm --batch=8 --seq_len=512
    python bench/train_step.py --config=configs/ettin_150m.py:mlm --batch=64 --seq_len=1024  # GPU

Times `train.make_setup(...).train_step` (forward, backward, StableAdamW update, one micro
batch) on one device after warm-up, and reports tokens/s and MFU (ettin_jax.train_metrics' FLOP
convention over the device's peak). Batches have the loader's format and MLM statistics
(30% of the positions predicted, rows packed with documents of random lengths) but random
token ids: throughput does not depend on the text. On CPU it also times transformers'
`ModernBertForMaskedLM` (sdpa attention, sparse prediction, torch AdamW, float32) on the same
shape in the same run, the two steps taken in turn (so that load from other programs slows both
alike), and prints the ratio of median step times (wall and CPU time). The last line printed is a JSON object; with
--results it is also appended to bench/RESULTS.md as a table row.

    python bench/train_step.py --config=configs/ettin_17m.py:mlm --profile

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
import platform
import re
import shlex
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ettin_jax import cli  # noqa: E402  # pylint: disable=wrong-import-position


def define_flags():
    config_flags.DEFINE_config_file("config", None, "FILE:ARG, e.g. configs/ettin_17m.py:mlm",
                                    lock_config=False)
    flags.DEFINE_integer("batch", 8, "rows per step")
    flags.DEFINE_integer("seq_len", 512, "tokens per row")
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation)")
    flags.DEFINE_string("dtype", "auto", "compute dtype; auto = float32 on CPU, the config's otherwise")
    flags.DEFINE_string("attention_impl", None, "override config.model.attention_impl")
    flags.DEFINE_enum("transformers", "auto", ["auto", "yes", "no"],
                      "also time transformers' ModernBertForMaskedLM (auto: on CPU)")
    flags.DEFINE_bool("results", False, "append the result to bench/RESULTS.md")
    flags.DEFINE_string("note", "", "free text for the RESULTS.md row")
    flags.DEFINE_bool("profile", False, "print the step's time per XLA operation instead of timing it")
    flags.DEFINE_integer("top", 25, "with --profile: entries listed per group")
    flags.mark_flag_as_required("config")


def make_batch(config, rows, seq_len, seed=0):
    """One host batch in the loader's format with random ids and packed random-length docs."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from data_pipeline import objectives  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    m = config.model
    input_ids = rng.integers(0, m.cls_token_id - 1, (rows, seq_len), dtype=np.int32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        start, segment = 0, 1
        while start < seq_len:
            length = min(seq_len - start, int(rng.integers(seq_len // 8, seq_len + 1)))
            segment_ids[r, start:start + length] = segment
            positions[r, start:start + length] = np.arange(length)
            input_ids[r, start] = m.cls_token_id
            start, segment = start + length, segment + 1
    batch = {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions}
    if config.objective == "mlm":
        ratio = config.train.mask_ratio
        slots = objectives.max_predictions(seq_len, ratio)
        count = int(ratio * seq_len)
        where = np.sort(np.stack([rng.choice(np.arange(1, seq_len), count, replace=False)
                                  for _ in range(rows)]), axis=1).astype(np.int32)
        labels = np.full((rows, seq_len), -100, np.int32)
        np.put_along_axis(labels, where, np.take_along_axis(input_ids, where, 1), 1)
        batch["mask_positions"] = np.zeros((rows, slots), np.int32)
        batch["mask_positions"][:, :count] = where
        batch["mask_labels"] = np.full((rows, slots), -100, np.int32)
        batch["mask_labels"][:, :count] = np.take_along_axis(input_ids, where, 1)
        np.put_along_axis(input_ids, where, m.mask_token_id, 1)
        batch["labels"] = labels
    else:
        labels = np.full((rows, seq_len), -100, np.int32)
        same = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
        labels[:, :-1] = np.where(same, input_ids[:, 1:], -100)
        batch["labels"] = labels
    return batch


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


def transformers_step_fn(config, batch):
    """transformers' ModernBertForMaskedLM training step at the same shape, float32 on CPU."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    m = config.model
    hf_config = transformers.ModernBertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        global_attn_every_n_layers=m.global_attn_every_n_layers, local_attention=m.local_attention,
        max_position_embeddings=max(8192, batch["input_ids"].shape[1]),
        pad_token_id=m.pad_token_id, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id,
        cls_token_id=m.cls_token_id, sep_token_id=m.sep_token_id, sparse_prediction=True,
        attention_dropout=0.0, reference_compile=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.peak_lr, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=config.optimizer.weight_decay)
    input_ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    attention_mask = torch.from_numpy(batch["segment_ids"] > 0).long()
    carry = {"loss": None}

    def step():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        carry["loss"] = loss.detach().item()

    return step, lambda: carry["loss"]


def time_interleaved(step_fns, steps, warmup):
    """Median wall and CPU seconds per step of each callable, their steps taken in turn so that
    a busy machine slows all of them alike."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    for _ in range(warmup):
        for step in step_fns:
            step()
    wall = [[] for _ in step_fns]
    cpu = [[] for _ in step_fns]
    for _ in range(steps):
        for i, step in enumerate(step_fns):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[i].append(time.perf_counter() - start_wall)
            cpu[i].append(time.process_time() - start_cpu)
    return [(float(np.median(w)), float(np.median(c))) for w, c in zip(wall, cpu)]


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
    """Instruction name -> its op_name metadata with digits folded (layers grouped)."""
    names = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        source = re.search(r'op_name="([^"]+)"', line)
        if match and source:
            names[match.group(1)] = re.sub(r"\d+", "#", source.group(1))
    return names


def profile(config, batch, top: int):
    """Prints the thunk time of one step per JAX operation (see the module docstring)."""
    import jax  # pylint: disable=import-outside-toplevel

    step, _, hlo_text = ours_step_fn(config, batch)
    step()
    step()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            step()
        totals = thunk_durations(trace_dir)
    names = op_names(hlo_text())   # the same computation, to name each thunk by its operation
    by_op = collections.Counter()
    for thunk, micros in totals.items():
        if thunk in names:
            by_op[names[thunk]] += micros
    dots = collections.Counter({k: v for k, v in by_op.items() if "dot_general" in k})
    rest = collections.Counter({k: v for k, v in by_op.items() if "dot_general" not in k})
    print(f"{config.size}:{config.objective} {batch['input_ids'].shape[0]}x"
          f"{batch['input_ids'].shape[1]} on {jax.devices()[0].device_kind}: matmuls "
          f"{sum(dots.values()) / 1e3:.1f} ms, everything else {sum(rest.values()) / 1e3:.1f} ms "
          "(thunk time of one step)")
    for title, group in (("matmuls", dots), ("everything else", rest)):
        print(f"-- {title}")
        for name, micros in group.most_common(top):
            print(f"{micros / 1e3:9.1f} ms  {name}")


def main(argv):
    del argv
    F = flags.FLAGS
    if F.profile:   # per-thunk trace events on CPU; read when the backend starts, below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import train_metrics  # pylint: disable=import-outside-toplevel

    config = F.config
    config.train.global_batch_size = F.batch
    config.train.seq_len = F.seq_len
    config.train.grad_accum_steps = 1
    on_cpu = jax.default_backend() == "cpu"
    if F.dtype != "auto" or on_cpu:
        config.model.dtype = "float32" if F.dtype == "auto" else F.dtype
    if F.attention_impl:
        config.model.attention_impl = F.attention_impl
    batch = make_batch(config, F.batch, F.seq_len)
    if F.profile:
        profile(config, batch, F.top)
        return
    device = jax.devices()[0].device_kind
    tokens = F.batch * F.seq_len

    step_fns, loss_fns = zip(*[ours_step_fn(config, batch)[:2]])
    with_transformers = F.transformers == "yes" or (F.transformers == "auto" and on_cpu)
    if with_transformers:
        hf_step, hf_loss = transformers_step_fn(config, batch)
        step_fns, loss_fns = step_fns + (hf_step,), loss_fns + (hf_loss,)
    times = time_interleaved(step_fns, F.steps, F.warmup)
    seconds, cpu_seconds = times[0]
    result = {"config": f"{config.size}:{config.objective}", "device": device,
              "backend": jax.default_backend(), "dtype": config.model.dtype,
              "attention_impl": config.model.attention_impl, "batch": F.batch,
              "seq_len": F.seq_len, "step_ms": round(seconds * 1e3, 2),
              "step_cpu_ms": round(cpu_seconds * 1e3, 2),
              "tokens_per_sec": round(tokens / seconds, 1), "loss": round(loss_fns[0](), 4)}
    peak = train_metrics.device_peak_flops(config)
    if peak:
        result["mfu"] = round(train_metrics.training_flops_per_row(config) * F.batch / seconds
                              / peak, 4)
    print(f"ettin-jax: {result['step_ms']} ms/step (median), {result['tokens_per_sec']:,.0f} "
          f"tokens/s" + (f", MFU {result['mfu']:.1%}" if "mfu" in result else "") + f" ({device})")
    if with_transformers:
        import torch  # pylint: disable=import-outside-toplevel
        hf_seconds, hf_cpu_seconds = times[1]
        result.update(transformers_step_ms=round(hf_seconds * 1e3, 2),
                      transformers_step_cpu_ms=round(hf_cpu_seconds * 1e3, 2),
                      transformers_tokens_per_sec=round(tokens / hf_seconds, 1),
                      transformers_loss=round(loss_fns[1](), 4),
                      torch_threads=torch.get_num_threads(),
                      ratio=round(hf_seconds / seconds, 3),
                      cpu_time_ratio=round(hf_cpu_seconds / cpu_seconds, 3))
        print(f"transformers ModernBertForMaskedLM: {result['transformers_step_ms']} ms/step "
              f"(median), {result['transformers_tokens_per_sec']:,.0f} tokens/s; ettin-jax is "
              f"{result['ratio']}x by wall time, {result['cpu_time_ratio']}x by CPU time")
    if F.results:
        append_results(result, F.note)
    print(json.dumps(result))


def append_results(result, note):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{result['device']}, {os.cpu_count()} cores, load {load:.1f}, "
               f"Python {platform.python_version()}")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = ("\n## Train step (bench/train_step.py): tokens/s of the jitted step, one device\n\n"
              "| date | config | batch x seq | dtype | tokens/s | MFU | transformers tokens/s | "
              "ratio (wall) | ratio (CPU time) | machine | command |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    with open(path, encoding="utf-8") as f:
        headers = [line for line in f if line.startswith("## ")]
    # Continue our table only if it is the file's last section (others append here too).
    has_header = bool(headers) and headers[-1].startswith("## Train step (bench/train_step.py)")
    row = (f"| {datetime.date.today()} | {result['config']} | {result['batch']} x "
           f"{result['seq_len']} | {result['dtype']} | {result['tokens_per_sec']:,.0f} | "
           f"{result.get('mfu', 'n/a')} | {result.get('transformers_tokens_per_sec', 'n/a')} | "
           f"{result.get('ratio', 'n/a')} | {result.get('cpu_time_ratio', 'n/a')} | {machine} | "
           f"`{command}`"
           f"{' ' + note if note else ''} |\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("" if has_header else header) + row)


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
