"""The run's tokens-per-step figure: the data's mean sequence length, measured once and stored
in the workdir, so that every start of the run (and its plan) sizes steps the same way.

    record = for_run(config, workdir, demo=False)  # the stored record, else a fresh measurement
    store(workdir, record)                         # `workdir/step_tokens.json` (once)
    check_split(workdir, split, has_checkpoints)   # the steps' sizes stay as the run began

A step is `train.global_batch_size` (4608) sequences of the data's mean length, packed into
`schedules.rows_per_step(config, mean, data_parallel)` rows of `train.seq_len` tokens
(recipe §3.2.1; the mean comes from data_pipeline.lengths). Rows per step, the batch-size
warmup, total steps and the checkpoint interval all follow from the mean, so a resumed run
must keep the figure its first start used: re-measuring a sampled source, or data that moved
or grew, would change the steps under a run's checkpoints. A stored record is therefore
never recomputed: a changed mixture only logs a warning (delete the file to re-measure);
a changed `train.seq_len` is an error, as the mean is only valid for the row length it was
measured at. The demo (no data configured) stores a mean of null: one row per sequence.

Record (JSON):
    mean_sequence_length  float, or null (the demo)
    seq_len               train.seq_len it was measured at
    mixture               config.data.mixture it was measured on ("" for the demo)
    sources               per source: path, token_share (configured), documents, measured,
                          exact, tokens_per_document, pieces_per_document, mean_sequence_length,
                          relative_error
    split                 data_parallel, rows_per_step and warmup_split of the run's steps,
                          and num_steps, its last step (a later phase's start checks that
                          the run it continues got there: workdir.check_init_from)
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from data_pipeline import shards
from ettin_jax import processes

FILENAME = "step_tokens.json"


def path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), FILENAME)


def read(workdir: str) -> dict | None:
    """The stored record of the run in `workdir`, or None when there is none."""
    file = path(workdir)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or not {"mean_sequence_length", "seq_len"} <= set(record):
            raise ValueError("mean_sequence_length or seq_len missing")
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable tokens-per-step record ({type(e).__name__}: "
                         f"{e}); restore it, or delete it to measure the data again") from None
    return record


def measure(config, *, demo: bool) -> dict:
    """A fresh record for `config` (data_pipeline.lengths over config.data.mixture); with
    demo=True, the demo's record (no mean: one row per sequence)."""
    seq_len = int(config.train.seq_len)
    if demo:
        return {"mean_sequence_length": None, "seq_len": seq_len, "mixture": "", "sources": []}
    from data_pipeline import lengths, mixtures, sources  # pylint: disable=import-outside-toplevel
    result = lengths.measure(config)
    weights = [w for _, w in sources.parse_mixture(mixtures.expand(config.data.mixture,
                                                                   config.phase))]
    return {
        "mean_sequence_length": result.mean_sequence_length,
        "seq_len": seq_len,
        "mixture": config.data.mixture,
        "sources": [{"path": s.path, "token_share": w / sum(weights), "documents": s.documents,
                     "measured": s.measured, "exact": s.exact,
                     "tokens_per_document": s.tokens_per_document,
                     "pieces_per_document": s.pieces_per_document,
                     "mean_sequence_length": s.mean_sequence_length,
                     "relative_error": s.relative_error}
                    for s, w in zip(result.sources, weights)],
    }


def read_for(config, workdir: str) -> dict | None:
    """The stored record (None when there is none) if this config's run may resume with it;
    ValueError, as the run's start raises, when it cannot be read or is of another row
    length."""
    stored = read(workdir)
    if stored is not None and stored["mean_sequence_length"] is not None and \
            stored["seq_len"] != config.train.seq_len:
        raise ValueError(
            f"{path(workdir)}: the mean sequence length was measured at train.seq_len="
            f"{stored['seq_len']}, but config.train.seq_len={config.train.seq_len}; a run keeps "
            "its row length (start a new workdir, or delete the file to measure again)")
    return stored


def for_run(config, workdir: str, *, demo: bool) -> dict:
    """The run's record: the one stored in `workdir` (never re-measured), else a fresh
    measurement. Adds "stored": whether it came from the workdir. Writes nothing."""
    stored = read_for(config, workdir)
    if stored is None:
        return dict(measure(config, demo=demo), stored=False)
    file = path(workdir)
    if not demo and stored.get("mixture") != config.data.mixture:
        logging.warning("%s was measured on config.data.mixture=%r, this run reads %r: keeping "
                        "the stored mean sequence length %s (steps stay as the run began; "
                        "delete the file to measure again)", file, stored.get("mixture"),
                        config.data.mixture, stored["mean_sequence_length"])
    return dict(stored, stored=True)


def store(workdir: str, record: dict) -> str:
    """Writes `record` (without its "stored" flag) to `workdir/step_tokens.json` atomically;
    returns the path."""
    file = path(workdir)
    shards.write_json_atomic(file, {k: v for k, v in record.items() if k != "stored"})
    return file


def agreed(config, workdir: str, *, demo: bool) -> float | None:
    """The run's mean sequence length as every process of the run uses it: process 0 reads the workdir's
    stored figure or measures the data and stores it; every process gets process 0's value,
    bit for bit (the steps' row counts must agree). None for the demo."""
    mean, error = None, None
    if jax.process_index() == 0:
        try:
            record = for_run(config, workdir, demo=demo)
            if not record["stored"]:
                store(workdir, record)
        except (OSError, ValueError) as e:   # told to the other processes, or they would wait
            error = e
        else:
            mean = record["mean_sequence_length"]
            logging.info("mean sequence length %s (%s %s)",
                         "none: the demo packs one sequence per row" if mean is None else mean,
                         "stored in" if record["stored"] or mean is None
                         else "measured on the data, stored in", path(workdir))
    processes.raise_with_process0(error, lambda: ValueError(
        f"{path(workdir)}: process 0 could not settle the run's tokens per step (its error "
        "names why)"))
    if jax.process_count() > 1:   # float64 travels as its 8 bytes: no float32 rounding
        raw = np.frombuffer(np.float64(np.nan if mean is None else mean).tobytes(), np.uint8)
        raw = multihost_utils.broadcast_one_to_all(raw.astype(np.int32))
        value = float(np.frombuffer(np.asarray(raw, np.uint8).tobytes(), np.float64)[0])
        mean = None if math.isnan(value) else value
    return mean


def check_split(workdir: str, split: dict, has_checkpoints: bool):
    """Refuses a resume whose steps would be cut differently from the steps under the run's
    checkpoints. `split`: {"data_parallel", "rows_per_step", "warmup_split", "warmup_steps",
    "num_steps"} of this start.

    Rows per step round to whole micro batches per data-parallel device, and steps are
    replayed by index (schedules.rows_schedule), so on another device count, micro-batch split
    or batch-size warmup a step could hold other rows (a warmup replayed mid-run) and the run
    would end at another token count. The first start records its split in the record (a run
    recorded before a key: its next start, as does a start that finds no checkpoint; a resume
    with the same cut records its num_steps). Raises ValueError on every process."""
    problem = ""
    if jax.process_index() == 0:
        record = read(workdir)
        old = (record or {}).get("split")
        keys = ("rows_per_step", "warmup_split", "warmup_steps")
        changed = [key for key in keys if old and key in old and old[key] != split[key]]
        if record is not None and (old is None or not has_checkpoints):
            store(workdir, dict(record, split=split))
        elif old is not None and not changed:
            # keys the record lacks (recorded before them), and num_steps: a resume may
            # lengthen or shorten the run
            kept = dict(split, **{k: v for k, v in old.items() if k in keys or
                                  k == "data_parallel"})
            if kept != old:
                store(workdir, dict(record, split=kept))
        elif old is not None:
            names = {"rows_per_step": "rows per step", "warmup_split": "the batch-size "
                     "warmup's micro batches", "warmup_steps": "batch-size warmup steps"}
            what = "; ".join(f"{names[k]} {old[k]} -> {split[k]}" for k in changed)
            if old["data_parallel"] != split["data_parallel"]:
                fix = (f"resume on {old['data_parallel']} data-parallel devices (config.mesh: "
                       f"data x fsdp; this start has {split['data_parallel']})")
            else:
                fix = ("resume with the batch settings it started with (train.global_batch_size, "
                       "train.grad_accum_steps or train.max_micro_tokens, and optimizer."
                       "batch_warmup_tokens and batch_warmup_start_fraction)")
                if "rows_per_step" not in changed:
                    # The same settings can give another warmup split since commit afafa13
                    # (2026-12-03) counted the warmup's pieces differently.
                    fix += ("; if they are unchanged, this code splits the warmup otherwise "
                            "than the code that started the run (afafa13): finish the run with "
                            "a checkout from before it, or start a new workdir")
            problem = (f"{path(workdir)}: this run's steps would be cut otherwise than when it "
                       f"started ({what}); steps replay by index, so the run would end at "
                       f"another token count: {fix}")
    processes.raise_with_process0(ValueError(problem) if problem else None, lambda: ValueError(
        "the run's step split changed (process 0's error names it)"))
