"""Tokenised GLUE examples and the padded batches the fine-tuning steps read."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def min_seq_len(num_texts: int) -> int:
    """The shortest max_len that keeps a token of each text: [CLS], then text and [SEP] each."""
    return 1 + 2 * num_texts


def encode(tokenizer, texts: Sequence[tuple], *, cls_id: int, sep_id: int, max_len: int):
    """`[CLS] a [SEP] (b [SEP])` token ids, longer text truncated first to fit `max_len`."""
    if texts and max_len < min_seq_len(len(texts[0])):
        raise ValueError(f"max_len={max_len}: {len(texts[0])} text(s) need at least "
                         f"{min_seq_len(len(texts[0]))}")
    # One batched call per text column: the tokenizers library encodes it in parallel.
    columns = [tokenizer.encode_batch(list(column), add_special_tokens=False)
               for column in zip(*texts)]
    out = []
    for encodings in zip(*columns):
        parts = [e.ids for e in encodings]
        budget = max_len - 1 - len(parts)
        while sum(len(p) for p in parts) > budget:
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[longest].pop()
        ids = [cls_id]
        for p in parts:
            ids += p + [sep_id]
        out.append(ids)
    return out


def make_batch(rows: list[list[int]], labels: np.ndarray, batch_size: int, pad_id: int,
               length_multiple: int = 32) -> dict[str, np.ndarray]:
    """Right-padded batch of exactly `batch_size` rows (missing rows have weight 0).

    Returns input_ids, mask `[batch, seq]` int32 (seq rounded up to `length_multiple`, so few
    shapes compile), labels `[batch]`, weight `[batch]` float32.
    """
    seq = length_multiple * math.ceil(max(len(r) for r in rows) / length_multiple)
    input_ids = np.full((batch_size, seq), pad_id, np.int32)
    mask = np.zeros((batch_size, seq), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    padded_labels = np.zeros((batch_size,), labels.dtype)
    padded_labels[:len(rows)] = labels
    weight = np.zeros((batch_size,), np.float32)
    weight[:len(rows)] = 1.0
    return {"input_ids": input_ids, "mask": mask, "labels": padded_labels, "weight": weight}
