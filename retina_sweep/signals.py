"""SIGTERM and SIGINT as interrupts, so that a terminated trial or sweep is recorded as killed.

SLURM (and so submitit) sends SIGTERM at a job's time limit and on preemption, `kill` sends it by
default, and so do systemd and most process managers. Python's default action for SIGTERM ends
the process at once without unwinding the stack: no `except` or `finally` runs, so the trial's
MLflow run stays RUNNING forever and a sweep's parent run never gets its summary. Inside
`terminate_as_interrupt()` SIGTERM raises `Terminated`, a `KeyboardInterrupt`, so the code that
already handles Ctrl-C handles it too: the trial ends with outcome `killed` (status KILLED), the
sweep's parent run is closed as KILLED, and rerunning the sweep trains only the cells without a
finished run (from the trial's last checkpoint).

A sweep that runs its trials in worker processes (`launcher=parallel`: joblib's loky workers)
passes `grace_s`: on SIGTERM or Ctrl-C it first forwards the signal to its child processes and
gives them `grace_s` seconds to record their end, because joblib kills its workers with SIGKILL
as soon as the sweep process is interrupted. For the same reason each signal is handled once: a
worker that gets Ctrl-C from the terminal and again from its sweep must not be interrupted while
it records its trial. SIGKILL (`kill -9`, the OOM killer) cannot be caught; a trial killed that
way stays RUNNING in MLflow and is rerun like any unfinished cell. A trial that tagged its outcome
but was killed before setting its status is ended by the sweep's parent run
(`ParentRun.settle_children`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "SWEEP_GRACE_S",
    "Terminated",
    "check_grace",
    "deferred",
    "pending",
    "raise_pending",
    "terminate_as_interrupt",
]

# The interrupts raised by the handlers of the open `terminate_as_interrupt` blocks.
_pending: list[KeyboardInterrupt] = []
# Open `deferred()` blocks: a handler then records its interrupt without raising it.
_defer_depth = [0]
# Interrupts of `_pending` that a finalizer swallowed (`_quiet_unraisable`) and that no
# `raise_pending` has raised again since.
_swallowed: list[KeyboardInterrupt] = []


def _is_in(exc: BaseException, excs: list[KeyboardInterrupt]) -> bool:
    return any(exc is e for e in excs)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a SIGTERM / SIGINT handled by `terminate_as_interrupt` does not raise:
    its interrupt is raised when the block ends. For work that must not stop half-way and is
    short: writing a checkpoint (torch.save's C++ writer calls the file's Python `write`, and an
    interrupt raised there comes out as torch's "RuntimeError: unexpected pos", the checkpoint
    lost)."""
    _defer_depth[0] += 1
    try:
        yield
    finally:
        _defer_depth[0] -= 1
    if _defer_depth[0] == 0:
        raise_pending()


def pending() -> KeyboardInterrupt | None:
    """The interrupt a handler of an open `terminate_as_interrupt` block has raised, if any.

    An error that ends the block after it was raised is the signal's doing when the interrupt
    was raised inside code that turned it into another exception: torch.save's C++ writer calls
    the file's Python `write`, the handler runs there, and what comes out is torch's
    ``RuntimeError: ... unexpected pos``. `retina_sweep.train` then records the run as killed,
    not failed.
    """
    return _pending[-1] if _pending else None


def raise_pending() -> None:
    """Raise again an interrupt whose first raise was swallowed.

    Python runs a signal handler between bytecodes, wherever the main thread is, finalizers and
    weakref callbacks included (garbage collection runs them anywhere). An exception raised
    there is only printed ("Exception ignored in ..."), and the handler, which acts once, ignores
    the signal from then on: the trial would train on to its end and be killed by the scheduler
    or by its sweep with its MLflow run left RUNNING (seen once in a CI run: a SIGINT forwarded
    to a joblib worker landed in SQLAlchemy's registry cleanup). Long loops call this once per
    step; a raise that propagated never comes back to them. Inside `terminate_as_interrupt` the
    swallowed interrupt is not printed either (`_quiet_unraisable`): it is not an error, and
    the user who pressed Ctrl-C would otherwise see a traceback through a library's finalizer.
    """
    interrupt = pending()
    if interrupt is not None:
        _swallowed[:] = [e for e in _swallowed if e is not interrupt]
        raise interrupt


# The sweepers' default for `hydra.sweeper.grace_s` (see `check_grace`).
SWEEP_GRACE_S = 5.0


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (SIGINT raises a plain
    `KeyboardInterrupt`, as Python's own handler does)."""


def _forward_and_wait(signum: int, grace_s: float) -> None:
    """`signum` to this process's children (joblib's workers), then `grace_s` seconds for them."""
    children = multiprocessing.active_children()
    for child in children:
        try:
            os.kill(child.pid, signum)
        except (ProcessLookupError, TypeError):  # already gone, or not started (pid None)
            pass
    if children:
        time.sleep(grace_s)


def check_grace(value: object, *, key: str) -> float:
    """`value` as a grace period in seconds, or a `ValueError` naming the config `key`.

    The sweepers' default (`hydra.sweeper.grace_s`: 5) is generous on a local sqlite store, where a
    trial's end is a metrics flush and two small writes, well under a second; a tracking server or
    a shared filesystem under load may need more. SLURM's own grace between SIGTERM and SIGKILL
    (`KillWait`, 30 s by default) bounds it from above on a cluster.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _quiet_unraisable(previous: object) -> object:
    """A `sys.unraisablehook` that drops this module's own pending interrupts (`raise_pending`
    raises them again at the next step) and hands every other unraisable exception to
    `previous`."""

    def hook(unraisable: object) -> None:
        exc = getattr(unraisable, "exc_value", None)
        if exc is not None and _is_in(exc, _pending):
            if not _is_in(exc, _swallowed):
                _swallowed.append(exc)
            return
        previous(unraisable)  # type: ignore[operator]

    return hook


@contextmanager
def terminate_as_interrupt(*, grace_s: float = 0.0) -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt`, once.

    The first of them raises; later ones are ignored until the block ends, so that a scheduler
    signalling every process of a job, a repeated signal, or Ctrl-C reaching a worker both from
    the terminal and from its sweep, does not interrupt the cleanup that records the run as
    killed (SIGKILL still ends it). With ``grace_s > 0`` the handler first forwards the signal to
    the process's child processes and waits ``grace_s`` seconds (see the module docstring). A
    signal the process ignores (SIGINT of a background job) stays ignored. The previous handlers
    are restored after the block. An interrupt whose raise a finalizer swallowed (the handler
    ran inside it) and that no `raise_pending` raised again is raised when the block would
    otherwise end normally, after the handlers are restored: a signal is never lost. Python delivers
    signals to the main thread only, so elsewhere (a trial run in a thread pool) this does
    nothing.
    """
    check_grace(grace_s, key="grace_s")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) != signal.SIG_IGN]

    def handler(signum: int, frame: object) -> None:
        for s in caught:
            signal.signal(s, signal.SIG_IGN)
        if grace_s > 0:
            _forward_and_wait(signum, grace_s)
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            exc: KeyboardInterrupt = Terminated(f"terminated by {name}")
        else:
            exc = KeyboardInterrupt(f"interrupted by {name}")
        _pending.append(exc)  # for `raise_pending`, should this raise be swallowed
        if _defer_depth[0] == 0:
            raise exc

    previous = {s: signal.signal(s, handler) for s in caught}
    depth = len(_pending)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    try:
        yield
        # The block ended normally, yet a handler's raise was swallowed by a finalizer after the
        # block's last `raise_pending`: the signal is not lost, it ends the block. (An interrupt
        # that reached code which caught it on purpose, to record a run, is not raised again.)
        unraised = [e for e in _pending[depth:] if _is_in(e, _swallowed)]
    finally:
        sys.unraisablehook = previous_hook
        _swallowed[:] = [e for e in _swallowed if not _is_in(e, _pending[depth:])]
        del _pending[depth:]
        # getsignal() returns None for a handler not installed from Python: put the default back.
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
    if unraised:
        raise unraised[-1]
