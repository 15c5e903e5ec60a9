"""Mean length of the sequences the loader feeds, per source and for a mixture (recipe §3.2.1).

Ettin's optimizer step was 4608 *unpacked* sequences; our loader packs them into rows of
`train.seq_len` tokens, so a step needs 4608 x mean_sequence_length / seq_len rows
(ettin_jax.schedules.rows_per_step). A sequence here is one piece that packing places
(data_pipeline.packing): a training document as the loader frames it ([CLS]/[SEP] added where
missing; prepare output is framed already), cut into pieces of at most seq_len tokens. Per
source, over the documents the train stream reads (the eval hold-out excluded, as the loader
does):
    tokens_per_document  mean framed length
    pieces_per_document  mean ceil(framed length / seq_len)
and for the mixture
    mean_sequence_length = sum_s r_s tokens_s / sum_s r_s pieces_s
with r_s the loader's per-document sampling rates (sources.document_weights: token shares
over mean document lengths). Packing's gap filling (`data.pack_fill_min`) splits off more
pieces; that is an artefact of packing, not of the data, and is not counted.

Cost: a source with at most `sample_documents` (default 20,000) train documents is measured
exactly, every document read. A larger one is sampled with a seeded generator: documents
drawn uniformly (with replacement), or for data-order parquet whole row groups (parquet's unit
of I/O) in a seeded random order, `sample_documents` at first and doubled until the ratio
estimate's relative standard error is below max_relative_error / 2 (about 95% confidence of
being within max_relative_error, default 1%), or the whole source has been read.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from data_pipeline import data_order, loader, sources


@dataclasses.dataclass(frozen=True)
class SourceLengths:
    path: str
    documents: int               # train documents of the source
    measured: int                # documents read (== documents when exact)
    exact: bool
    tokens_per_document: float   # framed tokens
    pieces_per_document: float   # pieces of at most seq_len tokens
    relative_error: float        # standard error of mean_sequence_length, relative (0 if exact)

    @property
    def mean_sequence_length(self) -> float:
        return self.tokens_per_document / self.pieces_per_document


@dataclasses.dataclass(frozen=True)
class MixtureLengths:
    mean_sequence_length: float
    seq_len: int
    sources: tuple[SourceLengths, ...]
    document_rates: tuple[float, ...]   # the loader's per-document sampling weights


def _ratio_error(tokens: np.ndarray, pieces: np.ndarray) -> float:
    """Relative standard error of sum(tokens) / sum(pieces) over an iid sample (delta method)."""
    if tokens.size < 2:
        return math.inf
    ratio = tokens.sum() / pieces.sum()
    residual = tokens - ratio * pieces
    return float(np.sqrt(residual.var(ddof=1) / tokens.size) / pieces.mean() / ratio)


def _index_batches(docs, stop: int, rng: np.random.Generator, size: int):
    """Endless batches of sampled train indices; for parquet, whole row groups."""
    if isinstance(docs, data_order.ParquetDocs):
        starts = np.minimum(docs.row_group_starts(), stop)
        for group in rng.permutation(len(starts) - 1):
            if starts[group] < starts[group + 1]:
                yield np.arange(starts[group], starts[group + 1])
        return
    while True:
        yield np.sort(rng.integers(0, stop, size))


def measure_source(src: sources.Source, *, seq_len: int, stop: int, frame=None,
                   sample_documents: int = 20_000, max_relative_error: float = 0.01,
                   seed: int = 0) -> SourceLengths:
    """Lengths of documents [0, stop) of `src` as the loader feeds them; frame(ids) -> ids is
    the loader's framing for this source (None: used as stored)."""
    if stop <= 0:
        raise ValueError(f"config.data.mixture: {src.path}: no training documents to measure "
                         f"(source has {len(src.docs)}, all held out for eval?)")

    def framed_lengths(indices: np.ndarray) -> np.ndarray:
        try:
            return np.array([len(frame(src.docs[int(i)]) if frame else src.docs[int(i)])
                             for i in indices], np.int64)
        except (OSError, IndexError) as e:
            raise ValueError(f"config.data.mixture: {src.path}: cannot measure sequence "
                             f"lengths ({e})") from None

    exact = stop <= sample_documents
    if not exact:
        batches = _index_batches(src.docs, stop, np.random.default_rng(seed), sample_documents)
        parts, target, read = [], sample_documents, 0
        while True:
            for batch in batches:
                parts.append(framed_lengths(batch))
                read += batch.size
                if read >= target:
                    break
            else:                          # a parquet source whose every row group was read
                return _summary(src.path, stop, np.concatenate(parts), seq_len, exact=True)
            lengths = np.concatenate(parts)
            if _ratio_error(lengths, -(-lengths // seq_len)) <= max_relative_error / 2:
                return _summary(src.path, stop, lengths, seq_len, exact=False)
            target *= 2
            if target >= stop:             # reading everything costs about as much
                break
    return _summary(src.path, stop, framed_lengths(np.arange(stop)), seq_len, exact=True)


def _summary(path: str, stop: int, lengths: np.ndarray, seq_len: int, *,
             exact: bool) -> SourceLengths:
    pieces = -(-lengths // seq_len)
    if pieces.sum() == 0:
        raise ValueError(f"config.data.mixture: {path}: every measured document is empty")
    return SourceLengths(path=path, documents=stop, measured=int(lengths.size), exact=exact,
                         tokens_per_document=float(lengths.mean()),
                         pieces_per_document=float(pieces.mean()),
                         relative_error=0.0 if exact else _ratio_error(lengths, pieces))


def measure(config, *, sample_documents: int = 20_000, max_relative_error: float = 0.01,
            seed: int = 0) -> MixtureLengths | None:
    """Mean length of the sequences the train loader feeds for `config.data.mixture` at
    `config.train.seq_len` (module docstring); None when no data is configured (the demo)."""
    if not config.data.mixture:
        return None
    seq_len, m = config.train.seq_len, config.model
    srcs = loader.open_sources(config, config.data.mixture)
    results = []
    for src in srcs:
        held_out = 0 if config.data.eval_mixture else loader.held_out_documents(config, src)
        frame = (None if src.kind == "arrayrecord" else
                 functools.partial(loader.frame_document, cls_id=m.cls_token_id,
                                   sep_id=m.sep_token_id))
        results.append(measure_source(src, seq_len=seq_len, stop=len(src.docs) - held_out,
                                      frame=frame, sample_documents=sample_documents,
                                      max_relative_error=max_relative_error, seed=seed))
    rates = sources.document_weights(srcs)
    tokens = sum(r * s.tokens_per_document for r, s in zip(rates, results))
    pieces = sum(r * s.pieces_per_document for r, s in zip(rates, results))
    return MixtureLengths(mean_sequence_length=tokens / pieces, seq_len=seq_len,
                          sources=tuple(results), document_rates=tuple(rates))
