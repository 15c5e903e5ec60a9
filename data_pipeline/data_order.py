"""Random-access reader for Ettin's released batch order (`jhu-clsp/ettin-data-order`).

Layout (recipe §5.2): parquet files such as `checkpoint_XXXXXX/steps_000001_to_000100.parquet`
whose rows carry `input_ids` (a list of token ids) and `step`. `ParquetDocs(root)` serves all
rows of all `*.parquet` files under `root` in sorted-path order, one row group in memory at a
time, as 1-D int32 arrays; errors name the file and row. To replay the published order, set
--config.data.shuffle=false, --config.data.pack_pool_size=1 and --config.data.num_workers=0
(packing then keeps arrival order; worker processes would each pack every n-th document).
Shuffled access is slow by design of parquet: every row read outside the cached row group
decodes a whole group.
"""
from __future__ import annotations

import glob
import os

import numpy as np


class ParquetError(ValueError):
    """A missing, unreadable or malformed parquet file; names the file (and row)."""


class ParquetDocs:
    def __init__(self, root: str, *, column: str = "input_ids", vocab_size: int | None = None):
        import pyarrow.parquet as pq
        self.root, self.column, self.vocab_size = root, column, vocab_size
        self._paths = ([root] if root.endswith(".parquet") else
                       sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)))
        if not self._paths:
            raise ParquetError(f"{root}: no .parquet files found")
        self._groups = []          # (path, row group index, rows)
        for path in self._paths:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
                raise ParquetError(f"{path}: not a readable parquet file ({e})") from None
            if column not in meta.schema.to_arrow_schema().names:
                raise ParquetError(f"{path}: no {column!r} column "
                                   f"(columns: {meta.schema.to_arrow_schema().names})")
            self._groups.extend((path, g, meta.row_group(g).num_rows)
                                for g in range(meta.num_row_groups))
        self._starts = np.concatenate([[0], np.cumsum([g[2] for g in self._groups],
                                                      dtype=np.int64)])
        self._cached = (None, None)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return dict(self.__dict__, _cached=(None, None))

    def _group(self, k: int):
        if self._cached[0] != k:
            import pyarrow.parquet as pq
            path, g, _ = self._groups[k]
            try:
                table = pq.ParquetFile(path).read_row_group(g, columns=[self.column])
            except Exception as e:
                raise ParquetError(f"{path}: row group {g} unreadable ({e})") from None
            self._cached = (k, table.column(0).combine_chunks())
        return self._cached[1]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.root}: row {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[k])
        value = self._group(k)[row]
        if not value.is_valid:
            raise ParquetError(f"{self._groups[k][0]}: row {row + self._row_offset(k)}: "
                               f"{self.column} is null")
        ids = value.values.to_numpy(zero_copy_only=False)
        if ids.size and (ids.dtype.kind not in "iu" or (ids.dtype.kind == "i" and ids.min() < 0)):
            raise ParquetError(f"{self._groups[k][0]}: row {row + self._row_offset(k)}: "
                               f"{self.column} holds {ids.dtype} values"
                               + (f" ({int(ids.min())} < 0)" if ids.dtype.kind == "i" else "")
                               + "; expected token ids >= 0")
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise ParquetError(f"{self._groups[k][0]}: row {row + self._row_offset(k)}: id "
                               f"{int(ids.max())} >= vocab size {self.vocab_size}")
        return ids.astype(np.int32)

    def row_group_starts(self) -> np.ndarray:
        """int64 [row groups + 1]: index of each row group's first row, then len(self).
        Row groups are parquet's unit of I/O: samplers should draw whole groups."""
        return self._starts.copy()

    def mean_length(self, min_rows: int = 1024, max_groups: int = 16) -> float:
        """Mean row length over `length_sample`'s rows."""
        return float(np.mean(self.length_sample(min_rows, max_groups)[0]))

    def length_sample(self, min_rows: int = 1024, max_groups: int = 16):
        """(lengths, first ids, last ids) int64 [rows] of the rows of the fewest evenly spread
        row groups (at most `max_groups`) holding `min_rows` rows; a row group is the unit of
        parquet I/O, so sampling single rows would read as much. An empty row's ids are 0."""
        import pyarrow.compute as pc
        n = len(self._groups)
        for count in range(1, min(max_groups, n) + 1):
            picks = np.unique(np.linspace(0, n - 1, count).astype(int))
            if sum(self._groups[k][2] for k in picks) >= min_rows:
                break
        parts = []
        for k in picks:
            rows = self._group(int(k))
            length = pc.list_value_length(rows).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = rows.offsets.to_numpy(zero_copy_only=False)
            values = rows.values.to_numpy(zero_copy_only=False).astype(np.int64)
            ends = (np.zeros((2, len(length)), np.int64) if not values.size else
                    np.where(length > 0, [values[np.minimum(offsets[:-1], values.size - 1)],
                                          values[np.maximum(offsets[1:] - 1, 0)]], 0))
            parts.append((length, *ends))
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _row_offset(self, k: int) -> int:
        """Row number within its file of the first row of row group k."""
        path = self._groups[k][0]
        return sum(g[2] for g in self._groups[:k] if g[0] == path)
