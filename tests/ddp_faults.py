"""Faults injected into multi-process runs (tests/test_distributed.py), and a deadline for them.

The DDP workers are fresh processes spawned by `retina_sweep.distributed.launch`: they cannot be
monkeypatched, so the faults come in through the config, built by `hydra.utils.instantiate` in
each worker (tests/ must be on the workers' PYTHONPATH, which `run_with_deadline` sets):

- `faulty_focal` (as `loss._target_`): the paper's focal loss, except that training forward
  number `fault_call` (counted from 1) on rank `fault_rank` returns a NaN loss (`fault=nonfinite`) or
  raises (`fault=raise`, a stand-in for a data error on one rank only);
- `PruneAt` (as `pruning._target_`): a pruner that asks to stop at the first evaluation at or
  after `step`, and writes down on which ranks it was built, asked and told;
- `recording_model` (as `model._target_`): the detector, which writes down each inference
  forward (eval mode) with its rank, a checksum of each image it was given (to see which rank
  inferred which images) and a digest of its buffers (to see which BatchNorm running statistics
  each rank evaluated with).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from retina_sweep.sampling import FocalStrategy

TESTS_DIR = Path(__file__).resolve().parent


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


class FaultyFocal(FocalStrategy):
    def __init__(
        self, *, alpha: float, gamma: float, fault: str, fault_rank: int, fault_call: int
    ) -> None:
        super().__init__(alpha=alpha, gamma=gamma)
        if fault not in ("nonfinite", "raise"):
            raise ValueError(f"fault must be nonfinite or raise, got {fault!r}")
        self.fault, self.fault_rank, self.fault_call = fault, int(fault_rank), int(fault_call)
        self.calls = 0

    def forward(self, **kw: Any) -> dict[str, Tensor]:
        out = super().forward(**kw)
        if not self.training:
            return out
        self.calls += 1
        if self.calls == self.fault_call and _rank() == self.fault_rank:
            if self.fault == "raise":
                raise RuntimeError(f"injected data error on rank {_rank()}")
            out["loss_cls"] = out["loss_cls"] * math.nan
        return out


def faulty_focal(
    name: str = "focal",
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    fault: str = "nonfinite",
    fault_rank: int = 1,
    fault_call: int = 2,
) -> FaultyFocal:
    assert name == "focal", name
    return FaultyFocal(
        alpha=alpha, gamma=gamma, fault=fault, fault_rank=fault_rank, fault_call=fault_call
    )


class PruneAt:
    """`report(step, metrics)` is True from `step` on; its construction and every call are
    appended to `log` (a JSON line each, with the rank)."""

    def __init__(self, *, step: int, log: str) -> None:
        self.step, self.log = int(step), Path(log)
        self._write("init", 0)

    def _write(self, event: str, step: int) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"event": event, "step": int(step), "rank": _rank()}) + "\n")

    def report(self, step: int, metrics: dict[str, Any]) -> bool:
        self._write("report", step)
        return step >= self.step

    def pruned(self, step: int) -> float:
        self._write("pruned", step)
        return math.nan


def buffer_digest(module: Any) -> str:
    """A digest of the bytes of every buffer of `module` (BatchNorm running statistics among
    them), in their order: equal only for bitwise-equal buffers."""
    digest = hashlib.sha1()
    for name, buffer in module.named_buffers():
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def recording_model(*, record: str, **kw: Any):
    """`retina_sweep.builders.build_model(**kw)` that appends a JSON line `{"rank", "images":
    [checksum of each unpadded image], "buffers": buffer_digest(model)}` to `record` at each
    forward in eval mode."""
    from retina_sweep.builders import build_model

    model = build_model(**kw)

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if module.training:
            return
        images, sizes = args[0], kwargs["image_sizes"]
        sums = [
            round(float(im[:, :h, :w].sum()), 3) for im, (h, w) in zip(images, sizes, strict=True)
        ]
        with open(record, "a") as f:
            row = {"rank": _rank(), "images": sums, "buffers": buffer_digest(module)}
            f.write(json.dumps(row) + "\n")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_CHILD = """
import json, sys
from helpers import compose_config
from retina_sweep.train import run
ap = run(compose_config(json.loads(sys.argv[1])))
print("RESULT " + json.dumps(ap))
"""


def run_with_deadline(overrides: list[str], timeout: float = 90.0) -> tuple[int, float, str]:
    """`run(compose_config(overrides))` in a fresh Python process (its own process group, with
    tests/ on PYTHONPATH for it and the workers it spawns) that is killed, workers and all, if
    it is not done within `timeout` seconds: a hang fails the test instead of stalling CI.

    Returns (exit status, the AP returned or nan, stdout + stderr).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    code, output = run_command_with_deadline(
        [sys.executable, "-c", _CHILD, json.dumps(overrides)], timeout, env=env
    )
    ap = math.nan
    for line in output.splitlines():
        if line.startswith("RESULT "):
            ap = float(json.loads(line[len("RESULT ") :]))
    return code, ap, output


def run_command_with_deadline(cmd: list[str], timeout: float, **popen: Any) -> tuple[int, str]:
    """`cmd` in its own process group, killed with all its processes (DDP workers, a torchrun
    agent's ranks) if it is not done within `timeout` seconds; returns (exit status, stdout +
    stderr). A hang fails the test with the output so far instead of stalling CI."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(
            f"the run did not finish within {timeout:.0f} s (a hang?); its output:\n{output}"
        ) from None
    return proc.returncode, output


@contextlib.contextmanager
def started(cmd: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """`cmd` started in its own process group, for a test to watch while it runs; the group (a
    torchrun agent and its ranks) is killed on leaving the block if `cmd` is still running, so a
    failed or timed-out wait (`proc.wait(timeout=...)`) leaves no process behind."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
