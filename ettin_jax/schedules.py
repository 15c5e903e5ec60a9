"""Learning-rate and batch-size schedules, on tokens seen (recipe §4.2).

Time is counted in tokens, as bert24 counts it: the tokens seen *before* a step decide its
learning rate and batch size. Here a step's tokens are its rows × `train.seq_len` (packed
rows; the recipe's unpadded count differs by the packing padding only). Batch sizes are
counted in Ettin's unpacked sequences (`train.global_batch_size` = 4608) and converted to
packed rows with the data's mean sequence length (`rows_per_step`; data_pipeline.lengths
measures it).

Multipliers (of the phase LR `optimizer.peak_lr × schedule.lr_fraction`):
  warmup_stable_decay  linear 1e-10 → 1 over `warmup_tokens`, 1 until `total − decay_tokens`,
                       then linear to `final_fraction` at `total_tokens`
                       (pre-training: decay_tokens = 0, i.e. warmup + constant)
  one_minus_sqrt       1 until `total − decay_tokens`, then
                       final + (1 − final)·(1 − sqrt(elapsed / decay_tokens)), floored at final
"""
from __future__ import annotations

import fractions
import math

SCHEDULES = ("warmup_stable_decay", "one_minus_sqrt")
_WARMUP_START = 1e-10  # bert24's warmup starts at alpha_i = 1e-10, not 0


def warmup_stable_decay(tokens: float, *, warmup_tokens: float, decay_tokens: float,
                        total_tokens: float, final_fraction: float) -> float:
    if tokens < warmup_tokens:
        return _WARMUP_START + (1.0 - _WARMUP_START) * tokens / warmup_tokens
    decay_start = total_tokens - decay_tokens
    if tokens < decay_start or decay_tokens <= 0:
        return 1.0
    fraction = (tokens - decay_start) / decay_tokens
    return max(0.0, 1.0 - fraction * (1.0 - final_fraction))


def one_minus_sqrt(tokens: float, *, decay_tokens: float, total_tokens: float,
                   final_fraction: float) -> float:
    decay_start = total_tokens - decay_tokens
    if tokens <= decay_start or decay_tokens <= 0:
        return 1.0
    fraction = (tokens - decay_start) / decay_tokens
    return max(final_fraction, final_fraction + (1.0 - final_fraction) * (1.0 - math.sqrt(fraction)))


def lr_multiplier(config, tokens: float) -> float:
    """The schedule's multiplier after `tokens` tokens of this phase."""
    s = config.schedule
    if s.name == "warmup_stable_decay":
        return warmup_stable_decay(tokens, warmup_tokens=config.optimizer.lr_warmup_tokens,
                                   decay_tokens=s.decay_tokens, total_tokens=s.total_tokens,
                                   final_fraction=s.final_fraction)
    if s.name == "one_minus_sqrt":
        return one_minus_sqrt(tokens, decay_tokens=s.decay_tokens, total_tokens=s.total_tokens,
                              final_fraction=s.final_fraction)
    raise ValueError(f"config.schedule.name={s.name!r}: expected one of {SCHEDULES}")


def learning_rate(config, tokens: float) -> float:
    """The LR of the step that starts after `tokens` tokens of this phase."""
    return config.optimizer.peak_lr * config.schedule.lr_fraction * lr_multiplier(config, tokens)


AUTO = 0   # train.grad_accum_steps = 0: as many micro batches as train.max_micro_tokens needs


# `train.max_micro_tokens` is measured with the model's layers as a loop (the default). A
# `lax.scan` over them without remat keeps every saved activation twice over (the stacks XLA
# copies them into): on XLA's H100 plan the scanned limits were 0.46-0.63 of the loop's at
# every size and length (bench/RESULTS.md), so such a run gets half.
SCAN_WITHOUT_REMAT_SHARE = 0.5


def max_micro_rows(config) -> int:
    """Rows of `train.seq_len` in the largest micro batch that fits one device:
    `train.max_micro_tokens` // seq_len (memory grows about linearly in tokens, so a run whose
    seq_len is overridden keeps a fitting limit), halved for `model.scan_layers` without
    `model.remat` (SCAN_WITHOUT_REMAT_SHARE)."""
    rows = int(config.train.get("max_micro_tokens", 0)) // int(config.train.seq_len)
    return int(rows * SCAN_WITHOUT_REMAT_SHARE) if scan_halves_limit(config) else rows


def scan_halves_limit(config) -> bool:
    """Whether the layers run as a scan without remat (`max_micro_rows` takes a share)."""
    model = config.get("model") or {}
    return bool(model.get("scan_layers", False)) and model.get("remat", "none") == "none"


def grad_accum_steps(config, mean_sequence_length: float | None = None,
                     data_parallel: int = 1, max_rows: int | None = None) -> int:
    """Micro batches per full step: `train.grad_accum_steps`, or, when that is 0 (auto), a
    count that splits `train.global_batch_size` over the `data_parallel` groups and keeps each
    group's share of a micro batch within `max_rows` rows (default `max_micro_rows(config)`:
    the largest micro batch that fits one accelerator; the configs set
    `train.max_micro_tokens` per size and row length from bench/memory.py's H100 table): the
    fewest such, or up to twice as many where that rounds the step's rows nearer its
    sequences. The answer follows the run's mean sequence length and device count, so the
    same config fills one GPU or eight. bench/memory.py passes `max_rows` it measured."""
    accum = int(config.train.grad_accum_steps)
    if accum != AUTO:
        return accum
    limit = max_micro_rows(config) if max_rows is None else int(max_rows)
    if limit < 1:
        scanned = scan_halves_limit(config)
        factor = f"{1 / SCAN_WITHOUT_REMAT_SHARE:g} x " if scanned else ""
        raise ValueError(f"config.train.grad_accum_steps=0 (auto) needs config.train."
                         f"max_micro_tokens >= {factor}train.seq_len={config.train.seq_len} "
                         f"(the tokens of a micro batch that fit one device"
                         f"{', halved for scan_layers without remat' if scanned else ''}), "
                         f"got {config.train.get('max_micro_tokens', 0)}; or set "
                         "grad_accum_steps to a count")
    seqs = int(config.train.global_batch_size)
    fits = [accum for accum in range(1, seqs + 1) if seqs % (accum * data_parallel) == 0 and
            _rows(config, mean_sequence_length, data_parallel, accum)
            <= limit * accum * data_parallel]
    if fits:
        # A step's rows round to whole micro batches on every device, which can move its
        # tokens by up to half of accum x data_parallel rows (1b at 8192: 256 rows for 305):
        # of the splits with at most twice the fewest micro batches, the one whose rows come
        # nearest the sequences' (ties: fewer micro batches).
        exact = seqs * (mean_sequence_length or config.train.seq_len) / config.train.seq_len
        return min((accum for accum in fits if accum <= 2 * fits[0]), key=lambda accum: (
            abs(_rows(config, mean_sequence_length, data_parallel, accum) - exact), accum))
    raise ValueError(f"config.train.global_batch_size={seqs} does not split into micro batches "
                     f"of at most {limit} rows per device (config.train.max_micro_tokens) over "
                     f"{data_parallel} data-parallel devices (it must be a multiple of their "
                     "count); change the mesh, or set grad_accum_steps")


def checked_grad_accum_steps(config, mean_sequence_length: float | None,
                             data_parallel: int) -> int:
    """grad_accum_steps, checked to split the step's sequences over the data-parallel devices
    (and the eval batch to split over them: it failed at the first evaluation, before the
    first checkpoint, so every rerun failed there again)."""
    eval_rows = int(config.data.eval_batch_size)
    if config.train.eval_batches and (eval_rows < 1 or eval_rows % data_parallel):
        fit = max(data_parallel, eval_rows // data_parallel * data_parallel)
        raise ValueError(f"config.data.eval_batch_size={eval_rows} does not split over the "
                         f"{data_parallel} data-parallel devices (data x fsdp): set it to a "
                         f"multiple of {data_parallel}, e.g. {fit}")
    accum = grad_accum_steps(config, mean_sequence_length, data_parallel)
    if config.train.global_batch_size % (data_parallel * accum):
        raise ValueError(
            f"config.train.global_batch_size={config.train.global_batch_size} must split into "
            f"grad_accum_steps={accum} micro batches whose rows divide over data x fsdp = "
            f"{data_parallel} devices")
    return accum


def describe_split(config, mean_sequence_length: float | None, data_parallel: int) -> str:
    """What a run logs of its step: tokens per step and the micro batches that carry them
    (raises as checked_grad_accum_steps does)."""
    accum = checked_grad_accum_steps(config, mean_sequence_length, data_parallel)
    rows = rows_per_step(config, mean_sequence_length, data_parallel)
    mean = ("(demo: one row each)" if mean_sequence_length is None
            else f"{mean_sequence_length:.1f}")
    limit = "" if config.train.grad_accum_steps else (
        f", the fewest within {max_micro_rows(config)} rows (config.train.max_micro_tokens="
        f"{config.train.max_micro_tokens}"
        + (", halved: layers scanned without remat)" if scan_halves_limit(config) else ")"))
    micro = rows // accum
    return (f"tokens per step: {config.train.global_batch_size} sequences of mean length {mean} "
            f"-> {rows} rows of {config.train.seq_len} = {rows * config.train.seq_len:,} tokens; "
            f"{accum} micro batches of {micro} rows per step ({micro // data_parallel} per "
            f"data-parallel device){limit}")


def _rows(config, mean_sequence_length: float | None, data_parallel: int, accum: int,
          sequences: int | None = None) -> int:
    seqs = config.train.global_batch_size if sequences is None else sequences
    if mean_sequence_length is None:
        return seqs
    seq_len = config.train.seq_len
    if not 0 < mean_sequence_length <= seq_len:
        raise ValueError(f"mean_sequence_length={mean_sequence_length}: must lie in "
                         f"(0, config.train.seq_len={seq_len}] (pieces longer than seq_len "
                         "are split by the loader)")
    quantum = accum * data_parallel
    if quantum < 1:
        raise ValueError(f"config.train.grad_accum_steps={accum} and "
                         f"data_parallel={data_parallel} must be >= 1")
    rows = seqs * mean_sequence_length / seq_len
    return quantum * max(1, round(rows / quantum))


def rows_per_step(config, mean_sequence_length: float | None = None, data_parallel: int = 1,
                  *, sequences: int | None = None) -> int:
    """Packed rows of `train.seq_len` tokens that carry `sequences` (default
    `train.global_batch_size`) sequences of the data's mean length.

    Ettin's step was 4608 unpacked sequences (recipe §3.2.1); our rows are packed, so a step
    holds sequences x mean_sequence_length / seq_len rows, rounded to the nearest multiple of
    grad_accum_steps x data_parallel (whole micro batches that split over the data-parallel
    groups), and at least one row per micro batch and group. mean_sequence_length is what
    data_pipeline.lengths measures; None (the demo, or no measurement) keeps one row per
    sequence, i.e. rows = sequences.
    """
    accum = grad_accum_steps(config, mean_sequence_length, data_parallel)
    return _rows(config, mean_sequence_length, data_parallel, accum, sequences)


def warmup_micro_batches(config, tokens: float, full: int) -> int:
    """Micro batches in the step after `tokens` tokens, of `full` in a full step.

    Batch-size warmup (recipe §4.4) counts sequences: a step carries
    `optimizer.batch_warmup_start_fraction` (f) of `train.global_batch_size` at first, in whole
    micro batches (ceil(full x f), at least one), and grows linearly to all of them over
    `optimizer.batch_warmup_tokens` in steps of that many micro batches: about 1 / f distinct
    step sizes whatever the split, as each size compiles the train step once more. Rows
    convert sequences as rows_per_step does, so the count does not depend on the mean.
    `full` is the warmup's split of a step (warmup_split), not always grad_accum_steps.
    """
    warmup = config.optimizer.batch_warmup_tokens
    if warmup <= 0 or tokens >= warmup:
        return full
    first = max(1, min(full, math.ceil(full * _warmup_start(config) - 1e-9)))
    levels = math.ceil(full / first)
    return min(full, first * (1 + int((levels - 1) * tokens / warmup)))


def _warmup_start(config) -> float:
    fraction = float(config.optimizer.get("batch_warmup_start_fraction", 1 / 8))
    if not 0 < fraction <= 1:
        raise ValueError(f"config.optimizer.batch_warmup_start_fraction={fraction}: the share of "
                         "the batch the first step carries must lie in (0, 1]")
    return fraction


def warmup_split(config, mean_sequence_length: float | None = None,
                 data_parallel: int = 1) -> tuple[int, int]:
    """(micro batches, rows in each): the pieces a full step is cut into while the batch-size
    warmup lasts; the warmup's steps are whole numbers of them (warmup_micro_batches).

    The run's own split (grad_accum_steps micro batches of micro_batch_size rows) serves when
    f x its count is whole (f = optimizer.batch_warmup_start_fraction). Otherwise a warmup
    step could only be whole micro batches of it: the first step would carry more than f of
    the batch (a third for three micro batches at f = 1/8), and a step of one micro batch (17m
    on four GPUs) would have no warmup at all. Then the warmup cuts the step into the fewest
    smaller micro batches, at least as many as the run's, of which f is a whole number (8, 16,
    ... at f = 1/8; 10, 20, ... at f = 0.3; each at least one row per device). Their rows are
    a multiple of `data_parallel`, rounded down: they need not add up to a full step, which
    keeps the run's own split. The warmup then counts as many of them as a full step holds
    (rounded down to a multiple of q): counting only the pieces first chosen, a step of 288
    rows on 4 devices cut into 40 pieces of 4 rows topped out at 140 rows before jumping to
    288, where 72 pieces grow to 252."""
    accum = grad_accum_steps(config, mean_sequence_length, data_parallel)
    full = rows_per_step(config, mean_sequence_length, data_parallel)
    # f as p / q in lowest terms (q <= 64): multiples of q micro batches hold f of them whole.
    quantum = fractions.Fraction(_warmup_start(config)).limit_denominator(64).denominator
    pieces = min(quantum * math.ceil(accum / quantum), full // data_parallel)
    if pieces <= accum:
        return accum, full // accum
    piece_rows = full // (pieces * data_parallel) * data_parallel
    # At least the pieces chosen: a step of fewer than q rows per device keeps one row each.
    return max(pieces, full // piece_rows // quantum * quantum), piece_rows


def micro_batch_size(config, mean_sequence_length: float | None = None,
                     data_parallel: int = 1) -> int:
    """Rows per micro batch (all hosts together): rows_per_step / grad_accum_steps."""
    seqs = config.train.global_batch_size
    accum = grad_accum_steps(config, mean_sequence_length, data_parallel)
    if accum < 1 or seqs % accum:
        raise ValueError(f"config.train.global_batch_size={seqs} is not a multiple of "
                         f"config.train.grad_accum_steps={accum}")
    return rows_per_step(config, mean_sequence_length, data_parallel) // accum


def rows_schedule(config, mean_sequence_length: float | None = None, data_parallel: int = 1):
    """rows_for_step(step) -> global rows of optimizer step `step` (0-based) of this phase.

    A step's tokens are its rows x seq_len. Steps are replayed from the start, so the answer
    is the same on a resumed run; after the batch-size warmup every step is full.
    """
    pieces, piece_rows = warmup_split(config, mean_sequence_length, data_parallel)
    full = rows_per_step(config, mean_sequence_length, data_parallel)
    seq_len = config.train.seq_len
    warmup = config.optimizer.batch_warmup_tokens
    rows = []      # rows of every warmup step computed so far
    tokens = [0]   # tokens seen before step len(rows)

    def rows_for_step(step: int) -> int:
        while len(rows) <= step and tokens[0] < warmup:
            count = warmup_micro_batches(config, tokens[0], pieces)
            rows.append(full if count == pieces else piece_rows * count)
            tokens[0] += rows[-1] * seq_len
        return rows[step] if step < len(rows) else full

    return rows_for_step


def batch_warmup_steps(config, mean_sequence_length: float | None = None,
                       data_parallel: int = 1) -> int:
    """Steps of the batch-size warmup: those of fewer rows than a full step (rows_schedule)."""
    rows_for_step = rows_schedule(config, mean_sequence_length, data_parallel)
    full = rows_per_step(config, mean_sequence_length, data_parallel)
    steps = 0
    while rows_for_step(steps) < full:
        steps += 1
    return steps


def micro_rows_schedule(config, mean_sequence_length: float | None = None,
                        data_parallel: int = 1):
    """micro_rows_for(rows) -> rows per micro batch of a step of `rows` rows (rows_for_step):
    the run's micro batch where the step is a whole number of them, else the warmup's
    (warmup_split)."""
    micro = micro_batch_size(config, mean_sequence_length, data_parallel)
    _, piece_rows = warmup_split(config, mean_sequence_length, data_parallel)

    def micro_rows_for(rows: int) -> int:
        micro_rows = micro if rows % micro == 0 else piece_rows
        if rows % micro_rows:
            raise ValueError(f"a step of {rows} rows is no whole number of micro batches of "
                             f"{micro} or {piece_rows} rows")
        return micro_rows

    return micro_rows_for


def total_steps(config, mean_sequence_length: float | None = None, data_parallel: int = 1) -> int:
    """Optimizer steps until `schedule.total_tokens` are seen."""
    rows_for_step = rows_schedule(config, mean_sequence_length, data_parallel)
    full_tokens = rows_per_step(config, mean_sequence_length, data_parallel) * config.train.seq_len
    step, tokens = 0, 0
    while tokens < config.schedule.total_tokens:
        rows = rows_for_step(step)
        if rows * config.train.seq_len == full_tokens and tokens >= config.optimizer.batch_warmup_tokens:
            return step + math.ceil((config.schedule.total_tokens - tokens) / full_tokens)
        tokens += rows * config.train.seq_len
        step += 1
    return step


def checkpoint_every_steps(config, mean_sequence_length: float | None = None,
                           data_parallel: int = 1) -> int:
    """Steps between checkpoints: `checkpoint.every_steps` if > 0, else
    `checkpoint.every_tokens` over the tokens of a full step (rows_per_step x seq_len)."""
    if config.checkpoint.every_steps > 0:
        return int(config.checkpoint.every_steps)
    full_tokens = rows_per_step(config, mean_sequence_length, data_parallel) * config.train.seq_len
    return max(1, math.ceil(config.checkpoint.every_tokens / full_tokens))


def validate(config):
    """Checks the schedule fields together, with messages naming the config keys."""
    s = config.schedule
    for key in ("seq_len", "global_batch_size"):       # rows and steps are divided by them
        if config.train[key] < 1:
            raise ValueError(f"config.train.{key}={config.train[key]}: must be >= 1")
    if config.train.grad_accum_steps < 0:
        raise ValueError(f"config.train.grad_accum_steps={config.train.grad_accum_steps}: must "
                         f"be >= 0 ({AUTO} = as many as train.max_micro_tokens needs)")
    if s.name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={s.name!r}: expected one of {SCHEDULES}")
    if s.total_tokens <= 0:
        raise ValueError(f"config.schedule.total_tokens={s.total_tokens}: must be > 0")
    if not 0 <= s.decay_tokens <= s.total_tokens:
        raise ValueError(f"config.schedule.decay_tokens={s.decay_tokens} must lie in "
                         f"[0, total_tokens={s.total_tokens}]")
    if s.name == "warmup_stable_decay" and config.optimizer.lr_warmup_tokens < 0:
        raise ValueError("config.optimizer.lr_warmup_tokens must be >= 0")
    _warmup_start(config)
    if config.checkpoint.keep_last < 1:     # none kept: a crash would leave nothing to resume
        raise ValueError(f"config.checkpoint.keep_last={config.checkpoint.keep_last}: must be "
                         ">= 1, the newest checkpoints are what a restart resumes from")
    for key, value in (("log.every_steps", config.log.every_steps),
                       ("train.eval_every_steps", config.train.eval_every_steps)):
        if value < 1:                       # steps are taken modulo it
            raise ValueError(f"config.{key}={value}: must be >= 1")
    if config.train.eval_batches < 0:
        raise ValueError(f"config.train.eval_batches={config.train.eval_batches}: must be >= 0 "
                         "(0 = no evaluation)")
    if config.checkpoint.keep_every_nth < 0:
        raise ValueError(f"config.checkpoint.keep_every_nth={config.checkpoint.keep_every_nth}: "
                         "must be >= 0 (0 = keep none for good)")
    micro_batch_size(config)
