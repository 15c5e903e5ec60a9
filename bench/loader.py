"""Loader throughput: packed + masked tokens/s at seq_len 1024 with the default workers.

    python bench/loader.py [--config=configs/ettin_17m.py:mlm] [--batches=40] [--rows=256]
                           [--workers=N] [--seq_len=1024] [--results]

Builds a synthetic prepared corpus in a temp dir (real ArrayRecord shards; document lengths
log-normal, median 400 tokens, sigma 1.1, clipped to [16, 20000]: a web-like length mix;
random regular ids framed [CLS] ... [SEP]) and a tokenizer of the config's vocabulary layout,
then times `make_train_iterator` after a warm-up batch (worker start-up excluded). Reports
tokens/s (all row tokens, padding included), packing efficiency (non-pad / all tokens), and
the mask ratio; --results appends them as a row to bench/RESULTS.md.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ettin_jax import cli  # noqa: E402
from bench import results  # noqa: E402

from data_pipeline import loader, shards, tokenizer  # noqa: E402


TITLE = "Data loader (bench/loader.py): packed + masked tokens/s, goal >= 500k on 2 cores"
COLUMNS = ["date", "run", "tokens/s", "packing efficiency", "labels / real tokens", "machine",
           "command"]


def synthetic_docs(n: int, *, unk_id: int, cls_id: int, sep_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(400), 1.1, n), 16, 20_000).astype(np.int64)
    return [np.concatenate([[cls_id], rng.integers(0, unk_id, k), [sep_id]]) for k in lengths]


def define_flags():
    config_flags.DEFINE_config_file("config", "configs/ettin_17m.py:mlm", "FILE:ARG of the "
                                    "config whose loader settings are timed", lock_config=False)
    flags.DEFINE_integer("batches", 40, "timed batches")
    flags.DEFINE_integer("rows", 256, "rows per batch")
    flags.DEFINE_integer("documents", 20_000, "synthetic documents in the corpus")
    flags.DEFINE_integer("seq_len", 1024, "row length (8192: phases 2-3)")
    flags.DEFINE_integer("workers", None, "default: config.data.num_workers")
    results.define_flags()


def main(argv) -> int:
    a = flags.FLAGS
    config = a.config
    config.train.seq_len = a.seq_len
    if a.workers is not None:
        config.data.num_workers = a.workers
    m, d = config.model, config.data
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer.train_bpe(["def f(x):\n    return x + 1\n" * 50],
                                  vocab_size=m.vocab_size, unk_id=d.unk_token_id)
        tok_dir = tokenizer.save(tok, os.path.join(tmp, "tok"))
        docs = synthetic_docs(a.documents, unk_id=d.unk_token_id, cls_id=m.cls_token_id,
                              sep_id=m.sep_token_id)
        shards.write_token_dataset(os.path.join(tmp, "corpus"), docs, tokenizer_path=tok_dir,
                                   source="synthetic")
        d.mixture, d.tokenizer = os.path.join(tmp, "corpus"), tok_dir
        it = loader.make_train_iterator(config, process_index=0, process_count=1,
                                        rows_for_step=lambda step: a.rows)
        next(it)                                            # warm-up: workers start
        tokens = real = masked = 0
        start = time.perf_counter()
        for _ in range(a.batches):
            batch = next(it)
            tokens += batch["input_ids"].size
            real += int((batch["segment_ids"] > 0).sum())
            if "labels" in batch:
                masked += int((batch["labels"] != -100).sum())
        elapsed = time.perf_counter() - start
        it.close()
    rate = tokens / elapsed
    efficiency = real / tokens
    row = [datetime.date.today(),
           f"{config.objective}, seq {a.seq_len}, {a.rows} rows/batch, {d.num_workers} workers",
           f"{rate:,.0f}", f"{efficiency:.4f}", f"{masked / max(real, 1):.3f}",
           results.machine(device=False), f"`{results.command()}`" + (f" {a.note}" if a.note else "")]
    print(" | ".join(f"{column}: {cell}" for column, cell in zip(COLUMNS, row)))
    if a.results:
        results.append(TITLE, COLUMNS, [row], continue_table=True)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
