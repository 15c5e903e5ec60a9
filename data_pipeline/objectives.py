"""Objective transforms of one packed row: MLM masking or CLM next-token labels.

Both take a packed row (data_pipeline.packing) and return it with `labels` int32 [seq_len]
(-100 = no loss). They are pure functions of (row, seed): the MLM random draws come from
numpy's PCG64 seeded with (seed, row_key), so the same row always gets the same mask, whatever
the worker count or restart history.
"""
from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -100


def max_predictions(seq_len: int, ratio: float) -> int:
    """Fixed number of MLM prediction slots per row: ceil(ratio * seq_len) + 1, rounded up to 8.

    `mlm_row` masks exactly floor(ratio * n_eligible + u), u ~ U[0, 1), positions, and
    n_eligible <= seq_len, so the count never exceeds this cap; nothing is ever cut.
    """
    need = int(np.ceil(ratio * seq_len)) + 1
    return -(-need // 8) * 8


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    ratio: float
    mask_id: int
    special_ids: tuple          # never masked (CLS, SEP, PAD, MASK, ...)
    random_high: int            # random replacements are drawn from [0, random_high)
    max_predictions: int
    seed: int
    mask_prob: float = 0.8      # of the selected positions: -> [MASK]
    random_prob: float = 0.1    # -> random id; the rest keep their token


def mlm_row(row: dict, cfg: MLMConfig) -> dict:
    """Adds MLM fields to a packed row.

    Selected positions are a uniformly random subset of the eligible ones (inside a segment and
    not a special token) of size floor(ratio * n_eligible + u). Of those, 80% become [MASK], 10%
    a uniformly random regular id, 10% stay. Outputs (int32):
      input_ids        [seq_len]          the corrupted ids
      labels           [seq_len]          original id at selected positions, -100 elsewhere
      mask_positions   [max_predictions]  selected positions in increasing order, then 0
      mask_labels      [max_predictions]  their original ids, then -100
    """
    ids = row["input_ids"]
    rng = np.random.default_rng([cfg.seed, *(int(k) for k in row["row_key"])])
    eligible = np.flatnonzero((row["segment_ids"] > 0) & ~np.isin(ids, cfg.special_ids))
    n = min(int(cfg.ratio * eligible.size + rng.random()), cfg.max_predictions)
    chosen = np.sort(rng.choice(eligible, size=n, replace=False)) if n else eligible[:0]
    u = rng.random(n)
    corrupted = ids.copy()
    corrupted[chosen[u < cfg.mask_prob]] = cfg.mask_id
    is_random = (u >= cfg.mask_prob) & (u < cfg.mask_prob + cfg.random_prob)
    corrupted[chosen[is_random]] = rng.integers(0, cfg.random_high, int(is_random.sum()),
                                                dtype=np.int32)
    labels = np.full(ids.shape, IGNORE, np.int32)
    labels[chosen] = ids[chosen]
    mask_positions = np.zeros(cfg.max_predictions, np.int32)
    mask_positions[:n] = chosen
    mask_labels = np.full(cfg.max_predictions, IGNORE, np.int32)
    mask_labels[:n] = ids[chosen]
    return dict(row, input_ids=corrupted, labels=labels, mask_positions=mask_positions,
                mask_labels=mask_labels)


def clm_row(row: dict) -> dict:
    """Adds next-token `labels`: labels[t] = input_ids[t+1] when t and t+1 are in the same
    segment (not padding); -100 at each segment's last token and on padding."""
    ids, seg = row["input_ids"], row["segment_ids"]
    labels = np.full(ids.shape, IGNORE, np.int32)
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    labels[:-1][same] = ids[1:][same]
    return dict(row, labels=labels)
