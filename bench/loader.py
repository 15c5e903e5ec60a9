"""Loader throughput: packed + masked tokens/s at seq_len 1024 with the default workers.

    python bench/loader.py [--config=configs/ettin_17m.py:mlm] [--batches=40] [--rows=256]
                           [--workers=N] [--seq_len=1024] [--no_append]

Builds a synthetic prepared corpus in a temp dir (real ArrayRecord shards; document lengths
log-normal, median 400 tokens, sigma 1.1, clipped to [16, 20000]: a web-like length mix;
random regular ids framed [CLS] ... [SEP]) and a tokenizer of the config's vocabulary layout,
then times `make_train_iterator` after a warm-up batch (worker start-up excluded). Reports
tokens/s (all row tokens, padding included), packing efficiency (non-pad / all tokens), and
the mask ratio; appends one line to bench/RESULTS.md unless --no_append.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import loader, shards, tokenizer  # noqa: E402


HEADER = ("## Data loader (bench/loader.py): packed + masked tokens/s, goal >= 500k on 2 cores",
          "",
          "| date | run | tokens/s | packing efficiency | labels / real tokens | machine | command |",
          "|---|---|---|---|---|---|---|")


def synthetic_docs(n: int, *, unk_id: int, cls_id: int, sep_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(400), 1.1, n), 16, 20_000).astype(np.int64)
    return [np.concatenate([[cls_id], rng.integers(0, unk_id, k), [sep_id]]) for k in lengths]


def load_config(spec: str):
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ettin_17m.py:mlm")
    p.add_argument("--batches", type=int, default=40, help="timed batches")
    p.add_argument("--rows", type=int, default=256, help="rows per batch")
    p.add_argument("--documents", type=int, default=20_000)
    p.add_argument("--seq_len", type=int, default=1024, help="row length (8192: phases 2-3)")
    p.add_argument("--workers", type=int, default=None, help="default: config.data.num_workers")
    p.add_argument("--no_append", action="store_true", help="do not append to bench/RESULTS.md")
    a = p.parse_args()
    config = load_config(a.config)
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
    line = (f"| {datetime.date.today()} | {config.objective}, seq {a.seq_len}, {a.rows} rows/batch, "
            f"{d.num_workers} workers | {rate:,.0f} | {efficiency:.4f} | "
            f"{masked / max(real, 1):.3f} | {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
            f"Python {platform.python_version()} | `python bench/loader.py` |")
    print(line)
    if not a.no_append:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        existing = open(results).read() if os.path.exists(results) else ""
        last = existing.rstrip().rsplit("\n", 1)[-1]
        with open(results, "a") as f:
            if "`python bench/loader.py`" not in last:   # others appended since: new table
                f.write(("\n" if existing else "") + "\n".join(HEADER) + "\n")
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
