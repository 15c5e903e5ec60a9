"""Synthetic training batches for the benches (no flags here: memory.py and train_step.py both
import it)."""
from __future__ import annotations


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
