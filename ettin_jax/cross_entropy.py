"""Cross-entropy over the tied decoder without materialising the logits.

The decoder projects `features [rows, hidden]` onto the 50,368-token vocabulary; a dense
`[rows, vocab]` float32 logits tensor costs 258 MB for the 1,280 masked positions of an
8 x 512 MLM batch and 13 GB for one 8 x 8192 CLM micro batch. Here the vocabulary is
walked in chunks of at most `vocab_chunk` columns with an online log-sum-exp (forward) and
the softmax gradient is formed chunk by chunk (backward, recomputing that chunk's logits), so
only `[rows, vocab_chunk]` is ever live. Rows are processed at most `row_chunk` at a time.
Both are split into equal chunks (`balanced_chunk`), so little padding is computed.

On a 2-core CPU this also runs faster than the dense form (every pass over the dense
logits goes to memory; a chunk stays in cache): `python bench/train_step.py` measures it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from data_pipeline.objectives import IGNORE  # the loader's "no target" label

CHUNK_ALIGN = 128   # chunk sizes are multiples of this (GPU matmul tile rows)


def cross_entropy(features, embedding, bias, labels, *, dtype=jnp.float32,
                  vocab_chunk: int = 4096, row_chunk: int = 8192):
    """Summed next-token / masked-token loss of `features @ embedding.T + bias`.

    Args:
      features: `[..., hidden]` (the prediction head's output).
      embedding: `[vocab, hidden]` float32, the tied decoder weight; bias: `[vocab]`.
      labels: `[...]` int32 target ids; `IGNORE` (-100) marks positions without a target.
      dtype: matmul input dtype (the model's compute dtype); accumulation is float32.
    Returns:
      (sum of -log p(label) over labelled positions, {"count": labelled positions,
      "correct": labelled positions whose argmax is the label}), all float32 scalars.
    """
    hidden = features.shape[-1]
    features = features.reshape(-1, hidden)
    labels = labels.reshape(-1).astype(jnp.int32)
    rows = features.shape[0]
    vocab_chunk = balanced_chunk(embedding.shape[0], vocab_chunk)
    row_chunk = balanced_chunk(rows, row_chunk)
    pad = -rows % row_chunk
    features_padded = jnp.pad(features, ((0, pad), (0, 0)))
    labels_padded = jnp.pad(labels, (0, pad), constant_values=IGNORE)
    nll, correct = _chunked_loss(features_padded.reshape(-1, row_chunk, hidden), embedding, bias,
                                 labels_padded.reshape(-1, row_chunk), jnp.dtype(dtype),
                                 vocab_chunk)
    count = jnp.sum(labels != IGNORE, dtype=jnp.float32)
    return nll, {"count": count, "correct": correct}


def balanced_chunk(total: int, limit: int, align: int = CHUNK_ALIGN) -> int:
    """The chunk size that covers `total` in as few chunks of at most `limit` as possible,
    with the work spread evenly: ceil(total / chunks) rounded up to a multiple of `align`
    (matmul tiles), still at most `limit`; `total` itself when it fits in one chunk.

    Chunks of `limit` each would pad the last one: 9,984 masked positions (32 x 1024 MLM
    rows) in chunks of 8,192 become 16,384 rows of head matmuls, 64% more than needed;
    two chunks of 4,992 need none. The vocabulary (50,368) in 13 chunks of 4,096 computes
    53,248 columns, 3,968 a chunk computes 51,584."""
    if total <= limit:
        return total
    chunks = -(-total // limit)
    even = -(-total // chunks)
    return min(limit, -(-even // align) * align)


def _chunk_start(index, vocab_chunk: int, vocab: int):
    """First column of chunk `index` and a mask of the columns it owns. The last chunk is
    shifted left to end at `vocab` (dynamic_slice clamps it there); columns already covered
    by the previous chunk are masked out, so no padded copy of the embedding is needed."""
    nominal = index * vocab_chunk
    start = jnp.minimum(nominal, vocab - vocab_chunk)
    owned = start + jnp.arange(vocab_chunk) >= nominal
    return start, owned


def _chunk_logits(features, embedding, bias, start, owned):
    """`[rows, vocab_chunk]` float32 logits of the columns start.. (-inf where not owned),
    and the chunk's weight rows. `features` and `embedding` come already in the matmul dtype
    (cast once per call: a cast per chunk reads the float32 rows again for every row chunk)."""
    vocab_chunk = owned.shape[0]
    weight = jax.lax.dynamic_slice_in_dim(embedding, start, vocab_chunk)
    logits = jnp.einsum("rh,vh->rv", features, weight, preferred_element_type=jnp.float32)
    # The mask rides on the `[vocab_chunk]` bias (finite + -inf = -inf): a select on the
    # `[rows, vocab_chunk]` logits is one more pass over them, and XLA built its masks ahead
    # as a `[chunks, rows, vocab_chunk]` tensor.
    bias_chunk = jax.lax.dynamic_slice_in_dim(bias, start, vocab_chunk)
    return logits + jnp.where(owned, bias_chunk, -jnp.inf), weight


def _forward(features, embedding, bias, labels, dtype, vocab_chunk):
    rows, vocab = features.shape[0], embedding.shape[0]
    num_chunks = -(-vocab // vocab_chunk)
    features_in_dtype = features.astype(dtype)

    def body(carry, index):
        running_max, running_sum, label_logit, best, best_id = carry
        start, owned = _chunk_start(index, vocab_chunk, vocab)
        logits, _ = _chunk_logits(features_in_dtype, embedding, bias, start, owned)
        chunk_max, chunk_sum = _row_max_sum_exp(logits)
        new_max, running_sum = _merge_max_sum((running_max, running_sum), (chunk_max, chunk_sum))
        # The label's logit, gathered: a select-and-sum over the chunk read a zeros tensor of
        # the chunk's size as well, which XLA hoisted out of the loop and kept in memory.
        column = labels - start
        safe = jnp.clip(column, 0, vocab_chunk - 1)
        has_label = (column >= 0) & (column < vocab_chunk) & owned[safe]
        picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
        label_logit += jnp.where(has_label, picked, 0.0)
        # Strictly greater: the first maximum wins, as jnp.argmax over the whole row.
        chunk_best = start + jnp.argmax(logits, axis=-1).astype(jnp.int32)
        best_id = jnp.where(chunk_max > best, chunk_best, best_id)
        best = jnp.maximum(best, chunk_max)
        return (new_max, running_sum, label_logit, best, best_id), None

    init = (jnp.full((rows,), -jnp.inf), jnp.zeros((rows,)), jnp.zeros((rows,)),
            jnp.full((rows,), -jnp.inf), jnp.zeros((rows,), jnp.int32))
    (running_max, running_sum, label_logit, _, best_id), _ = jax.lax.scan(
        body, init, jnp.arange(num_chunks))
    log_z = running_max + jnp.log(running_sum)
    valid = labels != IGNORE
    nll = jnp.sum(jnp.where(valid, log_z - label_logit, 0.0))
    correct = jnp.sum(valid & (best_id == labels), dtype=jnp.float32)
    return nll, correct, log_z


def _row_max_sum_exp(logits):
    """Per row of `[rows, cols]` logits: (max, sum of exp(logit - max)) in one pass.

    A max and then a sum of exponentials relative to it are two passes over the chunk's
    float32 logits (the sum needs the max first). One variadic reduction, whose combiner
    rescales partial sums to their common maximum (online softmax within the chunk), reads
    them once, in the same kernel as the argmax (XLA fuses sibling reductions of one input).
    """
    # Each logit enters as (itself, 1); a masked one (-inf) with a sum of 0. The ones are
    # computed from the logits: XLA hoists a loop-invariant `[rows, cols]` constant out of
    # the vocabulary loop and then reads it from memory on every chunk.
    ones = jnp.isfinite(logits).astype(logits.dtype)
    return jax.lax.reduce((logits, ones), (jnp.float32(-jnp.inf), jnp.float32(0.0)),
                          _merge_max_sum, (logits.ndim - 1,))


def _merge_max_sum(a, b):
    """Two (max, sum of exp(x - max)) partials of one row -> theirs together (online softmax):
    within a chunk (the reduction's combiner) and across chunks (the vocabulary loop)."""
    (max_a, sum_a), (max_b, sum_b) = a, b
    new_max = jnp.maximum(max_a, max_b)
    # A side whose maximum is -inf (masked columns, the identity, no chunk yet) adds nothing;
    # the where also keeps exp(-inf - -inf) = nan out.
    return new_max, (jnp.where(max_a == -jnp.inf, 0.0, sum_a * jnp.exp(max_a - new_max))
                     + jnp.where(max_b == -jnp.inf, 0.0, sum_b * jnp.exp(max_b - new_max)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_loss(features, embedding, bias, labels, dtype, vocab_chunk):
    """(summed nll, correct) of row chunks: features `[row_chunks, row_chunk, hidden]`, labels
    `[row_chunks, row_chunk]`."""
    nll, correct, _ = _forward_rows(features, embedding, bias, labels, dtype, vocab_chunk)
    return nll, correct


def _forward_rows(features, embedding, bias, labels, dtype, vocab_chunk):
    embedding_in_dtype = embedding.astype(dtype)
    nll, correct, log_z = jax.lax.map(
        lambda chunk: _forward(chunk[0], embedding_in_dtype, bias, chunk[1], dtype, vocab_chunk),
        (features, labels))
    return jnp.sum(nll), jnp.sum(correct), log_z


def _chunked_loss_fwd(features, embedding, bias, labels, dtype, vocab_chunk):
    nll, correct, log_z = _forward_rows(features, embedding, bias, labels, dtype, vocab_chunk)
    return (nll, correct), (features, embedding, bias, labels, log_z)


def _chunked_loss_bwd(dtype, vocab_chunk, residuals, cotangents):
    """The gradients, row chunk by row chunk and, in each, vocabulary chunk by chunk. The
    embedding's and the bias's gradients accumulate in one carry across the row chunks: a
    gradient per row chunk, summed afterwards, cost a zero-filled and an added `[vocab,
    hidden]` float32 array per row chunk."""
    features, embedding, bias, labels, log_z = residuals
    d_nll = cotangents[0]  # `correct` is a count: no gradient flows from it
    vocab = embedding.shape[0]
    num_chunks = -(-vocab // vocab_chunk)
    embedding_in_dtype = embedding.astype(dtype)

    def row_chunk_body(carry, chunk):
        chunk_features, chunk_labels, chunk_log_z = chunk
        row_scale = jnp.where(chunk_labels != IGNORE, d_nll, 0.0)[:, None]
        features_in_dtype = chunk_features.astype(dtype)

        def body(carry, index):
            d_features, d_embedding, d_bias = carry
            start, owned = _chunk_start(index, vocab_chunk, vocab)
            logits, weight = _chunk_logits(features_in_dtype, embedding_in_dtype, bias, start,
                                           owned)
            is_label = (chunk_labels - start)[:, None] == jnp.arange(vocab_chunk)[None, :]
            # d nll / d logits = softmax - one_hot(label); zero on columns not owned.
            d_logits = (jnp.exp(logits - chunk_log_z[:, None]) - (is_label & owned)) * row_scale
            d_features += jnp.einsum("rv,vh->rh", d_logits.astype(dtype), weight,
                                     preferred_element_type=jnp.float32)
            d_weight = jnp.einsum("rv,rh->vh", d_logits.astype(dtype), features_in_dtype,
                                  preferred_element_type=jnp.float32)
            d_embedding = jax.lax.dynamic_update_slice_in_dim(
                d_embedding,
                jax.lax.dynamic_slice_in_dim(d_embedding, start, vocab_chunk) + d_weight,
                start, axis=0)
            d_bias = jax.lax.dynamic_update_slice_in_dim(
                d_bias, jax.lax.dynamic_slice_in_dim(d_bias, start, vocab_chunk)
                + jnp.sum(d_logits, axis=0), start, axis=0)
            return (d_features, d_embedding, d_bias), None

        (d_features, *carry), _ = jax.lax.scan(
            body, (jnp.zeros(chunk_features.shape, jnp.float32), *carry), jnp.arange(num_chunks))
        return tuple(carry), d_features.astype(features.dtype)

    init = (jnp.zeros(embedding.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
    (d_embedding, d_bias), d_features = jax.lax.scan(row_chunk_body, init,
                                                     (features, labels, log_z))
    return d_features, d_embedding.astype(embedding.dtype), d_bias.astype(bias.dtype), None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
