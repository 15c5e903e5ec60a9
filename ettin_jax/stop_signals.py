"""Stop requests by signal: SIGTERM (a scheduler's preemption notice) and Ctrl-C make a run save a
checkpoint after its current step and exit cleanly; a second one of either exits without saving
(a process hung in a collective never reaches the end of its step, so a flag alone cannot stop it).
Shared by single runs (train.train_and_evaluate) and pairs (pairs.train_pair)."""
from __future__ import annotations

import signal

from absl import logging

from ettin_jax import processes


class StopOnSignal:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a request to save and stop after the current
    step. A second signal of the same kind gets the previous handler: KeyboardInterrupt for
    Ctrl-C, and for SIGTERM its default, which ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.name = ""
        # None: a handler installed outside Python, which Python cannot re-install.
        self.previous = {s: signal.signal(s, self._on_signal) or signal.SIG_DFL
                         for s in self.SIGNALS}

    def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
        self.name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        logging.warning("%s: saving a checkpoint after this step, then exiting (or exiting "
                        "before the first step, during the setup; %s again: exit without "
                        "saving)", self.name, again)
        self.flag = True
        signal.signal(signum, self.previous[signum])

    def requested(self) -> bool:
        """Whether any process got the signal (all processes agree, so they save together)."""
        return processes.any_process(self.flag)

    def requested_in_setup(self, who: str = "") -> bool:
        """`requested()`, for a run still setting up (a demo build, compiling, a restore): it
        ends there, with nothing new to save, and says so."""
        requested = self.requested()    # a collective: once, on every process
        if requested:
            logging.warning("%sstopped by %s before the first step: nothing was trained or "
                            "saved; rerun the same command to start", who, self.name or "a signal")
        return requested

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
