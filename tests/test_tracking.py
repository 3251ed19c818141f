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


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:secret@host/db",
        "postgresql+psycopg2://u:p%40ss:w/rd@127.0.0.1:5432/optuna",
        "mysql+pymysql://u:secret@h:3306/db?charset=utf8mb4",
        "postgresql://user@host/db",
        "sqlite:////abs/optuna.db",
    ],
)
def test_redact_masks_a_password_as_sqlalchemy_does(url: str) -> None:
    from sqlalchemy import make_url

    from retina_sweep.tracking import redact

    assert redact(url) == make_url(url).render_as_string(hide_password=True)
    assert redact(f"storage:'{url}',x:1 ({url})") == (
        f"storage:'{redact(url)}',x:1 ({redact(url)})"
    )


def test_a_run_records_no_password_of_a_url(tmp_path: Path) -> None:
    # The Optuna sweeper gives every trial its storage URL (pruning.storage), and tracking.uri may
    # carry credentials: both reached the run's params, config/resolved.yaml and overrides.txt.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = "postgresql://u:s3cret@db.example/optuna"
    server = "http://me:s3cret@mlflow.example:5000"
    tracker = RunTracker(uri=uri)
    run_id = tracker.start(
        tags={"cell": f"storage={storage}"},
        params={"pruning.storage": storage, "tracking.uri": server},
    )
    tracker.log_text(f"pruning:\n  storage: {storage}\n", "config/resolved.yaml")
    tracker.log_dict({"storage": storage, "uris": [server]}, "config/uris.json")
    tracker.finish("failed", error=f"OperationalError: cannot reach {storage}")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["pruning.storage"] == "postgresql://u:***@db.example/optuna"
    assert run.data.params["tracking.uri"] == "http://me:***@mlflow.example:5000"
    assert run.data.tags["error"] == (
        "OperationalError: cannot reach postgresql://u:***@db.example/optuna"
    )
    # Nowhere in the store, nor in the artifacts.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "resolved.yaml" for p in written)
    for path in written:
        assert b"s3cret" not in path.read_bytes(), path


def test_log_records_made_in_redacted_log_records_show_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from retina_sweep.tracking import redacted_log_records

    logger = logging.getLogger("hydra.core.utils")  # where Hydra's launchers log job overrides
    line = "\t#0 : x=1 pruning={storage:'postgresql://u:s3cret@h/db',trial_number:0}"
    with caplog.at_level(logging.INFO):
        with redacted_log_records():
            logger.info("%s", line)
            logger.info(line)
        logger.info("%s", line)  # outside: as it was
    assert caplog.messages == [line.replace("s3cret", "***")] * 2 + [line]


class _Racing:
    """An MlflowClient whose `create_run` waits at ``barrier`` before and after creating (two
    sweepers that both looked the parent up before either created it, and both created it before
    either searched again), and whose first `search_runs` finds nothing when ``blind``."""

    def __init__(self, mlf, barrier=None, *, blind: bool = False, start_time=None) -> None:
        import threading

        self._mlf, self._barrier, self._blind, self._start = mlf, barrier, blind, start_time
        self._one = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._mlf, name)

    def search_runs(self, *args, **kwargs):
        if self._blind:
            self._blind = False
            return []
        return self._mlf.search_runs(*args, **kwargs)

    def create_run(self, *args, **kwargs):
        if self._barrier is not None:
            self._barrier.wait()
        if self._start is not None:
            kwargs["start_time"] = self._start
        with self._one:
            run = self._mlf.create_run(*args, **kwargs)
        if self._barrier is not None:
            self._barrier.wait()
        return run


def _no_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store without the SQLite `parents` lock, as a tracking server is."""
    import contextlib

    from retina_sweep import tracking

    monkeypatch.setattr(tracking, "store_lock", lambda uri, name: contextlib.nullcontext())


def _open_parent(mlf):
    from retina_sweep.sweep import ParentRun

    return ParentRun.open(
        mlf, "retina_sweep", name="s", table=None, shash="h", definition={}, kind="optuna"
    )


def _parents_and_children(uri: str) -> tuple[list[str], dict[str, set[str]]]:
    """(the active parent runs, each run's children) in the store ``uri``."""
    mlf = client(uri)
    exp = mlf.get_experiment_by_name("retina_sweep").experiment_id
    runs = mlf.search_runs([exp])
    parents = sorted(r.info.run_id for r in runs if r.data.tags.get("is_parent") == "true")
    children: dict[str, set[str]] = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            children.setdefault(r.data.tags["mlflow.parentRunId"], set()).add(r.info.run_id)
    return parents, children


def test_sweepers_creating_a_parent_at_once_without_a_lock_keep_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a tracking server (no lock), two sweepers started together both found no parent and
    # both created one: the study's trials were split between two parents.
    import threading

    _no_lock(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri)  # the schema, made before the race
    barrier = threading.Barrier(2, timeout=60)
    opened: dict[int, object] = {}

    def sweeper(i: int) -> None:
        opened[i] = _open_parent(_Racing(client(uri), barrier))

    threads = [threading.Thread(target=sweeper, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(opened) == 2
    kids = [
        RunTracker(uri=uri, parent_run_id=p.run_id).start(tags={}, params={})
        for p in opened.values()
    ]
    parents, children = _parents_and_children(uri)
    assert len(parents) == 1, parents
    assert children[parents[0]] == set(kids)
    assert {p.run_id for p in opened.values()} == set(parents)


def test_a_parent_merged_after_its_sweeper_launched_trials_takes_its_children_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sweeper (A) that saw only its own parent launched trials under it; another one (B), whose
    # look-up came before A's parent existed and whose clock is behind, created an earlier one.
    # Both settle on B's: A's trials move over, A's parent is deleted, A launches on under B's.
    _no_lock(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = _open_parent(client(uri))
    first = RunTracker(uri=uri, parent_run_id=a.run_id).start(tags={}, params={})
    mine = a.run_id
    start = client(uri).get_run(mine).info.start_time - 60_000
    b = _open_parent(_Racing(client(uri), blind=True, start_time=start))
    assert b.run_id != mine
    second = RunTracker(uri=uri, parent_run_id=b.run_id).start(tags={}, params={})
    assert a.resolve_duplicates() == b.run_id == a.run_id  # before A's next launch
    third = RunTracker(uri=uri, parent_run_id=a.run_id).start(tags={}, params={})
    a.close()
    parents, children = _parents_and_children(uri)
    assert parents == [b.run_id]
    assert children[b.run_id] == {first, second, third}
    gone = client(uri).get_run(mine)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags["duplicate_of"] == b.run_id


def test_redact_files_masks_passwords_and_leaves_other_files_alone(tmp_path: Path) -> None:
    from retina_sweep.tracking import redact_files

    (tmp_path / "config.yaml").write_text("pruning:\n  storage: postgresql://u:s3cret@h/db\n")
    (tmp_path / "clean.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    (tmp_path / "notes.txt").write_text("http://me:s3cret@host\n")  # not matched by the pattern
    mtime = (tmp_path / "clean.yaml").stat().st_mtime_ns
    assert redact_files(tmp_path) == [tmp_path / "config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == (
        "pruning:\n  storage: postgresql://u:***@h/db\n"
    )
    assert (tmp_path / "clean.yaml").stat().st_mtime_ns == mtime  # not rewritten
    assert "s3cret" in (tmp_path / "notes.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.yaml", "config.yaml", "notes.txt"]
    assert redact_files(tmp_path / "missing") == []


def test_hydra_job_files_hold_no_password(tmp_path: Path) -> None:
    """Hydra saves `.hydra/{config,hydra,overrides}.yaml` as given before the task function
    runs; the task function rewrites them masked (before: `tracking.uri=http://me:s3cret@...`
    stayed in all three). The run stops at once on a bad config value, after the rewrite."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retina_sweep",
            "data=coco",
            "data.root=/nonexistent",
            "tracking.uri=http://me:s3cret@127.0.0.1:1",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr  # the config error, not a crash
    saved = sorted((tmp_path / "out" / ".hydra").glob("*.yaml"))
    assert [p.name for p in saved] == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for path in saved:
        assert "me:***@127.0.0.1" in path.read_text(), path
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path
