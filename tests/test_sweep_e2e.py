"""Sweeps end to end in subprocesses (scale=smoke, a temporary MLflow store and sweep folder)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


SWEEP_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sweep_command(tmp_path: Path, *args: str) -> list[str]:
    """`python -m retina_sweep <args>` at scale=smoke, everything under `tmp_path`."""
    return [
        sys.executable,
        "-m",
        "retina_sweep",
        *args,
        "scale=smoke",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"paths.root={tmp_path}/sweeps",
        f"data.cache_dir={tmp_path}/cache",
        f"hydra.searchpath=[file://{TESTS}/configs]",
    ]


def sweep(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = sweep_command(tmp_path, *args)
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=SWEEP_ENV, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def runs(tmp_path: Path):
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.get_experiment_by_name("retina_sweep")
    all_runs = mlf.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("is_parent") == "true"]
    children = [r for r in all_runs if r.data.tags.get("is_parent") != "true"]
    return mlf, parents, children


def test_grid_sweep_parent_children_tags_and_resume(tmp_path: Path) -> None:
    out = sweep(tmp_path, "+sweep=tiny_grid")
    mlf, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep"] == "tiny_grid" and parent.data.tags["table"] == "1b"
    assert parent.data.metrics["n_finished"] == 2
    assert parent.data.metrics["iterations_trained"] == 2 * 4  # scale=smoke trains 4 iterations
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.params["loss.gamma"] for c in children} == {"0.0", "2.0"}
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["sweep"] == "tiny_grid" and c.data.tags["table"] == "1b"
        assert c.data.tags["seed"] == "0" and c.data.tags["cell"].startswith("gamma=")
        assert "AP" in c.data.metrics
    assert "[tiny_grid 2/2]" in out.stdout and "ETA" in out.stdout

    # Relaunching the same sweep recomputes nothing and reuses the parent.
    again = sweep(tmp_path, "+sweep=tiny_grid")
    assert "0 to run, 2 already finished" in again.stdout
    _, parents2, children2 = runs(tmp_path)
    assert len(parents2) == 1 and len(children2) == 2

    # sweep.force=true recomputes both cells.
    sweep(tmp_path, "+sweep=tiny_grid", "sweep.force=true")
    _, parents3, children3 = runs(tmp_path)
    assert len(children3) == 4
    # The parent counts cells (each config hash by its latest run), not runs; the compute spent
    # counts every run.
    (parent,) = parents3
    assert parent.data.metrics["n_finished"] == 2 and parent.data.metrics["n_completed"] == 2
    assert parent.data.metrics["n_runs"] == 4
    assert parent.data.metrics["iterations_trained"] == 4 * 4


def test_an_ad_hoc_grid_from_the_command_line_runs_as_the_readme_says(tmp_path: Path) -> None:
    """README: `python -m retina_sweep -m loss.gamma=0,1,2`, no preset. Without `-m` Hydra
    refuses the comma list, which the README once showed; with it, the grid sweeper crosses the
    list, logs one parent and its children, and Hydra's folders land under `multirun/`."""
    sweep(tmp_path, "-m", "loss.gamma=0,2")
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(float(c.data.params["loss.gamma"]) for c in children) == [0.0, 2.0]
    assert all(c.info.status == "FINISHED" and "AP" in c.data.metrics for c in children)
    (launch,) = (tmp_path / "sweeps" / "multirun").iterdir()
    assert (launch / "multirun.yaml").is_file()
    assert sorted(p.name for p in launch.iterdir() if p.is_dir()) == ["0", "1"]


def test_a_command_line_value_of_a_grid_key_replaces_the_presets_axis(tmp_path: Path) -> None:
    """`+sweep=tiny_grid loss.gamma=0,1` once launched the grid's gammas 0 and 2 twice each (4
    trials, two per config hash); the command line's values replace the axis instead."""
    out = sweep(tmp_path, "+sweep=tiny_grid", "loss.gamma=0,1")
    assert "2 trials: 2 to run" in out.stdout
    _, parents, children = runs(tmp_path)
    assert sorted(float(c.data.params["loss.gamma"]) for c in children) == [0.0, 1.0]
    assert len({c.data.tags["config_hash"] for c in children}) == 2
    # A fixed value is a one-value axis: gamma 1 alone, the cell just trained.
    again = sweep(tmp_path, "+sweep=tiny_grid", "loss.gamma=1.0")
    assert "1 trials: 0 to run, 1 already finished" in again.stdout
    assert len(runs(tmp_path)[2]) == 2


def test_a_command_line_value_of_a_key_the_rows_set_stops_the_sweep(tmp_path: Path) -> None:
    out = sweep(tmp_path, "+sweep=tiny_rows", "model.anchors.scales_per_octave=2", check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stopped before any trial: model.anchors.scales_per_octave is set by" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() or runs(tmp_path)[2] == []


def test_a_swept_seed_overlapping_sweep_seeds_trains_each_seed_once(tmp_path: Path) -> None:
    """`seed=0,1 sweep.seeds=2` expands to seeds 0,1,1,2: seed 1 was trained twice."""
    out = sweep(tmp_path, "-m", "seed=0,1", "sweep.seeds=2")
    assert "dropped 1 duplicate cell(s)" in out.stdout and "3 trials: 3 to run" in out.stdout
    _, parents, children = runs(tmp_path)
    assert sorted(int(c.data.tags["seed"]) for c in children) == [0, 1, 2]
    assert parents[0].data.metrics["n_runs"] == 3


@pytest.mark.parametrize(
    ("launcher", "signum", "error"),
    [
        ("local", signal.SIGTERM, "terminated by SIGTERM"),
        ("parallel", signal.SIGTERM, "terminated by SIGTERM"),
        ("parallel", signal.SIGINT, "interrupted by SIGINT"),  # `kill -INT` of the sweep alone
    ],
)
def test_sigterm_or_sigint_closes_the_sweep_and_its_trials_as_killed_and_a_rerun_finishes(
    tmp_path: Path, launcher: str, signum: int, error: str
) -> None:
    # SIGTERM is what SLURM sends at a time limit and what `kill` sends. Python's default would
    # end the process on the spot, leaving the parent and the trial RUNNING in MLflow forever.
    # With `launcher=parallel` the signal reaches the sweep process only (as `kill PID` does):
    # it must forward it to the joblib workers before joblib kills them, or their trials stay
    # RUNNING. A few seconds of training per trial: still running when the signal comes.
    args = [
        "+sweep=tiny_grid",
        f"launcher={launcher}",
        "train.iterations=60",
        "train.checkpoint_every=2",
    ]
    started = 2 if launcher == "parallel" else 1  # trials running when the signal comes
    cmd = sweep_command(tmp_path, *args)
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=SWEEP_ENV, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            # Wait for the first trial's first checkpoint: the trial is then well inside training.
            deadline = time.monotonic() + 300
            while not list((tmp_path / "sweeps" / "checkpoints").glob("*/last.pt")):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    # One line and the shell's status for the signal (143, 130), not a traceback.
    assert code == 128 + signum, log.read_text()
    assert "Traceback" not in log.read_text() and "resumes" in log.read_text(), log.read_text()
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == started, log.read_text()
    assert parents[0].info.status == "KILLED", log.read_text()
    for trial in children:
        assert trial.info.status == "KILLED" and trial.data.tags["outcome"] == "killed"
        assert trial.data.tags["error"] == error

    # The same command again reuses the parent, resumes from the checkpoints and finishes.
    rerun = sweep(tmp_path, *args)
    assert "resuming from" in rerun.stdout + rerun.stderr
    _, parents2, children2 = runs(tmp_path)
    assert len(parents2) == 1 and parents2[0].info.status == "FINISHED"
    statuses = sorted(c.info.status for c in children2)
    assert statuses == ["FINISHED", "FINISHED"] + ["KILLED"] * started


def test_listed_rows_run_exactly_and_a_failure_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # The third row asks for a pretrained checkpoint that does not exist: that trial fails at
    # build time, the other two finish.
    out = sweep(tmp_path, "+sweep=tiny_rows", check=False)
    _, parents, children = runs(tmp_path)
    got = sorted(
        (
            c.data.params["model.anchors.scales_per_octave"],
            c.data.params["model.anchors.aspect_ratios"],
        )
        for c in children
    )
    assert got == [("1", "[0.5, 2.0]"), ("1", "[1.0]"), ("2", "[0.5, 1.0, 2.0]")]
    status = {c.data.params["model.anchors.aspect_ratios"]: c.info.status for c in children}
    assert status == {"[1.0]": "FINISHED", "[0.5, 1.0, 2.0]": "FINISHED", "[0.5, 2.0]": "FAILED"}
    failed = [c for c in children if c.info.status == "FAILED"][0]
    assert "nonexistent" in failed.data.tags["error"]
    assert parents[0].data.metrics["n_failed"] == 1
    assert parents[0].info.status == "FINISHED"  # two of its trials finished
    # The sweep went on, but its exit status says that a trial failed.
    assert out.returncode == 1 and "1 of 3 trials FAILED" in out.stdout

    # The relaunch retries the failed cell only (it fails again): still one FAILED cell of 3.
    again = sweep(tmp_path, "+sweep=tiny_rows", check=False)
    assert again.returncode == 1 and "1 of 1 trials FAILED" in again.stdout
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    metrics = parents[0].data.metrics
    assert metrics["n_failed"] == 1  # the cell, not its two FAILED runs
    assert metrics["n_finished"] == 2 and metrics["n_runs"] == 4


def test_a_sweep_on_a_missing_coco_root_stops_before_any_trial(tmp_path: Path) -> None:
    """One message naming the folder, before the parent run or any trial: it used to launch
    every trial into the same MissingDataError and exit 0."""
    args = ["-m", "data=coco", f"data.root={tmp_path}/no_coco", "data.num_classes=8"]
    cmd = [a for a in sweep_command(tmp_path, *args, "loss.gamma=0,1") if "cache_dir" not in a]
    out = subprocess.run(
        cmd, cwd=tmp_path, env=SWEEP_ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode != 0
    assert f"COCO root {tmp_path}/no_coco does not exist" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() or runs(tmp_path)[2] == []


def test_trials_in_parallel_all_land(tmp_path: Path) -> None:
    sweep(
        tmp_path,
        "+sweep=tiny_grid",
        "sweep.grid={loss.gamma:[0.0,1.0,2.0]}",
        "launcher=parallel",
        "tracking.log_every=1",
    )
    mlf, parents, children = runs(tmp_path)
    assert len(children) == 3
    for c in children:
        assert c.info.status == "FINISHED"
        history = mlf.get_metric_history(c.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert "AP" in c.data.metrics
    # Two at once at one thread each; the last trial runs alone with both jobs' threads.
    threads = {c.data.params["loss.gamma"]: c.data.params["train.threads"] for c in children}
    assert threads == {"0.0": "1", "1.0": "1", "2.0": "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_mlflow_server_shows_the_sweep_over_rest(tmp_path: Path) -> None:
    sweep(tmp_path, "+sweep=tiny_grid", "tracking.log_every=1")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        exp = _get(f"{base}/experiments/get-by-name?experiment_name=retina_sweep")["experiment"]
        found = _post(
            f"{base}/runs/search",
            {"experiment_ids": [exp["experiment_id"]], "filter": "tags.is_parent = 'true'"},
        )["runs"]
        assert len(found) == 1
        parent_id = found[0]["info"]["run_id"]
        kids = _post(
            f"{base}/runs/search",
            {
                "experiment_ids": [exp["experiment_id"]],
                "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
            },
        )["runs"]
        assert len(kids) == 2
        for kid in kids:
            params = {p["key"]: p["value"] for p in kid["data"]["params"]}
            assert params["loss.gamma"] in {"0.0", "2.0"}
            rid = kid["info"]["run_id"]
            hist = _get(f"{base}/metrics/get-history?run_id={rid}&metric_key=loss")["metrics"]
            assert sorted(m["step"] for m in hist) == [1, 2, 3, 4]
            arts = _get(f"{base}/artifacts/list?run_id={rid}&path=config")["files"]
            assert "config/resolved.yaml" in {a["path"] for a in arts}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_parent_summary_counts_the_iterations_pruning_saved() -> None:
    from types import SimpleNamespace

    from retina_sweep.sweep import ParentRun

    def child(outcome: str, ap: float | None, **tags: str):
        return SimpleNamespace(
            info=SimpleNamespace(status="FINISHED", run_id=f"{outcome}{ap}{tags}"),
            data=SimpleNamespace(
                tags={"outcome": outcome, **tags},
                params={"train.iterations": "400"},
                metrics={} if ap is None else {"AP": ap},
            ),
        )

    kids = [
        child("completed", 30.0),
        child("completed", 35.0),
        child("pruned", None, pruned_at="100"),
        child("pruned", None, pruned_at="200"),
        child("diverged", None),  # stopped at an unknown step: not counted
    ]
    mlf = SimpleNamespace(search_runs=lambda *a, **k: kids)
    summary = ParentRun(mlf, "0", "parent").summarize("AP")
    assert summary["iterations_trained"] == 400 + 400 + 100 + 200
    assert summary["best_AP"] == 35.0 and summary["outcome"]["pruned"] == 2


def test_closing_the_parent_ends_children_that_recorded_their_outcome(tmp_path: Path) -> None:
    from retina_sweep.sweep import ParentRun

    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.create_experiment("retina_sweep")
    parent = mlf.create_run(exp, tags={"is_parent": "true"}).info.run_id

    def child(outcome: str, status: str = "RUNNING") -> str:
        tags = {"mlflow.parentRunId": parent, "outcome": outcome}
        run_id = mlf.create_run(exp, tags=tags).info.run_id
        if status != "RUNNING":
            mlf.set_terminated(run_id, status)
        return run_id

    # Tagged `killed`, then SIGKILLed by the launcher before it could set its status.
    half_ended = child("killed")
    still_training = child("running")  # another process may still be training it: left alone
    done = child("completed", "FINISHED")
    summary = ParentRun(mlf, exp, parent).close(status="KILLED")
    status = {r: mlf.get_run(r).info.status for r in (half_ended, still_training, done)}
    assert status == {half_ended: "KILLED", still_training: "RUNNING", done: "FINISHED"}
    assert summary["status"] == {"KILLED": 1, "RUNNING": 1, "FINISHED": 1}
    assert mlf.get_run(parent).info.status == "KILLED"


def test_parent_summary_counts_each_cell_by_its_latest_run() -> None:
    """A relaunch or `sweep.force=true` reuses the parent: a cell with several children counts
    once, by its latest FINISHED run, else its latest run (the report's rule); the compute
    spent counts every run."""
    from types import SimpleNamespace

    from retina_sweep.sweep import ParentRun

    def child(run_id: str, chash: str, status: str, start: int, ap: float | None = None):
        outcome = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "killed"}[status]
        return SimpleNamespace(
            info=SimpleNamespace(status=status, run_id=run_id, start_time=start),
            data=SimpleNamespace(
                tags={"outcome": outcome, "config_hash": chash, "cell": chash},
                params={"train.iterations": "4"},
                metrics={} if ap is None else {"AP": ap},
            ),
        )

    kids = [
        child("a1", "a", "FAILED", 1),  # failed, then its retry finished
        child("a2", "a", "FINISHED", 5, ap=10.0),
        child("b1", "b", "FINISHED", 2, ap=30.0),  # recomputed by sweep.force=true
        child("b2", "b", "FINISHED", 6, ap=20.0),
        child("c1", "c", "FINISHED", 3, ap=5.0),  # a later retry was killed: still a result
        child("c2", "c", "KILLED", 7),
        child("d1", "d", "FAILED", 4),  # failed twice: one failed cell
        child("d2", "d", "FAILED", 8),
    ]
    mlf = SimpleNamespace(search_runs=lambda *a, **k: list(reversed(kids)))
    summary = ParentRun(mlf, "0", "parent").summarize("AP")
    assert summary["status"] == {"FINISHED": 3, "FAILED": 1}
    assert summary["outcome"] == {"completed": 3, "failed": 1}
    assert summary["children"] == 4 and summary["runs"] == 8
    assert summary["best_AP"] == 20.0 and summary["best_run_id"] == "b2"  # b's latest result
    assert summary["iterations_trained"] == 4 * 4  # the four completed runs


def test_a_relaunch_that_finishes_a_failed_cell_logs_no_failed_cell(tmp_path: Path) -> None:
    """The parent is reused: its `n_failed` from the first launch must drop to 0 once the
    cell's retry finished (it stayed 1, and counted runs: `n_finished` 1 + `n_failed` 1)."""
    from retina_sweep.sweep import ParentRun

    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.create_experiment("retina_sweep")
    parent = mlf.create_run(exp, tags={"is_parent": "true"}).info.run_id

    def child(status: str, outcome: str) -> None:
        tags = {"mlflow.parentRunId": parent, "outcome": outcome, "config_hash": "h"}
        run_id = mlf.create_run(exp, tags=tags).info.run_id
        mlf.set_terminated(run_id, status)
        time.sleep(0.01)  # distinct start times

    child("FAILED", "failed")
    ParentRun(mlf, exp, parent).close(status="FAILED")
    assert mlf.get_run(parent).data.metrics["n_failed"] == 1
    child("FINISHED", "completed")
    summary = ParentRun(mlf, exp, parent).close()
    assert summary["status"] == {"FINISHED": 1}
    metrics = mlf.get_run(parent).data.metrics
    assert metrics["n_failed"] == 0 and metrics["n_finished"] == 1
    assert metrics["n_completed"] == 1 and metrics["n_runs"] == 2


def test_sweepers_started_together_share_one_parent_run(tmp_path: Path) -> None:
    """Two sweeper processes of one sweep (Optuna workers on a shared study) open its parent at
    the same moment: the look-up and the creation are one step under the store's lock, so the
    second finds the first one's parent. The look-up is slowed here so that, without the lock,
    both would look before either created (two parents: the test failed so)."""
    import threading
    import time

    from retina_sweep.sweep import ParentRun
    from retina_sweep.tracking import client

    uri = f"sqlite:///{tmp_path}/m.db"
    ids: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        mlf = client(uri)
        search = mlf.search_runs

        def slow_search(*args, **kwargs):
            found = search(*args, **kwargs)
            time.sleep(0.5)
            return found

        mlf.search_runs = slow_search
        barrier.wait()
        parent = ParentRun.open(
            mlf, "retina_sweep", name="s", table=None, shash="h", definition={}, kind="optuna"
        )
        ids.append(parent.run_id)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(ids) == 2 and ids[0] == ids[1]
    mlf = client(uri)
    exp = mlf.get_experiment_by_name("retina_sweep")
    parents = mlf.search_runs([exp.experiment_id], filter_string="tags.is_parent = 'true'")
    assert len(parents) == 1


def test_a_second_process_waits_for_the_cell_another_one_trains(tmp_path: Path) -> None:
    """Two sweeps sharing a cell (alpha and gamma share three) must not train into one
    checkpoint at once: the second waits for the cell's lock without opening an MLflow run,
    then takes the cell up from its checkpoint."""
    import torch
    from helpers import compose_config

    from retina_sweep.config import config_hash
    from retina_sweep.locks import exclusive

    cfg = compose_config(["scale=smoke", f"paths.root={tmp_path}/sweeps"])
    lock = tmp_path / "sweeps" / "checkpoints" / config_hash(cfg) / ".lock"
    log = tmp_path / "second.log"
    with exclusive(lock), open(log, "w") as out:  # the first process, still training
        proc = subprocess.Popen(
            sweep_command(tmp_path),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=SWEEP_ENV,
        )
        deadline = time.monotonic() + 120
        while "another process is training this cell" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting
        assert not (lock.parent / "last.pt").exists()
        mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        exp = mlf.get_experiment_by_name("retina_sweep")
        assert exp is None or not mlf.search_runs([exp.experiment_id])
    assert proc.wait(timeout=120) == 0, log.read_text()
    runs = mlf.search_runs([mlf.get_experiment_by_name("retina_sweep").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert torch.load(lock.parent / "last.pt", weights_only=True)["iteration"] == 4
