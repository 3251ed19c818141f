"""SIGTERM as an interrupt, so that a terminated trial or sweep is recorded as killed.

SLURM (and so submitit) sends SIGTERM at a job's time limit and on preemption, `kill` sends it by
default, and so do systemd and most process managers. Python's default action for SIGTERM ends
the process at once without unwinding the stack: no `except` or `finally` runs, so the trial's
MLflow run stays RUNNING forever and a sweep's parent run never gets its summary. Inside
`terminate_as_interrupt()` SIGTERM raises `Terminated`, a `KeyboardInterrupt`, so the code that
already handles Ctrl-C handles it too: the trial ends with outcome `killed` (status KILLED), the
sweep's parent run is closed as KILLED, and rerunning the sweep trains only the cells without a
finished run (from the trial's last checkpoint).

SIGKILL (`kill -9`, the OOM killer) cannot be caught; a trial killed that way stays RUNNING in
MLflow and is rerun like any unfinished cell. A sweep that runs its trials in worker processes
(`launcher=parallel`: joblib's loky workers) passes `grace_s`: on SIGTERM it first sends SIGTERM
to its child processes and gives them `grace_s` seconds to record their end, because joblib kills
its workers with SIGKILL as soon as the sweep process is interrupted. A trial that tagged its
outcome but was killed before setting its status is ended by the sweep's parent run
(`ParentRun.settle_children`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SWEEP_GRACE_S", "Terminated", "terminate_as_interrupt"]

# Seconds a sweep gives its worker processes to record their trials as killed: a trial's end is
# a metrics flush and two small writes to the tracking store, well under a second on sqlite.
SWEEP_GRACE_S = 5.0


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _forward_and_wait(grace_s: float) -> None:
    """SIGTERM to this process's children (joblib's workers), then `grace_s` seconds for them."""
    children = multiprocessing.active_children()
    for child in children:
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):  # already gone, or not started (pid None)
            pass
    if children:
        time.sleep(grace_s)


@contextmanager
def terminate_as_interrupt(*, grace_s: float = 0.0) -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; the previous handler is restored after.

    The first SIGTERM raises; later ones are ignored, so that a scheduler signalling every
    process of a job, or repeating the signal, does not interrupt the cleanup that records the
    run as killed (SIGKILL still ends it). With ``grace_s > 0`` the handler first forwards
    SIGTERM to the process's child processes and waits ``grace_s`` seconds (see the module
    docstring). Python delivers signals to the main thread only, so elsewhere (a trial run in a
    thread pool) this does nothing.
    """
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if grace_s > 0:
            _forward_and_wait(grace_s)
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # getsignal() returns None for a handler not installed from Python: put the default back.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
