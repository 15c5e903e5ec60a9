"""ArrayRecord shards of token-id arrays and the `manifest.json` that describes them.

A prepared directory holds
    shard-00000.arrayrecord ...   one document (or chunk) per record: raw little-endian
                                  uint16 (vocab <= 65536) or uint32 token ids, already framed
                                  [CLS] ... [SEP]
    manifest.json                 {"format": "ettin-arrayrecord-v1", "source", "dtype",
                                   "vocab_size", "tokenizer": {"path", "fingerprint", "specials"},
                                   "documents", "tokens", "shards": [{"name", "documents",
                                   "tokens", "bytes"}], ...}
A shard is written to `NAME.tmp` and renamed when closed, so a reader never sees half a shard.
"""
from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from ettin_jax import cli

MANIFEST = "manifest.json"
FORMAT = "ettin-arrayrecord-v1"


class ShardError(ValueError):
    """A shard or manifest that is missing, corrupt or inconsistent; names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrayrecord"


def write_shard(path: str, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Writes `docs` (1-D id arrays) to `path` atomically; returns its manifest entry."""
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    tokens = 0
    with cli.naming_file(tmp):
        for doc in docs:
            writer.write(np.asarray(doc, dtype=dtype).tobytes())
            tokens += len(doc)
        writer.close()
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "documents": len(docs), "tokens": int(tokens),
            "bytes": os.path.getsize(path)}


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with cli.naming_file(tmp), open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ShardError(f"{path}: missing; is {directory} a directory written by "
                         "`python -m data_pipeline.prepare`?")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ArrayRecordDocs:
    """Random-access documents of a prepared directory: `docs[i]` is a 1-D int32 id array.

    Checks at open that every shard exists with the size and record count the manifest
    records, and on read that ids are < vocab_size; errors name the shard and record.
    Readers open lazily per process, so the object pickles into Grain worker processes.
    """

    def __init__(self, directory: str, *, vocab_size: int | None = None):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = vocab_size or self.manifest["vocab_size"]
        self._paths, counts = [], []
        for entry in self.manifest["shards"]:
            path = os.path.join(directory, entry["name"])
            if not os.path.exists(path):
                raise ShardError(f"{path}: listed in {MANIFEST} but missing")
            if os.path.getsize(path) != entry["bytes"]:
                raise ShardError(f"{path}: {os.path.getsize(path)} bytes, {MANIFEST} says "
                                 f"{entry['bytes']} (truncated or overwritten shard)")
            self._paths.append(path)
            counts.append(entry["documents"])
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return dict(self.__dict__, _readers={})

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            path = self._paths[shard]
            try:
                reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
            except RuntimeError as e:
                raise ShardError(f"{path}: cannot open as ArrayRecord ({e})") from None
            expected = int(self._starts[shard + 1] - self._starts[shard])
            if reader.num_records() != expected:
                raise ShardError(f"{path}: {reader.num_records()} records, {MANIFEST} says "
                                 f"{expected} (corrupt or truncated shard)")
            self._readers[shard] = reader
        return reader

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record number) of document `index`, for error messages."""
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._paths[shard], index - int(self._starts[shard])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.directory}: document {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        record = index - int(self._starts[shard])
        try:
            raw = self._reader(shard).read([record])[0]
        except RuntimeError as e:
            raise ShardError(f"{self._paths[shard]}: record {record}: unreadable ({e})") from None
        if len(raw) % self.dtype.itemsize:
            raise ShardError(f"{self._paths[shard]}: record {record}: {len(raw)} bytes is not a "
                             f"whole number of {self.dtype} ids")
        ids = np.frombuffer(raw, dtype=self.dtype)   # unsigned: checked before int32 wraps it
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ShardError(f"{self._paths[shard]}: record {record}: id {int(ids.max())} >= "
                             f"vocab size {self.vocab_size} (data tokenized with another "
                             "tokenizer?)")
        return ids.astype(np.int32)


def build_manifest(*, source: str, vocab_size: int, tokenizer_path: str, fingerprint: str,
                   specials: dict, entries: list[dict], input_documents: int,
                   chunking: dict | None) -> dict:
    return {"format": FORMAT, "source": source, "dtype": token_dtype(vocab_size).str,
            "vocab_size": vocab_size,
            "tokenizer": {"path": tokenizer_path, "fingerprint": fingerprint, "specials": specials},
            "documents": sum(e["documents"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "input_documents": input_documents, "chunking": chunking, "shards": entries}


def write_token_dataset(directory: str, docs: list[np.ndarray], *, tokenizer_path: str,
                        source: str, docs_per_shard: int = 10_000) -> dict:
    """Writes already-tokenized documents as a prepared directory (shards + manifest.json).

    For data tokenized elsewhere, benchmarks and tests; `prepare` is the path from raw text.
    Each document must be framed as prepare frames it, `[CLS] ... [SEP]` (the loader frames
    no document of a prepared directory); raises ValueError naming the first that is not.
    """
    from data_pipeline import tokenizer  # tokenizers import only where a manifest is made
    tok = tokenizer.load(tokenizer_path)
    vocab_size = tok.get_vocab_size()
    specials = tokenizer.special_ids(tok, tokenizer_path)
    for i, doc in enumerate(docs):
        if len(doc) < 2 or doc[0] != specials["cls"] or doc[-1] != specials["sep"]:
            raise ValueError(
                f"{directory}: document {i} ({len(doc)} ids) is not framed as [CLS] ... [SEP] "
                f"(ids {specials['cls']} and {specials['sep']}): add them before writing, as "
                "data_pipeline.prepare does; the loader reads prepared documents as they are")
    os.makedirs(directory, exist_ok=True)
    entries = [write_shard(os.path.join(directory, shard_name(k)),
                           docs[i:i + docs_per_shard], token_dtype(vocab_size))
               for k, i in enumerate(range(0, len(docs), docs_per_shard))]
    manifest = build_manifest(source=source, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                              fingerprint=tokenizer.fingerprint(tok),
                              specials=specials, entries=entries, input_documents=len(docs), chunking=None)
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    return manifest
