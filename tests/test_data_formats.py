"""Readers of Ettin's released formats: MDS shards (raw and zstd) and the data-order parquet,
with files written here from the format description (recipe §5.3), plus the loader reading them
and the demo corpus path."""
import fcntl
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import train_testlib
from configs import ettin_tiny
from data_pipeline import data_order, demo_corpus, loader, mds, sources


def mds_sample(doc_id: str, ids: np.ndarray, bare: bool) -> bytes:
    """Columns sorted by name: id (str), input_ids (ndarray[:uint32]); both variable-size."""
    ids = ids.astype("<u4")
    shape_code = 0 if len(ids) < 256 else 1 if len(ids) < 65536 else 2
    shape = np.array([len(ids)], dtype=["<u1", "<u2", "<u4"][shape_code]).tobytes()
    arr = (bytes([32]) if bare else b"") + bytes([(1 << 2) | shape_code]) + shape + ids.tobytes()
    text = doc_id.encode()
    return struct.pack("<II", len(text), len(arr)) + text + arr


def write_mds(directory, docs, *, per_shard=3, compress=False, bare=False):
    os.makedirs(directory, exist_ok=True)
    infos = []
    for k, i in enumerate(range(0, len(docs), per_shard)):
        samples = [mds_sample(f"doc{j}", docs[j], bare) for j in range(i, min(i + per_shard, len(docs)))]
        encodings = ["str", "ndarray" if bare else "ndarray:uint32"]
        config = json.dumps({"column_encodings": encodings, "column_names": ["id", "input_ids"],
                             "column_sizes": [None, None], "format": "mds"}).encode()
        header = 4 * (len(samples) + 2)
        offsets = np.cumsum([header + len(config)] + [len(s) for s in samples]).astype("<u4")
        data = struct.pack("<I", len(samples)) + offsets.tobytes() + config + b"".join(samples)
        raw = f"shard.{k:05d}.mds"
        info = {"column_encodings": encodings, "column_names": ["id", "input_ids"],
                "column_sizes": [None, None], "compression": "zstd" if compress else None,
                "format": "mds", "hashes": [], "raw_data": {"basename": raw, "bytes": len(data),
                                                            "hashes": {}},
                "samples": len(samples), "size_limit": 1 << 26, "version": 2, "zip_data": None}
        if compress:
            packed = zstandard.ZstdCompressor().compress(data)
            with open(os.path.join(directory, raw + ".zstd"), "wb") as f:
                f.write(packed)
            info["zip_data"] = {"basename": raw + ".zstd", "bytes": len(packed), "hashes": {}}
        else:
            with open(os.path.join(directory, raw), "wb") as f:
                f.write(data)
        infos.append(info)
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump({"shards": infos, "version": 2}, f)


def random_docs(n, rng, high=500, lo=3, hi=300):
    return [np.concatenate([[501], rng.integers(0, high, rng.integers(lo, hi)), [502]])
            for _ in range(n)]


@pytest.mark.parametrize("compress,bare", [(False, False), (True, False), (False, True)])
def test_mds_reader_round_trips(tmp_path, compress, bare):
    docs = random_docs(8, np.random.default_rng(0))
    docs.append(np.arange(70_000) % 500)                 # shape stored as uint32
    write_mds(tmp_path / "part", docs, compress=compress, bare=bare)
    reader = mds.MDSDocs(str(tmp_path), vocab_size=512, cache_dir=str(tmp_path / "cache"))
    assert len(reader) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(reader[i], doc)
        assert reader[i].dtype == np.int32


@pytest.mark.parametrize("compress", [False, True])
def test_a_merged_index_beside_its_parts_serves_each_document_once(tmp_path, compress):
    """streaming's merge_index writes root/index.json listing part*/ shards by their paths
    from the root; the parts' own index.json files stay. Every document is served once;
    zstd shards so named decompress into a cache directory of flat names."""
    rng = np.random.default_rng(5)
    parts = {name: random_docs(5, rng) for name in ("part0", "part1")}
    merged = []
    for name, docs in parts.items():
        write_mds(tmp_path / name, docs, per_shard=2, compress=compress)
        with open(tmp_path / name / "index.json") as f:
            for info in json.load(f)["shards"]:
                for key in ("raw_data", "zip_data"):
                    if info[key]:
                        info[key]["basename"] = f"{name}/{info[key]['basename']}"
                merged.append(info)
    with open(tmp_path / "index.json", "w") as f:
        json.dump({"shards": merged, "version": 2}, f)
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    reader = mds.MDSDocs(str(tmp_path), vocab_size=512, cache_dir=str(cache))
    if compress:
        assert len(os.listdir(cache)) == 6 and not os.path.exists(tmp_path / "part0" /
                                                                   "shard.00000.mds")
    assert len(reader) == 10
    served = sorted(tuple(reader[i]) for i in range(len(reader)))
    assert served == sorted(tuple(d) for d in parts["part0"] + parts["part1"])


def test_an_mds_sources_mean_length_is_within_a_percent(tmp_path):
    """The mean sets the source's document rate for its token share. Web-like lengths
    (lognormal, coefficient of variation 1.3): 256 evenly spread documents were 3% off here;
    the reader's sample (sources.MDS_MEAN_SAMPLES) is within 1% of the exact mean."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(120), 1.0, 40_000).astype(int), 1, 5000)
    docs = [np.concatenate([[501], rng.integers(0, 500, n), [502]]) for n in lengths]
    write_mds(tmp_path / "web", docs, per_shard=2000)
    source = sources.open_source(str(tmp_path / "web"), 1.0, vocab_size=512)
    exact = np.mean([len(d) for d in docs])
    assert abs(source.mean_length / exact - 1) < 0.01
    assert abs(sources._sampled_mean_length(source.docs, 256) / exact - 1) > 0.02


def test_mds_truncated_and_bad_ids_fail_naming_file_and_sample(tmp_path):
    docs = random_docs(6, np.random.default_rng(1))
    docs[4][3] = 9000
    write_mds(tmp_path, docs)
    reader = mds.MDSDocs(str(tmp_path), vocab_size=512)
    with pytest.raises(mds.MDSError, match=r"shard\.00001\.mds: sample 1: id 9000 >= vocab"):
        reader[4]
    shard = tmp_path / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(mds.MDSError, match=r"shard\.00000\.mds: .*truncated shard"):
        mds.MDSDocs(str(tmp_path), vocab_size=512)[0]
    (tmp_path / "shard.00001.mds").unlink()
    with pytest.raises(mds.MDSError, match=r"shard\.00001\.mds: missing"):
        mds.MDSDocs(str(tmp_path))


def test_mds_fixed_shape_columns_decode_and_corrupt_lengths_name_the_sample(tmp_path):
    """streaming's `ndarray:DTYPE:SHAPE` (fixed size, no shape header) decodes; a value of a
    byte length that is no whole number of ids fails naming the shard and sample."""
    docs = [np.concatenate([[501], row, [502]]) for row in
            np.random.default_rng(3).integers(0, 500, (4, 30))]
    samples = [struct.pack("<I", 4) + f"doc{i}".encode() + d.astype("<u4").tobytes()
               for i, d in enumerate(docs)]
    encodings, sizes = ["str", "ndarray:uint32:32"], [None, 32 * 4]
    config = json.dumps({"column_encodings": encodings, "column_names": ["id", "input_ids"],
                         "column_sizes": sizes, "format": "mds"}).encode()
    offsets = np.cumsum([4 * 6 + len(config)] + [len(x) for x in samples]).astype("<u4")
    data = struct.pack("<I", 4) + offsets.tobytes() + config + b"".join(samples)
    (tmp_path / "shard.00000.mds").write_bytes(data)
    info = {"column_encodings": encodings, "column_names": ["id", "input_ids"],
            "column_sizes": sizes, "compression": None, "format": "mds", "hashes": [],
            "raw_data": {"basename": "shard.00000.mds", "bytes": len(data), "hashes": {}},
            "samples": 4, "size_limit": 1 << 26, "version": 2, "zip_data": None}
    with open(tmp_path / "index.json", "w") as f:
        json.dump({"shards": [info], "version": 2}, f)
    reader = mds.MDSDocs(str(tmp_path), vocab_size=512)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(reader[i], doc)
    with pytest.raises(mds.MDSError, match=r"x: 5 bytes of uint32 values, not a multiple of 4"):
        mds.decode_ndarray(memoryview(bytes([4 | 0, 1]) + b"\0" * 5), "ndarray:uint32", "x")
    with pytest.raises(mds.MDSError, match=r"x: unsupported column encoding 'ndarray:uint32:a'"):
        mds.decode_ndarray(memoryview(b"\0" * 8), "ndarray:uint32:a", "x")
    with pytest.raises(mds.MDSError, match=r"x: empty ndarray value"):
        mds.decode_ndarray(memoryview(b""), "ndarray", "x")


def test_mds_corrupt_zstd_fails_naming_file(tmp_path):
    write_mds(tmp_path, random_docs(3, np.random.default_rng(2)), compress=True)
    z = tmp_path / "shard.00000.mds.zstd"
    z.write_bytes(b"not zstd at all" * 10)
    with pytest.raises(mds.MDSError, match=r"shard\.00000\.mds\.zstd: corrupt zstd"):
        mds.MDSDocs(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]


def write_order(directory, docs, per_file=5):
    os.makedirs(directory, exist_ok=True)
    for k, i in enumerate(range(0, len(docs), per_file)):
        chunk = docs[i:i + per_file]
        table = pa.table({"input_ids": pa.array([d.tolist() for d in chunk], pa.list_(pa.uint32())),
                          "step": pa.array([i // 2 + j // 2 + 1 for j in range(len(chunk))])})
        pq.write_table(table, os.path.join(directory, f"steps_{k * 100 + 1:06d}_to_{k * 100 + 100:06d}.parquet"),
                       row_group_size=2)


def test_data_order_parquet_reads_rows_in_order(tmp_path):
    docs = random_docs(12, np.random.default_rng(3))
    write_order(tmp_path / "checkpoint_000001", docs)
    reader = data_order.ParquetDocs(str(tmp_path), vocab_size=512)
    assert len(reader) == 12
    for i in (0, 3, 7, 11, 2):                               # random access across groups/files
        np.testing.assert_array_equal(reader[i], docs[i])
    bad = random_docs(2, np.random.default_rng(4))
    bad[1][1] = 600
    write_order(tmp_path / "bad", bad)
    with pytest.raises(data_order.ParquetError, match=r"steps_000001_to_000100\.parquet: row 1: id 600"):
        data_order.ParquetDocs(str(tmp_path / "bad"), vocab_size=512)[1]
    # int64 ids below 0 (JAX's embedding lookup would wrap them silently) and floats
    for name, values, message in (("neg", pa.array([[501, -3, 502]], pa.list_(pa.int64())),
                                   r"row 0: input_ids holds int64 values \(-3 < 0\)"),
                                  ("float", pa.array([[501.0, 3.5]], pa.list_(pa.float64())),
                                   r"row 0: input_ids holds float64 values; expected token ids")):
        os.makedirs(tmp_path / name)
        pq.write_table(pa.table({"input_ids": values}), str(tmp_path / name / "steps.parquet"))
        with pytest.raises(data_order.ParquetError, match=message):
            data_order.ParquetDocs(str(tmp_path / name), vocab_size=512)[0]


def test_loader_mixes_mds_and_parquet_by_token_share(tmp_path, demo):
    tok_dir, _ = demo
    rng = np.random.default_rng(5)
    # MDS docs without framing (the loader adds [CLS]/[SEP], recipe §4.5); parquet ~4x longer
    write_mds(tmp_path / "mds", [d[1:-1] for d in random_docs(60, rng, lo=20, hi=60)])
    write_order(tmp_path / "order", random_docs(60, rng, lo=120, hi=200))
    config = ettin_tiny.get_config("mlm")
    config.data.mixture = f"{tmp_path / 'mds'}:0.25,{tmp_path / 'order'}:0.75"
    config.data.tokenizer, config.data.num_workers = tok_dir, 0
    config.data.eval_documents = 0
    it = loader.make_train_iterator(config, process_index=0, process_count=1,
                                    include_metadata=True)
    src = np.concatenate([next(it)["source_ids"] for _ in range(40)])
    share = (src == 0).sum() / (src >= 0).sum()
    assert abs(share - 0.25) < 0.05, share
    batch = next(it)
    starts = batch["positions"] == 0
    first = np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])[starts]
    assert (first == 501).mean() > 0.5                    # framing added on MDS docs


def test_token_shares_count_the_framing_the_loader_adds(tmp_path, demo):
    """Documents of 4 stored tokens (MDS, parquet) become 6 once framed [CLS] ... [SEP]: at
    0.5 each against 200-token documents, their rates counted 4 and the short source took
    0.60 of the tokens. framed_lengths equals the length of loader.frame_document's output
    (empty, framed, half-framed and bare documents)."""
    tok_dir, _ = demo
    cls_id, sep_id = ettin_tiny.CLS_ID, ettin_tiny.SEP_ID
    rng = np.random.default_rng(0)
    docs = [np.array([], np.int64), np.array([cls_id, 5, sep_id]), np.array([cls_id, 5]),
            np.array([5, sep_id]), np.array([7]), np.array([cls_id]), np.array([sep_id])]
    docs += [rng.integers(0, 500, n) for n in rng.integers(1, 9, 40)]
    want = [len(loader.frame_document(d, cls_id=cls_id, sep_id=sep_id)) for d in docs]
    got = sources.framed_lengths([len(d) for d in docs], [d[0] if len(d) else -1 for d in docs],
                                 [d[-1] if len(d) else -1 for d in docs], (cls_id, sep_id))
    assert got.tolist() == want

    short = [rng.integers(0, 500, 4) for _ in range(600)]
    write_mds(tmp_path / "short_mds", short, per_shard=200)
    write_order(tmp_path / "short_parquet", short, per_file=200)
    write_mds(tmp_path / "long", [rng.integers(0, 500, 200) for _ in range(60)], per_shard=20)
    for name in ("short_mds", "short_parquet"):
        config = ettin_tiny.get_config("clm")
        config.data.mixture = f"{tmp_path / name}:0.5,{tmp_path / 'long'}:0.5"
        config.data.tokenizer, config.data.num_workers = tok_dir, 0
        config.data.eval_documents, config.data.pack_pool_size = 0, 1
        assert [s.mean_length for s in loader.open_sources(config, config.data.mixture)] == \
            [6.0, 202.0]
        it = loader.make_train_iterator(config, process_index=0, process_count=1,
                                        include_metadata=True)
        src = np.concatenate([next(it)["source_ids"] for _ in range(60)])
        share = (src == 0).sum() / (src >= 0).sum()
        assert abs(share - 0.5) < 0.03, (name, share)


def test_demo_corpus_trains_without_configured_data(demo):
    tok_dir, shard_dir = demo
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert (hf.mask_token_id, hf.pad_token_id, len(hf)) == (504, 503, 512)
    assert "def" in hf.decode(hf("def main():")["input_ids"], skip_special_tokens=True)
    # what an exported encoder meets: transformers' fill-mask pipeline with this tokenizer
    from transformers import ModernBertConfig, ModernBertForMaskedLM, pipeline
    model = ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=503, cls_token_id=501, sep_token_id=502,
        bos_token_id=501, eos_token_id=502)).eval()
    filled = pipeline("fill-mask", model=model, tokenizer=hf)("def main(): return [MASK]", top_k=2)
    assert len(filled) == 2 and all(f["sequence"].startswith("def main(): return") for f in filled)
    config = ettin_tiny.get_config("clm")
    config.data.demo_dir = os.path.dirname(os.path.dirname(shard_dir))
    config.data.demo_max_bytes = train_testlib.DEMO_MAX_BYTES   # the `demo` fixture's build
    config.data.num_workers = 0
    demo_corpus.configure(config)      # what a run with no data configured does first
    batch = next(loader.make_train_iterator(config, process_index=0, process_count=1))
    assert batch["input_ids"].shape == (8, 128)
    assert (batch["segment_ids"] > 0).mean() > 0.95
    assert loader.tokenizer_path(config) == tok_dir


def test_demo_corpus_builders_take_turns(demo):
    """The processes of a multi-process run configure the demo at once (two builds collided on
    corpus.jsonl.tmp, and the run failed): a builder waits while another holds OUTPUT.lock,
    then finds that build and reuses it."""
    output = os.path.dirname(demo[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(output + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = subprocess.Popen(
            [sys.executable, "-m", "data_pipeline.demo_corpus", f"--output={output}",
             "--vocab_size=512", "--unk_id=500", f"--max_bytes={train_testlib.DEMO_MAX_BYTES}"],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = []
        while not any("waiting for another process's build" in line for line in said):
            line = builder.stderr.readline()
            assert line, f"the builder did not wait: {''.join(said)}"
            said.append(line)
        assert builder.poll() is None
    out, err = builder.communicate(timeout=300)
    assert builder.returncode == 0, err[-2000:]
    assert f"shards: {demo[1]}" in out and "training a" not in err


def test_a_finished_demo_corpus_is_reused_where_its_lock_cannot_be_made(tmp_path, demo, capsys):
    """A build in a read-only place (an image, a read-only mount): here OUTPUT.lock cannot be
    opened (a directory of that name), and the finished build is reused all the same, without
    a word; the build's own errors come without the lock's attached."""
    import shutil  # pylint: disable=import-outside-toplevel
    output = str(tmp_path / os.path.basename(os.path.dirname(demo[1])))
    shutil.copytree(os.path.dirname(demo[1]), output)
    os.mkdir(output + ".lock")
    assert demo_corpus.build(output, vocab_size=512, unk_id=500,
                             max_bytes=train_testlib.DEMO_MAX_BYTES) == \
        (os.path.join(output, "tokenizer"), os.path.join(output, "shards"))
    assert "lock" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds a demo corpus built for") as refused:
        demo_corpus.build(output, vocab_size=1024, unk_id=1000, max_bytes=100)
    assert refused.value.__context__ is None


def test_a_demo_corpus_build_refuses_another_layout_in_its_directory(tmp_path, demo):
    """The CLI builds into --output as given: a build of another vocabulary there reused the
    old one (a 512-token tokenizer for --vocab_size=1024). A layout that cannot fit fails
    before the corpus's megabytes are written."""
    output = os.path.dirname(demo[1])
    size = train_testlib.DEMO_MAX_BYTES
    assert demo_corpus.build(output, vocab_size=512, unk_id=500, max_bytes=size) == demo
    with pytest.raises(ValueError, match=r"built for vocab_size=512, unk_id=500, .*not "
                                         r"vocab_size=1024, unk_id=1000, max_bytes"):
        demo_corpus.build(output, vocab_size=1024, unk_id=1000, max_bytes=size)
    with pytest.raises(ValueError, match="max_bytes"):
        demo_corpus.build(output, vocab_size=512, unk_id=500, max_bytes=size + 1)
    with pytest.raises(ValueError, match=r"unk_id=510, vocab_size=512: need"):
        demo_corpus.build(str(tmp_path / "new"), vocab_size=512, unk_id=510)
    assert not os.path.exists(tmp_path / "new")


def test_ettin_phase_mixture_expands_to_the_paper_weights(tmp_path, demo):
    from data_pipeline import mixtures
    tok_dir, _ = demo
    rng = np.random.default_rng(6)
    names = ["DCLM-Dolmino", "code_repos", "arxiv", "StackExchange-Dolmino", "tulu flan",
             "Math_Dolmino", "wikipedia", "books", "textbooks"]
    for name in names:
        write_mds(tmp_path / "decay" / name / "split_0", random_docs(20, rng, lo=30, hi=80))
    expanded = mixtures.expand(f"ettin:{tmp_path / 'decay'}", "decay")
    weights = {os.path.basename(p): float(w) for p, w in
               (e.rsplit(":", 1) for e in expanded.split(","))}
    assert weights["DCLM-Dolmino"] == 26.0 and weights["tulu flan"] == 4.1
    assert sum(weights.values()) == pytest.approx(76.3)          # the paper's decay total
    config = ettin_tiny.get_config("mlm_decay")
    config.data.mixture = f"ettin:{tmp_path / 'decay'}"
    config.data.tokenizer, config.data.num_workers, config.data.eval_documents = tok_dir, 0, 0
    it = loader.make_train_iterator(config, process_index=0, process_count=1,
                                    include_metadata=True)
    src = np.concatenate([next(it)["source_ids"] for _ in range(20)])
    dclm, textbooks = (src == 0).mean(), (src == 8).mean()
    assert dclm > 0.2 and textbooks < 0.05                      # 34% and 0.7% of tokens
    os.makedirs(tmp_path / "decay" / "unknown-source")
    with pytest.raises(ValueError, match=r"without a source in the phase table \['unknown-source'\]"):
        mixtures.expand(f"ettin:{tmp_path / 'decay'}", "decay")
    with pytest.raises(ValueError, match=r"sources without a directory \['dclm', 'cc_head'"):
        mixtures.expand(f"ettin:{tmp_path / 'decay'}", "pretrain")


def test_data_order_replays_in_published_order(tmp_path, demo):
    tok_dir, _ = demo
    docs = random_docs(30, np.random.default_rng(7), lo=40, hi=120)
    write_order(tmp_path / "order", docs)
    config = ettin_tiny.get_config("clm")
    config.data.mixture, config.data.tokenizer = str(tmp_path / "order"), tok_dir
    config.data.shuffle, config.data.pack_pool_size, config.data.pack_fill_min = False, 1, 0
    config.data.num_workers, config.data.eval_documents = 0, 0
    batches = list(loader.make_train_iterator(config, process_index=0, process_count=1,
                                              num_epochs=1))
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    np.testing.assert_array_equal(ids, np.concatenate(docs))


def test_data_order_mean_length_reads_whole_row_groups(tmp_path):
    docs = random_docs(12, np.random.default_rng(8))
    write_order(tmp_path, docs)                 # 3 files x 3 row groups of <= 2 rows
    reader = data_order.ParquetDocs(str(tmp_path))
    assert reader.mean_length() == pytest.approx(np.mean([len(d) for d in docs]))
