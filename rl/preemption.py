"""A run asked to stop (SIGTERM: preemption, ``kubectl delete``, ``ray job stop``) ends at the next step boundary
with a checkpoint and exit status 0, so ``trainer.resume=auto`` continues it as if it had never stopped.

The handler only records the request: the step in flight finishes (its learner update and weight sync are
collectives that must not be cut), ``rl.run_state.run_steps`` writes the checkpoint and returns. A second SIGTERM
is Python's default again: the process ends at once. On a cluster the signal's sender must wait long enough for a
step and a checkpoint (``RAY_JOB_STOP_WAIT_TIME_S`` on the head, the pod's ``terminationGracePeriodSeconds``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

log = logging.getLogger("rl.trainer")

FAULT_SIGTERM = "REALSR_FAULT_SIGTERM_AT_STEP"  # fault injection: the driver signals itself when step N starts


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop.requested`` after each step. Outside the main thread (where Python
    cannot take signals) it never fires."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum, self.requested = signum, False
        self._previous: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        log.warning("%s received: the run stops after the step in flight, with a checkpoint",
                    signal.Signals(signum).name)


def inject_sigterm(step: int) -> None:
    """Fault injection for the preemption test: ``REALSR_FAULT_SIGTERM_AT_STEP=N`` sends this process SIGTERM as
    step N (1-based) starts, through the real handler."""
    at = os.environ.get(FAULT_SIGTERM, "")
    if at and int(at) == step:
        log.warning("fault injection: SIGTERM at the start of step %d", step)
        os.kill(os.getpid(), signal.SIGTERM)
