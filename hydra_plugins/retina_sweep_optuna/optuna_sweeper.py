"""An ask-and-tell Optuna sweeper: samplers, shared storage, pruning, MLflow child runs.

    python -m retina_sweep hydra/sweeper=optuna -m \
        'hydra.sweeper.params.loss.gamma=interval(0,5)' hydra.sweeper.n_trials=20
    python -m retina_sweep +sweep=hpo                  # the preset: TPE + Hyperband

The search space is written in Hydra's override syntax: `choice(a,b)` and comma lists are
categorical, `range(a,b[,step])` is categorical over the range, `interval(a,b)` is a float (or int
when both ends are ints), `tag(log, interval(a,b))` samples on a log scale. Command-line sweeps
(`loss.alpha=0.25,0.5`) join the space.

The study lives in `storage`: by default an Optuna journal file next to the sweep's outputs
(`<paths.root>/<sweep name>/optuna_journal.log`, safe for several processes on one machine), or
any database URL (PostgreSQL for several machines). Sweeps given the same `study_name` and storage
share the study: each asks for new trials until the study holds `n_trials` trials in total, so
they split the budget and never run a trial twice; each trial's random draws are seeded from
(`seed`, trial number), so processes running the same command do not sample the same points.
Two processes can both see one free slot and both ask; a trial numbered past the budget is then
told FAIL with the user attribute `over_budget` and never run (Optuna cannot delete a trial), so
exactly `n_trials` trials train.

`compute_budget` (optional) caps the study's training compute instead of, or as well as, its trial
count: in full trials' worth of `train.iterations`. A pruned trial costs the iterations it trained
(its `pruned_at` step), a finished or failed one the full count, and a running one holds the full
count until it ends. A trial starts only if it fits beside everything spent or held, so the
study never trains more than the budget, and what pruning saves buys more trials.

A trial that did not end (the sweep interrupted, or its process killed) is told FAIL as
`interrupted` and its parameters are enqueued again, by the sweep itself or, after a SIGKILL, by
a sweep on the study that sees the trial's process gone (same host) or its heartbeat stopped
(database storages, `heartbeat_s`); the retry resumes from the checkpoint of the same
configuration. A point drawn again (the same parameters and fixed overrides as a COMPLETE or
PRUNED trial) is told that trial's outcome without training. Bad input (an unknown key, a value
retina_sweep rejects, a bad distribution or storage) stops the sweep before the study opens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

# Standard library only (no torch): cheap enough for Hydra's plugin discovery.
from retina_sweep.signals import SWEEP_GRACE_S, check_grace, terminate_as_interrupt

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "hyperband", "successive_halving")


OVER_BUDGET_ATTR = "over_budget"
# A trial's sweeper process (`host/PID namespace:pid:start time`), so that a resumed sweep can tell a trial left
# RUNNING by a process that is gone from one still running in another process.
OWNER_ATTR = "sweeper_process"
# A trial that did not end (the sweep was interrupted or its process killed): told FAIL, and its
# parameters enqueued again as a new trial with `retry_of` (its number).
INTERRUPTED_ATTR = "interrupted"
RETRY_ATTR = "retry_of"
# The fixed part of a trial's config (a hash of the sweep's fixed overrides): two trials with the
# same parameters and this key are the same experiment.
CONFIG_ATTR = "config_key"
# A trial whose experiment had already run in the study (`duplicate_of`: that trial's number) is
# told that trial's outcome without training again, and costs nothing in the compute budget.
DUPLICATE_ATTR = "duplicate_of"
# Why a trial was told FAIL: the job's exception, or its missing objective (a diverged run).
ERROR_ATTR = "error"
# Trials that take no place in the study's n_trials nor in its compute budget.
NOT_COUNTED = (OVER_BUDGET_ATTR, INTERRUPTED_ATTR)


@dataclass
class RetinaOptunaSweeperConf:
    _target_: str = "hydra_plugins.retina_sweep_optuna.optuna_sweeper.RetinaOptunaSweeper"
    sampler: str = "tpe"
    sampler_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 4}
    seed: int = 0
    direction: str = "maximize"
    metric: str = "AP"
    n_trials: int = 20
    compute_budget: Any = None  # full trials' worth of train.iterations (e.g. 8.4); null = none
    n_jobs: int = 1
    study_name: Any = None  # default: the sweep's name
    storage: Any = None  # default: journal file under <paths.root>/<sweep name>/
    pruner: str = "none"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # Seconds worker processes get to record their trials as killed after SIGTERM or Ctrl-C
    # reaches the sweep (retina_sweep.signals); raise it on a slow shared tracking store.
    grace_s: float = SWEEP_GRACE_S
    # Database storages: the sweeper records a heartbeat of its running trials every heartbeat_s
    # seconds, and a sweep on the study retries a trial whose heartbeat is 5 intervals old (its
    # machine died). null or 0: none (a trial left RUNNING elsewhere then stays RUNNING).
    heartbeat_s: Any = 60


def build_sampler(name: str, seed: int, space: dict[str, Any], args: dict[str, Any] | None = None):
    """The Optuna sampler ``name`` with ``seed``; ``args`` go to its constructor (for TPE e.g.
    ``n_startup_trials``: Optuna's default of 10 random trials is most of a short study)."""
    import optuna

    args = dict(args or {})
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **args)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed, **args)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **args)
    if name == "grid":
        grid = {}
        for key, dist in space.items():
            if not isinstance(dist, optuna.distributions.CategoricalDistribution):
                from retina_sweep.config import ConfigError

                raise ConfigError(
                    f"hydra.sweeper.sampler=grid needs choice()/range() values, {key} is {dist}"
                )
            grid[key] = list(dist.choices)
        return optuna.samplers.GridSampler(grid, seed=seed, **args)
    raise ValueError(f"hydra.sweeper.sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def absolute_storage(spec: str, cwd: str | os.PathLike | None = None) -> str:
    """``spec`` with a relative SQLite or journal path made absolute (from ``cwd``)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    for prefix in ("sqlite:///", "journal:"):
        if spec.startswith(prefix):
            path = spec[len(prefix) :]
            if path and not Path(path).is_absolute():
                return prefix + str((base / path).resolve())
    return spec


def open_storage(spec: str, heartbeat_s: int | None = None):
    """The study's storage (``make_storage``), or a ``ConfigError`` naming
    ``hydra.sweeper.storage`` when it cannot be opened (a malformed URL, a database driver that
    is not installed, a server that does not answer, a directory that does not exist)."""
    from retina_sweep.config import ConfigError
    from retina_sweep.optuna_pruning import make_storage
    from retina_sweep.tracking import redact

    try:
        return make_storage(spec, heartbeat_s=heartbeat_s)
    except Exception as exc:  # SQLAlchemy's, the driver's, or the file system's
        # The URL's password is not shown (SQLAlchemy's parse errors quote the URL whole).
        message = redact(" ".join(str(exc).split("(Background on this error")[0].split()))
        if "://" not in spec:
            message += (
                " (a storage is a database URL, sqlite:///file.db or postgresql://..., or "
                "journal:/path/file.log)"
            )
        raise ConfigError(
            f"hydra.sweeper.storage={redact(spec)}: cannot open the study's storage: "
            f"{type(exc).__name__}: {message}"
        ) from None


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed for trial ``number`` of a study sampled with ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


def ask_trial(study, space: dict[str, Any], *, sampler: str, seed: int, sampler_args=None):
    """Ask ``study`` for a trial whose random draws depend on (seed, trial number) only.

    Several sweep processes sharing a study run the same command, so one seeded sampler per
    process would draw the same points in each of them (two processes trained every random
    start-up configuration twice). Each trial is therefore sampled by a sampler seeded from
    ``(seed, trial.number)``: the study's points are the same whether one process asks for them
    or several, and reproducible from the seed. The samplers keep no state of their own between
    trials (TPE and random read the study; CMA-ES keeps its state in the study's trials). The
    grid sampler is the exception: it gives trial n the n-th point of a grid shuffled by its
    seed, which is already unique across processes as long as they all keep the one seed.
    """
    import warnings

    import optuna

    with warnings.catch_warnings():
        # The sweeper records its trials' heartbeats itself (class Heartbeats).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        if sampler == "grid":
            study.sampler = build_sampler(sampler, seed, space, sampler_args)
            trial = study.ask()
        else:
            trial = study.ask()  # draws nothing yet: the parameters are suggested below
    if sampler != "grid":
        study.sampler = build_sampler(sampler, trial_seed(seed, trial.number), space, sampler_args)
    for name, dist in space.items():
        if isinstance(dist, optuna.distributions.FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_categorical(name, dist.choices)
    return trial


def grid_exhausted(study, grid_sampler) -> bool:
    """Whether every point of ``grid_sampler``'s grid has been taken by a trial (running or
    ended) and no enqueued trial waits: Optuna's GridSampler would then draw a point again (a
    duplicate trial, where a running one's point is drawn before it has ended)."""
    import optuna

    taken = set()
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            return False
        if "grid_id" in t.system_attrs and grid_sampler._same_search_space(
            t.system_attrs["search_space"]
        ):
            taken.add(t.system_attrs["grid_id"])
    return len(taken) >= grid_sampler._n_min_trials


def config_key(fixed: list[str]) -> str:
    """The ``config_key`` of trials run with the fixed overrides ``fixed``."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(fixed)).encode()).hexdigest()[:16]


def finished_twin(study, trial, key: str):
    """The first COMPLETE or PRUNED trial of the study with ``trial``'s parameters and config
    key (the same experiment, so the same result: training is deterministic), else None.

    Samplers draw a point again (TPE does, often, in a small categorical space); training it
    again resumed its finished checkpoint, so cost an evaluation and a full trial of the
    compute budget, and two processes training one point at once shared a checkpoint file."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=done):
        if t.number != trial.number and t.user_attrs.get(CONFIG_ATTR) == key:
            if t.params == trial.params:
                return t
    return None


def tell_as_twin(study, trial, twin) -> str:
    """Tell ``trial`` the outcome of ``twin`` (a trial of the same experiment that has ended)."""
    import optuna

    TrialState = optuna.trial.TrialState
    trial.set_user_attr(DUPLICATE_ATTR, twin.number)
    if twin.state == TrialState.COMPLETE:
        tell(study, trial, twin.value)
        return f"done (as trial {twin.number})"
    if twin.state == TrialState.PRUNED:
        tell(study, trial, state=TrialState.PRUNED)
        return f"PRUNED (as trial {twin.number})"
    trial.set_user_attr(ERROR_ATTR, f"the same experiment as trial {twin.number}, which failed")
    tell(study, trial, state=TrialState.FAIL)
    return f"FAILED (as trial {twin.number})"


def finished_trials(study) -> int:
    """Trials of the study that ran to an end (complete, pruned or failed), in every process."""
    return sum(t.state.is_finished() and counted(t) for t in study.get_trials(deepcopy=False))


def counted(t) -> bool:
    """Whether trial ``t`` takes a place in the study (not over budget, not interrupted)."""
    return not any(attr in t.user_attrs for attr in NOT_COUNTED)


def iterations_spent(
    study,
    full: int,
    *,
    below: int | None = None,
    finished_only: bool = False,
    waiting: bool = True,
) -> int:
    """Training iterations the study's trials used or hold (of trials numbered < ``below``;
    with ``finished_only``, of the trials that ended; without ``waiting``, not counting the
    enqueued trials that no process has taken yet).

    A pruned trial costs its ``pruned_at`` step (also while it is still RUNNING, between the job
    stopping and the sweeper's tell); a complete or failed trial costs ``full``; a running or
    waiting one holds ``full``, since it may train to the end. Trials marked ``over_budget``
    never ran and cost nothing; an ``interrupted`` one costs nothing either, since its retry
    resumes from its checkpoint and is counted in full.
    """
    import optuna

    from retina_sweep.optuna_pruning import PRUNED_ATTR

    total = 0
    for t in study.get_trials(deepcopy=False):
        if not counted(t) or (below is not None and t.number >= below):
            continue
        if DUPLICATE_ATTR in t.user_attrs:
            continue  # never trains: told its twin's outcome
        if finished_only and not t.state.is_finished():
            continue
        if not waiting and t.state == optuna.trial.TrialState.WAITING:
            continue
        total += int(t.user_attrs.get(PRUNED_ATTR, full))
    return total


def tell(study, trial, value: float | None = None, state=None) -> None:
    """``study.tell`` that survives the grid sampler's end of grid.

    Optuna's GridSampler calls ``study.stop()`` after the last grid point is told, which raises
    outside ``study.optimize``; the trial's state and value are stored before that (Optuna
    writes them in a ``finally``), and this sweeper stops at the end of the grid itself
    (``grid_exhausted``). A trial that has already ended (another process retried it as
    abandoned) is left as it is.
    """
    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def host_id() -> str:
    """This host as its processes see it: the host name and the PID namespace (containers that
    share a host name, e.g. with host networking, do not see each other's pids)."""
    try:
        ns = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{ns}" if ns else socket.gethostname()


def process_id() -> str:
    """This process as ``host:pid:start time``: a pid alone may be reused after a reboot."""
    return f"{host_id()}:{os.getpid()}:{_start_time(os.getpid()) or ''}"


def process_gone(owner: str) -> bool:
    """Whether the process ``owner`` (a ``process_id()``) has ended. Only a process on this host
    can be checked; one elsewhere is taken as alive."""
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != host_id() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid() or not 0 < pid < 2**22:  # (Linux's pid_max is at most 2**22)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    now = _start_time(pid)
    return bool(started and now and now != started)  # the pid is another process's now


def give_back(study, trial_number: int, reason: str) -> bool:
    """Fail RUNNING trial ``trial_number`` as interrupted and enqueue its parameters again.

    Returns False (and enqueues nothing) when the trial had already ended, e.g. when another
    process resuming the same study failed it first: its retry is then that process's. A trial
    that its job had pruned (``pruned_at`` set) before the sweep could tell it is told PRUNED.
    """
    import optuna

    from retina_sweep.optuna_pruning import PRUNED_ATTR

    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    try:
        if PRUNED_ATTR in storage.get_trial(trial_id).user_attrs:
            storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.PRUNED)
            return False
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, reason)
        if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    frozen = storage.get_trial(trial_id)
    study.enqueue_trial(dict(frozen.params), user_attrs={RETRY_ATTR: trial_number})
    return True


def heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval in seconds (a database storage made with one), or None."""
    from optuna.storages._heartbeat import BaseHeartbeat  # what Optuna's own check uses

    if isinstance(storage, BaseHeartbeat):  # a study wraps its RDBStorage in a cache
        return storage.get_heartbeat_interval() or None
    return None


def retry_abandoned_trials(study) -> list[int]:
    """Fail and enqueue again the RUNNING trials whose sweeper process is gone (killed with
    SIGKILL, by the OOM killer, or with its machine): Optuna keeps them RUNNING for ever, where
    they held a place of n_trials and a full trial of the compute budget. A process on this host
    is checked directly; on a database storage with heartbeats, a trial whose heartbeat is stale
    is abandoned wherever its process ran. The numbers retried."""
    import optuna

    storage = study._storage
    stale: set[int] = set()
    if heartbeat_interval(storage):
        stale = set(storage._get_stale_trial_ids(study._study_id))
    me = process_id()
    retried = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        if not isinstance(owner, str) or owner == me:
            continue  # a trial of this process, or of a version that did not record its owner
        if owner.partition(":")[0] == host_id():  # checked directly, not by heartbeats
            if not process_gone(owner):
                continue
            reason = f"its sweeper process {owner} ended"
        elif t._trial_id in stale:
            reason = f"the heartbeat of its sweeper process {owner} stopped"
        else:
            continue
        if give_back(study, t.number, reason):
            retried.append(t.number)
    return retried


class Heartbeats:
    """A thread that records the heartbeat of the trials ``trial_ids()`` returns every
    ``heartbeat_interval(storage)`` seconds, from ``start()`` to ``close()`` (none without an
    interval: a journal storage, or ``heartbeat_s`` null)."""

    def __init__(self, storage, trial_ids) -> None:
        import threading

        self.storage, self.trial_ids = storage, trial_ids
        self.interval = heartbeat_interval(storage)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeats", daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            for trial_id in list(self.trial_ids()):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a database hiccup: the next beat may land
                    log.warning("heartbeat of trial id %s not recorded: %s", trial_id, exc)
            self.stop.wait(self.interval)

    def beat_now(self) -> None:
        """Record the heartbeats at once (a new trial, before its first interval ends)."""
        if self.interval:
            for trial_id in list(self.trial_ids()):
                self.storage.record_heartbeat(trial_id)

    def start(self) -> None:
        if self.interval:
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def end_abandoned_runs(parent, number: int, reason: str) -> list[str]:
    """End the MLflow child runs of trial ``number`` still RUNNING under ``parent`` (a
    ``retina_sweep.sweep.ParentRun``) as KILLED, outcome ``killed``: a trial process killed with
    SIGKILL cannot close its own run, which said RUNNING for ever. The run ids ended."""
    from mlflow.entities import RunTag

    from retina_sweep.tracking import retry

    runs = retry(
        lambda: parent.mlf.search_runs(
            [parent.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent.run_id}' AND "
                f"tags.optuna_trial = '{int(number)}' AND attributes.status = 'RUNNING'"
            ),
        )
    )
    tags = [RunTag("outcome", "killed"), RunTag("error", reason)]
    for r in runs:
        retry(lambda r=r: parent.mlf.log_batch(r.info.run_id, tags=tags))
        retry(lambda r=r: parent.mlf.set_terminated(r.info.run_id, status="KILLED"))
    return [r.info.run_id for r in runs]


def build_pruner(name: str, args: dict[str, Any]):
    import optuna

    makers = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    if name not in makers:
        raise ValueError(f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)}, got {name!r}")
    if name == "none":
        # A preset's pruner_args stay in place when the command line turns pruning off.
        return optuna.pruners.NopPruner()
    return makers[name](**dict(args or {}))


def _plain(args: Any) -> dict[str, Any]:
    """A config mapping (DictConfig, dict or None) as plain, JSON-able Python."""
    if isinstance(args, DictConfig):
        return dict(OmegaConf.to_container(args, resolve=True))
    return dict(args or {})


def pruner_arguments(name: str, args: Any) -> dict[str, Any]:
    """The constructor arguments of pruner ``name`` from ``hydra.sweeper.pruner_args``.

    Either flat (``{min_resource: 100, max_resource: 400}``, for the configured pruner) or keyed
    by pruner name (``{hyperband: {...}, median: {...}}``), so that a preset can carry tuned
    arguments for several pruners and ``hydra.sweeper.pruner=NAME`` alone switches among them
    (a pruner missing from the mapping gets Optuna's defaults). Keys that mix the two forms are
    taken as flat, and the pruner's constructor rejects them with the key named."""
    flat = _plain(args)
    if flat and all(k in PRUNERS for k in flat):
        return _plain(flat.get(name))
    return flat


def to_distribution(override) -> Any:
    """A Hydra sweep override -> an Optuna distribution (``ConfigError`` naming the key when
    Optuna rejects it: an empty choice, an interval with its ends swapped, a log scale from 0)."""
    import optuna.distributions as d

    from retina_sweep.config import ConfigError

    value = override.value()
    key = override.get_key_element()
    try:
        if isinstance(value, ChoiceSweep | RangeSweep):
            return d.CategoricalDistribution(list(override.sweep_iterator()))
        if isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                return d.IntDistribution(int(value.start), int(value.end), log=log_scale)
            return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    except ValueError as exc:
        raise ConfigError(f"hydra.sweeper.params: {key}: {exc}") from None
    raise ConfigError(
        f"hydra.sweeper.params: {key}: {override.input_line} is not a sweep (choice, range or "
        "interval)"
    )


def probe_values(dist) -> list[Any]:
    """Values of ``dist`` to check before a study starts: every choice of a categorical, both
    ends of an int interval, and a float interval's ends moved inward by one ulp (a sampler never
    draws an end exactly, so an open bound such as alpha < 1 may be an end)."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, d.IntDistribution):
        return sorted({dist.low, dist.high})
    if dist.low == dist.high:
        return [dist.low]
    return [math.nextafter(dist.low, dist.high), math.nextafter(dist.high, dist.low)]


@contextlib.contextmanager
def stop_before_trials(prefix: str, retina: bool):
    """Bad input found before the study (a ``ConfigError``, for retina_sweep's config also a
    ``DatasetError``): one line on stderr, ``{prefix}: {message}``, and exit status 2."""
    from retina_sweep.config import ConfigError

    if retina:
        from retina_sweep.config import exit_on_bad_input

        with exit_on_bad_input(prefix):
            yield
        return
    try:
        yield
    except ConfigError as exc:
        import sys

        print(f"{prefix}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class RetinaOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        self.opts = RetinaOptunaSweeperConf(**kwargs)
        if self.opts.sampler not in SAMPLERS:
            raise ValueError(
                f"hydra.sweeper.sampler must be one of {', '.join(SAMPLERS)}, "
                f"got {self.opts.sampler!r}"
            )
        if self.opts.pruner not in PRUNERS:
            raise ValueError(
                f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)}, "
                f"got {self.opts.pruner!r}"
            )
        if self.opts.direction not in ("maximize", "minimize"):
            raise ValueError(
                f"hydra.sweeper.direction must be maximize or minimize, got {self.opts.direction!r}"
            )
        if int(self.opts.n_trials) < 1 or int(self.opts.n_jobs) < 1:
            raise ValueError("hydra.sweeper.n_trials and n_jobs must be >= 1")
        self.opts.grace_s = check_grace(self.opts.grace_s, key="hydra.sweeper.grace_s")
        beat = self.opts.heartbeat_s
        if beat is not None and (isinstance(beat, bool) or not isinstance(beat, int) or beat < 0):
            raise ValueError(
                f"hydra.sweeper.heartbeat_s must be null or an integer >= 0, got {beat!r}"
            )
        budget = self.opts.compute_budget
        if budget is not None and not (
            isinstance(budget, int | float) and not isinstance(budget, bool) and budget >= 1
        ):
            raise ValueError(
                "hydra.sweeper.compute_budget must be null or a number >= 1 (full trials' worth "
                f"of train.iterations), got {budget!r}"
            )
        # Bad constructor arguments fail here, naming the key, before any trial runs.
        self.pruner_args = pruner_arguments(self.opts.pruner, self.opts.pruner_args)
        try:
            build_pruner(self.opts.pruner, self.pruner_args)
        except TypeError as exc:
            raise ValueError(f"hydra.sweeper.pruner_args: {exc}") from exc
        if self.opts.sampler != "grid":  # a grid sampler needs the search space
            try:
                build_sampler(self.opts.sampler, 0, {}, self.opts.sampler_args)
            except TypeError as exc:
                raise ValueError(f"hydra.sweeper.sampler_args: {exc}") from exc
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any], dict[str, str]]:
        """(fixed overrides, the search space, each searched key's override as written)."""
        from retina_sweep.config import ConfigError

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in (self.opts.params or {}).items()]
        space: dict[str, Any] = {}
        written: dict[str, str] = {}
        fixed: list[str] = []
        for override in parser.parse_overrides(lines + list(arguments)):
            if override.is_sweep_override():
                space[override.get_key_element()] = to_distribution(override)
                written[override.get_key_element()] = override.input_line
            else:
                fixed.append(override.input_line)
        if not space:
            raise ConfigError(
                "the Optuna sweeper needs a search space: hydra.sweeper.params or a sweep on "
                "the command line, e.g. 'loss.gamma=interval(0,5)'"
            )
        return fixed, space, written

    def _storage_spec(self) -> tuple[str, str]:
        cfg = self.config
        name = self.opts.study_name or OmegaConf.select(cfg, "sweep.name") or "retina_sweep"
        if self.opts.storage:
            # Absolute, so that every job (another cwd, another node) opens the same study.
            return absolute_storage(str(self.opts.storage)), str(name)
        root = Path(OmegaConf.select(cfg, "paths.root", default="sweeps"))
        return f"journal:{(root / str(name) / 'optuna_journal.log').resolve()}", str(name)

    def sweep(self, arguments: list[str]) -> Any:
        # SIGTERM (a scheduler's time limit, `kill`) closes the parent run as KILLED, as Ctrl-C
        # does, instead of ending the process with the parent RUNNING; worker processes get
        # either signal forwarded and `grace_s` seconds to record their trials
        # (retina_sweep.signals).
        # Hydra's launchers log every job's overrides, the storage URL among them (the job's
        # pruning callback connects with it): its password is logged as ***.
        from retina_sweep.tracking import redacted_log_records

        with terminate_as_interrupt(grace_s=self.opts.grace_s), redacted_log_records():
            return self._sweep(arguments)

    def _retina(self) -> bool:
        """Whether the task is retina_sweep's (not the tests' stand-in app)."""
        return OmegaConf.select(self.config, "data.kind") is not None

    def _compose(self, overrides: list[str], key: str | None = None) -> DictConfig:
        from hydra.errors import ConfigCompositionException

        from retina_sweep.config import ConfigError

        try:
            return self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides)
            )
        except ConfigCompositionException as exc:
            text = str(exc)
            if key and text.startswith(f"Could not override '{key}'"):
                message = f"not a key of the config (a new key is searched as +{key})"
            else:  # e.g. a config group's missing option, with the options there are
                message = " ".join(text.split("Config search path")[0].split())
            where = f"hydra.sweeper.params: {key}: " if key else ""
            raise ConfigError(f"{where}{message}") from None

    def _check_space(self, fixed: list[str], space: dict[str, Any], written: dict[str, str]):
        """Every searched key composed with the values the search can draw (its choices, its
        interval's ends) and, for retina_sweep, validated: an unknown key or an out-of-range
        value stops the sweep before the study opens, naming the key, instead of failing every
        trial (or, for an unknown key, crashing the sweep at its first launch)."""
        from retina_sweep.config import ConfigError, validate
        from retina_sweep.sweep import format_value

        for key, dist in space.items():
            for value in probe_values(dist):
                cfg = self._compose([*fixed, f"{key}={format_value(value)}"], key)
                if self._retina():
                    try:
                        validate(cfg)
                    except ConfigError as exc:
                        raise ConfigError(f"search space {written[key]}: {exc}") from None

    def _check_base(self, fixed: list[str]) -> None:
        """The study's base config (without the searched keys) validated before the study is
        opened: as the grid sweeper does, a bad value stops here with one line and exit status
        2, not in every trial. (What the trials share, synthetic data and pretrained backbone,
        is made, or a COCO root checked, once the storage has opened.)"""
        if not self._retina():
            return  # not retina_sweep's config (the tests' stand-in app): nothing to check
        from retina_sweep.config import OBJECTIVES, ConfigError, validate

        if self.opts.metric not in OBJECTIVES:
            raise ConfigError(
                f"invalid config value hydra.sweeper.metric={self.opts.metric!r}: the study's "
                f"objective is a final metric of the trials, one of {', '.join(OBJECTIVES)}"
            )
        validate(self._compose(fixed))

    def _sweep(self, arguments: list[str]) -> Any:
        import optuna

        from retina_sweep.config import ConfigError
        from retina_sweep.optuna_pruning import PRUNED_ATTR
        from retina_sweep.sweep import Progress, format_value
        from retina_sweep.tracking import redact

        name = OmegaConf.select(self.config, "sweep.name") or "optuna"
        with stop_before_trials(f"[{name}] stopped before any trial", self._retina()):
            fixed, space, written = self._space(arguments)
            self._check_base(fixed)
            self._check_space(fixed, space, written)
            full, max_iterations = self._iteration_budget()
            sampler = build_sampler(
                self.opts.sampler, int(self.opts.seed), space, self.opts.sampler_args
            )
            spec, study_name = self._storage_spec()
            storage = open_storage(spec, self.opts.heartbeat_s)
            if self._retina():
                from retina_sweep.train import prepare

                prepare(self._compose(fixed))
            study = optuna.create_study(
                study_name=study_name,
                storage=storage,
                sampler=sampler,
                pruner=build_pruner(self.opts.pruner, self.pruner_args),
                direction=self.opts.direction,
                load_if_exists=True,
            )
            if study.direction.name.lower() != self.opts.direction:
                # create_study(load_if_exists=True) keeps the stored direction, silently.
                raise ConfigError(
                    f"hydra.sweeper.direction={self.opts.direction}: the study {study_name!r} in "
                    f"the storage {study.direction.name.lower()}s (a study's direction is fixed "
                    "when it is created: give another hydra.sweeper.study_name)"
                )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # As OmegaConf.save writes it, with the password of a storage or tracking URL as ***.
        (sweep_dir / "multirun.yaml").write_text(redact(OmegaConf.to_yaml(self.config)))
        n_trials = int(self.opts.n_trials)
        parent = self._parent(study_name, spec, space)
        if max_iterations is None:
            progress = Progress(n_trials, name=f"optuna:{study_name}", done=finished_trials(study))
        else:
            # With a compute budget the study's end is counted in iterations, not trials.
            progress = Progress(
                max_iterations,
                name=f"optuna:{study_name} iterations",
                done=iterations_spent(study, full, finished_only=True),
            )
        returns = []
        job_idx = 0
        status = "FINISHED"
        ran = failed = 0  # trials this process launched, and those told FAIL
        owner = process_id()
        key = config_key(fixed)
        trials: list[Any] = []  # asked and not yet told
        twins: list[tuple[Any, Any]] = []  # (trial, the trial of this batch it repeats)
        heartbeats = Heartbeats(
            study._storage, lambda: [t._trial_id for t in [*trials, *(t for t, _ in twins)]]
        )
        heartbeats.start()
        try:
            while True:
                for number in retry_abandoned_trials(study):
                    print(
                        f"[optuna:{study_name}] trial {number} was left RUNNING by a process "
                        "that ended (or whose heartbeat stopped): told FAIL (interrupted), its "
                        "parameters enqueued again"
                    )
                    if parent is not None:
                        end_abandoned_runs(parent, number, "its sweeper process ended (killed)")
                # Enqueued trials (retries) are not counted: this process takes them next.
                TrialState = optuna.trial.TrialState
                taken = sum(
                    counted(t) and t.state != TrialState.WAITING
                    for t in study.get_trials(deepcopy=False)
                )
                batch = min(int(self.opts.n_jobs), n_trials - taken)
                if batch <= 0:
                    break
                trials, twins, told_twins = [], [], False
                for _ in range(batch):
                    if self.opts.sampler == "grid" and grid_exhausted(study, sampler):
                        print(f"[optuna:{study_name}] grid exhausted: every point has a trial")
                        break
                    if max_iterations is not None:
                        held = iterations_spent(study, full, waiting=False)
                        if held + full > max_iterations:
                            print(
                                f"[optuna:{study_name}] compute budget: {held} of "
                                f"{max_iterations} iterations spent or held by running trials; "
                                "no new trial fits"
                            )
                            break
                    trial = ask_trial(
                        study,
                        space,
                        sampler=self.opts.sampler,
                        seed=int(self.opts.seed),
                        sampler_args=self.opts.sampler_args,
                    )
                    trial.set_user_attr(OWNER_ATTR, owner)
                    trial.set_user_attr(CONFIG_ATTR, key)
                    if not self._fits(study, trial.number, n_trials, full, max_iterations):
                        # Another process took the last slot (or the last of the compute
                        # budget) between our count and this ask: the lower number keeps it.
                        trial.set_user_attr(OVER_BUDGET_ATTR, True)
                        tell(study, trial, state=TrialState.FAIL)
                        continue
                    twin = finished_twin(study, trial, key)
                    if twin is not None:  # the same experiment has run: its outcome, no training
                        state_name = tell_as_twin(study, trial, twin)
                        self._progress(study, progress, trial, state_name, full, max_iterations)
                        told_twins = True
                        continue
                    same = next((t for t in trials if t.params == trial.params), None)
                    if same is not None:  # repeats a trial of this batch: told after it
                        twins.append((trial, same))
                        continue
                    trials.append(trial)
                if not trials:
                    if told_twins:
                        continue
                    break
                if parent is not None:
                    # Another sweeper may have created a parent of the study at the same moment
                    # (a tracking server has no lock): launch under the one they all keep.
                    parent.resolve_duplicates()
                overrides = []
                for trial in trials:
                    params = [f"{k}={format_value(v)}" for k, v in trial.params.items()]
                    label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trial.params.items())
                    pruning = (
                        "pruning={_target_:retina_sweep.optuna_pruning.OptunaPruningCallback,"
                        f"storage:{format_value(spec)},study_name:{format_value(study_name)},"
                        f"trial_number:{trial.number},metric:{self.opts.metric},"
                        f"pruner:{self.opts.pruner},"
                        f"pruner_args:{format_value(self.pruner_args)}}}"
                    )
                    extra = [pruning, f"+extra_tags.optuna_trial={trial.number}"]
                    if self._retina():
                        # The trial returns the study's metric (its final value) as objective.
                        extra.append(f"objective={self.opts.metric}")
                    extra.append(f"sweep.cell={format_value(label)}")
                    if parent is not None:
                        extra.append(f"tracking.parent_run_id={parent.run_id}")
                    overrides.append(fixed + params + extra)
                heartbeats.beat_now()
                results = self.launcher.launch(overrides, initial_job_idx=job_idx)
                job_idx += len(overrides)
                for trial, result in zip(list(trials), results, strict=True):
                    state_name = self._tell(study, trial, result, PRUNED_ATTR)
                    trials.remove(trial)
                    ran += 1
                    failed += state_name.startswith("FAILED")
                    self._progress(study, progress, trial, state_name, full, max_iterations)
                for trial, same in list(twins):
                    state_name = tell_as_twin(
                        study, trial, study._storage.get_trial(same._trial_id)
                    )
                    twins.remove((trial, same))
                    self._progress(study, progress, trial, state_name, full, max_iterations)
                returns.append(list(results))
            if ran and failed == ran:
                status = "FAILED"  # nothing this process trained gave an objective
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            # Trials in flight did not end: fail them and enqueue them again, so that the next
            # process on the study runs them (resuming from their checkpoints) instead of their
            # staying RUNNING, each holding a place in the study for ever.
            reason = f"the sweep ended with {type(exc).__name__}"
            for trial in [*trials, *(t for t, _ in twins)]:
                if give_back(study, trial.number, reason):
                    print(f"[optuna:{study_name}] trial {trial.number} interrupted: enqueued again")
            raise
        finally:
            heartbeats.close()
            if parent is not None:
                summary = parent.close(status=status, metric=self.opts.metric)
                print(f"[optuna:{study_name}] MLflow parent run {parent.run_id}: {summary}")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            print(
                f"[optuna:{study_name}] best trial {best.number}: "
                f"{self.opts.metric}={best.value:.3f} {best.params}"
            )
        if status == "FAILED":
            # A script or a cluster job must see it (each trial's `error` user attribute and
            # MLflow tag say why); a study where only some trials failed has a result: exit 0.
            print(f"[optuna:{study_name}] every trial this process ran FAILED ({failed})")
            raise SystemExit(1)
        return returns

    @staticmethod
    def _progress(study, progress, trial, state_name: str, full: int, max_iterations) -> None:
        """One progress line for ``trial``, counted over all processes on the study."""
        value = study._storage.get_trial(trial._trial_id).value
        if max_iterations is None:
            done = finished_trials(study)
        else:
            done = iterations_spent(study, full, finished_only=True)
        progress.update(f"trial {trial.number}", value, state_name, done=done)

    @staticmethod
    def _fits(study, number: int, n_trials: int, full: int, max_iterations: int | None) -> bool:
        """Whether trial ``number`` is within n_trials and the compute budget, counting only the
        trials numbered before it (so two processes racing for the last place agree)."""
        before = [t for t in study.get_trials(deepcopy=False) if t.number < number and counted(t)]
        if len(before) >= n_trials:
            return False
        if max_iterations is None:
            return True
        return iterations_spent(study, full, below=number) + full <= max_iterations

    def _iteration_budget(self) -> tuple[int, int | None]:
        """(train.iterations of a full trial, the study's iteration budget or None)."""
        full = OmegaConf.select(self.config, "train.iterations", default=None)
        budget = self.opts.compute_budget
        if budget is None:
            return int(full or 0), None
        if not isinstance(full, int) or full < 1:
            from retina_sweep.config import ConfigError

            raise ConfigError(
                "hydra.sweeper.compute_budget counts full trials of train.iterations, but the "
                f"config's train.iterations is {full!r}"
            )
        return full, int(math.floor(float(budget) * full))

    def _tell(self, study, trial, result, pruned_attr: str) -> str:
        import optuna

        from retina_sweep.tracking import redact

        TrialState = optuna.trial.TrialState
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state.is_finished():
            # Another process took the trial for abandoned (its heartbeat was late) and retried
            # it: its state stays, and the retry runs; a tell here raised and ended the sweep.
            log.warning("trial %d had already ended %s", trial.number, frozen.state.name)
            return f"{frozen.state.name} (already, by another process)"
        if result.status != JobStatus.COMPLETED:
            exc = getattr(result, "_return_value", None)  # the job's exception
            error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else "failed"
            trial.set_user_attr(ERROR_ATTR, redact(error)[:1000])
            tell(study, trial, state=TrialState.FAIL)
            return "FAILED"
        frozen = study._storage.get_trial(trial._trial_id)
        if pruned_attr in frozen.user_attrs:
            tell(study, trial, state=TrialState.PRUNED)
            return "PRUNED"
        value = result.return_value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            trial.set_user_attr(ERROR_ATTR, f"no objective: the job returned {value}")
            tell(study, trial, state=TrialState.FAIL)
            return "FAILED (no objective)"
        tell(study, trial, float(value))
        return "done"

    def _parent(self, study_name: str, spec: str, space: dict[str, Any]):
        cfg = self.config
        if not OmegaConf.select(cfg, "tracking.enabled", default=False):
            return None
        from retina_sweep.sweep import ParentRun, sweep_hash
        from retina_sweep.tracking import client, redact

        # The parent records the storage without its password, and is found by it (so the
        # tag sweep_hash is no digest of the password either).
        shown = redact(spec)
        definition = {
            "study_name": study_name,
            "storage": shown,
            "sampler": self.opts.sampler,
            "seed": self.opts.seed,
            "sampler_args": _plain(self.opts.sampler_args),
            "pruner": self.opts.pruner,
            "pruner_args": self.pruner_args,
            "n_trials": int(self.opts.n_trials),
            "compute_budget": self.opts.compute_budget,
            "space": {k: repr(v) for k, v in space.items()},
        }
        return ParentRun.open(
            client(cfg.tracking.uri),
            cfg.tracking.experiment,
            name=OmegaConf.select(cfg, "sweep.name") or study_name,
            table=OmegaConf.select(cfg, "sweep.table"),
            shash=sweep_hash(f"optuna:{study_name}:{shown}", []),
            definition=definition,
            kind="optuna",
        )
