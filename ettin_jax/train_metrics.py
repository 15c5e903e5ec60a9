"""What the train loop reports: clu metric collections, model FLOPs per row, device peak.

    TrainMetrics, EvalMetrics          clu Collections built inside the jitted steps
    ratio_metric(total, count)         an Average weighted by a count (e.g. loss per token)
    sum_metric(name)                   a count summed over steps (e.g. skipped steps)
    training_flops_per_row(config)     forward + backward FLOPs of one row, for MFU
    device_peak_flops(config)          bf16 dense peak FLOP/s of one device (0 = unknown)
    Pauses, Window, train_scalars(...) the steps since the last log line and their scalars
    run_summary(last, ...)             the first half of the run's closing log line
"""
# No `from __future__ import annotations`: clu reads the metric classes from __annotations__.

import contextlib
import dataclasses
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
from absl import logging
from clu import metrics as clu_metrics

# bf16 dense peak FLOP/s per device, for MFU when config.log.device_peak_flops is 0.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def ratio_metric(total_name: str, count_name: str):
    """An Average whose update is (kwargs[total_name], kwargs[count_name]): merged over steps it
    weighs every step by its count (e.g. loss per predicted token over a logging window)."""

    @flax.struct.dataclass
    class Ratio(clu_metrics.Average):
        @classmethod
        def from_model_output(cls, **kwargs) -> clu_metrics.Average:
            return cls(total=jnp.asarray(kwargs[total_name], jnp.float32),
                       count=jnp.asarray(kwargs[count_name], jnp.float32))

    return Ratio


def sum_metric(name: str):
    """A metric whose value is kwargs[name] summed over the merged steps."""

    @flax.struct.dataclass
    class Sum(clu_metrics.Metric):
        total: jnp.ndarray

        @classmethod
        def from_model_output(cls, **kwargs) -> "Sum":
            return cls(total=jnp.asarray(kwargs[name], jnp.float32))

        @classmethod
        def empty(cls) -> "Sum":
            return cls(total=jnp.zeros([], jnp.float32))

        def merge(self, other: "Sum") -> "Sum":
            return type(self)(total=self.total + other.total)

        def compute(self) -> jnp.ndarray:
            return self.total

    return Sum


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    # A skipped step (ettin_jax.divergence) adds 0 to the counts of loss, accuracy and
    # grad_norm: they average the steps that were applied.
    loss: ratio_metric("loss_sum", "predictions")            # per predicted token
    accuracy: ratio_metric("correct", "predictions")         # argmax == label
    grad_norm: ratio_metric("grad_norm", "applied")          # of the step's mean gradient
    param_norm: clu_metrics.LastValue.from_output("param_norm")
    packing_efficiency: ratio_metric("real_tokens", "tokens")  # non-padding share of the rows
    skipped_steps: sum_metric("skipped")                     # non-finite steps not applied


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: ratio_metric("loss_sum", "predictions")
    accuracy: ratio_metric("correct", "predictions")


def training_flops_per_row(config) -> float:
    """Model FLOPs of one row (forward + backward) under the stated convention:
    6 x (layer matmul params) per token, 6 x (head + decoder params) per predicted token
    (the masked fraction for MLM, every token for CLM), and attention scores + values
    12 x hidden x keys per token per layer, keys = seq for global layers, the window for
    local ones, halved when causal. Embedding lookups count zero; padding counts fully."""
    m, seq = config.model, config.train.seq_len
    H, I, V = m.hidden_size, m.intermediate_size, m.vocab_size
    layer_params = 3 * H * H + H * H + 2 * H * I + I * H
    predicted = seq * config.train.mask_ratio if config.objective == "mlm" else seq
    flops = 6 * layer_params * m.num_layers * seq + 6 * (H * H + V * H) * predicted
    for layer in range(m.num_layers):
        is_global = layer % m.global_attn_every_n_layers == 0
        keys = seq if is_global else min(seq, m.local_attention + 1)
        if m.causal:
            keys = keys / 2
        flops += 12 * H * keys * seq
    return float(flops)


def device_peak_flops(config) -> float:
    """config.log.device_peak_flops, else the PEAK_FLOPS entry of jax's device_kind, else 0."""
    if config.log.device_peak_flops > 0:
        return float(config.log.device_peak_flops)
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), 0.0)


# --- the logging window ----------------------------------------------------------------------

class Pauses:
    """Seconds spent on work other than train steps (restores, evals, checkpoint saves), which
    throughput leaves out. The two runs of a pair share one: each side's window then leaves
    out the other side's pauses too, which fall inside it."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def pause(self):
        start = time.time()
        try:
            yield
        finally:
            self.seconds += time.time() - start


@dataclasses.dataclass
class Window:
    """Steps since the last write of scalars (for throughput) and train metrics since the
    last log line."""
    pauses: Pauses
    start: float | None = None       # time.time() of the window's opening; None: now
    steps: int = 0
    rows: int = 0
    metrics: Any = None

    def __post_init__(self):
        self.start = time.time() if self.start is None else self.start
        self.paused_before = self.pauses.seconds

    def add(self, metrics, rows: int):
        self.metrics = metrics if self.metrics is None else self.metrics.merge(metrics)
        self.steps, self.rows = self.steps + 1, self.rows + rows

    def seconds(self) -> float:
        """Since the window opened, less the pauses in between."""
        return time.time() - self.start - (self.pauses.seconds - self.paused_before)


def train_scalars(window: Window, config, *, step: int, num_steps: int, learning_rate: float,
                   rows: int, tokens: int, peak_flops: float, run_tokens_per_sec: float) -> dict:
    """The window's train metrics and throughput; logs a progress line.

    run_tokens_per_sec: this process's tokens over its wall time since its first step,
    pauses included, for the ETA (a run keeps evaluating and saving)."""
    scalars = {k: float(v) for k, v in window.metrics.compute().items()}
    elapsed = max(window.seconds(), 1e-9)
    rows_per_sec = window.rows / elapsed
    scalars.update(learning_rate=learning_rate, batch_size=rows,
                   tokens_per_step=rows * config.train.seq_len, tokens_seen=tokens,
                   tokens_per_sec=rows_per_sec * config.train.seq_len,
                   steps_per_sec=window.steps / elapsed)
    if peak_flops:
        scalars["mfu"] = rows_per_sec * training_flops_per_row(config) / peak_flops
    if config.objective == "clm":
        scalars["perplexity"] = math.exp(min(scalars["loss"], 50.0))
    # In tokens, not steps: the batch-size warmup's steps are smaller than the ones to come.
    eta = max(0.0, config.schedule.total_tokens - tokens) / max(run_tokens_per_sec, 1e-9)
    logging.info("step %d/%d (%.0f%%): loss %.4f, accuracy %.3f, lr %.3g, %.0f tokens/s, ETA %s",
                 step, num_steps, 100 * step / num_steps, scalars["loss"], scalars["accuracy"],
                 learning_rate, scalars["tokens_per_sec"], format_duration(eta))
    return scalars


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_summary(last: dict, *, step: int, num_steps: int, tokens: int, seconds: float,
                skipped: int, first_step: int = 0, first_tokens: int = 0) -> str:
    """What the run's closing line says of its training. `last`: this process's last logged
    scalars, empty when it trained no step (a re-run of a finished run has no loss of its own).
    first_step, first_tokens: where this process started (a resume), `seconds` its time."""
    if "loss" not in last:
        return f"nothing to train: the run already reached step {step} of {num_steps} " \
               f"({tokens:,} tokens)"
    done = f"{step} steps, {tokens:,} tokens in {format_duration(seconds)}"
    if first_step:
        done = (f"step {step}, {tokens:,} tokens; this process trained steps {first_step + 1}-"
                f"{step} ({tokens - first_tokens:,} tokens) in {format_duration(seconds)}")
    return (f"done: {done}; last logged loss {last['loss']:.4f}, accuracy {last['accuracy']:.3f}"
            + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
            + (f"; {skipped} non-finite steps skipped" if skipped else ""))
