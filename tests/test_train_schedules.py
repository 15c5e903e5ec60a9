"""LR and batch-size schedules against the recipe's phase table (recipe §3.2, §3.3, §4.2)."""
import math

import pytest

from configs import ettin_150m, ettin_1b, ettin_17m
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
    assert schedules.num_micro_batches(c, 0) == c.train.grad_accum_steps


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
    assert schedules.num_micro_batches(c, 0) == 1
    assert schedules.num_micro_batches(c, warmup / 2) == 1 + math.floor((full - 1) / 2)
    assert schedules.num_micro_batches(c, warmup) == full
    counts = [schedules.num_micro_batches(c, t) for t in range(0, int(warmup), int(warmup) // 50)]
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
