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
MLflow and is rerun like any unfinished cell. That includes one race: with `launcher=parallel`,
joblib kills its worker processes as soon as the sweep process is interrupted, so a trial whose
worker got the same signal (a process group, a SLURM job) may be killed before it records its end.
A trial that tagged its outcome but not its status is ended by the sweep's parent run
(`ParentRun.settle_children`); one killed before that stays RUNNING.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    # Once: a second SIGTERM (a scheduler signals every process of the job, then may repeat)
    # must not interrupt the cleanup that records the run as killed. SIGKILL still ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; the previous handler is restored after.

    Python delivers signals to the main thread only, so elsewhere (a trial run in a thread
    pool) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # getsignal() returns None for a handler not installed from Python: put the default back.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
