"""data_pipeline.lengths: the mean length of the sequences the loader feeds, measured on small
prepared / MDS / data-order sources written here, against numpy over the written documents and
against what the loader itself packs; and the rows per step it gives (recipe §3.2.1)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import ettin_tiny
from data_pipeline import lengths, loader, mds, shards
from ettin_jax import schedules
from test_data_formats import write_mds, write_order

CLS, SEP = 501, 502


def body(rng, n):
    return rng.integers(0, 500, n).astype(np.int32)


def expected_mean(framed_lengths, seq_len):
    """Hand rule: every framed document is cut into ceil(n / seq_len) pieces."""
    n = np.asarray(framed_lengths)
    return n.sum() / np.ceil(n / seq_len).sum()


def make_config(mixture, tok_dir, *, seq_len=128, eval_documents=0):
    config = ettin_tiny.get_config("clm")
    config.data.mixture, config.data.tokenizer = mixture, tok_dir
    config.data.num_workers, config.data.eval_documents = 0, eval_documents
    config.train.seq_len = seq_len
    return config


def test_prepared_source_is_exact_and_excludes_the_eval_holdout(tmp_path, demo):
    tok_dir, _ = demo
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 400, 50)
    docs = [np.concatenate([[CLS], body(rng, n), [SEP]]) for n in sizes]
    shards.write_token_dataset(str(tmp_path), docs, tokenizer_path=tok_dir, source="p",
                               docs_per_shard=7)
    config = make_config(str(tmp_path), tok_dir, eval_documents=5)    # last 5 held out
    result = lengths.measure(config)
    (src,) = result.sources
    assert src.exact and src.documents == src.measured == 45
    want = expected_mean([len(d) for d in docs[:45]], 128)
    assert result.mean_sequence_length == pytest.approx(want, rel=1e-12)
    assert result.mean_sequence_length != pytest.approx(expected_mean([len(d) for d in docs], 128),
                                                         rel=1e-6)


def test_mds_source_counts_the_framing_the_loader_adds(tmp_path, demo):
    tok_dir, _ = demo
    rng = np.random.default_rng(1)
    # half the documents carry [CLS] ... [SEP] already, half neither: the loader adds both
    docs = [np.concatenate([[CLS], body(rng, n), [SEP]]) if i % 2 else body(rng, n)
            for i, n in enumerate(rng.integers(1, 700, 40))]
    write_mds(tmp_path / "mds", docs, per_shard=6)
    result = lengths.measure(make_config(str(tmp_path / "mds"), tok_dir, seq_len=256))
    framed = [len(d) if i % 2 else len(d) + 2 for i, d in enumerate(docs)]
    assert result.sources[0].exact
    assert result.mean_sequence_length == pytest.approx(expected_mean(framed, 256), rel=1e-12)


def test_mixture_weighs_sources_as_the_loader_samples_them(tmp_path, demo):
    tok_dir, _ = demo
    rng = np.random.default_rng(2)
    short = [np.concatenate([[CLS], body(rng, n), [SEP]]) for n in rng.integers(10, 60, 30)]
    long = [np.concatenate([[CLS], body(rng, n), [SEP]]) for n in rng.integers(100, 600, 30)]
    write_mds(tmp_path / "mds", short)
    write_order(tmp_path / "order", long, per_file=4)
    config = make_config(f"{tmp_path / 'mds'}:0.25,{tmp_path / 'order'}:0.75", tok_dir)
    result = lengths.measure(config)
    # documents are drawn at rate token share / mean document length; per drawn document a
    # source contributes its mean length in tokens and its mean piece count
    tokens = [np.mean([len(d) for d in short]), np.mean([len(d) for d in long])]
    rates = np.array([0.25 / tokens[0], 0.75 / tokens[1]])
    pieces = [np.mean([np.ceil(len(d) / 128) for d in ds]) for ds in (short, long)]
    want = (rates @ tokens) / (rates @ pieces)
    assert result.mean_sequence_length == pytest.approx(want, rel=1e-9)
    # token shares, not document shares: ~0.75 of the tokens come from the long source
    assert rates[1] * tokens[1] / (rates @ tokens) == pytest.approx(0.75)


def test_measured_mean_is_what_the_loader_packs(tmp_path, demo):
    """One epoch through the real loader (no gap filling): non-pad tokens / segments."""
    tok_dir, _ = demo
    rng = np.random.default_rng(3)
    docs = [body(rng, n) for n in rng.lognormal(np.log(90), 1.0, 80).astype(int) + 1]
    write_mds(tmp_path / "mds", docs, per_shard=9)
    config = make_config(str(tmp_path / "mds"), tok_dir, seq_len=128, eval_documents=20)
    config.data.pack_fill_min, config.data.shuffle = 0, False
    measured = lengths.measure(config).mean_sequence_length
    it = loader.make_train_iterator(config, process_index=0, process_count=1, num_epochs=1)
    tokens = segments = 0
    for batch in it:
        seg = batch["segment_ids"]
        tokens += int((seg > 0).sum())
        segments += int(seg.max(axis=1).sum())
    assert tokens == sum(len(d) + 2 for d in docs[:80 - 8])   # a tenth held out, all framed
    assert measured == pytest.approx(tokens / segments, rel=1e-12)


def test_large_sources_are_sampled_within_a_percent(tmp_path, demo):
    tok_dir, _ = demo
    rng = np.random.default_rng(4)
    sizes = rng.lognormal(np.log(150), 0.8, 20_000).astype(int) + 1
    docs = [np.concatenate([[CLS], body(rng, n), [SEP]]) for n in sizes]
    write_mds(tmp_path / "mds", docs, per_shard=2000)
    (tmp_path / "order").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array([d.tolist() for d in docs], pa.list_(pa.uint32()))}),
                   str(tmp_path / "order" / "steps_000001_to_000100.parquet"), row_group_size=100)
    want = expected_mean([len(d) for d in docs], 256)
    for path in (tmp_path / "mds", tmp_path / "order"):
        config = make_config(str(path), tok_dir, seq_len=256)
        exact = lengths.measure(config)                       # 20,000 documents: all read
        sampled = lengths.measure(config, sample_documents=300, max_relative_error=0.01)
        (src,) = sampled.sources
        assert exact.sources[0].exact and exact.sources[0].measured == 20_000
        assert exact.mean_sequence_length == pytest.approx(want, rel=1e-12)
        assert not src.exact and 300 <= src.measured < 20_000 and src.relative_error <= 0.005
        assert sampled.mean_sequence_length == pytest.approx(want, rel=0.01)
        assert lengths.measure(config, sample_documents=300) == sampled     # seeded: repeatable


def test_unmeasurable_sources_name_their_path(tmp_path, demo):
    tok_dir, _ = demo
    assert lengths.measure(make_config("", tok_dir)) is None            # demo: no mean
    with pytest.raises(ValueError, match="nowhere"):
        lengths.measure(make_config(str(tmp_path / "nowhere"), tok_dir))
    write_mds(tmp_path / "mds", [body(np.random.default_rng(5), 30) for _ in range(4)])
    shard = tmp_path / "mds" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(mds.MDSError, match=r"shard\.00001\.mds"):
        lengths.measure(make_config(str(tmp_path / "mds"), tok_dir))


@pytest.mark.parametrize("seq_len", [1024, 8192])
def test_rows_per_step_carries_4608_sequences_of_the_data(tmp_path, demo, seq_len):
    """4608 x mean / seq_len rows: within a few percent of 4608 sequences' tokens, on data
    whose lengths are known (a lognormal web-like mix, some documents longer than seq_len)."""
    tok_dir, _ = demo
    rng = np.random.default_rng(6)
    sizes = rng.lognormal(np.log(seq_len / 3), 1.0, 400).astype(int) + 1
    write_mds(tmp_path / "mds", [body(rng, n) for n in sizes], per_shard=100)
    config = make_config(str(tmp_path / "mds"), tok_dir, seq_len=seq_len)
    config.train.global_batch_size, config.train.grad_accum_steps = 4608, 8
    mean = lengths.measure(config).mean_sequence_length
    known = expected_mean(sizes + 2, seq_len)
    assert mean == pytest.approx(known, rel=1e-12)
    rows = schedules.rows_per_step(config, mean, data_parallel=4)
    assert rows % 32 == 0
    assert rows * seq_len == pytest.approx(4608 * known, rel=0.03)
    assert rows < 4608                       # fewer packed rows than sequences
