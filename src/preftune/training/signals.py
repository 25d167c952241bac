"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (what schedulers, ``kill`` and ``torchrun`` send).

While a run's steps execute (:meth:`StopSignals.deferred`), the first signal interrupts nothing: it is
recorded, and the loop looks at it after each optimizer step, once the step's metrics are written. Every
process takes part in that look (one all-reduce), so all of them stop after the same step, save one
checkpoint of it together and raise :class:`Terminated` (SIGTERM) or ``KeyboardInterrupt`` (SIGINT). A stop
therefore never tears an optimizer step, never checkpoints one step behind, and never leaves a process waiting
in a collective for another that has left. During the final evaluation and save the signal is held until the
model is written. Elsewhere (loading data and the model, precomputing the reference: nothing to save yet) and
on a second signal, the run stops at once; then the last periodic checkpoint is what ``--resume`` finds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: checkpoint the last completed step, then exit non-zero (143)."""


class StopSignals:
    """The signal state of one run (see the module docstring)."""

    def __init__(self) -> None:
        self.pending: int | None = None  # the first signal received while deferring
        self._deferring = False

    def _handle(self, signum, frame) -> None:
        if self._deferring and self.pending is None:
            self.pending = signum
            return
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record the first signal instead of raising it, for the duration of the block."""
        previous, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = previous

    def requested(self, accelerator=None) -> KeyboardInterrupt | None:
        """The stop every process agrees on (a signal on any one of them counts), as the exception to raise
        after checkpointing; None to go on. A collective: every process must call it at the same point."""
        local = [float(self.pending == signal.SIGINT), float(self.pending == signal.SIGTERM)]
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            total = accelerator.reduce(
                torch.tensor(local, device=accelerator.device), reduction="sum"
            ).tolist()
        else:
            total = local
        stop = Terminated() if total[1] > 0 else KeyboardInterrupt() if total[0] > 0 else None
        if stop is not None:
            stop.agreed = True  # every process stops at this same point
        return stop


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Install the run's SIGINT and SIGTERM handlers (main thread only; elsewhere signals stay as they are)."""
    state = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {sig: signal.signal(sig, state._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
