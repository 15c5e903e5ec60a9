"""Loader checks from issue 3: exactly-once epoch, packing, MLM/CLM statistics, resume (with
worker processes, through Orbax), batch-size warmup, eval split, bad data.

Documents are built so that every token names its document: doc i is
[CLS] 100*i + (j % 100) for j < n_i [SEP]; a row's segment can then be traced back to the
document and offset it came from without trusting the loader.
"""
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging

from configs import ettin_17m
from data_pipeline import loader, objectives, shards, tokenizer

UNK, CLS, SEP, PAD, MASK = 50280, 50281, 50282, 50283, 50284


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    tok = tokenizer.train_bpe(["the cat sat on the mat\n" * 20], vocab_size=50368, unk_id=UNK)
    return tokenizer.save(tok, str(tmp_path_factory.mktemp("tok")))


def traceable_docs(lengths):
    return [np.concatenate([[CLS], 100 * i + np.arange(n) % 100, [SEP]]).astype(np.int32)
            for i, n in enumerate(lengths)]


def make_config(objective, mixture, tok, *, seq_len=256, workers=0, rows=4):
    config = ettin_17m.get_config(objective)
    config.train.seq_len = seq_len
    config.train.global_batch_size = rows
    config.data.mixture, config.data.tokenizer = mixture, tok
    config.data.num_workers = workers
    config.data.eval_documents = 0
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dir):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(60), 1.0, 300), 1, 900).astype(int)
    docs = traceable_docs(lengths)
    path = str(tmp_path_factory.mktemp("corpus"))
    shards.write_token_dataset(path, docs, tokenizer_path=tok_dir, source="trace",
                               docs_per_shard=100)
    return path, docs


def take(it, n):
    return [next(it) for _ in range(n)]


def segments(batch):
    """(row, segment id, ids, positions) for every document piece in a batch."""
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            yield r, s, batch["input_ids"][r][where], batch["positions"][r][where]


def test_epoch_delivers_every_token_once_across_hosts_and_workers(corpus, tok_dir):
    path, docs = corpus
    seen = {i: [] for i in range(len(docs))}
    cls_count = sep_count = 0
    for host in range(2):
        config = make_config("clm", path, tok_dir, workers=2 if host == 0 else 0, rows=8)
        it = loader.make_train_iterator(config, process_index=host, process_count=2,
                                        num_epochs=1)
        for batch in it:
            assert batch["input_ids"].shape == (4, 256)
            for _, _, ids, pos in segments(batch):
                np.testing.assert_array_equal(pos, np.arange(len(pos)))   # restart per piece
                body = ids[(ids != CLS) & (ids != SEP)]
                cls_count += int((ids == CLS).sum())
                sep_count += int((ids == SEP).sum())
                if body.size:
                    owners = np.unique(body // 100)
                    assert owners.size == 1, f"segment mixes documents {owners}"
                    assert np.all(np.diff(body % 100) % 100 == 1), "piece is not contiguous"
                    seen[int(owners[0])].append(body % 100)
        it.close()
    assert cls_count == sep_count == len(docs)
    for i, doc in enumerate(docs):
        got = np.sort(np.concatenate(seen[i])) if seen[i] else np.array([], int)
        np.testing.assert_array_equal(got, np.sort(doc[1:-1] % 100), err_msg=f"document {i}")


def test_unshuffled_training_data_repeats_in_its_order(corpus, tok_dir):
    """data.shuffle=false (the published data order's replay) trains past the end of its
    documents, in the same order again; only num_epochs ends a training stream."""
    path, docs = corpus
    config = make_config("clm", path, tok_dir, rows=8)
    config.data.shuffle, config.data.pack_pool_size = False, 1
    one_pass = list(loader.make_train_iterator(config, num_epochs=1))
    firsts = [int(ids[ids != CLS][0]) // 100 for _, _, ids, _ in segments(one_pass[0])
              if (ids != CLS).any() and ids[0] == CLS]
    assert firsts[:3] == [0, 1, 2]                   # arrival order
    it = loader.make_train_iterator(config)
    batches = take(it, len(one_pass) + 3)            # no StopIteration at the end of a pass
    it.close()
    starts = [int(ids[1]) // 100 for b in batches[len(one_pass) - 1:] for _, _, ids, _ in
              segments(b) if ids[0] == CLS and len(ids) > 1]
    assert 0 in starts and len(docs) - 1 in starts   # the last document, then the first again
    assert all(b["segment_ids"].any() for b in batches)


@pytest.mark.parametrize("fill_min", [0, 3])
def test_a_pool_of_one_packs_every_token_in_arrival_order(fill_min):
    """pack_pool_size=1, the published order's replay: documents up to three rows long come
    out token for token in their order (a long document's tail, which fits a gap sooner, went
    before its head)."""
    from data_pipeline import packing  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(fill_min)
    docs = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in
            enumerate(rng.integers(1, 25, 60))]
    source = grain.MapDataset.source([{"ids": d, "source": 0, "key": i}
                                      for i, d in enumerate(docs)])
    rows = list(packing.PackIterDataset(source, seq_len=8, pad_id=-1, pool_size=1,
                                        fill_min=fill_min))
    stream = np.concatenate([row["input_ids"][row["segment_ids"] > 0] for row in rows])
    np.testing.assert_array_equal(stream, np.concatenate(docs))


def test_an_unshuffled_replay_with_workers_says_it_loses_the_order(corpus, tok_dir, caplog):
    config = make_config("clm", corpus[0], tok_dir, rows=8, workers=2)
    config.data.shuffle, config.data.pack_pool_size = False, 1
    with caplog.at_level(logging.WARNING):
        loader.make_train_iterator(config).close()
    assert "arrival order only with data.num_workers=0: each of the 2 workers" in caplog.text
    caplog.clear()
    config.data.num_workers = 0
    with caplog.at_level(logging.WARNING):
        loader.make_train_iterator(config).close()
    assert "arrival order" not in caplog.text


def source_share(config, *, hosts, batches):
    """Token share of source 0 in the first `batches` batches of every host."""
    counts = np.zeros(2)
    for host in range(hosts):
        it = loader.make_train_iterator(config, process_index=host, process_count=hosts,
                                        include_metadata=True)
        for batch in take(it, batches):
            counts += [(batch["source_ids"] == 0).sum(), (batch["source_ids"] == 1).sum()]
        it.close()
    return counts[0] / counts.sum()


def test_every_host_and_worker_slice_keeps_the_mixtures_token_shares(tmp_path, tok_dir):
    """Shares 0.75 / 0.25 of documents of 300 and 100 tokens: equal document rates, which grain
    interleaves with period 2. Sliced after mixing, two hosts (or two workers) took 0.505 of
    the tokens from the first source; sliced before, each slice keeps what one stream has."""
    rng = np.random.default_rng(0)
    for name, length in (("long", 298), ("short", 98)):
        docs = [np.concatenate([[CLS], rng.integers(0, UNK, length), [SEP]]).astype(np.int32)
                for _ in range(600)]
        shards.write_token_dataset(str(tmp_path / name), docs, tokenizer_path=tok_dir,
                                   source=name)
    mixture = f"{tmp_path / 'long'}:0.75,{tmp_path / 'short'}:0.25"
    config = make_config("clm", mixture, tok_dir, seq_len=512, rows=8)
    config.data.pack_pool_size = 1         # no best-fit lookahead: it delays long documents
    alone = source_share(config, hosts=1, batches=80)
    assert abs(alone - 0.75) < 0.02
    config.train.global_batch_size = 16
    assert abs(source_share(config, hosts=2, batches=80) - alone) < 0.03
    config.train.global_batch_size, config.data.num_workers = 8, 2
    assert abs(source_share(config, hosts=1, batches=80) - alone) < 0.03


def test_packing_efficiency_at_1024_on_a_web_like_length_mix(tmp_path, tok_dir):
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(400), 1.1, 3000), 16, 20_000).astype(int)
    docs = [np.concatenate([[CLS], rng.integers(0, UNK, n), [SEP]]) for n in lengths]
    shards.write_token_dataset(str(tmp_path), docs, tokenizer_path=tok_dir, source="web")
    config = make_config("mlm", str(tmp_path), tok_dir, seq_len=1024, rows=32)
    it = loader.make_train_iterator(config, process_index=0, process_count=1)
    seg = np.concatenate([next(it)["segment_ids"] for _ in range(10)])
    efficiency = (seg > 0).mean()
    print(f"packing efficiency at seq_len 1024 over {seg.shape[0]} rows: {efficiency:.4f}")
    assert efficiency >= 0.99


def test_mlm_statistics_match_ratio_and_80_10_10(corpus, tok_dir):
    path, _ = corpus
    clm = loader.make_train_iterator(make_config("clm", path, tok_dir, rows=64),
                                     process_index=0, process_count=1)
    mlm_config = make_config("mlm", path, tok_dir, rows=64)
    mlm = loader.make_train_iterator(mlm_config, process_index=0, process_count=1)
    P = objectives.max_predictions(256, 0.30)
    counts = {"eligible": 0, "chosen": 0, "mask": 0, "random": 0, "same": 0}
    for _ in range(4):
        ref, got = next(clm), next(mlm)
        original, seg = ref["input_ids"], ref["segment_ids"]
        np.testing.assert_array_equal(seg, got["segment_ids"])   # packing is objective-free
        special = np.isin(original, [CLS, SEP, PAD, MASK]) | (seg == 0)
        chosen = got["labels"] != -100
        assert not (chosen & special).any(), "a special token or padding was masked"
        np.testing.assert_array_equal(got["labels"][chosen], original[chosen])
        changed = got["input_ids"] != original
        assert not (changed & ~chosen).any(), "an unselected token changed"
        counts["eligible"] += int((~special).sum())
        counts["chosen"] += int(chosen.sum())
        counts["mask"] += int((got["input_ids"][chosen] == MASK).sum())
        counts["same"] += int((got["input_ids"][chosen] == original[chosen]).sum())
        rand = chosen & (got["input_ids"] != MASK) & changed
        counts["random"] += int(rand.sum())
        assert (got["input_ids"][rand] < UNK).all()
        assert got["mask_positions"].shape == got["mask_labels"].shape == (64, P)
        for r in range(64):                    # sparse form == dense labels
            n = int(chosen[r].sum())
            np.testing.assert_array_equal(got["mask_positions"][r, :n], np.flatnonzero(chosen[r]))
            np.testing.assert_array_equal(got["mask_labels"][r, :n], original[r][chosen[r]])
            assert (got["mask_labels"][r, n:] == -100).all()
    ratio = counts["chosen"] / counts["eligible"]
    assert abs(ratio - 0.30) < 0.005, ratio
    for key, share in (("mask", 0.8), ("random", 0.1), ("same", 0.1)):
        assert abs(counts[key] / counts["chosen"] - share) < 0.02, (key, counts)


def test_mlm_never_selects_unk(tmp_path, tok_dir):
    """transformers' collator (Ettin's masking, recipe §4.3) leaves every special token out,
    [UNK] included (its all_special_ids): half the tokens here are [UNK], none is selected."""
    rng = np.random.default_rng(4)
    docs = [np.concatenate([[CLS], np.where(rng.random(n) < 0.5, UNK, rng.integers(0, UNK, n)),
                            [SEP]]).astype(np.int32) for n in rng.integers(20, 200, 60)]
    shards.write_token_dataset(str(tmp_path / "c"), docs, tokenizer_path=tok_dir, source="c")
    batch = next(loader.make_train_iterator(make_config("mlm", str(tmp_path / "c"), tok_dir,
                                                        rows=16), process_index=0, process_count=1))
    chosen = batch["labels"] != -100
    assert chosen.sum() > 100 and not (batch["labels"][chosen] == UNK).any()


def test_clm_labels_never_cross_a_document_boundary(corpus, tok_dir):
    path, _ = corpus
    it = loader.make_train_iterator(make_config("clm", path, tok_dir, rows=16),
                                    process_index=0, process_count=1)
    batch = next(it)
    assert "mask_positions" not in batch
    ids, seg, labels = batch["input_ids"], batch["segment_ids"], batch["labels"]
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            same_doc = t + 1 < ids.shape[1] and seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]
            assert labels[r, t] == (ids[r, t + 1] if same_doc else -100), (r, t)


def test_resume_through_orbax_with_workers_matches_uninterrupted(corpus, tok_dir, tmp_path):
    path, _ = corpus
    config = make_config("mlm", path, tok_dir, workers=2, rows=4)
    it = loader.make_train_iterator(config, process_index=0, process_count=1)
    take(it, 3)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)
    it.close()
    fresh = loader.make_train_iterator(config, process_index=0, process_count=1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want, got in zip(expected, take(fresh, 4)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    fresh.close()


def test_batch_size_warmup_neither_skips_nor_repeats_rows(corpus, tok_dir):
    path, _ = corpus
    config = make_config("mlm", path, tok_dir, rows=4)
    fixed = loader.make_train_iterator(config, process_index=0, process_count=1)
    reference = np.concatenate([next(fixed)["input_ids"] for _ in range(12)])   # 48 rows
    schedule = [2, 2, 6, 10, 12, 16]                                             # 48 rows
    warm = loader.make_train_iterator(config, process_index=0, process_count=1,
                                      rows_for_step=lambda step: schedule[step])
    got = [next(warm)["input_ids"] for _ in schedule]
    assert [g.shape[0] for g in got] == schedule
    np.testing.assert_array_equal(np.concatenate(got), reference)


def test_state_mid_group_resumes_exactly(corpus, tok_dir):
    path, _ = corpus
    config = make_config("clm", path, tok_dir, rows=5)      # 5 rows cut the 16-row groups
    it = loader.make_train_iterator(config, process_index=0, process_count=1)
    take(it, 2)
    state = it.get_state()
    assert state["offset"] not in (0, config.data.worker_group_rows)
    expected = take(it, 3)
    other = loader.make_train_iterator(config, process_index=0, process_count=1)
    other.set_state(state)
    for want, got in zip(expected, take(other, 3)):
        np.testing.assert_array_equal(want["input_ids"], got["input_ids"])


def test_eval_iterator_is_one_padded_pass_over_held_out_documents(tmp_path, tok_dir):
    docs = traceable_docs([50] * 200)
    shards.write_token_dataset(str(tmp_path), docs, tokenizer_path=tok_dir, source="e")
    config = make_config("mlm", str(tmp_path), tok_dir)
    config.data.eval_documents = 20                   # docs 180..199
    config.data.eval_batch_size = 8
    batches = list(loader.make_eval_iterator(config, process_index=0, process_count=1))
    assert all(b["input_ids"].shape == (8, 256) for b in batches)
    ids = np.concatenate([b["input_ids"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    ids = np.where(labels != -100, labels, ids)      # undo masking
    owners = np.unique(ids[ids < UNK] // 100)
    assert (ids[np.concatenate([b["segment_ids"] for b in batches]) == 0] == PAD).all()
    np.testing.assert_array_equal(owners, np.arange(180, 200))
    assert (ids == CLS).sum() == 20
    assert (np.concatenate([b["segment_ids"] for b in batches])[-1] == 0).all()  # padded row
    empty = loader.empty_eval_batch(config, process_index=0, process_count=1)   # one out of docs
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
        k: (v.shape, v.dtype) for k, v in batches[0].items()}
    assert (empty["input_ids"] == PAD).all() and (empty["labels"] == -100).all()
    train = loader.make_train_iterator(config, process_index=0, process_count=1, num_epochs=1)
    train_ids = np.concatenate([np.where(b["labels"] != -100, b["labels"], b["input_ids"])
                                for b in train])
    assert (train_ids[train_ids < UNK] // 100 < 180).all()   # held-out docs never trained on


def test_token_datasets_hold_framed_documents_only(tmp_path, tok_dir):
    """The loader frames no document of a prepared directory, so writing an unframed one
    (it would train without [CLS]/[SEP]) is refused, naming it; nothing is written."""
    docs = traceable_docs([10] * 3)
    for bad in (docs[1][1:], docs[1][:-1], np.array([CLS], np.int32)):
        with pytest.raises(ValueError, match=r"/c: document 1 \(\d+ ids\) is not framed as "
                                             rf"\[CLS\] ... \[SEP\] \(ids {CLS} and {SEP}\)"):
            shards.write_token_dataset(str(tmp_path / "c"), [docs[0], bad, docs[2]],
                                       tokenizer_path=tok_dir, source="c")
    assert not (tmp_path / "c").exists()


def test_ids_beyond_vocab_fail_naming_shard_and_record(tmp_path, tok_dir):
    docs = traceable_docs([10] * 5)
    docs[3] = docs[3].copy()
    docs[3][4] = 50368 + 7
    tok = tokenizer.train_bpe(["x y z\n" * 10], vocab_size=65536, unk_id=UNK)
    big_tok = tokenizer.save(tok, str(tmp_path / "bigtok"))
    shards.write_token_dataset(str(tmp_path / "c"), docs, tokenizer_path=big_tok, source="c")
    config = make_config("clm", str(tmp_path / "c"), big_tok)
    config.model.vocab_size = 50368
    with pytest.raises(shards.ShardError, match="tokenizer vocabulary 65536 > model vocab_size"):
        loader.make_train_iterator(config, process_index=0, process_count=1)
    src = shards.ArrayRecordDocs(str(tmp_path / "c"), vocab_size=50368)
    with pytest.raises(shards.ShardError, match=r"shard-00000\.arrayrecord: record 3: id 50375"):
        src[3]


def test_tokenizer_not_matching_manifest_fails(corpus, tmp_path):
    path, _ = corpus
    other = tokenizer.train_bpe(["completely different text here\n" * 20], vocab_size=50368,
                                unk_id=UNK)
    other_dir = tokenizer.save(other, str(tmp_path / "other"))
    config = make_config("mlm", path, other_dir)
    with pytest.raises(shards.ShardError, match=r"manifest\.json: made with tokenizer"):
        loader.make_train_iterator(config, process_index=0, process_count=1)


def test_special_ids_that_differ_from_the_tokenizers_are_named(corpus, tok_dir):
    """[UNK] is checked with the others: a stale config.data.unk_token_id let MLM select the
    tokenizer's real [UNK] and draw random tokens from its special ids."""
    path, _ = corpus
    config = make_config("mlm", path, tok_dir)
    config.data.unk_token_id = UNK - 1
    with pytest.raises(tokenizer.TokenizerError, match=rf"special ids differ: config\.data\."
                                                       rf"unk_token_id={UNK - 1} but the "
                                                       rf"tokenizer's \[UNK\] is {UNK}$"):
        loader.make_train_iterator(config, process_index=0, process_count=1)
    config = make_config("mlm", path, tok_dir)
    config.model.pad_token_id = 7
    with pytest.raises(tokenizer.TokenizerError, match=r"config\.model\.pad_token_id=7 but"):
        loader.make_train_iterator(config, process_index=0, process_count=1)


def test_truncated_or_corrupt_shard_fails_naming_the_file(corpus, tok_dir, tmp_path):
    path, docs = corpus
    copy = tmp_path / "copy"
    shards.write_token_dataset(str(copy), docs, tokenizer_path=tok_dir, source="t",
                               docs_per_shard=100)
    shard = copy / "shard-00001.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(shards.ShardError, match=r"shard-00001\.arrayrecord: \d+ bytes.*truncated"):
        loader.make_train_iterator(make_config("clm", str(copy), tok_dir),
                                   process_index=0, process_count=1)
    # same size, garbage content: detected when the shard is opened
    shard.write_bytes(b"\x00" * len(data))
    docs_src = shards.ArrayRecordDocs(str(copy), vocab_size=50368)
    with pytest.raises(shards.ShardError, match=r"shard-00001\.arrayrecord"):
        docs_src[150]
    assert os.path.getsize(shard) == len(data)


def test_every_row_draws_its_own_masks_from_its_key_and_the_seed(tmp_path, tok_dir):
    """MLM masks are drawn per row, from data.seed and the row's key (its first document's
    key, unique over sources, hosts and epochs): rows of one layout (equal-length documents,
    so equal eligible positions) get different masks, as do the two sources' rows and another
    data.seed, while the same config draws the same masks again."""
    paths = [str(tmp_path / name) for name in ("a", "b")]
    for i, path in enumerate(paths):       # documents 0-5 in source a, 6-11 in b
        docs = traceable_docs([254] * 12)[:6] if i == 0 else traceable_docs([254] * 12)[6:]
        shards.write_token_dataset(path, docs, tokenizer_path=tok_dir, source=f"s{i}")

    def patterns(seed, mixture, process_count=1, process=0):
        config = make_config("mlm", mixture, tok_dir, rows=4)
        config.data.shuffle, config.data.seed = False, seed
        batches = take(loader.make_train_iterator(config, process_index=process,
                                                  process_count=process_count), 3)
        return [tuple(np.flatnonzero(row != -100)) for b in batches for row in b["labels"]]

    one_source = patterns(0, paths[0])     # 12 rows: two epochs of its 6 documents
    assert len(set(one_source)) == len(one_source), "two rows share a mask pattern"
    assert patterns(0, paths[0]) == one_source
    hosts = [patterns(0, paths[0], 2, process) for process in range(2)]
    assert not set(hosts[0]) & set(hosts[1]), "rows of two processes share a mask pattern"
    assert not set(patterns(1, paths[0])) & set(one_source), "data.seed changes no mask"
    mixed = patterns(0, f"{paths[0]}:0.5,{paths[1]}:0.5")
    assert len(set(mixed)) == len(mixed), "rows of the two sources share a mask pattern"


def test_each_process_evaluates_its_own_share_of_the_held_out_documents(tmp_path, tok_dir):
    """Two processes' eval streams split the held-out documents (none evaluated twice, none
    left out) in their halves of each global eval batch; with an eval_mixture, the train
    sources keep every document."""
    docs = traceable_docs([50] * 200)
    shards.write_token_dataset(str(tmp_path), docs, tokenizer_path=tok_dir, source="e")
    config = make_config("mlm", str(tmp_path), tok_dir)
    # 30 asked, at most a tenth of the source held out: docs 180..199
    config.data.eval_documents, config.data.eval_batch_size = 30, 8
    owners = []
    for process in range(2):
        batches = list(loader.make_eval_iterator(config, process_index=process, process_count=2))
        assert all(b["input_ids"].shape == (4, 256) for b in batches)
        ids = np.concatenate([np.where(b["labels"] != -100, b["labels"], b["input_ids"])
                              for b in batches])
        owners.append(set((ids[ids < UNK] // 100).tolist()))
    assert not owners[0] & owners[1], "a held-out document is evaluated by both processes"
    assert owners[0] | owners[1] == set(range(180, 200))

    config.data.eval_mixture = str(tmp_path)
    train = loader.make_train_iterator(config, process_index=0, process_count=1, num_epochs=1)
    train_ids = np.concatenate([np.where(b["labels"] != -100, b["labels"], b["input_ids"])
                                for b in train])
    assert set((train_ids[train_ids < UNK] // 100).tolist()) == set(range(200))


def test_mlm_masks_ratio_times_eligible_in_expectation_even_when_it_is_not_whole():
    """A row of 5 eligible tokens at ratio 0.3 masks 1 or 2 of them (1.5 on average): the
    count is ratio x eligible rounded at random, not down (which masked 1, a third short of the
    recipe's ratio on short documents). Hand-built rows through objectives.mlm_row."""
    cfg = objectives.MLMConfig(ratio=0.3, mask_id=MASK, special_ids=(CLS, SEP, PAD, MASK, UNK),
                               random_high=UNK, max_predictions=8, seed=0)
    ids = np.array([CLS, 11, 12, 13, 14, 15, SEP, PAD], np.int32)
    segment_ids = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.int32)
    counts = [int((objectives.mlm_row({"input_ids": ids, "segment_ids": segment_ids,
                                        "row_key": np.array([key, 0], np.int64)},
                                       cfg)["labels"] != -100).sum()) for key in range(4000)]
    assert set(counts) == {1, 2}
    assert np.mean(counts) == pytest.approx(1.5, abs=0.05)
