"""Packing documents into fixed rows of `seq_len` tokens, as a checkpointable Grain IterDataset.

Input: a MapDataset whose element i is {"ids": int32 [n], "source": int, "key": int} (`key` is
the element's index in the global document stream, unique across hosts and workers).
Output rows (padding: input_ids = pad_id): {"input_ids", "segment_ids", "positions", "source_ids": int32 [seq_len],
"row_key": int64 [2]} with
  segment_ids   1, 2, ... per piece in the row, 0 on padding;
  positions     0, 1, ... restarting at every piece, 0 on padding;
  source_ids    source index per token, -1 on padding;
  row_key       (key, start) of the row's first piece: unique per row, seeds its masking.
A document longer than `seq_len` is split into pieces of at most `seq_len` tokens (every
piece a new segment, positions restarting); nothing is dropped.

Algorithm (best fit with a lookahead pool): keep up to `pool_size` pending pieces in arrival
order; a row starts with the oldest piece (so no piece waits forever), then repeatedly takes
the longest pending piece that still fits, until none fits (pool_size 1: only the oldest,
so pieces keep their arrival order). A gap of at least `fill_min` tokens
(0 = never) that no piece fits is filled with the head of the oldest pending piece (its tail
stays pending), so efficiency stays >= 1 - fill_min/seq_len per row (measured efficiencies
per fill_min: bench/RESULTS.md).

State (for Orbax via Grain): {"next": next parent index to read, "pool": [[index, start, end],
...], "rows": rows emitted}. Pending pieces are stored as references into the parent and
re-read on restore, so the state stays small and resume is exact.
"""
from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.MapDataset, *, seq_len: int, pad_id: int,
                 pool_size: int = 256, fill_min: int = 32,
                 slice_docs: Callable[[slice], grain.MapDataset] | None = None):
        """slice_docs(sl): the documents a worker packs (default parent[sl]); a mixture of
        sources slices each source instead (data_pipeline.loader)."""
        super().__init__(parent)
        self.slice_docs = slice_docs
        if seq_len < 2 or pool_size < 1:
            raise ValueError(f"packing: seq_len={seq_len}, pool_size={pool_size} must be >= 2, >= 1")
        self.seq_len, self.pad_id, self.pool_size = seq_len, pad_id, pool_size
        self.fill_min = fill_min

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        # Called by mp_prefetch in each worker: the worker packs documents sl of the stream.
        del sequential_slice
        self._parents = (self.slice_docs(sl) if self.slice_docs else self._parent.slice(sl),)

    def __iter__(self) -> "PackIterator":
        return PackIterator(self)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, pool_size={self.pool_size})"


class PackIterator(grain.DatasetIterator):
    def __init__(self, ds: PackIterDataset):
        super().__init__()
        self._ds = ds
        self._docs = ds._parent            # MapDataset: random access by index
        self._next = 0
        self._rows = 0
        # pending pieces: parallel lists (parent index, start, end) + a doc cache
        self._pool: list[list[int]] = []
        self._cache: dict[int, dict] = {}
        self._exhausted = False

    # -- pool management
    def _refill(self) -> None:
        while not self._exhausted and len(self._pool) < self._ds.pool_size:
            if self._next >= len(self._docs):
                self._exhausted = True
                break
            doc = self._docs[self._next]
            n = len(doc["ids"])
            if n:
                self._cache[self._next] = doc
                for start in range(0, n, self._ds.seq_len):
                    self._pool.append([self._next, start, min(n, start + self._ds.seq_len)])
            self._next += 1

    def _take(self, i: int, length: int | None = None) -> tuple[dict, int, int]:
        index, start, end = self._pool[i]
        if length is not None and length < end - start:
            self._pool[i][1] = start + length      # head used now, tail stays pending
            end = start + length
        else:
            del self._pool[i]
        doc = self._cache[index]
        if not any(p[0] == index for p in self._pool):
            del self._cache[index]
        return doc, start, end

    def __next__(self) -> dict[str, Any]:
        self._refill()
        if not self._pool:
            raise StopIteration
        L = self._ds.seq_len
        ids = np.full(L, self._ds.pad_id, np.int32)
        seg = np.zeros(L, np.int32)
        pos = np.zeros(L, np.int32)
        src = np.full(L, -1, np.int32)
        row_key = np.array(self._pool[0][:2], np.int64)
        row_key[0] = self._cache[self._pool[0][0]]["key"]
        filled, segment = 0, 0
        choice = 0                                   # the oldest piece opens the row
        while True:
            doc, start, end = self._take(choice, L - filled if choice == 0 and segment else None)
            n = end - start
            segment += 1
            ids[filled:filled + n] = doc["ids"][start:end]
            seg[filled:filled + n] = segment
            pos[filled:filled + n] = np.arange(n, dtype=np.int32)
            src[filled:filled + n] = doc["source"]
            filled += n
            gap = L - filled
            if gap == 0:
                break
            self._refill()
            if not self._pool:
                break
            # Pool size 1 keeps arrival order (the published order's replay): only the oldest
            # piece, or a long document's tail, which fits a gap sooner, went before its head.
            candidates = len(self._pool) if self._ds.pool_size > 1 else 1
            lens = np.fromiter((p[2] - p[1] for p in self._pool[:candidates]), np.int64,
                               candidates)
            fits = np.flatnonzero(lens <= gap)
            if fits.size:
                choice = int(fits[np.argmax(lens[fits])])
            elif self._ds.fill_min and gap >= self._ds.fill_min:
                choice = 0                           # split the oldest piece into the gap
            else:
                break
        self._rows += 1
        return {"input_ids": ids, "segment_ids": seg, "positions": pos, "source_ids": src,
                "row_key": row_key}

    # -- checkpointing
    def get_state(self) -> dict:
        return {"next": self._next, "pool": [list(p) for p in self._pool], "rows": self._rows}

    def set_state(self, state: dict) -> None:
        self._next, self._rows = int(state["next"]), int(state["rows"])
        self._pool = [list(map(int, p)) for p in state["pool"]]
        self._cache = {i: self._docs[i] for i in sorted({p[0] for p in self._pool})}
        self._exhausted = False
