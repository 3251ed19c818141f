"""An advisory inter-process file lock, for work that several processes may start at once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(lock_path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive POSIX `flock` on `lock_path` (created if missing) inside the block.

    `on_wait` is called once, before blocking, when another process holds the lock (to say what
    this one waits for). The kernel drops a lock with its holder's last file descriptor, so a
    killed holder never leaves a stale lock behind.

    A no-op where `fcntl` does not exist (Windows): callers must stay correct without it (their
    writes atomic, their creation idempotent), the lock only keeps them from doing the work twice.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
