"""Optimizers as optax transformations: StableAdamW (recipe §4.1) and AdamW.

Both take the learning rate of the current step as an extra argument,

    updates, opt_state = tx.update(grads, opt_state, params, learning_rate=lr)

because Ettin's schedules run on tokens seen (which the train loop counts), not on the
optimizer's own step counter. `make_optimizer(config.optimizer, config.schedule, params)`
builds the configured one, with weight decay masked off biases and norms.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging


MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class StableAdamWState(NamedTuple):
    count: jax.Array   # int32 scalar: steps taken, for the debiased betas
    mu: optax.Updates  # first moment, like params, in moments_dtype
    nu: optax.Updates  # second moment, like params, in moments_dtype


def debias_beta(beta: float, step):
    """optimi's debiased EMA coefficient (β^t − β) / (β^t − 1); 0 at t = 1, → β as t grows."""
    beta_t = jnp.power(jnp.float32(beta), step.astype(jnp.float32))
    return (beta_t - beta) / (beta_t - 1.0)


def stable_adamw(*, b1: float, b2: float, eps: float, weight_decay: float, max_lr: float,
                 weight_decay_mask=None,
                 moments_dtype=jnp.float32) -> optax.GradientTransformationExtraArgs:
    """StableAdamW with fully decoupled weight decay, per recipe §4.1 (optimi semantics).

    Per tensor p with gradient g, at step t = 1, 2, ...:
        m = m + (1 − b1_t)(g − m);   v = b2_t·v + (1 − b2_t)·g²      (b*_t = debias_beta(β*, t))
        lr_t = lr / max(1, sqrt(mean(g² / max(v, eps²))))           (per-tensor update clipping)
        p ← p·(1 − (lr_t / max_lr)·wd) − lr_t · m / (sqrt(v) + eps)

    Args:
      max_lr: the LR weight decay is relative to (the optimizer's configured LR), so the decay
        per step is wd × schedule multiplier / clip, not wd × lr.
      weight_decay_mask: pytree of bools like params (True = decay), or None for all.
      moments_dtype: storage dtype of m and v (the arithmetic is float32 either way).
    """

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=moments_dtype), params)
        return StableAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                nu=jax.tree.map(jnp.zeros_like, zeros))

    def update(grads, state, params=None, *, learning_rate, **unused_extra_args):
        if params is None:
            raise ValueError("stable_adamw needs params for its weight decay")
        count = state.count + 1
        b1_t, b2_t = debias_beta(b1, count), debias_beta(b2, count)
        mask = weight_decay_mask if weight_decay_mask is not None else jax.tree.map(
            lambda _: True, params)

        def one_tensor(g, m, v, p, decay):
            g, m, v = g.astype(jnp.float32), m.astype(jnp.float32), v.astype(jnp.float32)
            m = m + (1.0 - b1_t) * (g - m)
            v = b2_t * v + (1.0 - b2_t) * jnp.square(g)
            rms = jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v, eps * eps)))
            lr_t = learning_rate / jnp.maximum(1.0, rms)
            step = -lr_t * m / (jnp.sqrt(v) + eps)
            if decay and weight_decay:
                step = step - (lr_t / max_lr) * weight_decay * p
            return step.astype(p.dtype), m.astype(moments_dtype), v.astype(moments_dtype)

        out = jax.tree.map(one_tensor, grads, state.mu, state.nu, params, mask)
        updates, mu, nu = jax.tree.transpose(jax.tree.structure(params),
                                             jax.tree.structure((0, 0, 0)), out)
        return updates, StableAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by −learning_rate, the rate given to `update` of this step."""

    def update(updates, state, params=None, *, learning_rate, **unused_extra_args):
        del params
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def adamw(*, b1: float, b2: float, eps: float, weight_decay: float,
          weight_decay_mask=None, moments_dtype=jnp.float32) -> optax.GradientTransformationExtraArgs:
    """AdamW as PyTorch has it (bias-corrected moments, decay lr·wd·p).
    optax keeps only the first moment in `moments_dtype`."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=moments_dtype),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_learning_rate_arg())


def weight_decay_mask(params):
    """True where weight decay applies: tensors of rank >= 2 whose name is not a bias
    (recipe §3.3 `filter_bias_norm_wd`; embeddings and the tied decoder are decayed)."""

    def decays(path, p):
        name = jax.tree_util.keystr(path).lower()
        return p.ndim > 1 and "bias" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def check_config(optimizer_config):
    """ValueError naming the key of an optimizer or moments dtype make_optimizer has not."""
    name = optimizer_config.name
    if name not in ("stableadamw", "adamw"):
        raise ValueError(f"config.optimizer.name={name!r}: expected 'stableadamw' or 'adamw'")
    moments = optimizer_config.get("moments_dtype", "float32")
    if moments not in MOMENT_DTYPES:
        raise ValueError(f"config.optimizer.moments_dtype={moments!r}: expected one of "
                         f"{sorted(MOMENT_DTYPES)}")


def make_optimizer(optimizer_config, params) -> optax.GradientTransformationExtraArgs:
    """The optimizer `config.optimizer` names, for params shaped like `params`.

    `max_lr` of StableAdamW is `optimizer_config.peak_lr × max_lr_fraction`.
    """
    check_config(optimizer_config)
    mask = weight_decay_mask(params)
    name = optimizer_config.name
    moments = optimizer_config.get("moments_dtype", "float32")
    if name == "stableadamw":
        tx = stable_adamw(b1=optimizer_config.b1, b2=optimizer_config.b2, eps=optimizer_config.eps,
                          weight_decay=optimizer_config.weight_decay,
                          max_lr=optimizer_config.peak_lr * optimizer_config.max_lr_fraction,
                          weight_decay_mask=mask, moments_dtype=MOMENT_DTYPES[moments])
    elif name == "adamw":
        tx = adamw(b1=optimizer_config.b1, b2=optimizer_config.b2, eps=optimizer_config.eps,
                   weight_decay=optimizer_config.weight_decay, weight_decay_mask=mask,
                   moments_dtype=MOMENT_DTYPES[moments])
    else:
        raise AssertionError(name)              # check_config names the choices
    if optimizer_config.grad_clip_norm > 0:
        if name == "stableadamw":
            logging.warning("config.optimizer.grad_clip_norm=%s with StableAdamW: the recipe has no "
                            "gradient clipping, StableAdamW already clips each tensor's update",
                            optimizer_config.grad_clip_norm)
        tx = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), tx)
    return tx
