r"""Prepare raw text into ArrayRecord token shards: normalize, filter, dedup, tokenize, chunk, shard.

    python -m data_pipeline.prepare --input='raw/*.jsonl.gz' --output=data/web \
        --tokenizer=data/tok [--source=web] [--text_field=text] [--chunk_size=8000] ...

Stages (each switchable, each counted in OUTPUT/stats.json and printed as a summary):
  1. normalize      Unicode NFC + whitespace (data_pipeline.normalize)
  2. filter         Gopher/C4-style quality rules and language id (data_pipeline.quality)
  3. dedup          exact (sha256) then near-duplicate (MinHash LSH, --jaccard) across all inputs
  4. tokenize       `tokenizers`, batched, in --workers processes; each document [CLS] ... [SEP]
  5. chunk          optional Ettin chunking for long-context phases (data_pipeline.chunking)
  6. shard          ArrayRecord shards + manifest.json (data_pipeline.shards)

Resumable: stages 1-3 write OUTPUT/.work/kept.jsonl once; stage 4-6 writes shards one by one
(each to NAME.tmp, then renamed) and records them in OUTPUT/.work/progress.json. A re-run with
the same inputs and options skips what is done; with different ones it refuses (use a new
--output). A failing run never touches finished shards or an existing manifest.
Exit status: 0 ok, 1 bad input or options (one `error:` line naming the file and line or flag).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Iterator

import numpy as np

from absl import flags

from data_pipeline import chunking, dedup, normalize, quality, shards, text_io, tokenizer
from ettin_jax import cli

WORK = ".work"


@dataclasses.dataclass
class Options:
    inputs: list
    output: str
    tokenizer: str
    source: str = ""
    text_field: str = "text"
    normalize: bool = True
    filters: tuple = tuple(quality.RULES)
    quality: quality.QualityConfig = dataclasses.field(default_factory=quality.QualityConfig)
    exact_dedup: bool = True
    near_dedup: bool = True
    jaccard: float = 0.7
    chunk: chunking.ChunkConfig | None = None
    docs_per_shard: int = 50_000
    workers: int = 1
    batch_size: int = 256

    def run_key(self, tokenizer_fingerprint: str) -> dict:
        """What decides the output; a resumed run must match it exactly."""
        # Size and modification time: an input edited in place (same size) is another input.
        return {"inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in self.inputs],
                "text_field": self.text_field, "normalize": self.normalize,
                "filters": list(self.filters), "quality": dataclasses.asdict(self.quality),
                "exact_dedup": self.exact_dedup, "near_dedup": self.near_dedup,
                "jaccard": self.jaccard,
                "chunk": dataclasses.asdict(self.chunk) if self.chunk else None,
                "docs_per_shard": self.docs_per_shard, "tokenizer": tokenizer_fingerprint}


class Progress:
    """Prints `label: done/total (rate, ETA)` to stderr at most every `every` seconds."""

    def __init__(self, label: str, total: float, unit: str, every: float = 5.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.start = self.last = time.time()

    def update(self, done: float, extra: str = "", force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"{self.label}: {done:,.0f}/{self.total:,.0f} {self.unit} ({rate:,.0f}/s, "
              f"ETA {eta:,.0f}s) {extra}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker processes
_WORKER_TOK = None
_WORKER_OPTS: Options | None = None
_WORKER_NEAR: dedup.NearDedup | None = None


def load_text_tokenizer(path: str):
    """The tokenizer at `path` for raw text: "[CLS]", "[MASK]", "[unused3]" written in a
    document are its text, not special ids (tokenizers matches added tokens in the input even
    with add_special_tokens=False: a page about BERT put [SEP] and [PAD] mid-document)."""
    tok = tokenizer.load(path)
    tok.encode_special_tokens = True
    return tok


def _init_worker(tokenizer_json: str, opts: Options) -> None:
    global _WORKER_TOK, _WORKER_OPTS, _WORKER_NEAR
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group: the parent alone stops the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_TOK = load_text_tokenizer(tokenizer_json)
    _WORKER_OPTS = opts
    _WORKER_NEAR = dedup.NearDedup(threshold=opts.jaccard) if opts.near_dedup else None


class _InProcess:
    """The part of multiprocessing.Pool's interface used here, run in this process."""

    def __init__(self, tokenizer_json: str, opts: Options):
        _init_worker(tokenizer_json, opts)

    def map(self, fn, jobs):
        return [fn(job) for job in jobs]

    def imap(self, fn, jobs):
        return (fn(job) for job in jobs)

    def close(self):
        pass

    def join(self):
        pass

    def terminate(self):
        pass


def _pool(tokenizer_json: str, opts: Options):
    if opts.workers <= 1:
        return _InProcess(tokenizer_json, opts)
    # spawn: a forked child would inherit the parent's tokenizer thread-pool state.
    return multiprocessing.get_context("spawn").Pool(opts.workers, initializer=_init_worker,
                                                     initargs=(tokenizer_json, opts))


# ---------------------------------------------------------------- stage 1-3: scan
def _check(texts: list[str]) -> list[tuple]:
    """Worker: per text (normalized text, words, filter reason or None, sha256 digest, MinHash
    values or None, tokens if removed by a filter else None). Dedup decisions stay sequential
    in the main process because they depend on every earlier document."""
    opts, out = _WORKER_OPTS, []
    for raw in texts:
        text = normalize.normalize(raw) if opts.normalize else raw
        reason = "empty" if not text.strip() else None
        if reason is None and opts.filters:
            reason = quality.first_failing_rule(text, opts.filters, opts.quality)
        sig = _WORKER_NEAR.signature(text) if reason is None and _WORKER_NEAR else None
        out.append([text, len(text.split()), reason, dedup.digest(text), sig, None])
    removed = [row for row in out if row[2]]
    encodings = _WORKER_TOK.encode_batch([row[0] for row in removed], add_special_tokens=False)
    for row, enc in zip(removed, encodings):
        row[5] = len(enc.ids)
    return [tuple(row) for row in out]


def _read_batches(opts: Options, stats: dict, progress: Progress):
    """Batches of input records, read in this process (errors name file and line)."""
    done_bytes, batch = 0, []
    for path in opts.inputs:
        size, chars_at_start = os.path.getsize(path), stats["chars_in"]
        for record in text_io.iter_file(path, text_field=opts.text_field):
            stats["chars_in"] += len(record.text)
            batch.append(record)
            if len(batch) == opts.batch_size:
                yield batch
                batch = []
            # within a file, characters read approximate bytes read (exact for ASCII)
            within = min(size, stats["chars_in"] - chars_at_start)
            progress.update(done_bytes + within, f"{stats['documents_in']:,} docs, {path}")
        done_bytes += size
    if batch:
        yield batch


def _scan(opts: Options, kept_path: str, tok, pool) -> dict:
    """Normalizes, filters and dedups every input record; writes kept texts as JSON lines.

    Workers normalize, filter, count tokens of filtered-out documents and compute MinHash
    values; this process reads the inputs and makes the order-dependent dedup decisions.
    """
    reasons = ("empty", *opts.filters, "exact_duplicate", "near_duplicate")
    stats = {"documents_in": 0, "words_in": 0, "chars_in": 0, "normalized_changed": 0,
             "removed": {name: 0 for name in reasons},
             "removed_tokens": {name: 0 for name in reasons},
             "documents_kept": 0, "words_kept": 0}
    exact = dedup.ExactDedup() if opts.exact_dedup else None
    near = dedup.NearDedup(threshold=opts.jaccard) if opts.near_dedup else None
    progress = Progress("scan", sum(os.path.getsize(p) for p in opts.inputs), "input bytes")
    window = max(1, 2 * opts.workers)              # batches in flight per round
    tmp = kept_path + ".tmp"
    try:
        with open(tmp, "w") as out:
            batches = _read_batches(opts, stats, progress)
            while True:
                round_ = [b for _, b in zip(range(window), batches)]
                if not round_:
                    break
                results = pool.map(_check, [[r.text for r in b] for b in round_])
                duplicates = []                    # (reason, text): tokens counted below
                for batch, checked in zip(round_, results):
                    for record, (text, words, reason, text_digest, sig, tokens) in zip(batch, checked):
                        stats["documents_in"] += 1
                        stats["words_in"] += words
                        stats["normalized_changed"] += text != record.text
                        if reason is None and exact is not None and exact.is_duplicate(text_digest):
                            reason = "exact_duplicate"
                        if reason is None and near is not None and near.is_duplicate(sig):
                            reason = "near_duplicate"
                        if reason is not None:
                            stats["removed"][reason] += 1
                            if tokens is None:
                                duplicates.append((reason, text))
                            else:
                                stats["removed_tokens"][reason] += tokens
                            continue
                        stats["documents_kept"] += 1
                        stats["words_kept"] += words
                        out.write(json.dumps({"text": text, "from": f"{record.file}:{record.line}"},
                                             ensure_ascii=False) + "\n")
                encodings = tok.encode_batch([t for _, t in duplicates], add_special_tokens=False)
                for (reason, _), enc in zip(duplicates, encodings):
                    stats["removed_tokens"][reason] += len(enc.ids)
        os.replace(tmp, kept_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    progress.update(progress.total, f"{stats['documents_in']:,} docs", force=True)
    return stats


# ---------------------------------------------------------------- stage 4-5: tokenize + chunk
def _encode(job: tuple[list[str], dict | None]) -> tuple[list[np.ndarray], int]:
    """Token-id documents for a batch of texts ([CLS] ids [SEP], or one per Ettin chunk), and
    the number of text tokens before framing and chunking."""
    texts, chunk = job
    ids = tokenizer.special_ids(_WORKER_TOK)
    cls, sep = np.array([ids["cls"]], np.uint32), np.array([ids["sep"]], np.uint32)
    cfg = chunking.ChunkConfig(**chunk) if chunk else None
    out, tokens_in = [], 0
    for enc in _WORKER_TOK.encode_batch(texts, add_special_tokens=False):
        body = np.asarray(enc.ids, dtype=np.uint32)
        tokens_in += len(body)
        pieces = chunking.chunk_ids(body, cfg) if cfg else [body]
        out.extend(np.concatenate([cls, p, sep]) for p in pieces)
    return out, tokens_in


def _text_batches(f, count: int, batch: int) -> Iterator[list[str]]:
    """The texts of the next `count` lines of the open kept.jsonl, in lists of `batch`."""
    texts = []
    for _ in range(count):
        texts.append(json.loads(f.readline())["text"])
        if len(texts) == batch:
            yield texts
            texts = []
    if texts:
        yield texts


def _write_shards(opts: Options, pool, n_docs: int, vocab_size: int,
                  progress_path: str) -> list[dict]:
    done = {}
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            done = {e["name"]: e for e in json.load(f)["shards"]}
    dtype = shards.token_dtype(vocab_size)
    n_shards = max(1, -(-n_docs // opts.docs_per_shard))
    chunk = dataclasses.asdict(opts.chunk) if opts.chunk else None
    progress = Progress("tokenize", n_docs, "documents")
    entries = []
    with open(os.path.join(opts.output, WORK, "kept.jsonl")) as kept:
        for k in range(n_shards):
            name = shards.shard_name(k)
            path = os.path.join(opts.output, name)
            first = k * opts.docs_per_shard
            count = min(opts.docs_per_shard, n_docs - first)
            entry = done.get(name)
            if entry and os.path.exists(path) and os.path.getsize(path) == entry["bytes"]:
                entries.append(entry)          # finished by an earlier run: keep it
                for _ in range(count):
                    kept.readline()
                continue
            jobs = ((texts, chunk) for texts in _text_batches(kept, count, opts.batch_size))
            docs, tokens_in = [], 0
            for i, (batch_docs, batch_tokens) in enumerate(pool.imap(_encode, jobs)):
                docs.extend(batch_docs)
                tokens_in += batch_tokens
                progress.update(first + min(count, (i + 1) * opts.batch_size),
                                f"shard {k + 1}/{n_shards}")
            entry = shards.write_shard(path, docs, dtype)
            entry["input_documents"] = count
            entry["input_tokens"] = tokens_in
            entries.append(entry)
            shards.write_json_atomic(progress_path, {"shards": entries})
    progress.update(n_docs, f"{n_shards} shards", force=True)
    return entries


# ---------------------------------------------------------------- driver
def _summary(stats: dict) -> str:
    lines = [f"documents in      {stats['documents_in']:>12,}   tokens {stats['tokens_in']:>14,}"]
    for name, count in stats["removed"].items():
        if count:
            lines.append(f"  removed {name:<20} {count:>10,}   tokens "
                         f"{stats['removed_tokens'][name]:>14,}")
    lines.append(f"documents kept    {stats['documents_kept']:>12,}   tokens {stats['tokens_kept']:>14,}")
    if stats["chunking_dropped_tokens"]:
        lines.append(f"  chunking dropped short tails             tokens "
                     f"{stats['chunking_dropped_tokens']:>14,}")
    lines.append(f"records out       {stats['records_out']:>12,}   tokens {stats['tokens_out']:>14,}"
                 "  (framed [CLS] ... [SEP])")
    return "\n".join(lines)


def run(opts: Options) -> dict:
    """Runs (or resumes) prepare; returns the manifest. Raises InputError/ShardError/TokenizerError."""
    tok = load_text_tokenizer(opts.tokenizer)
    specials = tokenizer.special_ids(tok, where=opts.tokenizer)
    fp = tokenizer.fingerprint(tok)
    key = json.loads(json.dumps(opts.run_key(fp)))   # tuples -> lists, as read back
    work = os.path.join(opts.output, WORK)
    run_path = os.path.join(work, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            previous = json.load(f)
        diff = sorted(k for k in set(previous) | set(key) if previous.get(k) != key.get(k))
        if diff:
            what = "tokenizer fingerprint" if diff == ["tokenizer"] else ", ".join(diff)
            raise shards.ShardError(
                f"{opts.output}: was prepared with a different {what} "
                f"({run_path}); resume needs identical inputs and options; use a new --output")
    kept_path = os.path.join(work, "kept.jsonl")
    scan_stats_path = os.path.join(work, "scan_stats.json")
    tok_json = os.path.join(work, "tokenizer.json")
    fresh = not os.path.exists(run_path)
    if fresh:
        # No finished scan here (a failed run may have left .work behind): start over.
        os.makedirs(work, exist_ok=True)
        tok.save(tok_json + ".tmp")
        os.replace(tok_json + ".tmp", tok_json)
    pool = _pool(tok_json, opts)
    try:
        if fresh:
            stats = _scan(opts, kept_path, tok, pool)
            shards.write_json_atomic(scan_stats_path, stats)
            shards.write_json_atomic(run_path, key)   # last: marks the scan complete
        else:
            with open(scan_stats_path) as f:
                stats = json.load(f)
            print(f"scan: reusing {kept_path} from an earlier run", file=sys.stderr)
        vocab_size = tok.get_vocab_size()
        entries = _write_shards(opts, pool, stats["documents_kept"], vocab_size,
                                os.path.join(work, "progress.json"))
    except BaseException:
        # A worker's tasks die with it on Ctrl-C: join() would wait for them forever.
        pool.terminate()
        raise
    pool.close()
    pool.join()
    stats["records_out"] = sum(e["documents"] for e in entries)
    stats["tokens_out"] = sum(e["tokens"] for e in entries)
    stats["tokens_kept"] = sum(e["input_tokens"] for e in entries)
    stats["tokens_in"] = stats["tokens_kept"] + sum(stats["removed_tokens"].values())
    # chunking drops short tails; framing adds [CLS] and [SEP] to every record
    stats["chunking_dropped_tokens"] = (stats["tokens_kept"] + 2 * stats["records_out"]
                                        - stats["tokens_out"])
    manifest = shards.build_manifest(
        source=opts.source or os.path.basename(opts.output.rstrip("/")), vocab_size=vocab_size,
        tokenizer_path=opts.tokenizer, fingerprint=fp, specials=specials, entries=entries,
        input_documents=stats["documents_kept"],
        chunking=dataclasses.asdict(opts.chunk) if opts.chunk else None)
    shards.write_json_atomic(os.path.join(opts.output, "stats.json"), stats)
    shards.write_json_atomic(os.path.join(opts.output, shards.MANIFEST), manifest)
    with open(os.path.join(opts.output, "summary.txt"), "w") as f:
        f.write(_summary(stats) + "\n")
    print(_summary(stats), file=sys.stderr)
    return manifest


def _quality_threshold_fields() -> list:
    return [f for f in dataclasses.fields(quality.QualityConfig) if f.type in ("int", "float")]


def define_flags():
    flags.DEFINE_multi_string("input", None, "glob of .jsonl/.jsonl.gz/.parquet/.txt files "
                              "(repeatable)", required=True)
    flags.DEFINE_string("output", None, "directory for shards and manifest.json", required=True)
    flags.DEFINE_string("tokenizer", None, "tokenizer directory, tokenizer.json, or hub name",
                        required=True)
    flags.DEFINE_string("source", "", "source name in the manifest (default: dir name)")
    flags.DEFINE_string("text_field", "text", "JSON/parquet field holding the text")
    flags.DEFINE_bool("no_normalize", False, "skip NFC/whitespace normalization")
    flags.DEFINE_string("filters", "all", f"'all', 'none', or a comma list of {','.join(quality.RULES)}")
    flags.DEFINE_string("languages", "en", "comma list of ISO codes kept by the language rule "
                        "(\"\" = no language rule); with languages other than en the stop-word "
                        "rule, whose words are English, judges English documents only")
    for field in _quality_threshold_fields():
        define = flags.DEFINE_integer if field.type == "int" else flags.DEFINE_float
        define(field.name, field.default, "quality rule threshold")
    flags.DEFINE_bool("no_exact_dedup", False, "skip exact (sha256) deduplication")
    flags.DEFINE_bool("no_near_dedup", False, "skip near-duplicate (MinHash) deduplication")
    flags.DEFINE_float("jaccard", 0.7, "near-duplicate Jaccard threshold on word 5-gram "
                       "shingles, in (0, 1); MinHash LSH applies it approximately (at 0.7, "
                       "pairs near 0.5 can be dropped and pairs near 0.85 kept)")
    flags.DEFINE_integer("chunk_size", 0, "Ettin chunking: max framed chunk length (e.g. 8000); 0 = off")
    flags.DEFINE_integer("min_chunk_size", 512, "Ettin chunking: shortest chunk kept")
    flags.DEFINE_integer("always_skip_size", 128, "Ettin chunking: shorter remainders are dropped")
    flags.DEFINE_bool("no_backfill", False, "Ettin chunking: no backfill of short chunks")
    flags.DEFINE_integer("docs_per_shard", 50_000, "input documents per shard (the unit of resume)")
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "tokenizer processes")


def options_from_flags(f) -> Options:
    """Options of the parsed flags; ValueError (naming the flag) for a bad value."""
    filters = (tuple(quality.RULES) if f.filters == "all" else ()
               if f.filters == "none" else tuple(x for x in f.filters.split(",") if x))
    unknown = [name for name in filters if name not in quality.RULES]
    if unknown:
        raise cli.UserError(f"--filters: unknown rule(s) {unknown}; known: {list(quality.RULES)}")
    qcfg = quality.QualityConfig(
        languages=tuple(x for x in f.languages.split(",") if x),
        **{field.name: f[field.name].value for field in _quality_threshold_fields()})
    chunk = (chunking.ChunkConfig(f.chunk_size, f.min_chunk_size, f.always_skip_size,
                                  not f.no_backfill) if f.chunk_size else None)
    for name in ("docs_per_shard", "workers"):
        if f[name].value < 1:
            raise cli.UserError(f"--{name}={f[name].value}: must be at least 1")
    if not 0.0 < f.jaccard < 1.0:
        raise cli.UserError(f"--jaccard={f.jaccard}: must lie in (0, 1)")
    return Options(inputs=text_io.expand_inputs(f.input), output=f.output, tokenizer=f.tokenizer,
                   source=f.source, text_field=f.text_field, normalize=not f.no_normalize,
                   filters=filters, quality=qcfg, exact_dedup=not f.no_exact_dedup,
                   near_dedup=not f.no_near_dedup, jaccard=f.jaccard, chunk=chunk,
                   docs_per_shard=f.docs_per_shard, workers=f.workers)


def main(argv) -> int:
    run(options_from_flags(flags.FLAGS))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
