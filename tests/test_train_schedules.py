"""LR and batch-size schedules against the recipe's phase table (recipe §3.2, §3.3, §4.2)."""
import itertools
import math

import numpy as np
import pytest

from configs import ettin_150m, ettin_1b, ettin_17m, ettin_tiny
from ettin_jax import schedules

PEAK_150M = 8e-4


def lr(config, tokens):
    return schedules.learning_rate(config, tokens)


def test_pretraining_is_linear_warmup_then_constant():
    c = ettin_150m.get_config("mlm")
    warmup = 3e9                                              # recipe §3.1, 150m
    assert lr(c, 0) == pytest.approx(1e-10 * PEAK_150M)
    assert lr(c, warmup / 4) == pytest.approx(0.25 * PEAK_150M, rel=1e-6)
    assert lr(c, warmup) == pytest.approx(PEAK_150M)
    assert lr(c, 1.0e12) == pytest.approx(PEAK_150M)           # constant, no decay
    assert lr(c, 1.7e12 - 1) == pytest.approx(PEAK_150M)


def test_extension_decays_one_minus_sqrt_from_peak_to_half():
    c = ettin_150m.get_config("mlm_ext")
    total = 250e9
    assert lr(c, 0) == pytest.approx(PEAK_150M)               # no warmup: starts at peak
    # 1 - sqrt(1/4) = 0.5 of the way from peak to peak/2
    assert lr(c, total / 4) == pytest.approx(0.75 * PEAK_150M)
    assert lr(c, total) == pytest.approx(0.5 * PEAK_150M)
    full = schedules.grad_accum_steps(c)
    assert schedules.warmup_micro_batches(c, 0, full) == full          # no batch warmup


def test_decay_goes_from_half_peak_to_two_percent():
    c = ettin_150m.get_config("clm_decay")
    total = 50e9
    assert lr(c, 0) == pytest.approx(0.5 * PEAK_150M)
    assert lr(c, total * 0.09) == pytest.approx(0.5 * PEAK_150M * (0.04 + 0.96 * 0.7))
    assert lr(c, total) == pytest.approx(0.02 * PEAK_150M)


def test_cross_objective_is_wsd_at_the_decay_lr():
    c = ettin_150m.get_config("mlm_from_clm")
    base = 4e-4                                               # recipe §3.3: 4e-4 for base
    assert lr(c, 1.5e9) == pytest.approx(0.5 * base, rel=1e-6)  # half way through 3B warmup
    assert lr(c, 3e9) == pytest.approx(base)
    assert lr(c, 40e9) == pytest.approx(base)                 # decay starts 10B before 50B
    assert lr(c, 45e9) == pytest.approx(base * (1 - 0.5 * 0.98))
    assert lr(c, 50e9) == pytest.approx(0.02 * base)
    assert c.optimizer.max_lr_fraction == 0.5                 # fresh optimizer: max_lr = its LR


def test_1b_phases_are_a_third_as_long():
    ext, decay, cross = (ettin_1b.get_config(a) for a in ("mlm_ext", "mlm_decay", "clm_from_mlm"))
    assert ext.schedule.total_tokens == pytest.approx(83.333e9, rel=1e-4)
    assert decay.schedule.total_tokens == pytest.approx(16.667e9, rel=1e-4)
    assert cross.optimizer.lr_warmup_tokens == 1e9
    assert lr(cross, 1e9) == pytest.approx(2.5e-4)            # recipe §3.3: 2.5e-4 for 1b


def test_small_cross_lr():
    assert lr(ettin_17m.get_config("clm_from_mlm"), 5e9) == pytest.approx(1.5e-3)


def test_overriding_total_tokens_moves_the_decay_with_it():
    c = ettin_150m.get_config("mlm_decay")
    c.schedule.total_tokens = 1e6
    assert c.schedule.decay_tokens == 1e6
    assert lr(c, 1e6) == pytest.approx(0.02 * PEAK_150M)


def test_batch_size_warmup_grows_linearly_in_micro_batches():
    c = ettin_17m.get_config("mlm")
    c.train.grad_accum_steps = 8
    full = 8
    warmup = c.optimizer.batch_warmup_tokens
    assert schedules.warmup_micro_batches(c, 0, full) == 1
    assert schedules.warmup_micro_batches(c, warmup / 2, full) == 1 + math.floor((full - 1) / 2)
    assert schedules.warmup_micro_batches(c, warmup, full) == full
    counts = [schedules.warmup_micro_batches(c, t, full)
              for t in range(0, int(warmup), int(warmup) // 50)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] <= full


def test_validate_names_the_bad_key():
    c = ettin_17m.get_config("mlm")
    c.train.grad_accum_steps = 7
    with pytest.raises(ValueError, match="grad_accum_steps"):
        schedules.validate(c)
    c = ettin_17m.get_config("mlm")
    c.schedule.name = "cosine"
    with pytest.raises(ValueError, match="config.schedule.name"):
        schedules.validate(c)


@pytest.mark.parametrize("data_parallel", [3, 6, 12])
def test_an_eval_batch_that_does_not_split_over_the_devices_is_refused(data_parallel):
    """The configs' eval batch of 64 on 3, 6 or 12 devices: the step's sequences split, the
    eval batch does not (it failed at the first evaluation, before any checkpoint)."""
    c = ettin_150m.get_config("mlm")
    assert c.train.global_batch_size % data_parallel == 0 and c.train.eval_batches > 0
    with pytest.raises(ValueError, match=rf"config.data.eval_batch_size=64 does not split over "
                                         rf"the {data_parallel} data-parallel devices .* e\.g\. "
                                         rf"{64 // data_parallel * data_parallel}$"):
        schedules.checked_grad_accum_steps(c, 600.0, data_parallel)
    c.data.eval_batch_size = 64 // data_parallel * data_parallel
    assert schedules.checked_grad_accum_steps(c, 600.0, data_parallel) >= 1
    c.data.eval_batch_size, c.train.eval_batches = 64, 0          # no evaluation: not checked
    assert schedules.checked_grad_accum_steps(c, 600.0, data_parallel) >= 1


def test_rows_per_step_rounds_to_whole_micro_batches_over_data_parallel_groups():
    c = ettin_17m.get_config("mlm")
    assert schedules.rows_per_step(c) == 4608                 # no mean (demo): rows = sequences
    rng = np.random.default_rng(0)
    for _ in range(300):
        c.train.seq_len = int(rng.choice([128, 1024, 8192]))
        c.train.grad_accum_steps = int(rng.choice([1, 2, 8, 16]))
        dp = int(rng.choice([1, 2, 4, 64]))
        mean = float(rng.uniform(1, c.train.seq_len))
        rows = schedules.rows_per_step(c, mean, dp)
        quantum = c.train.grad_accum_steps * dp
        exact = 4608 * mean / c.train.seq_len
        assert rows % quantum == 0 and rows >= quantum
        assert abs(rows - exact) <= quantum / 2 or rows == quantum    # nearest multiple
        assert schedules.micro_batch_size(c, mean, dp) * c.train.grad_accum_steps == rows
    c.train.seq_len, c.train.grad_accum_steps = 1024, 8
    assert schedules.rows_per_step(c, 1024.0) == 4608          # full rows: one per sequence
    assert schedules.rows_per_step(c, 1.0, 4) == 32            # at least a row per micro batch
    with pytest.raises(ValueError, match="config.train.seq_len=1024"):
        schedules.rows_per_step(c, 2000.0)


def test_warmup_steps_and_checkpoints_follow_the_packed_rows():
    c = ettin_17m.get_config("mlm")
    c.schedule.total_tokens = 4e9
    c.optimizer.batch_warmup_tokens = 1e9
    c.train.grad_accum_steps = 8
    mean, seq_len, accum = 700.0, c.train.seq_len, c.train.grad_accum_steps
    full = schedules.rows_per_step(c, mean)
    assert full == accum * round(4608 * mean / seq_len / accum)
    rows_for_step = schedules.rows_schedule(c, mean)
    # replay by hand: sequences ramp from a micro batch's share to 4608 over the warmup tokens,
    # converted to rows as rows_per_step converts 4608 (whole micro batches of full / accum)
    tokens, step = 0.0, 0
    while tokens < c.schedule.total_tokens:
        sequences = 4608 / accum * (1 + math.floor((accum - 1) * min(1.0, tokens / 1e9)))
        assert rows_for_step(step) == sequences / 4608 * full, step
        tokens += rows_for_step(step) * seq_len
        step += 1
    assert rows_for_step(0) == full // accum and rows_for_step(10**6) == full
    assert schedules.total_steps(c, mean) == step
    assert schedules.total_steps(c) > 0 and schedules.total_steps(c) < step
    every = c.checkpoint.every_tokens
    assert schedules.checkpoint_every_steps(c, mean) == math.ceil(every / (full * seq_len))
    assert schedules.checkpoint_every_steps(c) == math.ceil(every / (4608 * seq_len))
    c.checkpoint.every_steps = 7
    assert schedules.checkpoint_every_steps(c, mean) == 7


def test_total_steps_matches_a_step_by_step_count_without_warmup():
    c = ettin_150m.get_config("clm_decay")                    # no batch warmup in phase 3
    c.schedule.total_tokens = 3e10
    for mean in (None, 2500.0):
        rows = schedules.rows_per_step(c, mean, data_parallel=4)
        assert schedules.total_steps(c, mean, data_parallel=4) == math.ceil(
            3e10 / (rows * c.train.seq_len))


def test_auto_grad_accum_takes_the_fewest_micro_batches_that_fit():
    c = ettin_150m.get_config("mlm")
    c.train.grad_accum_steps, c.train.max_micro_tokens = 0, 50 * 1024 + 1023   # 50 rows
    # By hand, mean 600 at 1024: 4608 x 600 / 1024 = 2700 rows. One device: 48 micro batches
    # would hold round(2700 / 48) = 56 rows, 64 hold round(42.2) = 42 <= 50 (the divisors of
    # 4608 = 2^9 x 3^2 between are none): 2688 rows, and no split up to 128 comes nearer
    # (72: 2736, 96: 2688, 128: 2688). Eight devices: 6 x 8 groups hold 56, 8 x 8 hold 42.
    assert schedules.grad_accum_steps(c, 600.0) == 64
    assert schedules.rows_per_step(c, 600.0) == 64 * 42
    assert schedules.micro_batch_size(c, 600.0) == 42
    assert schedules.grad_accum_steps(c, 600.0, 8) == 8
    assert schedules.micro_batch_size(c, 600.0, 8) == 8 * 42
    # 1b-like at 8192 (mean 543: 305.4 rows' worth, 1 row fits): the fewest split, 256 micro
    # batches of one row, would carry 256 rows (-16%); 288 carries 288 (-5.7%): taken.
    c.train.seq_len, c.train.max_micro_tokens = 8192, 8192
    assert schedules.grad_accum_steps(c, 543.0) == 288
    assert schedules.rows_per_step(c, 543.0) == 288
    # A property against brute force over every split, for random limits, means and meshes:
    # a split that fits, at most twice the fewest, and none of those nearer the sequences.
    rng = np.random.default_rng(1)
    for _ in range(200):
        c.train.seq_len = int(rng.choice([1024, 8192]))
        limit = int(rng.integers(1, 200))
        c.train.max_micro_tokens = limit * c.train.seq_len + int(rng.integers(0, c.train.seq_len))
        dp = int(rng.choice([1, 2, 4, 8, 16]))
        mean = float(rng.uniform(50, c.train.seq_len))
        exact = 4608 * mean / c.train.seq_len
        accum = schedules.grad_accum_steps(c, mean, dp)
        rows = schedules.rows_per_step(c, mean, dp)

        def rows_of(a):
            return a * dp * max(1, round(exact / (a * dp)))
        fits = [a for a in range(1, 4609) if 4608 % (a * dp) == 0 and
                rows_of(a) <= limit * a * dp]
        assert accum in fits and accum <= 2 * fits[0] and rows == rows_of(accum)
        assert all(abs(rows_of(a) - exact) >= abs(rows - exact)
                   for a in fits if a <= 2 * fits[0])
        assert rows % (accum * dp) == 0 and rows // (accum * dp) <= limit
    c.train.max_micro_tokens = c.train.seq_len - 1          # not even one row
    with pytest.raises(ValueError, match=r"max_micro_tokens >= train.seq_len"):
        schedules.validate(c)
    c.train.seq_len, c.train.max_micro_tokens = 1024, 10 * 1024
    with pytest.raises(ValueError, match="over 5 data-parallel devices"):
        schedules.grad_accum_steps(c, 600.0, 5)          # 4608 does not split over 5
    c.train.seq_len = 4096                       # an override: the limit follows the tokens
    assert schedules.max_micro_rows(c) == 2
    accum = schedules.grad_accum_steps(c, 600.0, 4)
    assert schedules.rows_per_step(c, 600.0, 4) // (accum * 4) <= 2
    c.train.grad_accum_steps = 8                          # a count: the limit is not read
    assert schedules.grad_accum_steps(c, 600.0, 4) == 8


def test_batch_warmup_starts_at_a_fraction_of_the_batch_whatever_the_split():
    c = ettin_17m.get_config("mlm")
    warmup = c.optimizer.batch_warmup_tokens
    # first = ceil(full / 8) micro batches, then steps of `first`: at most 8 step sizes
    for full, first, half in ((8, 1, 4), (96, 12, 48), (12, 2, 6), (4, 1, 2), (1, 1, 1)):
        assert schedules.warmup_micro_batches(c, 0, full) == first
        assert schedules.warmup_micro_batches(c, warmup / 2, full) == half
        assert schedules.warmup_micro_batches(c, warmup, full) == full
        counts = {schedules.warmup_micro_batches(c, t, full)
                  for t in np.linspace(0, warmup, 1000)}
        assert all(n % first == 0 or n == full for n in counts) and len(counts) <= 8
    c.optimizer.batch_warmup_start_fraction = 0.5
    assert schedules.warmup_micro_batches(c, 0, 96) == 48
    assert schedules.warmup_micro_batches(c, 0, 7) == 4
    assert schedules.warmup_micro_batches(c, warmup * 0.99, 7) == 4      # ceil(7 / 4) = 2 levels
    c.optimizer.batch_warmup_tokens = 0
    assert schedules.warmup_micro_batches(c, 0, 96) == 96


def test_batch_warmup_cuts_a_step_of_one_micro_batch_into_eighths():
    """17m on four devices takes its step as one micro batch: the warmup still starts at an
    eighth of it, in micro batches of an eighth. By hand: 4608 sequences of mean 608 are
    2736 rows of 1024; an eighth, rounded down to whole rows per device, is 4 x 85 = 340."""
    c = ettin_17m.get_config("mlm")
    c.train.grad_accum_steps = 1
    mean, dp, warmup = 608.0, 4, c.optimizer.batch_warmup_tokens
    assert schedules.rows_per_step(c, mean, dp) == 2736
    assert schedules.warmup_split(c, mean, dp) == (8, 340)
    assert schedules.describe_split(c, mean, dp) == (
        "tokens per step: 4608 sequences of mean length 608.0 -> 2736 rows of 1024 = 2,801,664 "
        "tokens; 1 micro batches of 2736 rows per step (684 per data-parallel device)")
    rows_for_step = schedules.rows_schedule(c, mean, dp)
    micro_rows_for = schedules.micro_rows_schedule(c, mean, dp)
    tokens, step = 0.0, 0
    while tokens < warmup:
        eighths = 1 + math.floor(7 * tokens / warmup)
        expected = 2736 if eighths == 8 else 340 * eighths
        assert rows_for_step(step) == expected, step
        assert micro_rows_for(expected) == (2736 if eighths == 8 else 340)
        tokens += expected * c.train.seq_len
        step += 1
    assert rows_for_step(step) == rows_for_step(10 ** 7) == 2736 and step > 10_000


@pytest.mark.parametrize("start", [1 / 8, 0.3, 0.4, 0.15])
def test_batch_warmup_starts_at_any_fraction_and_grows_in_equal_steps(start):
    """f = batch_warmup_start_fraction need not be 1 / n: the first step carries f of the
    batch (0.3, not the half that whole micro batches of a step cut in four would give), and
    the warmup's sizes are 1, 2, ... times the first until the full step. 150m as its config
    splits it, on one device and on eight."""
    c = ettin_150m.get_config("mlm")
    c.optimizer.batch_warmup_start_fraction = start
    schedules.validate(c)
    for dp in (1, 8):
        full = schedules.rows_per_step(c, 608.0, dp)
        rows_for_step = schedules.rows_schedule(c, 608.0, dp)
        sizes, tokens = [], 0
        while tokens < c.optimizer.batch_warmup_tokens:
            sizes.append(rows_for_step(len(sizes)))
            tokens += sizes[-1] * c.train.seq_len
        assert abs(sizes[0] / full - start) <= 0.02, (dp, sizes[0], full)
        levels = math.ceil(1 / start - 1e-9)       # 8, 4 (0.3, 0.6, 0.9, 1), 3, 7
        assert rows_for_step(len(sizes)) == full and sizes == sorted(sizes)
        assert sorted({*sizes, full}) == [k * sizes[0] for k in range(1, levels)] + [full], dp
    for bad in (0.0, 1.5):
        c.optimizer.batch_warmup_start_fraction = bad
        with pytest.raises(ValueError, match=rf"batch_warmup_start_fraction={bad}: .* \(0, 1\]"):
            schedules.validate(c)


def test_a_run_keeps_at_least_its_newest_checkpoint_and_logs_at_whole_intervals():
    c = ettin_150m.get_config("mlm")
    c.checkpoint.keep_last = 0                # Orbax would delete each save at once
    with pytest.raises(ValueError, match=r"checkpoint.keep_last=0: must be >= 1"):
        schedules.validate(c)
    c.checkpoint.keep_last, c.checkpoint.keep_every_nth = 1, -1
    with pytest.raises(ValueError, match=r"checkpoint.keep_every_nth=-1: must be >= 0"):
        schedules.validate(c)
    c.checkpoint.keep_every_nth = 0
    schedules.validate(c)
    for key, section in (("every_steps", c.log), ("eval_every_steps", c.train)):
        before = section[key]
        section[key] = 0                    # a ZeroDivisionError after the first step before
        with pytest.raises(ValueError, match=rf"config\.\w+\.{key}=0: must be >= 1"):
            schedules.validate(c)
        section[key] = before
    c.train.eval_batches = -1
    with pytest.raises(ValueError, match=r"config.train.eval_batches=-1: must be >= 0"):
        schedules.validate(c)


def test_warmup_steps_split_into_micro_batches_that_fit_and_divide_over_the_devices():
    c = ettin_17m.get_config("mlm")
    c.optimizer.batch_warmup_tokens = 2e8
    rng = np.random.default_rng(1)
    for _ in range(60):
        c.train.grad_accum_steps = int(rng.choice([1, 2, 3, 6, 8, 16]))
        c.optimizer.batch_warmup_start_fraction = float(rng.choice([1 / 8, 1 / 4, 1 / 16]))
        dp = int(rng.choice([1, 2, 4, 8]))
        mean = float(rng.uniform(100, 1024))
        full = schedules.rows_per_step(c, mean, dp)
        micro = schedules.micro_batch_size(c, mean, dp)
        rows_for_step = schedules.rows_schedule(c, mean, dp)
        micro_rows_for = schedules.micro_rows_schedule(c, mean, dp)
        sizes = [rows_for_step(step) for step in range(schedules.total_steps(c, mean, dp))]
        start = c.optimizer.batch_warmup_start_fraction
        assert sizes == sorted(sizes) and sizes[-1] == full
        # an eighth (a quarter, a sixteenth) of the step, less the rows that do not divide
        assert full * start / 2 <= sizes[0] <= full * start, (sizes[0], full, micro)
        assert len(set(sizes)) == round(1 / start)
        for rows in set(sizes):
            micro_rows = micro_rows_for(rows)
            assert rows % micro_rows == 0 and micro_rows % dp == 0 and micro_rows <= micro


def test_batch_warmup_grows_to_the_last_level_below_a_full_step():
    """The warmup counts as many of its pieces as a full step holds. By hand: 1b's
    cross-objective step of 4608 sequences of mean 542.5 is 288 rows on 4 devices, 36 micro
    batches of 8; an eighth needs a multiple of 8 pieces, 40 of 288 // 160 * 4 = 4 rows. A
    full step holds 72 of those: the warmup starts at 9 (36 rows) and grows by 9 to 63 (252
    rows), where counting 40 pieces topped out at 35 (140 rows, under half the step)."""
    c = ettin_1b.get_config("clm_from_mlm")
    assert schedules.rows_per_step(c, 542.5, 4) == 288
    assert schedules.warmup_split(c, 542.5, 4) == (72, 4)
    rows_for_step = schedules.rows_schedule(c, 542.5, 4)
    sizes = sorted(set(rows_for_step(step) for step in range(
        schedules.batch_warmup_steps(c, 542.5, 4) + 1)))
    assert sizes == [36 * k for k in range(1, 8)] + [288]
    # A step of fewer than 8 rows per device (256 x 512 / 8192 = 16 rows, 4 per device): it
    # is cut into 4 pieces of one row per device, not none.
    c.train.global_batch_size, c.train.grad_accum_steps = 256, 1
    assert schedules.rows_per_step(c, 512.0, 4) == 16
    assert schedules.warmup_split(c, 512.0, 4) == (4, 4)
    assert schedules.rows_schedule(c, 512.0, 4)(0) == 4
    # Small batches of every split (a review's sweep found 928 of 2752 with no pieces at all).
    c = ettin_tiny.get_config("mlm")
    c.optimizer.batch_warmup_tokens = 1e6
    for sequences, accum, dp, start in itertools.product(
            range(1, 65), (1, 2, 3, 4, 8), range(1, 9), (1 / 8, 0.3)):
        c.train.global_batch_size, c.train.grad_accum_steps = sequences, accum
        c.optimizer.batch_warmup_start_fraction = start
        full = schedules.rows_per_step(c, 64.0, dp)     # half a row per sequence, rounded
        pieces, piece_rows = schedules.warmup_split(c, 64.0, dp)
        assert pieces >= 1 and 0 < pieces * piece_rows <= full, (sequences, accum, dp, start)
        assert 0 < schedules.rows_schedule(c, 64.0, dp)(0) <= full
    # Every size and phase: no room is left in a full step for q more pieces (f = p / q).
    from configs import ettin_32m, ettin_68m, ettin_400m
    for module in (ettin_17m, ettin_32m, ettin_68m, ettin_150m, ettin_400m, ettin_1b):
        for arg in ("mlm", "clm_from_mlm"):
            c = module.get_config(arg)
            for dp, mean in ((1, 610.0), (2, 542.5), (4, 542.5), (8, 610.0), (8, 542.5)):
                full = schedules.rows_per_step(c, mean, dp)
                pieces, piece_rows = schedules.warmup_split(c, mean, dp)
                assert pieces % 8 == 0 and piece_rows % dp == 0
                assert full - 8 * piece_rows < pieces * piece_rows <= full, (c.size, arg, dp)


def test_every_size_and_phase_fits_its_micro_batches_on_one_device_and_on_eight():
    """The configs' default: grad_accum_steps auto within max_micro_tokens (bench/memory.py's
    H100 table), for Ettin-like means (phase 1 ~ 2.8M / 4608 tokens, phases 2-3 ~ 2.5M / 4608)."""
    from configs import ettin_32m, ettin_68m, ettin_400m
    for module in (ettin_17m, ettin_32m, ettin_68m, ettin_150m, ettin_400m, ettin_1b):
        for arg, mean in (("mlm", 608.0), ("clm_ext", 543.0), ("mlm_decay", 543.0)):
            c = module.get_config(arg)
            assert c.train.grad_accum_steps == schedules.AUTO
            assert schedules.max_micro_rows(c) >= 1 and \
                c.train.max_micro_tokens % c.train.seq_len == 0
            schedules.validate(c)
            for dp in (1, 8):
                accum = schedules.grad_accum_steps(c, mean, dp)
                rows = schedules.rows_per_step(c, mean, dp)
                assert rows // (accum * dp) <= schedules.max_micro_rows(c), (c.size, arg, dp)
                assert rows == pytest.approx(4608 * mean / c.train.seq_len, abs=accum * dp)


def test_layers_scanned_without_remat_split_within_half_the_rows():
    """MAX_MICRO_ROWS is the loop's limit; a scan without remat planned 0.46-0.63 of those rows
    on XLA's H100 plan (bench/RESULTS.md), so the auto split keeps within half of them."""
    c = ettin_150m.get_config("mlm")
    loop_limit = c.train.max_micro_tokens // c.train.seq_len
    assert schedules.max_micro_rows(c) == loop_limit == 103
    loop_accum = schedules.grad_accum_steps(c, 1024.0, 1)
    c.model.scan_layers = True
    assert schedules.max_micro_rows(c) == loop_limit // 2
    accum = schedules.grad_accum_steps(c, 1024.0, 1)
    rows = schedules.rows_per_step(c, 1024.0, 1)
    assert rows // accum <= loop_limit // 2 < rows // loop_accum
    c.model.remat = "full"                      # remat keeps far less than the loop does
    assert schedules.max_micro_rows(c) == loop_limit
    assert schedules.grad_accum_steps(c, 1024.0, 1) == loop_accum
    c.model.remat = "none"
    # A limit measured for this very config (bench/memory.py's max_rows) is taken as it is.
    assert schedules.grad_accum_steps(c, 1024.0, 1, max_rows=loop_limit) == loop_accum
    assert schedules.grad_accum_steps(c, 1024.0, 1, max_rows=loop_limit // 2) == accum
    c.train.max_micro_tokens = c.train.seq_len   # one row, halved: none; the error says so
    with pytest.raises(ValueError, match=r"max_micro_tokens >= 2 x train.seq_len=1024 .*"
                                         r"halved for scan_layers without remat"):
        schedules.grad_accum_steps(c, 1024.0, 1)


def test_progress_eta_counts_the_tokens_left_not_the_steps_left(caplog):
    """Throughput leaves out the window's pauses (restores, evals, saves); the ETA is the tokens
    left at the run's tokens per second, pauses included (a run keeps evaluating and saving),
    not the steps left: during the batch-size warmup a step is a fraction of the steps to come.
    By hand: 100,000 tokens in a window of 1000 s (a few more while the test runs) of which 600
    s were pauses: 250 tokens/s; 8050 tokens left at the run's 100 tokens/s: 80.5 s."""
    import time  # pylint: disable=import-outside-toplevel
    from absl import logging  # pylint: disable=import-outside-toplevel
    from ettin_jax import train_metrics  # pylint: disable=import-outside-toplevel
    c = ettin_17m.get_config("mlm")
    c.train.seq_len, c.schedule.total_tokens = 100, 10_050
    ones = dict(loss_sum=2.0, predictions=1.0, correct=0.0, grad_norm=1.0, applied=1.0,
                param_norm=1.0, real_tokens=1.0, tokens=1.0, skipped=0.0)
    pauses = train_metrics.Pauses()
    pauses.seconds = 50.0                       # before the window: not its own
    window = train_metrics.Window(pauses, start=time.time() - 1000.0)
    window.add(train_metrics.TrainMetrics.single_from_model_output(**ones), rows=1000)
    pauses.seconds += 600.0
    with caplog.at_level(logging.INFO):
        scalars = train_metrics.train_scalars(
            window, c, step=2, num_steps=100, learning_rate=1e-3, rows=1000, tokens=2000,
            peak_flops=0.0, run_tokens_per_sec=100.0)
    assert scalars["tokens_per_sec"] == pytest.approx(250.0, rel=0.02)
    assert scalars["steps_per_sec"] == pytest.approx(1 / 400, rel=0.02)
    # By the window's 250 tokens/s: 32 s; by steps: 27h13m.
    assert "step 2/100 (2%)" in caplog.text and "ETA 1m20s" in caplog.text
