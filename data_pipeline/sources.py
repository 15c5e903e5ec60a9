"""Opening the document sources named in `config.data.mixture`, whatever their format.

Mixture grammar: comma-separated `PATH[:WEIGHT]` entries, e.g.
    "data/dclm:0.49,data/starcoder:0.155,ettin-decay-data/train/books:0.138"
WEIGHT is the share of *tokens* the source should contribute (default 1; normalized).
An entry `ettin:ROOT` stands for Ettin's sources of the config's phase under ROOT, weighted as
in the paper (data_pipeline.mixtures).
PATH is detected by what it holds:
    manifest.json          -> ArrayRecord shards from `data_pipeline.prepare`
    index.json (anywhere below) -> MosaicML MDS shards (Ettin's released phase data)
    *.parquet              -> Ettin's released batch order (`input_ids` column)
Every source serves `docs[i]` = 1-D int32 token ids.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from data_pipeline import data_order, mds, shards


@dataclasses.dataclass
class Source:
    name: str
    path: str
    kind: str              # arrayrecord | mds | parquet
    docs: object           # random access: len(docs), docs[i] -> int32 [n]
    weight: float          # token share before normalization
    mean_length: float     # tokens per document (manifest, or a sample of documents)
    manifest: dict | None = None


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """[(path, weight)] from the mixture string; raises naming the bad entry."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path, weight = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass                   # a ':' inside the path, not a weight
        if weight <= 0:
            raise ValueError(f"config.data.mixture entry {entry!r}: weight must be > 0")
        out.append((path, weight))
    return out


def detect_kind(path: str) -> str:
    if os.path.exists(os.path.join(path, shards.MANIFEST)):
        return "arrayrecord"
    if path.endswith("index.json") or glob.glob(os.path.join(path, "**", "index.json"),
                                                recursive=True):
        return "mds"
    if path.endswith(".parquet") or glob.glob(os.path.join(path, "**", "*.parquet"),
                                              recursive=True):
        return "parquet"
    if not os.path.exists(path):
        raise ValueError(f"config.data.mixture: {path}: no such file or directory")
    raise ValueError(f"config.data.mixture: {path}: holds no manifest.json (prepare output), "
                     "index.json (MDS) or *.parquet files")


# Documents an MDS source's mean length is taken from (evenly spread; all of a smaller one).
# The mean sets the source's document rate for its token share (document_weights): 256 left
# a standard error of 6-8% on web-like lengths (coefficient of variation 1-1.3); 20,000 leave
# under 1%, read in well under a second from the decompressed shards.
MDS_MEAN_SAMPLES = 20_000


def framed_lengths(lengths: np.ndarray, first: np.ndarray, last: np.ndarray,
                   frame: tuple[int, int] | None) -> np.ndarray:
    """Lengths of documents once the loader frames them `[CLS] ... [SEP]` (`frame` = (cls_id,
    sep_id); loader.frame_document adds each where it is missing), from their stored lengths
    and first and last ids (any value where the length is 0); None: as stored."""
    lengths = np.asarray(lengths, np.int64)
    if frame is None:
        return lengths
    cls_id, sep_id = frame
    added = np.where(lengths > 0, (np.asarray(first) != cls_id).astype(np.int64)
                     + (np.asarray(last) != sep_id), 1 + int(cls_id != sep_id))
    return lengths + added


def _sampled_mean_length(docs, samples: int = MDS_MEAN_SAMPLES,
                         frame: tuple[int, int] | None = None) -> float:
    n = len(docs)
    if n == 0:
        return 0.0
    picks = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64))
    sampled = [docs[int(i)] for i in picks]
    return float(np.mean(framed_lengths([len(d) for d in sampled],
                                        [d[0] if len(d) else -1 for d in sampled],
                                        [d[-1] if len(d) else -1 for d in sampled], frame)))


def open_source(path: str, weight: float, *, vocab_size: int, cache_dir: str | None = None,
                frame: tuple[int, int] | None = None) -> Source:
    """`frame` = (cls_id, sep_id): the mean length is that of the documents as the loader
    frames them (an MDS or parquet source's are stored unframed; 2 tokens more on each set
    the token share of a source of short documents high: 0.60 for 0.5 at 4 tokens a piece)."""
    kind = detect_kind(path)
    manifest = None
    if kind == "arrayrecord":
        docs = shards.ArrayRecordDocs(path, vocab_size=vocab_size)
        manifest = docs.manifest
        if manifest["vocab_size"] > vocab_size:
            raise shards.ShardError(
                f"{os.path.join(path, shards.MANIFEST)}: tokenizer vocabulary "
                f"{manifest['vocab_size']} > model vocab_size {vocab_size}")
        mean = manifest["tokens"] / max(1, manifest["documents"])
    elif kind == "mds":
        docs = mds.MDSDocs(path, vocab_size=vocab_size, cache_dir=cache_dir)
        mean = _sampled_mean_length(docs, frame=frame)
    else:
        docs = data_order.ParquetDocs(path, vocab_size=vocab_size)
        mean = float(np.mean(framed_lengths(*docs.length_sample(), frame)))
    if len(docs) == 0:
        raise ValueError(f"config.data.mixture: {path}: has no documents")
    name = (manifest or {}).get("source") or os.path.basename(path.rstrip("/"))
    return Source(name, path, kind, docs, weight, mean, manifest)


def document_weights(sources: list[Source]) -> list[float]:
    """Per-document sampling weights that give each source its *token* share."""
    raw = [s.weight / max(s.mean_length, 1e-9) for s in sources]
    total = sum(raw)
    return [w / total for w in raw]
