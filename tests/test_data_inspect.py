"""`python -m data_pipeline.inspect`: decoded rows, statistics, .npz dump, and a clean failure."""
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import inspect as inspect_lib
from data_pipeline import shards, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    tok = tokenizer.train_bpe([TEXT * 30], vocab_size=512, unk_id=500)
    tok_dir = tokenizer.save(tok, str(root / "tok"))
    doc = np.array([501] + tok.encode(TEXT, add_special_tokens=False).ids + [502])
    shards.write_token_dataset(str(root / "c"), [doc] * 40, tokenizer_path=tok_dir, source="code")
    return str(root), tok_dir


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline.inspect",
                           "--config=configs/ettin_tiny.py:mlm", "--config.data.num_workers=0",
                           *args], cwd=ROOT, capture_output=True, text=True)


def test_inspect_decodes_marks_and_dumps(corpus):
    root, tok_dir = corpus
    dump = os.path.join(root, "dump.npz")
    result = inspect(f"--config.data.mixture={root}/c", f"--config.data.tokenizer={tok_dir}",
                     "--batches=3", "--rows=2", "--decode", f"--dump={dump}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "‖1‖[CLS]" in out and "⟦M:" in out and "def" in out
    stats_text = out.split("=== statistics", 1)[1].splitlines()[1:]
    stats = dict(line.split(": ", 1) for line in stats_text if line.startswith(" "))
    stats = {k.strip(): float(v) for k, v in stats.items()}
    assert stats["packing_efficiency"] > 0.9
    assert abs(stats["mask_ratio"] - 0.3) < 0.05
    assert stats["share[c]"] == 1.0
    data = np.load(dump)
    assert sorted(data.files) == sorted(["input_ids", "segment_ids", "positions", "labels",
                                         "mask_positions", "mask_labels"])
    assert data["input_ids"].shape == (6, 128)
    # the text reconstructs: undoing the masks gives back the document's tokens
    ids = np.where(data["labels"] != -100, data["labels"], data["input_ids"])
    first = ids[0][data["segment_ids"][0] == 1]
    assert tokenizer.load(tok_dir).decode(first.tolist(), skip_special_tokens=True) == TEXT


def test_inspect_fails_cleanly_on_a_truncated_shard(corpus, tmp_path):
    root, tok_dir = corpus
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(os.path.join(root, "c")):
        with open(os.path.join(root, "c", name), "rb") as f:
            data = f.read()
        (bad / name).write_bytes(data[:1000] if name.endswith(".arrayrecord") else data)
    result = inspect(f"--config.data.mixture={bad}", f"--config.data.tokenizer={tok_dir}")
    assert result.returncode == 1
    assert "shard-00000.arrayrecord" in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_sources_of_one_basename_get_names_that_differ():
    """Two mixture sources named .../shards each: one share line per source, not one for both."""
    assert inspect_lib.source_names(["data/web/shards", "data/code/shards/"]) == ["web/shards",
                                                                                   "code/shards"]
    assert inspect_lib.source_names(["/a/web", "/b/code"]) == ["web", "code"]
    assert inspect_lib.source_names(["x/c", "x/c"]) == ["0:x/c", "1:x/c"]


def test_with_no_data_the_batches_are_the_demo_runs():
    """A run with no data trains config.demo's rows (ettin_jax.demo); inspect showed the
    full config's 1024-token rows instead."""
    from configs import ettin_17m
    config = ettin_17m.get_config("mlm")
    config.demo.train.seq_len = 64
    shown = inspect_lib.batches_config(config, rows=3)
    assert (shown.train.seq_len, shown.train.global_batch_size, shown.data.eval_batch_size) == \
        (64, 3, 3)
    config.data.mixture = "data/web"          # a run's own data: its own rows
    assert inspect_lib.batches_config(config, rows=3).train.seq_len == 1024
