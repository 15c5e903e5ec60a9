"""The train step compiled on a thread while the run restores or initializes its state.

Start-up is mostly compilation. The train step's compilation needs only shapes and shardings,
which `train.make_setup` and the config know before any array exists, so it starts at once on
a thread; the checkpoint restore (or the init program's own compilation and run), the data
pipeline's start and the writers' set-up run beside it (XLA compiles without holding the
GIL). The abstract arguments carry exactly the avals and shardings of the real ones, so the
first `train_step` call finds the executable in jax's in-memory cache; a step whose shapes
differ (a resume into another batch size) compiles as before.
"""
from __future__ import annotations

import concurrent.futures
import time

import jax
from absl import logging

from ettin_jax import losses
from ettin_jax import sharding as sharding_lib


def batch_spec(config, mesh: jax.sharding.Mesh, rows: int, micro_rows: int) -> dict:
    """ShapeDtypeStructs of a train step's global batch: `[rows // micro_rows, micro_rows, ...]`
    per key, sharded as `sharding.host_batch_to_global` shards the real one."""
    from data_pipeline import loader  # pylint: disable=import-outside-toplevel
    sharding = sharding_lib.batch_sharding(mesh, leading_axes=1)
    keys = losses.BATCH_KEYS[config.objective]
    return {key: jax.ShapeDtypeStruct((rows // micro_rows, micro_rows, *shape), dtype,
                                      sharding=sharding)
            for key, (shape, dtype) in loader.row_spec(config).items() if key in keys}


def start(train_step, abstract_state: dict, abstract_batch: dict, learning_rate: float,
          step: int) -> concurrent.futures.Future:
    """Compiles `train_step` (a jitted function) for these arguments on a thread. The scalars
    are passed as the loop passes them (Python numbers), so their avals match too.
    `.result()` waits for it and re-raises what the compilation raised."""
    def compile_step():
        # Both times are logged: a warm start (a compilation-cache hit) still traces and
        # lowers the step before the cache can be asked (bench/startup.py reads them).
        start_time = time.time()
        lowered = train_step.lower(abstract_state, abstract_batch, learning_rate, step)
        lowered_s = time.time() - start_time
        lowered.compile()
        logging.info("train step compiled in %.1f s (traced and lowered in %.1f s, then XLA "
                     "or the compilation cache; on a thread, beside the restore)",
                     time.time() - start_time, lowered_s)

    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="precompile")
    future = executor.submit(compile_step)
    executor.shutdown(wait=False)
    return future


def done() -> concurrent.futures.Future:
    """A finished `start`, for a run with no step left to train."""
    future = concurrent.futures.Future()
    future.set_result(None)
    return future
