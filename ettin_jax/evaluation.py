"""Held-out evaluation of a training run: the jitted eval step's body and the eval loop.

    eval_step(params, batch, ...) -> EvalMetrics    (jitted by train.make_setup)
    evaluate(setup, params, config) -> {"eval_loss", "eval_accuracy"[, "eval_perplexity"]}

Every process of a multi-process run takes part in each eval step; evaluate makes their step
counts agree (each packs its own share of the held-out documents).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ettin_jax import losses
from ettin_jax import model_loader
from ettin_jax import sharding as sharding_lib
from ettin_jax.train_metrics import EvalMetrics


def eval_step(params, batch: dict, *, graphdef, rng_layout, loss_fn: Callable) -> EvalMetrics:
    """Loss and accuracy of the model without dropout; batch: dict of `[rows, ...]` arrays."""
    model = nnx.merge(graphdef, params, model_loader.fresh_rng_state(rng_layout))
    loss_sum, stats = loss_fn(model, batch)
    return EvalMetrics.single_from_model_output(
        loss_sum=loss_sum, predictions=stats["count"], correct=stats["correct"])


def evaluate(setup, params, config) -> dict:
    """Loss and accuracy on the held-out split (config.train.eval_batches batches)."""
    from data_pipeline import loader  # pylint: disable=import-outside-toplevel
    keys = losses.BATCH_KEYS[config.objective]
    host_batches = list(itertools.islice(loader.make_eval_iterator(config),
                                         config.train.eval_batches))
    if jax.process_count() > 1:
        # Each process packs its own share of the held-out documents, so their batch counts
        # can differ, and every eval step needs all processes: all run the largest count, the
        # ones whose documents ran out on empty rows (nothing to predict).
        count = int(np.max(multihost_utils.process_allgather(np.int32(len(host_batches)))))
        host_batches += [loader.empty_eval_batch(config)] * (count - len(host_batches))
    total = None
    for host_batch in host_batches:
        batch = sharding_lib.host_batch_to_global({k: host_batch[k] for k in keys}, setup.mesh)
        metrics = setup.eval_step(params, batch)
        total = metrics if total is None else total.merge(metrics)
    if total is None:
        return {}
    out = {f"eval_{k}": float(v) for k, v in total.compute().items()}
    if config.objective == "clm":
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out
