"""Training losses: summed over the predicted tokens, with their counts for the mean.

Every loss takes `(model, batch)` and returns `(loss_sum, {"count", "correct"})` (the stats
of ettin_jax.cross_entropy). MLM predicts the masked positions only (sparse prediction: the
head runs on the gathered hidden states), CLM every next token, MNTP (encoder from decoder)
the masked token at position p from the hidden state at p - 1.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp

from ettin_jax import cross_entropy

IGNORE = cross_entropy.IGNORE

# What each objective's step reads from the loader's batches (the rest stays on the host).
BATCH_KEYS = {"mlm": ("input_ids", "segment_ids", "positions", "mask_positions", "mask_labels"),
              "clm": ("input_ids", "segment_ids", "positions", "labels")}


def head_loss(model, hidden, labels, **chunks):
    """Summed loss of the head on `hidden [..., hidden]` against `labels [...]` (-100 = none),
    through the chunked cross-entropy (the `[..., vocab]` logits are never built; `chunks`:
    its vocab_chunk / row_chunk, at most `[row_chunk, vocab_chunk]` logits are live)."""
    return cross_entropy.cross_entropy(
        model.head_features(hidden), model.tok_embeddings[...], model.decoder_bias[...],
        labels, dtype=model.config.compute_dtype, **chunks)


def mlm_loss(model, batch, *, mntp: bool = False, **chunks):
    """Sparse MLM: the head runs on the hidden states of the masked positions only.

    batch: input_ids/segment_ids/positions `[rows, seq]`, mask_positions/mask_labels
    `[rows, max_predictions]` (-100 = unused slot). MNTP reads position p - 1 for the token
    at p (a document's first token has no predecessor and is skipped).
    """
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    where, labels = batch["mask_positions"], batch["mask_labels"]
    valid = labels != IGNORE
    if mntp:
        starts_document = jnp.take_along_axis(batch["positions"], where, axis=1) == 0
        valid &= ~starts_document
        where = jnp.maximum(where - 1, 0)
    gathered = jnp.take_along_axis(hidden, where[..., None], axis=1)   # [rows, P, hidden]
    return head_loss(model, gathered, jnp.where(valid, labels, IGNORE), **chunks)


def clm_loss(model, batch, **chunks):
    """Next-token loss; batch["labels"] `[rows, seq]` is already shifted (-100 = none)."""
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    return head_loss(model, hidden, batch["labels"], **chunks)


def loss_chunks(config) -> dict:
    """head_loss's chunk sizes from `config.train.loss_vocab_chunk` / `loss_row_chunk`
    (positive ints; they trade live logits memory against loop steps, not the result)."""
    chunks = {}
    for key, arg in (("loss_vocab_chunk", "vocab_chunk"), ("loss_row_chunk", "row_chunk")):
        value = config.train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.train.{key}={value!r}: expected a positive integer "
                             f"(e.g. --config.train.{key}=4096)")
        chunks[arg] = value
    return chunks


def loss_fn_for(config) -> Callable:
    """The loss of `config.objective` (MNTP when `config.train.mntp`), chunked as
    `config.train.loss_vocab_chunk` / `loss_row_chunk` say."""
    if config.objective == "mlm":
        return functools.partial(mlm_loss, mntp=bool(config.train.mntp), **loss_chunks(config))
    return functools.partial(clm_loss, **loss_chunks(config))
