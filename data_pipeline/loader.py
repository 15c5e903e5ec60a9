"""Entry points: `config.data` -> Grain iterators of packed, objective-ready global batches.

    make_train_iterator(config, *, process_index=None, process_count=None,
                        rows_for_step=None, num_epochs=None, include_metadata=False)
        -> grain.DatasetIterator (infinite unless num_epochs is set)
    make_eval_iterator(config, *, process_index=None, process_count=None,
                       batch_rows=None, include_metadata=False)
        -> grain.DatasetIterator (finite: one pass over the eval documents)
    tokenizer_path(config) -> str   # directory with tokenizer.json (for export / decoding)
    resolve_sources(config) -> (train sources, eval sources or None, tokenizer path), checked
    open_sources, held_out_documents, frame_document   # the loader's own rules, reused by
                                    # data_pipeline.lengths (tokens per step) and the run plan

Batch format: a dict of numpy int32 arrays holding this host's slice of one global batch;
`batch` = rows_for_step(step) // process_count rows, `seq` = config.train.seq_len:
    input_ids     [batch, seq]   token ids (MLM: after masking); [PAD] on padding
    segment_ids   [batch, seq]   1, 2, ... per document piece in the row; 0 = padding
    positions     [batch, seq]   0, 1, ... restarting at every piece; 0 on padding
    labels        [batch, seq]   -100 = no loss. MLM: original id at masked positions.
                                 CLM: next token within the same piece; -100 at a piece's last
                                 token (never across a document boundary) and on padding.
  MLM only (config.objective == "mlm"):
    mask_positions [batch, P]    indices into seq of the predicted tokens, ascending, then 0
    mask_labels    [batch, P]    their original ids, then -100 for unused slots
  with P = objectives.max_predictions(seq, ratio) = ceil(ratio * seq) + 1 rounded up to 8.
  Exactly floor(ratio * eligible + u) positions are masked per row, which is always <= P:
  no prediction is ever cut. mask_positions/mask_labels carry the same information as
  `labels`, in the fixed-size form for sparse prediction.
  include_metadata=True adds source_ids [batch, seq] (source index, -1 = padding).
  A finite stream (eval, num_epochs) ends with a batch filled up by empty rows (all padding).

Pipeline (train): per source: random-access docs -> [CLS]/[SEP] framing check -> seeded
shuffle (reshuffled each epoch) -> repeat -> key (index in the source, source) -> this host's
slice [process_index::process_count] of each source (and each worker's slice of that) ->
weighted mixture (weights are token shares, converted to document rates by mean document
length; sliced before mixing, so every slice keeps the shares) -> best-fit packing into rows
(long documents split, never dropped; data_pipeline.packing) -> MLM masking or CLM labels,
seeded by (seed, row) -> `config.data.num_workers` worker processes (Grain mp_prefetch) ->
batches of rows_for_step(step) rows (batch-size warmup: rows are consumed in order, none
skipped or repeated).

Determinism and resume: everything is a function of (config.data.seed, process_count,
config.data.num_workers) and the position in the stream. `it.get_state()` / `it.set_state()`
(or Orbax with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` inside
`ocp.args.Composite`) resume exactly, given the same process count and worker count.

No data configured (config.data.mixture == "") is an error here: the demo corpus from the
Python standard library is built explicitly, by `demo_corpus.configure(config)` (which the
demo variant of a run, ettin_jax.demo, calls), and then named by config.data.mixture.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from typing import Callable

import grain
import numpy as np
from absl import logging

from data_pipeline import batching, mixtures, objectives, packing, shards, sources, tokenizer

ROW_KEYS = ("input_ids", "segment_ids", "positions", "labels")
MLM_KEYS = ("mask_positions", "mask_labels")


def _host(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: the loader itself runs without jax (workers, CLI tools)
        process_index, process_count = jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


_NO_MIXTURE = ("config.data.mixture is empty: set it to the data (PATH[:TOKEN_SHARE],...), or "
               "build the demo corpus first with data_pipeline.demo_corpus.configure(config) "
               "(main.py does so for a run with no data configured)")


def tokenizer_path(config) -> str:
    """The tokenizer the data was made with: config.data.tokenizer, else the copy prepare kept
    next to the first source's shards."""
    if config.data.tokenizer:
        return config.data.tokenizer
    if not config.data.mixture:
        raise ValueError(_NO_MIXTURE)
    first = sources.parse_mixture(mixtures.expand(config.data.mixture, config.phase))[0][0]
    copy = os.path.join(first, ".work", "tokenizer.json")
    if os.path.exists(copy):
        return copy
    raise ValueError(f"config.data.tokenizer is empty and {first} carries no tokenizer copy; "
                     "set --config.data.tokenizer=PATH (Ettin's released MDS and data-order "
                     "files use answerdotai/ModernBERT-base)")


def _check_tokenizer(config, srcs: list[sources.Source], tok_path: str) -> None:
    """The tokenizer must match every prepared source's manifest and the model's special ids."""
    tok = tokenizer.load(tok_path)
    fp = tokenizer.fingerprint(tok)
    for s in srcs:
        if s.manifest and s.manifest["tokenizer"]["fingerprint"] != fp:
            raise shards.ShardError(
                f"{os.path.join(s.path, shards.MANIFEST)}: made with tokenizer "
                f"{s.manifest['tokenizer']['fingerprint']} ({s.manifest['tokenizer']['path']}), "
                f"but config.data.tokenizer={tok_path} is {fp}")
    ids = tokenizer.special_ids(tok, where=tok_path)
    # [UNK] too: MLM never selects it and draws random tokens below it (objectives)
    want = {f"model.{name}_token_id": (name, config.model[f"{name}_token_id"])
            for name in ("cls", "sep", "pad", "mask")}
    want["data.unk_token_id"] = ("unk", config.data.unk_token_id)
    bad = [f"config.{key}={value} but the tokenizer's [{name.upper()}] is {ids[name]}"
           for key, (name, value) in want.items() if ids[name] != value]
    if bad:
        raise tokenizer.TokenizerError(f"{tok_path}: special ids differ: {'; '.join(bad)}")


def open_sources(config, mixture: str) -> list[sources.Source]:
    d = config.data
    return [sources.open_source(path, weight, vocab_size=config.model.vocab_size,
                                cache_dir=d.mds_cache_dir or None,
                                frame=(config.model.cls_token_id, config.model.sep_token_id))
            for path, weight in sources.parse_mixture(mixtures.expand(mixture, config.phase))]


def resolve_sources(config) -> tuple[list[sources.Source], list[sources.Source] | None, str]:
    """(train sources, eval sources or None = hold out from train, tokenizer path)."""
    d = config.data
    if not d.mixture:
        raise ValueError(_NO_MIXTURE)
    train = open_sources(config, d.mixture)
    evals = open_sources(config, d.eval_mixture) if d.eval_mixture else None
    tok_dir = tokenizer_path(config)
    _check_tokenizer(config, train + (evals or []), tok_dir)
    return train, evals, tok_dir


def held_out_documents(config, src: sources.Source) -> int:
    """Documents at the end of a train source kept for eval (when no eval_mixture is set)."""
    n = len(src.docs)
    return min(config.data.eval_documents, n // 10)


# -- per-element functions (module level so Grain can pickle them into worker processes)
def frame_document(ids: np.ndarray, *, cls_id: int, sep_id: int) -> np.ndarray:
    """Ettin's loading quirk (recipe §4.5): every document starts [CLS] and ends [SEP]."""
    if ids.size == 0 or ids[0] != cls_id:
        ids = np.concatenate([[cls_id], ids]).astype(np.int32)
    if ids[-1] != sep_id:
        ids = np.concatenate([ids, [sep_id]]).astype(np.int32)
    return ids


def _tag(ids: np.ndarray, *, source: int) -> dict:
    return {"ids": ids, "source": source}


def _keyed_in_source(index: int, doc: dict, *, source: int, num_sources: int) -> dict:
    """`key` unique over all sources, hosts, workers and epochs: the document's index in its
    source's stream, interleaved with the source's number."""
    return dict(doc, key=index * num_sources + source)


def _source_stream(config, src: sources.Source, i: int, *, start: int, stop: int,
                   shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
    m = config.model
    ds = grain.MapDataset.source(src.docs)[start:stop]
    if src.kind != "arrayrecord":          # prepare output is framed already
        ds = ds.map(functools.partial(frame_document, cls_id=m.cls_token_id, sep_id=m.sep_token_id))
    ds = ds.map(functools.partial(_tag, source=i))
    if shuffle:
        ds = ds.shuffle(seed=(config.data.seed * 1009 + i) % 2**32)
    return ds.repeat(num_epochs)           # None: forever


def _objective_fn(config, ratio: float, seed: int) -> Callable[[dict], dict]:
    if config.objective == "clm":
        return objectives.clm_row
    m, d = config.model, config.data
    cfg = objectives.MLMConfig(
        ratio=ratio, mask_id=m.mask_token_id,
        # As transformers' DataCollatorForLanguageModeling: every special token, [UNK] too.
        special_ids=(m.cls_token_id, m.sep_token_id, m.pad_token_id, m.mask_token_id,
                     d.unk_token_id),
        random_high=d.unk_token_id, max_predictions=objectives.max_predictions(
            config.train.seq_len, ratio), seed=seed)
    return functools.partial(objectives.mlm_row, cfg=cfg)


def _keys(config, include_metadata: bool) -> tuple[str, ...]:
    keys = ROW_KEYS + (MLM_KEYS if config.objective == "mlm" else ())
    return keys + (("source_ids",) if include_metadata else ())


def _pad_row(config, ratio: float) -> dict:
    L = config.train.seq_len
    row = {"input_ids": np.full(L, config.model.pad_token_id, np.int32),
           "segment_ids": np.zeros(L, np.int32), "positions": np.zeros(L, np.int32),
           "labels": np.full(L, objectives.IGNORE, np.int32),
           "source_ids": np.full(L, -1, np.int32)}
    if config.objective == "mlm":
        p = objectives.max_predictions(L, ratio)
        row.update(mask_positions=np.zeros(p, np.int32),
                   mask_labels=np.full(p, objectives.IGNORE, np.int32))
    return row


def _eval_host_rows(config, process_count: int, batch_rows: int | None = None) -> int:
    return (batch_rows or config.data.eval_batch_size) // process_count


def empty_eval_batch(config, *, process_index: int | None = None,
                     process_count: int | None = None,
                     batch_rows: int | None = None) -> dict[str, np.ndarray]:
    """This host's share of a batch of empty rows (all padding, nothing to predict), shaped as
    make_eval_iterator's batches with the same arguments."""
    _, pcount = _host(process_index, process_count)
    rows = _eval_host_rows(config, pcount, batch_rows)
    pad = _pad_row(config, config.train.eval_mask_ratio)
    return {key: np.stack([pad[key]] * rows) for key in _keys(config, include_metadata=False)}


def row_spec(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of one training row per key; a batch puts `[rows]` in front. Lets the
    train step compile before the first batch exists (ettin_jax.precompile)."""
    pad = _pad_row(config, config.train.mask_ratio)
    return {key: (pad[key].shape, pad[key].dtype) for key in _keys(config, include_metadata=False)}


def _exit_with_the_trainer(worker_index: int, worker_count: int, *, trainer_pid: int) -> None:
    """Runs first in each Grain worker process: a thread ends the worker once the trainer
    that started it is gone. Killed outright (SIGKILL, the OOM killer) the trainer cannot stop
    its workers, and they lived on holding memory, shard files and its output pipe (a
    supervisor reading it through `| tee` never saw the end). Not prctl(PR_SET_PDEATHSIG):
    that fires when the thread that started the worker ends, which Grain may not keep."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == trainer_pid:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-the-trainer", daemon=True).start()


def _ensure_absl_flags_parsed() -> None:
    # Grain's mp_prefetch reads absl flags; outside an absl app (tests, notebooks) they are
    # unparsed and reading them raises. Mark them parsed with their defaults.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _rows_to_batches(config, docs: grain.MapDataset, *, ratio: float, seed: int,
                     rows_for_step: Callable[[int], int], num_workers: int,
                     include_metadata: bool,
                     slice_docs: Callable[[slice], grain.MapDataset] | None = None
                     ) -> grain.DatasetIterator:
    rows = packing.PackIterDataset(docs, seq_len=config.train.seq_len,
                                   pad_id=config.model.pad_token_id,
                                   pool_size=config.data.pack_pool_size,
                                   fill_min=config.data.pack_fill_min, slice_docs=slice_docs)
    rows = rows.map(_objective_fn(config, ratio, seed))
    # Rows cross from the workers in groups: one shared-memory transfer per group, not per row.
    rows = rows.batch(config.data.worker_group_rows, drop_remainder=False)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        rows = rows.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=config.data.worker_buffer_groups),
            worker_init_fn=functools.partial(_exit_with_the_trainer, trainer_pid=os.getpid()))
    batches = batching.BatchIterDataset(rows, rows_for_step, keys=_keys(config, include_metadata),
                                        pad_row=_pad_row(config, ratio))
    return iter(batches)


def make_train_iterator(config, *, process_index: int | None = None,
                        process_count: int | None = None,
                        rows_for_step: Callable[[int], int] | None = None,
                        num_epochs: int | None = None,
                        include_metadata: bool = False) -> grain.DatasetIterator:
    """Iterator of this host's slice of each global training batch (format: module docstring).

    rows_for_step(step) -> global rows in batch `step` (batch-size warmup); default
    config.train.global_batch_size. It must be divisible by process_count.
    num_epochs=None repeats forever; an int stops after that many passes over the source (with
    several sources, Grain's mixture ends when the first of them runs out).
    """
    pid, pcount = _host(process_index, process_count)
    train, evals, _ = resolve_sources(config)
    d = config.data
    if not d.shuffle and d.pack_pool_size == 1 and d.num_workers > 0:
        logging.warning("data.shuffle=false with data.pack_pool_size=1 keeps the documents' "
                        "arrival order only with data.num_workers=0: each of the %d workers "
                        "packs every %d-th document and hands over %d rows at a time",
                        d.num_workers, d.num_workers, d.worker_group_rows)
    streams = []
    for i, src in enumerate(train):
        stop = len(src.docs) - (held_out_documents(config, src) if evals is None else 0)
        stream = _source_stream(config, src, i, start=0, stop=stop,
                                shuffle=config.data.shuffle, num_epochs=num_epochs)
        streams.append(stream.map_with_index(
            functools.partial(_keyed_in_source, source=i, num_sources=len(train)))[pid::pcount])
    weights = sources.document_weights(train)

    def mixed(part: slice) -> grain.MapDataset:
        # Every source is sliced before the mixture: grain's mixture interleaves the sources
        # in a fixed period, and a stride over the mixed stream (hosts, workers) whose step
        # shares a factor with that period would take some sources' turns more often than
        # their token shares say (0.75 came out as 0.51 over two workers).
        parts = [stream[part] for stream in streams]
        return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=weights)
    global_rows = rows_for_step or (lambda step: config.train.global_batch_size)

    def host_rows(step: int) -> int:
        total = int(global_rows(step))
        if total % pcount:
            raise ValueError(f"batch of {total} rows at step {step} does not split over "
                             f"{pcount} processes")
        return total // pcount

    return _rows_to_batches(config, mixed(slice(None)), ratio=config.train.mask_ratio,
                            seed=config.data.seed, rows_for_step=host_rows,
                            num_workers=config.data.num_workers,
                            include_metadata=include_metadata, slice_docs=mixed)


def make_eval_iterator(config, *, process_index: int | None = None,
                       process_count: int | None = None, batch_rows: int | None = None,
                       include_metadata: bool = False) -> grain.DatasetIterator:
    """One pass over the eval documents (config.data.eval_mixture, else the held-out tail of
    each train source), unshuffled, masked with config.train.eval_mask_ratio and a fixed seed;
    the last batch is padded with empty rows. batch_rows: global rows per batch (default
    config.data.eval_batch_size)."""
    pid, pcount = _host(process_index, process_count)
    train, evals, _ = resolve_sources(config)
    eval_sources = evals or train
    streams = []
    for i, src in enumerate(eval_sources):
        start = 0 if evals else len(src.docs) - held_out_documents(config, src)
        stream = _source_stream(config, src, i, start=start, stop=len(src.docs),
                                shuffle=False, num_epochs=1)
        streams.append(stream.map_with_index(
            functools.partial(_keyed_in_source, source=i, num_sources=len(eval_sources))))
    docs = streams[0] if len(streams) == 1 else grain.MapDataset.concatenate(streams)
    docs = docs[pid::pcount]
    rows = _eval_host_rows(config, pcount, batch_rows)
    ratio = config.train.eval_mask_ratio
    return _rows_to_batches(config, docs, ratio=ratio, seed=config.data.seed + 1,
                            rows_for_step=lambda step: rows, num_workers=0,
                            include_metadata=include_metadata)
