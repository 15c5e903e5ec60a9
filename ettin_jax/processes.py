"""What the processes of a multi-process run (jax.distributed) decide together, so that none
goes on alone and then waits at the next collective until a timeout, with a message that
says nothing of the cause (a gloo "DEADLINE_EXCEEDED" 30 s later, on CPU).

    any_process(flag) -> bool                 whether `flag` is set on some process
    raise_with_process0(error, elsewhere)     after process 0 alone tried something: raises
                                              its error there and `elsewhere()` on the others

Every process must call these at the same point (they are collectives); with one process
they cost nothing.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on at least one process."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def raise_with_process0(error: Exception | None, elsewhere: Callable[[], Exception]) -> None:
    """`error`: what process 0 raised (None there when it succeeded, and always None on the
    other processes). Returns when process 0 succeeded; else raises `error` on process 0 and
    `elsewhere()` (an error that points to process 0's) on every other process."""
    if jax.process_count() > 1:
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = elsewhere()
    if error is not None:
        raise error
