"""Cutting a stream of row groups into batches whose size may change with the step.

The parent yields *groups* of rows (dicts of arrays [g, ...], built in the worker processes so
that rows cross the process boundary in bulk). `BatchIterDataset(parent, rows_for_step)`
yields batch k as the next `rows_for_step(k)` rows, taken strictly in order across group
boundaries, so changing the batch size (batch-size warmup) never skips or repeats a row. When
the parent ends, the last short batch is filled with `pad_row` (empty rows) to keep shapes
static.

State: {"parent": parent state before the current group was read, "offset": rows of that
group already used, "step": k}; restore re-reads that group and skips `offset` rows.
"""
from __future__ import annotations

from typing import Callable

import grain
import numpy as np


class BatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, rows_for_step: Callable[[int], int], *,
                 keys: tuple[str, ...], pad_row: dict):
        super().__init__(parent)
        self.rows_for_step, self.keys, self.pad_row = rows_for_step, keys, pad_row

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self)


class BatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: BatchIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._step = 0
        self._group = None
        self._group_state = parent.get_state()
        self._offset = 0

    def _next_group(self) -> bool:
        state = self._parent.get_state()
        try:
            group = next(self._parent)
        except StopIteration:
            return False
        self._group, self._group_state, self._offset = group, state, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        want = int(self._ds.rows_for_step(self._step))
        if want < 1:
            raise ValueError(f"batch size schedule gave {want} rows at step {self._step}")
        parts = {k: [] for k in self._ds.keys}
        have = 0
        while have < want:
            if self._group is None or self._offset == len(self._group["input_ids"]):
                if not self._next_group():
                    break
            take = min(want - have, len(self._group["input_ids"]) - self._offset)
            for k in self._ds.keys:
                parts[k].append(self._group[k][self._offset:self._offset + take])
            self._offset += take
            have += take
        if have == 0:
            raise StopIteration
        if have < want:
            for k in self._ds.keys:
                parts[k].append(np.stack([self._ds.pad_row[k]] * (want - have)))
        self._step += 1
        # Always copies: group arrays live in worker shared memory, which must not outlive them.
        return {k: np.concatenate(v) for k, v in parts.items()}

    def close(self) -> None:
        self._group = None
        super().close()

    def get_state(self) -> dict:
        return {"parent": self._group_state, "offset": self._offset, "step": self._step}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._group, self._offset = None, 0
        self._group_state = state["parent"]
        if state["offset"]:
            if not self._next_group():
                raise ValueError("data iterator state points past the end of the data")
            self._offset = int(state["offset"])
        self._step = int(state["step"])
