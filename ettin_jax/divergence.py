"""The divergence guard: a non-finite step changes nothing, and a run of them stops training.

    update_is_finite(*scalars) -> bool array                               # inside the jit
    keep_if(ok, new_tree, old_tree) -> tree                                # inside the jit
    params_finite(params) -> bool                                          # on the host
    DivergenceGuard(config, describe_last_checkpoint)                      # on the host
    DivergenceError

Inside the jitted train step the new params and optimizer state are selected against the
old ones without a host sync, and the step's `skipped_steps` metric is 1 when they are not
taken: a step whose loss, gradient norm or learning rate is not finite leaves the whole state
bit-identical; one whose inputs are finite but whose new params' norm is not (an absurd LR)
keeps the old params while the optimizer moments take in its (finite) gradient. The moments
are selected on the inputs alone so that XLA fuses that select into the optimizer's own pass
(decided after the update it would read both states again: 9 GB more per 1b step,
bench/RESULTS.md). The host reads the skipped flag one step late (keeping the device queue
full), counts consecutive skips and raises DivergenceError after
config.train.max_nonfinite_steps of them. Logged losses above
config.train.loss_spike_factor x the mean of the recent logged ones are warned about.
"""
from __future__ import annotations

import collections
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ettin_jax import cli

SPIKE_HISTORY = 20      # logged losses the spike check averages over
SPIKE_MIN_HISTORY = 3   # fewer logged losses than this: no spike check yet


class DivergenceError(cli.UserError):
    """Training diverged: config.train.max_nonfinite_steps non-finite steps in a row."""


def update_is_finite(*scalars) -> jax.Array:
    """True where every scalar is finite (e.g. the step's loss, gradient norm and LR)."""
    return jnp.all(jnp.stack([jnp.isfinite(jnp.asarray(s, jnp.float32)) for s in scalars]))


def keep_if(ok: jax.Array, new_tree, old_tree):
    """`new_tree` where `ok`, else `old_tree`, leaf by leaf (same structure and shapes)."""
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_tree, old_tree)


@jax.jit
def _all_finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
                              if jnp.issubdtype(x.dtype, jnp.inexact)]))


def params_finite(params) -> bool:
    """Whether every floating-point parameter is finite (one device reduction, one sync)."""
    return bool(_all_finite(params))


class DivergenceGuard:
    """Counts consecutive skipped steps and watches logged losses for spikes.

    describe_last_checkpoint: () -> str naming the newest saved checkpoint (for the error).
    """

    def __init__(self, config, describe_last_checkpoint: Callable[[], str]):
        self.max_nonfinite_steps = int(config.train.max_nonfinite_steps)
        self.spike_factor = float(config.train.loss_spike_factor)
        self.describe_last_checkpoint = describe_last_checkpoint
        self.consecutive = 0
        self.first_skipped = 0
        self.total_skipped = 0
        self.recent_losses = collections.deque(maxlen=SPIKE_HISTORY)

    def observe(self, step: int, metrics):
        """Reads step `step`'s skipped flag from its TrainMetrics (waits for that step only);
        raises DivergenceError at config.train.max_nonfinite_steps skips in a row."""
        skipped = bool(np.asarray(metrics.skipped_steps.total) > 0)
        if not skipped:
            if self.consecutive:
                logging.info("step %d is finite again after %d skipped steps", step,
                             self.consecutive)
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive == 1:
            self.first_skipped = step
        logging.warning("step %d: the loss, gradient norm, learning rate or updated params are not "
                        "finite; its update was skipped (%d in a row, "
                        "config.train.max_nonfinite_steps=%d)", step,
                        self.consecutive, self.max_nonfinite_steps)
        if self.max_nonfinite_steps > 0 and self.consecutive >= self.max_nonfinite_steps:
            raise DivergenceError(
                f"training diverged at step {self.first_skipped}: the loss, gradient norm, "
                f"learning rate or updated params were not finite at steps "
                f"{self.first_skipped}-{step} ({self.consecutive} in a row, "
                f"config.train.max_nonfinite_steps={self.max_nonfinite_steps}); the params were"
                f" left at step {self.first_skipped - 1}. Last good checkpoint (finite params): "
                f"{self.describe_last_checkpoint()}. Lower config.optimizer.peak_lr (a changed "
                "setting needs --config.train.allow_config_change=True) or check the data of "
                "these steps, and rerun: the run resumes from that checkpoint")

    @property
    def in_skip_streak(self) -> bool:
        return self.consecutive > 0

    def check_loss(self, step: int, loss: float):
        """Warns when `loss` exceeds loss_spike_factor x the mean of the recent logged losses."""
        if not np.isfinite(loss):
            return
        if self.spike_factor > 0 and len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            mean = float(np.mean(self.recent_losses))
            if loss > self.spike_factor * mean:
                logging.warning("loss spike at step %d: %.4g is %.1fx the mean %.4g of the last %d "
                                "logged losses (config.train.loss_spike_factor=%g)", step, loss,
                                loss / mean, mean, len(self.recent_losses), self.spike_factor)
        self.recent_losses.append(loss)
