"""RunTracker on a SQLite store: runs started at the same moment on a fresh store all land."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retina_sweep.config import ConfigError
from retina_sweep.tracking import RunTracker, client

_WORKER = textwrap.dedent(
    """
    import sys, time
    from retina_sweep.tracking import RunTracker
    uri, start_at, i = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    time.sleep(max(0.0, start_at - time.time()))  # all processes open the store together
    tracker = RunTracker(uri=uri, run_name=f"run{i}")
    tracker.start(tags={"seed": i}, params={"i": i})
    tracker.log_metrics({"AP": float(i)}, step=1)
    tracker.finish("completed")
    """
)


def test_runs_started_together_on_a_fresh_store_all_land(tmp_path: Path) -> None:
    # Two `python -m retina_sweep` runs started together on a fresh directory: MLflow creates the
    # database schema on first use, and without the lock in `tracking.client` one of them died
    # with "table experiments already exists" (seen on 2026-11-27).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 4
    start_at = time.time() + 4.0  # after every interpreter has imported mlflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, uri, str(start_at), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[:2500]
    runs = client(uri).search_runs(
        [client(uri).get_experiment_by_name("retina_sweep").experiment_id]
    )
    assert sorted(r.data.metrics["AP"] for r in runs) == [float(i) for i in range(n)]


def test_a_deleted_experiment_is_a_clear_error(tmp_path: Path) -> None:
    # MLflow refused the run with "The experiment 1 must be in the 'active' state".
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlf = client(uri)
    mlf.delete_experiment(mlf.create_experiment("gone"))
    with pytest.raises(ConfigError, match=r"tracking\.experiment=gone: .* deleted .* restore"):
        RunTracker(uri=uri, experiment="gone").start(tags={}, params={})
