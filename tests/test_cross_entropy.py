"""The chunked cross-entropy against dense logits (optax's loss, jnp.argmax)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ettin_jax.cross_entropy import IGNORE, balanced_chunk, cross_entropy


def _dense(features, embedding, bias, labels):
    logits = features.reshape(-1, features.shape[-1]) @ embedding.T + bias
    labels = labels.reshape(-1)
    valid = labels != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    correct = valid & (jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(correct), jnp.sum(valid)


def _inputs(seed, shape, hidden, vocab):
    keys = jax.random.split(jax.random.key(seed), 4)
    features = jax.random.normal(keys[0], (*shape, hidden))
    embedding = jax.random.normal(keys[1], (vocab, hidden)) * 0.3
    bias = jax.random.normal(keys[2], (vocab,))
    labels = jax.random.randint(keys[3], shape, 0, vocab)
    ignored = jax.random.uniform(jax.random.fold_in(keys[3], 1), shape) < 0.25
    return features, embedding, bias, jnp.where(ignored, IGNORE, labels)


# vocab a multiple of the chunk, not a multiple (last chunk overlaps), and one chunk; rows
# below and above row_chunk (several row chunks, the last padded); chunks that balanced_chunk
# shrinks below the limit (600 rows in 2 x 384, vocab 1,100 in 3 x 384).
@pytest.mark.parametrize("shape,vocab,vocab_chunk,row_chunk", [
    ((6, 10), 256, 64, 8192), ((6, 10), 300, 64, 8192), ((3, 7), 97, 128, 8192),
    ((5, 9), 300, 128, 16), ((20, 30), 1100, 512, 512)])
def test_matches_dense_logits(shape, vocab, vocab_chunk, row_chunk):
    features, embedding, bias, labels = _inputs(vocab + len(shape), shape, 24, vocab)

    def chunked_loss(features, embedding, bias):
        return cross_entropy(features, embedding, bias, labels, vocab_chunk=vocab_chunk,
                             row_chunk=row_chunk)[0]

    def dense_loss(features, embedding, bias):
        return _dense(features, embedding, bias, labels)[0]

    nll, aux = jax.jit(lambda *a: cross_entropy(*a, labels, vocab_chunk=vocab_chunk,
                                                 row_chunk=row_chunk))(features, embedding, bias)
    ref_nll, ref_correct, ref_count = _dense(features, embedding, bias, labels)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert float(aux["count"]) == float(ref_count)
    assert float(aux["correct"]) == float(ref_correct)
    grads = jax.jit(jax.grad(chunked_loss, argnums=(0, 1, 2)))(features, embedding, bias)
    ref_grads = jax.grad(dense_loss, argnums=(0, 1, 2))(features, embedding, bias)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_argmax_counts_planted_hits_and_first_maximum():
    """Rows built so that the label is (or is not) the unique maximum, and a tie across two
    chunks, where the first index wins as with jnp.argmax."""
    vocab, hidden = 130, 4
    embedding = jnp.zeros((vocab, hidden)).at[:, 0].set(jnp.arange(vocab) / vocab)
    embedding = embedding.at[5].set(0.0).at[100].set(0.0)
    bias = jnp.zeros((vocab,)).at[5].set(10.0).at[100].set(10.0)   # tie: 5 and 100, every row
    features = jnp.stack([jnp.array([1.0, 0, 0, 0]),     # argmax 5 (tie with 100, first wins)
                          jnp.array([-1.0, 0, 0, 0]),    # argmax 5 too
                          jnp.array([1.0, 0, 0, 0])])
    labels = jnp.array([5, 100, IGNORE])
    assert list(jnp.argmax(features @ embedding.T + bias, axis=-1)) == [5, 5, 5]
    _, aux = cross_entropy(features, embedding, bias, labels, vocab_chunk=32)
    assert float(aux["correct"]) == 1.0 and float(aux["count"]) == 2.0


def test_bfloat16_matmuls_stay_close():
    features, embedding, bias, labels = _inputs(3, (4, 16), 32, 500)
    nll, _ = cross_entropy(features, embedding, bias, labels, dtype=jnp.bfloat16, vocab_chunk=128)
    ref_nll = _dense(features, embedding, bias, labels)[0]
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-2)


def test_memory_stays_below_one_copy_of_the_logits():
    """A CLM row of 8192 tokens over the 50,368-token vocabulary: dense float32 logits alone
    would take 1.65 GB; the compiled loss and gradient use a small fraction of that."""
    rows, hidden, vocab = 8192, 64, 50368
    args = (jax.ShapeDtypeStruct((rows, hidden), jnp.float32),
            jax.ShapeDtypeStruct((vocab, hidden), jnp.float32),
            jax.ShapeDtypeStruct((vocab,), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.int32))

    def loss(features, embedding, bias, labels):
        return cross_entropy(features, embedding, bias, labels)[0]

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    dense_logits_bytes = rows * vocab * 4
    assert compiled.memory_analysis().temp_size_in_bytes < dense_logits_bytes / 4


def test_balanced_chunk_hand_values():
    # 32 x 1024 MLM rows have 32 x 312 masked slots: two chunks of 4,992, not 2 x 8,192.
    assert balanced_chunk(9984, 8192) == 4992
    # The 50,368-token vocabulary: 13 chunks of 3,968 (51,584 columns), not 13 x 4,096.
    assert balanced_chunk(50368, 4096) == 3968
    assert balanced_chunk(4096, 8192) == 4096          # one chunk: the total, unpadded
    assert balanced_chunk(32768, 8192) == 8192         # divides evenly: the limit
    assert balanced_chunk(45, 16) == 16                # limit below the alignment


def test_balanced_chunk_properties():
    """Over random totals and limits: at most the limit, as few chunks as chunks of `limit`,
    and (when not capped by the limit) less than one alignment step of padding per chunk."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        total, limit = int(rng.integers(1, 100_000)), int(rng.integers(1, 20_000))
        size = balanced_chunk(total, limit)
        chunks = -(-total // size)
        assert 1 <= size <= limit or (total <= limit and size == total)
        assert chunks == -(-total // limit)
        if total > limit and size < limit:
            assert size % 128 == 0 and chunks * size - total < chunks * 128


def test_one_pass_max_and_sum_of_exponentials():
    """The variadic reduction (online softmax within a chunk) against numpy's two passes, with
    masked (-inf) columns, a row masked but for one column, and a non-finite logit that must
    stay non-finite."""
    from ettin_jax.cross_entropy import _row_max_sum_exp
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 20
    logits[:, 250:] = -np.inf                # a chunk's columns another chunk owns
    logits[1, 1:] = -np.inf                  # one finite column
    row_max, row_sum = jax.jit(_row_max_sum_exp)(jnp.asarray(logits))
    expected_max = logits.max(axis=-1)
    np.testing.assert_allclose(row_max, expected_max)
    np.testing.assert_allclose(row_sum, np.exp(logits - expected_max[:, None]).sum(-1),
                               rtol=1e-5)
    assert row_sum[1] == 1.0
    logits[2, 7] = np.inf
    logits[3, 9] = np.nan
    row_max, row_sum = jax.jit(_row_max_sum_exp)(jnp.asarray(logits))
    log_z = row_max + np.log(row_sum)     # what the loss takes from them
    assert not np.isfinite(log_z[2]) and np.isnan(log_z[3])
