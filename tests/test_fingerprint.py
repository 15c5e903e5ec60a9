"""data_pipeline.fingerprint: an encoder and a decoder run fed the same packed rows get the same
fingerprint at every step; other data, other order or another token get another."""
import hashlib

import numpy as np
import pytest

from configs import ettin_tiny
from data_pipeline import fingerprint, loader, objectives, shards, tokenizer

CLS, SEP, PAD, MASK = ettin_tiny.CLS_ID, ettin_tiny.SEP_ID, ettin_tiny.PAD_ID, ettin_tiny.MASK_ID


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tok = tokenizer.train_bpe(["the cat sat on the mat\n" * 20], vocab_size=ettin_tiny.VOCAB_SIZE,
                              unk_id=ettin_tiny.UNK_ID)
    tok_dir = tokenizer.save(tok, str(tmp_path_factory.mktemp("tok")))
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(60), 1.0, 200), 1, 400).astype(int)
    docs = [np.concatenate([[CLS], rng.integers(0, ettin_tiny.UNK_ID, n), [SEP]]).astype(np.int32)
            for n in lengths]
    path = str(tmp_path_factory.mktemp("corpus"))
    shards.write_token_dataset(path, docs, tokenizer_path=tok_dir, source="fp")
    return path, tok_dir


def tiny_config(objective, corpus, *, seed=0):
    config = ettin_tiny.get_config(objective)
    config.data.mixture, config.data.tokenizer = corpus
    config.data.num_workers = 0
    config.data.eval_documents = 0
    config.data.seed = seed
    return config


def fingerprints(config, steps):
    it = loader.make_train_iterator(config, process_index=0, process_count=1)
    out = [fingerprint.batch_fingerprint(next(it), config.objective) for _ in range(steps)]
    it.close()
    return out


def test_mlm_and_clm_runs_of_one_data_config_match_at_every_step(corpus):
    mlm = fingerprints(tiny_config("mlm", corpus), 5)
    clm = fingerprints(tiny_config("clm", corpus), 5)
    assert mlm == clm
    assert len(set(mlm)) == 5                      # every step sees other rows
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in mlm)
    other_seed = fingerprints(tiny_config("mlm", corpus, seed=1), 5)
    assert not set(other_seed) & set(mlm)


def test_row_count_is_part_of_the_fingerprint(corpus):
    config = tiny_config("clm", corpus)
    it = loader.make_train_iterator(config, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    first_half = {k: v[:4] for k, v in batch.items()}
    assert fingerprint.batch_fingerprint(first_half, "clm") != \
        fingerprint.batch_fingerprint(batch, "clm")
    # an independent re-computation of the documented definition
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.array(batch["input_ids"].shape, "<i8").tobytes())
    digest.update(batch["input_ids"].astype("<i4").tobytes())
    digest.update(batch["segment_ids"].astype("<i4").tobytes())
    assert fingerprint.batch_fingerprint(batch, "clm") == digest.hexdigest()


def hand_batch():
    ids = np.array([[CLS, 7, 8, 9, SEP, CLS, 10, SEP], [CLS, 11, 12, 13, 14, 15, 16, SEP]],
                   np.int32)
    segment_ids = np.array([[1, 1, 1, 1, 1, 2, 2, 2], [1] * 8], np.int32)
    return ids, segment_ids


def masked(ids, segment_ids, where, replacement):
    """An MLM batch with `where` (a boolean [batch, seq]) replaced by `replacement`."""
    labels = np.where(where, ids, objectives.IGNORE).astype(np.int32)
    return {"input_ids": np.where(where, replacement, ids).astype(np.int32), "labels": labels,
            "segment_ids": segment_ids}


def test_hand_built_batch_changes_with_a_token_not_with_masking():
    ids, seg = hand_batch()
    clm = fingerprint.batch_fingerprint({"input_ids": ids, "segment_ids": seg}, "clm")
    unmasked = masked(ids, seg, np.zeros_like(ids, bool), MASK)
    assert fingerprint.batch_fingerprint(unmasked, "mlm") == clm
    one = np.zeros_like(ids, bool)
    one[0, 2] = True
    some = np.zeros_like(ids, bool)
    some[[0, 1, 1], [1, 3, 6]] = True
    for where, replacement in ((one, MASK), (some, MASK), (some, 42)):   # [MASK] or random id
        assert fingerprint.batch_fingerprint(masked(ids, seg, where, replacement), "mlm") == clm
    changed = ids.copy()
    changed[1, 4] += 1
    assert fingerprint.batch_fingerprint({"input_ids": changed, "segment_ids": seg}, "clm") != clm
    # ... also when the changed token is a masked one (its label carries the change)
    mlm_changed = masked(changed, seg, some, MASK)
    assert fingerprint.batch_fingerprint(mlm_changed, "mlm") != clm
    # the same tokens cut into documents elsewhere are other packed rows
    other_cut = seg.copy()
    other_cut[0, 5] = 1
    assert fingerprint.batch_fingerprint({"input_ids": ids, "segment_ids": other_cut},
                                         "clm") != clm
    # int64 arrays (e.g. from another reader) hash as their int32 values
    wide = {"input_ids": ids.astype(np.int64), "segment_ids": seg.astype(np.int64)}
    assert fingerprint.batch_fingerprint(wide, "clm") == clm


def test_bad_arguments_name_what_to_fix():
    ids, seg = hand_batch()
    with pytest.raises(ValueError, match="config.objective"):
        fingerprint.batch_fingerprint({"input_ids": ids, "segment_ids": seg}, "mntp")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        fingerprint.batch_fingerprint({"input_ids": ids, "segment_ids": seg[:, :4]}, "clm")
