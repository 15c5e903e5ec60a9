"""Ettin's chunking of long documents for the long-context phases (recipe §5.2).

A document's token ids (without [CLS]/[SEP]) are cut into pieces of `chunk_size - 2` ids so
that each framed chunk `[CLS] piece [SEP]` is at most `chunk_size` long. Then:
  * a non-first piece shorter than `always_skip_size` is dropped (a tiny tail is noise);
  * with `backfill`, a last piece shorter than `min_chunk_size` takes a random number of tail
    ids from the previous piece (moved, not duplicated) so it reaches at least `min_chunk_size`,
    and the previous piece keeps at least `min_chunk_size` ids.
The released data names this "chunked-8000-512-128-backfill-nodups". Ettin also re-decoded
and re-encoded each chunk to force a leading space; we do not (ids stay those of the document).
The random draw is seeded by the document's ids, so a re-run chunks identically.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    chunk_size: int = 8000
    min_chunk_size: int = 512
    always_skip_size: int = 128
    backfill: bool = True

    def __post_init__(self):
        if not 2 < self.chunk_size or not 0 <= self.always_skip_size <= self.min_chunk_size:
            raise ValueError(f"chunking {self}: need chunk_size > 2 and "
                             "0 <= always_skip_size <= min_chunk_size")
        if 2 * self.min_chunk_size > self.chunk_size - 2:
            raise ValueError(f"chunking {self}: min_chunk_size must be at most "
                             "(chunk_size - 2) / 2 for backfill to keep both pieces long enough")


def chunk_ids(ids: np.ndarray, cfg: ChunkConfig) -> list[np.ndarray]:
    """Pieces of `ids` (1-D, no special tokens) per the module docstring; not yet framed."""
    width = cfg.chunk_size - 2
    pieces = [ids[i:i + width] for i in range(0, max(len(ids), 1), width)]
    pieces = [pieces[0]] + [p for p in pieces[1:] if len(p) >= cfg.always_skip_size]
    if cfg.backfill and len(pieces) >= 2 and len(pieces[-1]) < cfg.min_chunk_size:
        prev, last = pieces[-2], pieces[-1]
        need = cfg.min_chunk_size - len(last)
        most = len(prev) - cfg.min_chunk_size
        rng = np.random.default_rng(zlib.crc32(ids.tobytes()))
        move = int(rng.integers(need, max(need, most) + 1))
        pieces[-2], pieces[-1] = prev[:len(prev) - move], np.concatenate([prev[len(prev) - move:], last])
    return pieces
