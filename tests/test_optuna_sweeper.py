"""The Optuna sweeper: samplers, shared journal storage, pruning, MLflow children."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import compose_config
from mlflow.tracking import MlflowClient

from hydra_plugins.retina_sweep_optuna.optuna_sweeper import RetinaOptunaSweeper, iterations_spent
from retina_sweep.optuna_pruning import make_storage
from retina_sweep.train import run

APP = Path(__file__).resolve().parent / "optuna_app" / "app.py"


def standin(tmp_path: Path, *args: str, python: tuple[str, ...] = ()) -> subprocess.Popen:
    """The stand-in app as a subprocess; ``python`` = interpreter options before the script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            *python,
            str(APP),
            f"paths.root={tmp_path}",
            f"log_file={tmp_path}/trials.log",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def study(tmp_path: Path, name: str = "standin") -> optuna.Study:
    journal = tmp_path / name / "optuna_journal.log"
    return optuna.load_study(study_name=name, storage=make_storage(f"journal:{journal}"))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sampler": "bayes"}, "sampler"),
        ({"pruner": "asha"}, "pruner"),
        ({"direction": "up"}, "direction"),
        ({"compute_budget": 0.5}, "compute_budget"),
        ({"compute_budget": "lots"}, "compute_budget"),
        ({"grace_s": -1}, "grace_s"),
        ({"heartbeat_s": -1}, "heartbeat_s"),
        ({"heartbeat_s": 1.5}, "heartbeat_s"),
    ],
)
def test_unknown_names_are_clear_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"hydra\.sweeper\.{key} must be"):
        RetinaOptunaSweeper(**kwargs)


@pytest.mark.parametrize("key", ["sampler_args", "pruner_args"])
def test_bad_sampler_or_pruner_arguments_name_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=rf"hydra\.sweeper\.{key}: .*n_startup_trails"):
        RetinaOptunaSweeper(pruner="median", **{key: {"n_startup_trails": 4}})


def test_turning_pruning_off_keeps_a_presets_pruner_args() -> None:
    # `+sweep=hpo hydra.sweeper.pruner=none` leaves the preset's Hyperband arguments in place.
    RetinaOptunaSweeper(pruner="none", pruner_args={"min_resource": 100, "max_resource": 400})


def test_pruner_args_keyed_by_pruner_name_follow_the_chosen_pruner() -> None:
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import build_pruner

    keyed = {
        "hyperband": {"min_resource": 100, "max_resource": 400, "reduction_factor": 2},
        "median": {"n_startup_trials": 2, "n_warmup_steps": 0},
    }
    median = RetinaOptunaSweeper(pruner="median", pruner_args=keyed)
    assert median.pruner_args == {"n_startup_trials": 2, "n_warmup_steps": 0}
    assert build_pruner("median", median.pruner_args)._n_startup_trials == 2
    hb = RetinaOptunaSweeper(pruner="hyperband", pruner_args=keyed)
    assert build_pruner("hyperband", hb.pruner_args)._max_resource == 400
    # A pruner the mapping does not name gets Optuna's defaults; flat arguments stay flat.
    assert RetinaOptunaSweeper(pruner="successive_halving", pruner_args=keyed).pruner_args == {}
    assert RetinaOptunaSweeper(pruner="none", pruner_args=keyed).pruner_args == {}
    flat = RetinaOptunaSweeper(pruner="median", pruner_args={"n_startup_trials": 3})
    assert flat.pruner_args == {"n_startup_trials": 3}
    # Mixed keys are flat, so the pruner rejects the stray one by name.
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.pruner_args: .*hyperband"):
        RetinaOptunaSweeper(pruner="median", pruner_args={"hyperband": {}, "n_startup_trials": 2})


@pytest.mark.parametrize(("scale", "full"), [("proxy", 400), ("proxy_long", 800)])
def test_the_hpo_presets_hyperband_ends_at_the_full_trial(scale: str, full: int) -> None:
    # A fixed max_resource of 400 stopped Hyperband's rungs halfway through an 800-iteration
    # trial (scale=proxy_long); the proxy's value is unchanged.
    from hydra.core.plugins import Plugins

    cfg = compose_config(["+sweep=hpo", f"scale={scale}"], hydra=True)
    sweeper = Plugins.instance()._instantiate(cfg.hydra.sweeper)  # as Hydra makes it
    assert sweeper.pruner_args == {"min_resource": 100, "max_resource": full, "reduction_factor": 2}


def test_sampler_args_reach_the_sampler() -> None:
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import build_sampler

    tpe = build_sampler("tpe", 0, {}, {"n_startup_trials": 3})
    assert tpe._n_startup_trials == 3


def test_iterations_spent_counts_pruned_steps_and_holds_running_trials() -> None:
    s = optuna.create_study(direction="maximize")
    done = s.ask()
    s.tell(done, 1.0)  # 400
    pruned = s.ask()
    pruned.set_user_attr("pruned_at", 100)
    s.tell(pruned, state=optuna.trial.TrialState.PRUNED)  # 100
    failed = s.ask()
    s.tell(failed, state=optuna.trial.TrialState.FAIL)  # 400: it may have trained to the end
    s.ask()  # running: holds 400
    stopping = s.ask()
    stopping.set_user_attr("pruned_at", 200)  # pruned by its job, not yet told: 200
    never = s.ask()
    never.set_user_attr("over_budget", True)
    s.tell(never, state=optuna.trial.TrialState.FAIL)  # never ran: 0
    assert iterations_spent(s, 400) == 400 + 100 + 400 + 400 + 200
    assert iterations_spent(s, 400, below=2) == 500
    assert iterations_spent(s, 400, finished_only=True) == 400 + 100 + 400


def test_a_compute_budget_stops_the_study_before_it_is_exceeded(tmp_path: Path) -> None:
    # 12 iterations = 2.4 trials of 5: the third would need 15.
    proc = standin(tmp_path, "hydra.sweeper.n_trials=10", "hydra.sweeper.compute_budget=2.4")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert len(study(tmp_path).trials) == 2
    assert "compute budget: 10 of 12 iterations" in out
    assert "[optuna:standin iterations 10/12] trial 1" in out  # progress in iterations


def test_pruning_buys_more_trials_under_a_compute_budget(tmp_path: Path) -> None:
    # 17 iterations: two full trials (10), two built-to-be-bad ones pruned at step 1 (2), and a
    # fifth full one (17); without pruning the budget holds three trials.
    proc = standin(
        tmp_path,
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.compute_budget=3.4",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=median",
        "+hydra.sweeper.pruner_args.n_startup_trials=2",
        "bad_trials=[2,3]",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert [t.state for t in s.trials] == [C, C, P, P, C]
    assert iterations_spent(s, 5) == 17


def test_two_processes_never_exceed_a_shared_compute_budget(tmp_path: Path) -> None:
    procs = [
        standin(
            tmp_path,
            "hydra.sweeper.n_trials=20",
            "hydra.sweeper.compute_budget=4",
            "hydra.sweeper.sampler=random",
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = study(tmp_path)
    ran = [int(x) for x in (tmp_path / "trials.log").read_text().split()]
    kept = [t.number for t in s.trials if "over_budget" not in t.user_attrs]
    # Without pruning nothing frees budget, so exactly 4 trials of 5 iterations, each once.
    assert sorted(ran) == kept and len(kept) == 4
    assert iterations_spent(s, 5) == 20


def test_tpe_sweep_completes_and_finds_the_optimum_region(tmp_path: Path) -> None:
    proc = standin(tmp_path, "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler=tpe")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    assert len(s.trials) == 8
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials)
    assert s.best_value == pytest.approx(max(t.value for t in s.trials))
    assert s.best_value == pytest.approx(-((s.best_params["x"] - 1.0) ** 2))
    assert "best trial" in out


def test_two_processes_share_one_journal_study_without_duplicates(tmp_path: Path) -> None:
    # The same command twice (same sampler seed), as users share a study.
    procs = [
        standin(tmp_path, "hydra.sweeper.n_trials=10", "hydra.sweeper.sampler=random")
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = study(tmp_path)
    budget = [t for t in s.trials if "over_budget" not in t.user_attrs]
    assert len(budget) == 10
    ran = [int(x) for x in (tmp_path / "trials.log").read_text().split()]
    assert sorted(ran) == list(range(10))  # every trial exactly once, across both processes
    # ... and no configuration twice: one seeded sampler per process drew the same points.
    assert len({t.params["x"] for t in budget}) == 10
    # both processes did work
    assert all("trial" in o for o in outs)


def test_a_grid_study_runs_to_the_end_of_its_grid(tmp_path: Path) -> None:
    # Optuna's GridSampler calls study.stop() after the last point, which raises outside
    # study.optimize: the sweep crashed on its last tell.
    proc = standin(
        tmp_path,
        "hydra.sweeper.sampler=grid",
        "x=choice(-1.0,1.0,2.0)",
        "hydra.sweeper.n_trials=3",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    assert sorted(t.params["x"] for t in s.trials) == [-1.0, 1.0, 2.0]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials)


def test_a_grid_study_stops_when_its_grid_is_exhausted(tmp_path: Path) -> None:
    # Optuna's GridSampler goes on past the last point, re-drawing grid points at random: with
    # the default n_trials=20 a grid of 2 trained 18 duplicates (each holding a full trial of a
    # compute budget).
    proc = standin(
        tmp_path, "hydra.sweeper.sampler=grid", "x=choice(-1.0,1.0)", "hydra.sweeper.n_trials=5"
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert sorted(t.params["x"] for t in study(tmp_path).trials) == [-1.0, 1.0]
    assert "grid exhausted" in out


@pytest.mark.parametrize("sampler", ["random", "tpe", "grid"])
def test_processes_sharing_a_study_draw_what_one_process_would(sampler: str) -> None:
    """Two study objects on one storage (two processes), same seed: no point drawn twice, and
    the same points, trial by trial, as one process asking alone."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import ask_trial, tell

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler == "grid":
        space = {"b": CategoricalDistribution([1, 2]), "c": CategoricalDistribution(["x", "y"])}
    else:
        space = {
            "a": FloatDistribution(0.0, 1.0),
            "b": IntDistribution(1, 4),
            "c": CategoricalDistribution(["x", "y"]),
        }
    args = {"n_startup_trials": 2} if sampler == "tpe" else {}

    def ask(s: optuna.Study) -> dict:
        trial = ask_trial(s, space, sampler=sampler, seed=0, sampler_args=args)
        tell(s, trial, float(len(s.trials)))  # TPE takes over after 2 trials
        return trial.params

    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(study_name="shared", storage=storage)
    second = optuna.load_study(study_name="shared", storage=storage)
    shared = [ask(s) for s in (first, second, first, second)]
    assert len({tuple(p.values()) for p in shared}) == 4
    alone = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    assert [ask(alone) for _ in range(4)] == shared


def test_pruner_prunes_a_trial_built_to_be_bad(tmp_path: Path) -> None:
    proc = standin(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=median",
        "+hydra.sweeper.pruner_args.n_startup_trials=2",
        "bad_trials=[2,3]",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    states = [t.state for t in study(tmp_path).trials]
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert states == [C, C, P, P]
    assert study(tmp_path).trials[2].user_attrs["pruned_at"] == 1


@pytest.mark.parametrize("how", ["interrupt_trials", "kill_trials"])
def test_a_trial_killed_mid_way_is_retried_when_the_study_resumes(tmp_path: Path, how: str) -> None:
    """Ctrl-C (or SIGTERM) of the sweep, or SIGKILL of its process, in trial 1: the trial stayed
    RUNNING in the study for ever, held a slot of n_trials (and a full trial of a compute budget)
    and was never run again. Resuming now fails it (user attribute `interrupted`) and runs its
    parameters again as a new trial (`retry_of`), which resumes training from its checkpoint."""
    args = ("hydra.sweeper.n_trials=3", "hydra.sweeper.sampler=random")
    first = standin(tmp_path, *args, "hydra.sweeper.compute_budget=3", f"{how}=[1]")
    out, _ = first.communicate(timeout=300)
    assert first.returncode != 0, out
    again = standin(tmp_path, *args, "hydra.sweeper.compute_budget=3")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    s = study(tmp_path)
    C, F = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    assert [t.state for t in s.trials] == [C, F, C, C]
    assert "interrupted" in s.trials[1].user_attrs
    assert s.trials[2].user_attrs["retry_of"] == 1
    assert s.trials[2].params == s.trials[1].params
    ran = [int(x) for x in (tmp_path / "trials.log").read_text().split()]
    assert ran == [0, 1, 2, 3]
    assert iterations_spent(s, 5) == 15  # the interrupted trial costs nothing: its retry resumes


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_point_drawn_again_is_told_its_twins_outcome_without_training(
    tmp_path: Path, n_jobs: int
) -> None:
    # Samplers draw a point of a small categorical space again (TPE often): it was trained again
    # (costing a full trial of the compute budget) and, drawn twice in one batch or by two
    # processes, trained twice at once into one checkpoint directory.
    proc = standin(
        tmp_path,
        "x=choice(-1.0,1.0)",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.n_jobs={n_jobs}",
        "hydra.sweeper.compute_budget=6",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    assert len(s.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials)
    ran = [int(x) for x in (tmp_path / "trials.log").read_text().split()]
    assert len(ran) == 2 == len({s.trials[n].params["x"] for n in ran})  # each point once
    for t in s.trials:
        if t.number not in ran:
            twin = s.trials[t.user_attrs["duplicate_of"]]
            assert twin.number in ran and (twin.params, twin.value) == (t.params, t.value)
    assert iterations_spent(s, 5) == 10  # the repeats cost nothing


def test_a_crashed_or_diverged_trial_is_told_fail_and_the_study_goes_on(tmp_path: Path) -> None:
    proc = standin(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.compute_budget=4",
        "fail_trials=[1]",
        "nan_trials=[2]",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    C, F = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    assert [t.state for t in s.trials] == [C, F, F, C]
    # Why, for the dashboard: the job's exception, or the missing objective.
    assert s.trials[1].user_attrs["error"] == "RuntimeError: trial 1 crashed"
    assert s.trials[2].user_attrs["error"] == "no objective: the job returned nan"
    assert iterations_spent(s, 5) == 20  # a failed trial costs the full count


def test_a_study_whose_every_trial_failed_exits_1(tmp_path: Path) -> None:
    # As the grid sweeper: a script or a cluster job must see it. It exited 0.
    proc = standin(tmp_path, "hydra.sweeper.n_trials=2", "fail_trials=[0,1]")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "every trial this process ran FAILED (2)" in out


def test_only_a_process_of_this_host_and_pid_namespace_is_judged_gone() -> None:
    """A container with host networking has the host's name but its own pids: a pid of another
    PID namespace says nothing here (it was taken for gone, and a live trial retried)."""
    import socket

    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import host_id, process_gone, process_id

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(done.stdout)  # a process that has ended
    assert process_gone(f"{host_id()}:{pid}:1") and not process_gone(process_id())
    assert not process_gone(f"{socket.gethostname()}/1:{pid}:1")  # another PID namespace
    assert not process_gone(f"elsewhere:{pid}:1")


def test_an_abandoned_trial_is_retried_once_by_processes_racing_to_resume() -> None:
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import give_back

    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(study_name="s", storage=storage)
    second = optuna.load_study(study_name="s", storage=storage)
    trial = first.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    pruned = first.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    pruned.set_user_attr("pruned_at", 2)  # its job pruned it; the sweep died before its tell
    assert give_back(first, trial.number, "test") and not give_back(second, trial.number, "test")
    assert not give_back(second, pruned.number, "test")
    states = [t.state for t in first.trials]
    S = optuna.trial.TrialState
    assert states == [S.FAIL, S.PRUNED, S.WAITING]  # one retry, and the pruned trial PRUNED
    retry = first.trials[2]
    assert retry.system_attrs["fixed_params"] == trial.params and retry.user_attrs["retry_of"] == 0


@pytest.mark.parametrize(
    "storage", ["nosuchdb://host/optuna", "sqlite:////nonexistent/dir/optuna.db", "optuna.db"]
)
def test_a_bad_storage_url_stops_the_sweep_naming_the_key(tmp_path: Path, storage: str) -> None:
    # Before: a SQLAlchemy traceback (or an error message not naming the key), exit status 1.
    proc = standin(tmp_path, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert f"[standin] stopped before any trial: hydra.sweeper.storage={storage}: " in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "trials.log").exists()


def test_a_storage_password_is_not_shown_when_the_storage_cannot_be_opened(
    tmp_path: Path,
) -> None:
    # Before: the ConfigError quoted the URL whole, password included.
    storage = "postgresql+psycopg2://u:s3cret@127.0.0.1:1/optuna"  # nothing listens on port 1
    proc = standin(tmp_path, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "hydra.sweeper.storage=postgresql+psycopg2://u:***@127.0.0.1:1/optuna: cannot" in out
    assert "s3cret" not in out


PASSWORD_DB = """
import os, runpy, sys
import retina_sweep.optuna_pruning as op

real = op.make_storage
URL = "postgresql://u:s3cret@db.example/optuna"
connected = []


def make_storage(spec, **kwargs):
    # A database URL with a password, served by a journal file: what connects gets the real URL.
    if spec != URL:
        raise AssertionError("a storage opened with another URL than the one given")
    with open("connections.log", "a") as fh:
        fh.write("ok\\n")
    return real("journal:" + os.path.abspath("password_db.log"))


op.make_storage = make_storage
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_storage_password_is_neither_logged_nor_recorded(tmp_path: Path) -> None:
    # Before: Hydra's launcher logged each job's overrides (pruning={storage:'postgresql://u:
    # s3cret@...'}), and the parent run's sweep/definition.json and multirun.yaml held the URL.
    proc = standin(
        tmp_path,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=median",
        "hydra.sweeper.storage=postgresql://u:s3cret@db.example/optuna",
        "tracking.enabled=true",
        f"+tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "+tracking.experiment=retina_sweep",
        "+tracking.parent_run_id=null",
        python=("-c", PASSWORD_DB),
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "storage:'postgresql://u:***@db.example/optuna',study_name" in out  # Hydra's log
    assert "s3cret" not in out
    # The sweeper and both trials' pruning callbacks connected, with the real URL.
    assert (tmp_path / "connections.log").read_text().split() == ["ok"] * 3
    s = optuna.load_study(
        study_name="standin", storage=make_storage(f"journal:{tmp_path}/password_db.log")
    )
    assert [t.state for t in s.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = mlf.search_runs([mlf.get_experiment_by_name("retina_sweep").experiment_id])
    local = mlf.download_artifacts(parent.info.run_id, "sweep/definition.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["storage"] == "postgresql://u:***@db.example/optuna"
    # Nothing written holds it but Hydra's own record of each job's command line (`.hydra/`).
    written = [p for p in tmp_path.rglob("*") if p.is_file() and ".hydra" not in p.parts]
    assert any(p.name == "multirun.yaml" for p in written)
    for path in written:
        assert b"s3cret" not in path.read_bytes(), path


def test_a_relative_sqlite_storage_is_the_same_database_for_every_job(tmp_path: Path) -> None:
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import absolute_storage

    assert absolute_storage("sqlite:///o.db", cwd=tmp_path) == f"sqlite:///{tmp_path}/o.db"
    assert absolute_storage("sqlite:////abs/o.db", cwd=tmp_path) == "sqlite:////abs/o.db"
    assert absolute_storage("journal:o.log", cwd=tmp_path) == f"journal:{tmp_path}/o.log"
    url = "postgresql+psycopg2://u@h/db"
    assert absolute_storage(url, cwd=tmp_path) == url


def test_resuming_a_study_in_the_other_direction_is_an_error(tmp_path: Path) -> None:
    # Optuna's create_study(load_if_exists=True) keeps the stored direction and says nothing:
    # `hydra.sweeper.direction=minimize` on a maximized study went on maximizing.
    first = standin(tmp_path, "hydra.sweeper.n_trials=1")
    assert first.communicate(timeout=300)[0] and first.returncode == 0
    again = standin(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=minimize")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 2, out
    assert (
        "[standin] stopped before any trial: hydra.sweeper.direction=minimize: the study "
        "'standin' in the storage maximizes"
    ) in out, out
    assert len(study(tmp_path).trials) == 1


def test_a_trial_whose_heartbeat_stopped_on_another_machine_is_retried(tmp_path: Path) -> None:
    """A process on another host cannot be checked: on a database storage, a RUNNING trial whose
    sweeper stopped recording heartbeats (its machine died) is retried. It stayed RUNNING."""
    import time
    import warnings

    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import retry_abandoned_trials

    url = f"sqlite:///{tmp_path}/o.db"
    with warnings.catch_warnings():  # experimental; "supposed to be used with Study.optimize"
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
        s = optuna.create_study(study_name="s", storage=storage)
        dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
        dead, old, alive = (s.ask(dist) for _ in range(3))
    for n, trial in enumerate((dead, old, alive)):
        trial.set_user_attr("sweeper_process", f"elsewhere:{n + 1}:1")
    storage.record_heartbeat(dead._trial_id)  # then its machine died
    # `old` never beat (a sweeper without heartbeats): it cannot be judged and is kept.
    time.sleep(2.5)
    storage.record_heartbeat(alive._trial_id)
    assert retry_abandoned_trials(s) == [dead.number]
    S = optuna.trial.TrialState
    assert [t.state for t in s.trials] == [S.FAIL, S.RUNNING, S.RUNNING, S.WAITING]
    assert "heartbeat" in s.trials[0].user_attrs["interrupted"]


def test_the_sweeper_records_heartbeats_of_its_trials_on_a_database(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "o.db"
    proc = standin(tmp_path, "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    with sqlite3.connect(db) as con:
        beats = con.execute("SELECT COUNT(DISTINCT trial_id) FROM trial_heartbeats").fetchone()
    assert beats == (2,)


def test_telling_a_trial_another_process_already_retried_does_not_end_the_sweep() -> None:
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import give_back

    s = optuna.create_study(direction="maximize")
    trial = s.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert give_back(s, trial.number, "its heartbeat stopped")  # as another process would
    done = JobReturn(status=JobStatus.COMPLETED, _return_value=1.0)
    assert RetinaOptunaSweeper()._tell(s, trial, done, "pruned_at").startswith("FAIL")
    assert s.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_job_whose_trial_was_retried_elsewhere_stops(tmp_path: Path) -> None:
    # Its report raised UpdateFinishedTrialError and the job ended FAILED; stopping (as pruned)
    # keeps it from training on beside its retry, into the same checkpoint directory.
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import give_back
    from retina_sweep.optuna_pruning import OptunaPruningCallback

    spec = f"journal:{tmp_path}/j.log"
    s = optuna.create_study(study_name="s", storage=make_storage(spec), direction="maximize")
    trial = s.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    callback = OptunaPruningCallback(storage=spec, study_name="s", trial_number=trial.number)
    assert callback.report(1, {"AP": 1.0}) is False
    assert give_back(s, trial.number, "its heartbeat stopped")
    assert callback.report(2, {"AP": 2.0}) is True
    assert math.isnan(callback.pruned(2))
    assert s.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_the_mlflow_run_of_an_abandoned_trial_is_ended_killed(tmp_path: Path) -> None:
    # A trial process killed with SIGKILL leaves its MLflow child RUNNING, tagged `running`
    # (not a final outcome, so closing the parent left it RUNNING for ever).
    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import end_abandoned_runs
    from retina_sweep.sweep import ParentRun
    from retina_sweep.tracking import RunTracker, client

    uri = f"sqlite:///{tmp_path}/m.db"
    parent = ParentRun.open(
        client(uri), "retina_sweep", name="s", table=None, shash="h", definition={}, kind="optuna"
    )
    runs = {}
    for number in (1, 2):
        tracker = RunTracker(uri=uri, parent_run_id=parent.run_id)
        runs[number] = tracker.start(tags={"optuna_trial": number}, params={})
    assert end_abandoned_runs(parent, 1, "gone") == [runs[1]]
    mlf = MlflowClient(tracking_uri=uri)
    killed, other = mlf.get_run(runs[1]), mlf.get_run(runs[2])
    assert killed.info.status == "KILLED" and killed.data.tags["outcome"] == "killed"
    assert killed.data.tags["error"] == "gone" and other.info.status == "RUNNING"


class PruneAtFirstReport:
    """A pruning callback that always says stop (for the trainer side of pruning)."""

    def __init__(self, **_: object) -> None:
        self.steps: list[int] = []

    def report(self, step: int, metrics: dict) -> bool:
        self.steps.append(step)
        return True

    def pruned(self, step: int) -> float:
        return math.nan


@pytest.mark.slow
def test_a_pruned_training_run_ends_pruned_in_mlflow_not_failed(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "scale=smoke",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
            "train.eval_every=2",
            "+pruning._target_=test_optuna_sweeper.PruneAtFirstReport",
        ]
    )
    assert math.isnan(run(cfg))
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    r = mlf.search_runs([mlf.get_experiment_by_name("retina_sweep").experiment_id])[0]
    assert r.info.status == "KILLED"
    assert r.data.tags["outcome"] == "pruned" and r.data.tags["pruned_at"] == "2"


RACE = """
import runpy, sys
import optuna

ask = optuna.study.Study.ask


def racing_ask(self, *args, **kwargs):
    # Another process takes the last free slot between the sweeper's count and its ask.
    if not getattr(racing_ask, "raced", False):
        racing_ask.raced = True
        other = optuna.load_study(study_name=self.study_name, storage=self._storage)
        other.tell(other.ask(), 0.0)
    return ask(self, *args, **kwargs)


optuna.study.Study.ask = racing_ask
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_trial_asked_past_the_budget_in_a_race_is_never_run(tmp_path: Path) -> None:
    proc = standin(
        tmp_path,
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.sampler=random",
        python=("-c", RACE),
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    s = study(tmp_path)
    assert [t.state for t in s.trials] == [
        optuna.trial.TrialState.COMPLETE,  # the other process's trial
        optuna.trial.TrialState.FAIL,  # ours: numbered 1 with a budget of 1
    ]
    assert s.trials[1].user_attrs["over_budget"] is True
    assert not (tmp_path / "trials.log").exists()  # nothing ran in this process


def _optuna_smoke(tmp_path: Path, *args: str) -> list[str]:
    """`python -m retina_sweep -m hydra/sweeper=optuna scale=smoke`, outputs under tmp_path."""
    return [
        sys.executable,
        "-m",
        "retina_sweep",
        "-m",
        "hydra/sweeper=optuna",
        "scale=smoke",
        f"paths.root={tmp_path}/sweeps",
        f"data.cache_dir={tmp_path}/cache",
        *args,
    ]


def test_a_bad_fixed_value_stops_an_optuna_sweep_before_the_study(tmp_path: Path) -> None:
    """As the grid sweeper: the base config is validated and its data made before the study
    opens, so a bad value is one line and exit status 2, not the same error in every trial."""
    args = ["tracking=none", "sweep.name=bad_study", "train.iterations=0"]
    cmd = _optuna_smoke(tmp_path, *args, "loss.gamma=interval(0.0,3.0)")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "[bad_study] stopped before any trial: invalid config value train.iterations=0" in (
        proc.stderr
    )
    assert not (tmp_path / "sweeps" / "bad_study" / "optuna_journal.log").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        # An unknown key: Hydra refused it in the first trial's launch, which crashed the sweep
        # with that trial left RUNNING.
        ("loss.gamm=interval(0.0,3.0)", "hydra.sweeper.params: loss.gamm: not a key of the config"),
        ("loss=choice(focal,nope)", "hydra.sweeper.params: loss: In 'config': Could not find"),
        # A value the search would draw that retina_sweep rejects: every such trial failed.
        ("loss.gamma=interval(-1.0,3.0)", "search space loss.gamma=interval(-1.0,3.0): invalid"),
        (
            "model.anchors.scales_per_octave=choice(0,1)",
            "search space model.anchors.scales_per_octave=choice(0,1): invalid config value "
            "model.anchors.scales_per_octave=0",
        ),
        # A distribution Optuna rejects: a traceback that did not name the key.
        ("loss.gamma=tag(log,interval(0.0,3.0))", "hydra.sweeper.params: loss.gamma: "),
        ("loss.gamma=interval(3.0,1.0)", "hydra.sweeper.params: loss.gamma: "),
    ],
)
def test_a_bad_search_space_stops_an_optuna_sweep_naming_the_key(
    tmp_path: Path, space: str, message: str
) -> None:
    cmd = _optuna_smoke(tmp_path, "tracking=none", "sweep.name=bad_space", space)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"[bad_space] stopped before any trial: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps" / "bad_space" / "optuna_journal.log").exists()


def test_a_metric_that_is_not_a_final_metric_stops_the_study(tmp_path: Path) -> None:
    cmd = _optuna_smoke(tmp_path, "tracking=none", "sweep.name=bad_metric")
    cmd += ["hydra.sweeper.metric=loss", "loss.gamma=interval(0.0,3.0)"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "[bad_metric] stopped before any trial: invalid config value hydra.sweeper.metric='loss'"
        in proc.stderr
    ), proc.stderr


def test_the_grid_sweeper_refuses_an_interval_in_one_line(tmp_path: Path) -> None:
    # An interval is an Optuna search: the grid sweeper said so in a traceback, exit status 1.
    cmd = [sys.executable, "-m", "retina_sweep", "-m", "scale=smoke", "tracking=none"]
    cmd += [f"paths.root={tmp_path}/sweeps", "loss.gamma=interval(0.0,3.0)"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "[multirun] stopped before any trial: loss.gamma=interval(0.0,3.0): interval sweeps "
        "need an optimiser (hydra/sweeper=optuna), not the grid sweeper"
    )


@pytest.mark.slow
def test_optuna_sweep_of_real_trials_matches_mlflow(tmp_path: Path) -> None:
    cmd = _optuna_smoke(
        tmp_path,
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        "sweep.name=tpe_smoke",
        "hydra.sweeper.n_trials=3",
        # The study's objective is its metric's final value: here the inference time, whose
        # values are real at smoke scale (the smoke trials' AP is 0), minimised.
        "hydra.sweeper.metric=ms_per_image",
        "hydra.sweeper.direction=minimize",
        "loss.gamma=interval(0.0,3.0)",
    )
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = optuna.load_study(
        study_name="tpe_smoke",
        storage=make_storage(f"journal:{tmp_path}/sweeps/tpe_smoke/optuna_journal.log"),
    )
    assert len(s.trials) == 3
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    exp = mlf.get_experiment_by_name("retina_sweep").experiment_id
    parent = mlf.search_runs([exp], filter_string="tags.is_parent = 'true'")
    assert len(parent) == 1 and parent[0].data.tags["sweeper"] == "optuna"
    kids = mlf.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'"
    )
    assert sorted(int(k.data.tags["optuna_trial"]) for k in kids) == [0, 1, 2]
    by_trial = {int(k.data.tags["optuna_trial"]): k for k in kids}
    for t in s.trials:
        assert float(by_trial[t.number].data.params["loss.gamma"]) == pytest.approx(
            t.params["loss.gamma"]
        )
        assert by_trial[t.number].data.metrics["ms_per_image"] == pytest.approx(t.value)
        assert t.value > 0
    best = min(kids, key=lambda k: k.data.metrics["ms_per_image"])
    assert s.best_value == pytest.approx(best.data.metrics["ms_per_image"])
    # The parent records the study's definition as plain JSON (the report shows it).
    local = mlf.download_artifacts(parent[0].info.run_id, "sweep/definition.json", str(tmp_path))
    definition = json.loads(Path(local).read_text())
    assert list(definition["space"]) == ["loss.gamma"]
    assert (definition["sampler"], definition["seed"], definition["pruner"]) == ("tpe", 0, "none")
    assert definition["sampler_args"] == {} and definition["pruner_args"] == {}


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL server on 127.0.0.1 (skips when the server is not installed)."""
    import pwd
    import shutil
    import socket
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (.ci/run installs Debian's postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server as the 'postgres' system user.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="rs_pg_"))
    base.chmod(0o777)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    if as_user:
        shutil.chown(base, user="postgres")
        shutil.chown(sock, user="postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)  # noqa: E731
    run_(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    run_(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-w",
        "-l",
        str(base / "log"),
        "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        run_(
            str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna"
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_a_postgresql_study(tmp_path: Path, postgres: str) -> None:
    procs = [
        standin(
            tmp_path,
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.sampler=random",
            f"hydra.sweeper.seed={i}",
            f"hydra.sweeper.storage={postgres}",
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = optuna.load_study(study_name="standin", storage=postgres)
    # A trial asked past the budget in a race between the two processes is marked, never run.
    budget = [t for t in s.trials if "over_budget" not in t.user_attrs]
    assert len(budget) == 8
    assert all(t.state == optuna.trial.TrialState.FAIL for t in s.trials[8:])
    ran = [int(x) for x in (tmp_path / "trials.log").read_text().split()]
    assert sorted(ran) == list(range(8))
