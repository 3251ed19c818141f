"""SIGTERM as an interrupt (retina_sweep.signals): raised as `Terminated`, handler restored."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from retina_sweep.signals import Terminated, check_grace, terminate_as_interrupt


def _signal_self(signum: int) -> None:
    """Send `signum` to this process and give Python the bytecodes to run its handler on."""
    os.kill(os.getpid(), signum)
    for _ in range(10**6):
        pass


class Sentinel(Exception):
    pass


def _sentinel(signum, frame):
    raise Sentinel


@pytest.fixture
def sentinel_handler():
    """A SIGTERM handler of the test's own, so a regression raises instead of killing pytest."""
    previous = signal.signal(signal.SIGTERM, _sentinel)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_terminated_inside_and_the_old_handler_comes_back(sentinel_handler) -> None:
    with pytest.raises(Terminated, match="SIGTERM") as info:
        with terminate_as_interrupt():
            _signal_self(signal.SIGTERM)
    # A KeyboardInterrupt: every `except KeyboardInterrupt` (trial, sweep) handles it as Ctrl-C.
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is _sentinel
    with pytest.raises(Sentinel):
        _signal_self(signal.SIGTERM)


def test_the_handler_is_restored_after_a_normal_exit(sentinel_handler) -> None:
    with terminate_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not _sentinel
    assert signal.getsignal(signal.SIGTERM) is _sentinel


def test_outside_the_main_thread_it_changes_nothing(sentinel_handler) -> None:
    seen = []

    def body():
        with terminate_as_interrupt():  # signal.signal would raise ValueError in a thread
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [_sentinel]


def test_a_second_sigterm_does_not_interrupt_the_cleanup(sentinel_handler) -> None:
    cleaned = False
    with terminate_as_interrupt():
        try:
            _signal_self(signal.SIGTERM)
        except Terminated:
            _signal_self(signal.SIGTERM)  # ignored: the run is being recorded
            cleaned = True
    assert cleaned
    assert signal.getsignal(signal.SIGTERM) is _sentinel


def _child(path: str, ready) -> None:
    def on_term(signum, frame):
        with open(path, "w") as f:
            f.write("recorded")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    ready.set()
    while True:
        signal.pause()


def test_with_grace_the_children_get_the_signal_and_time_to_record(
    sentinel_handler, tmp_path
) -> None:
    # What a sweep with `launcher=parallel` needs: joblib kills its workers right after the
    # sweep process is interrupted, so the workers must hear of it first.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    record = tmp_path / "child.txt"
    child = ctx.Process(target=_child, args=(str(record), ready))
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(Terminated):
            with terminate_as_interrupt(grace_s=2.0):
                _signal_self(signal.SIGTERM)
        # Checked at once, before any join: the grace period itself let the child record.
        assert record.read_text() == "recorded"
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace_s"):
        with terminate_as_interrupt(grace_s=-1):
            pass


@pytest.mark.parametrize("value", [-0.5, float("nan"), "5", None, True])
def test_check_grace_names_the_key_of_a_bad_value(value: object) -> None:
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.grace_s must be a number"):
        check_grace(value, key="hydra.sweeper.grace_s")


def test_check_grace_takes_seconds_as_float() -> None:
    assert check_grace(0, key="k") == 0.0 and isinstance(check_grace(30, key="k"), float)


@pytest.mark.parametrize("sweeper", ["retina_grid", "optuna"])
def test_the_sweepers_grace_comes_from_the_config(monkeypatch, sweeper: str) -> None:
    # `hydra.sweeper.grace_s=...` reaches the handler the sweep installs, for either sweeper.
    from helpers import compose_config
    from hydra.utils import instantiate

    import retina_sweep.signals as signals

    overrides = ["hydra.sweeper.grace_s=12.5"]
    if sweeper == "optuna":
        overrides = ["+sweep=hpo", *overrides]
    cfg = compose_config(overrides, hydra=True)
    assert cfg.hydra.sweeper.grace_s == 12.5
    built = instantiate(cfg.hydra.sweeper)
    seen: list[float] = []
    real = signals.terminate_as_interrupt

    def spy(*, grace_s: float = 0.0):
        seen.append(grace_s)
        return real(grace_s=grace_s)

    # The sweeper's module imported the function by name: spy on that name.
    monkeypatch.setattr(sys.modules[type(built).__module__], "terminate_as_interrupt", spy)
    monkeypatch.setattr(built, "_sweep", lambda arguments: "swept")
    assert built.sweep([]) == "swept"
    assert seen == [12.5]


@pytest.fixture
def sigint_default():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_raises_once_and_its_handler_comes_back(sigint_default) -> None:
    recorded = False
    with pytest.raises(KeyboardInterrupt, match="interrupted by SIGINT") as info:
        with terminate_as_interrupt():
            try:
                _signal_self(signal.SIGINT)
            except KeyboardInterrupt:
                _signal_self(signal.SIGINT)  # Ctrl-C again while recording: ignored
                recorded = True
                raise
    assert recorded and not isinstance(info.value, Terminated)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored() -> None:
    # A background job (`cmd &` in a script, nohup) ignores SIGINT; the trial must not start
    # reacting to it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            _signal_self(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_swallowed_by_a_finalizer_is_not_printed_but_raised_again(
    sentinel_handler, monkeypatch
) -> None:
    """A handler that runs inside a finalizer raises into it, where Python hands the exception to
    `sys.unraisablehook` ("Exception ignored in ...", a traceback on stderr: seen in CI, a SIGINT
    forwarded to a joblib worker landed in SQLAlchemy's registry cleanup). Inside the block our
    own interrupt is dropped there, since `raise_pending` raises it again; any other unraisable
    exception still reaches the previous hook, which comes back after the block."""
    from retina_sweep.signals import raise_pending

    seen: list[BaseException | None] = []

    def recorder(unraisable) -> None:
        seen.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", recorder)

    class SignalOnCollect:
        def __del__(self):
            _signal_self(signal.SIGTERM)  # the handler runs here, inside the finalizer

    class FailOnCollect:
        def __del__(self):
            raise ValueError("a real finalizer error")

    with pytest.raises(Terminated, match="SIGTERM"):
        with terminate_as_interrupt():
            obj = SignalOnCollect()
            del obj  # its finalizer swallows the Terminated raised by the handler
            other = FailOnCollect()
            del other
            raise_pending()
    assert [type(e) for e in seen] == [ValueError]
    assert sys.unraisablehook is recorder


def test_an_interrupt_swallowed_after_the_last_check_ends_the_block(
    sentinel_handler, monkeypatch
) -> None:
    """A handler that runs in a finalizer after the block's last `raise_pending` (its work done,
    say a trial recorded) had its signal lost: the block ended normally and the process went on
    (a sweep to its next cell). It is now raised as the block ends, with the handler restored."""
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)

    class SignalOnCollect:
        def __del__(self):
            _signal_self(signal.SIGTERM)

    reached = []
    with pytest.raises(Terminated, match="SIGTERM"):
        with terminate_as_interrupt():
            obj = SignalOnCollect()
            del obj  # the handler's Terminated is swallowed by the finalizer
            reached.append("end of block")
    assert reached == ["end of block"]  # the block's own code was not cut short
    assert signal.getsignal(signal.SIGTERM) is _sentinel
