"""Optuna on the job side: the shared study storage, and the pruning callback a trial runs.

The Optuna sweeper (`hydra_plugins/retina_sweep_optuna`) asks the study for a trial, launches the
job with `pruning=` set to `OptunaPruningCallback(storage, study_name, trial_number)`, and the
trainer calls `report(step, metrics)` after every periodic evaluation. The callback writes the
intermediate value to the study *through the shared storage* (a journal file or a database, so
it works from another process or machine) and asks the study's pruner whether to stop. When the
trainer stops, `pruned(step)` records the step as a trial user attribute; the sweeper then tells
the study PRUNED, and the MLflow run ends with outcome `pruned` (status KILLED, tag
`pruned_at`), never FAILED.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["make_storage", "OptunaPruningCallback", "PRUNED_ATTR"]

PRUNED_ATTR = "pruned_at"

log = logging.getLogger(__name__)
# A trial is stale when its heartbeat is this many heartbeat intervals old.
HEARTBEAT_GRACE = 5


def make_storage(spec: str, *, heartbeat_s: int | None = None):
    """`journal:/path/file.log` -> a JournalStorage (safe for processes on one machine);
    anything else is a database URL (sqlite:///..., postgresql://...) -> an RDBStorage, with
    Optuna's trial heartbeats every ``heartbeat_s`` seconds (a trial whose heartbeat is
    ``HEARTBEAT_GRACE`` intervals old is stale) when given."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    beats: dict[str, Any] = {}
    if heartbeat_s:
        beats = {"heartbeat_interval": heartbeat_s, "grace_period": HEARTBEAT_GRACE * heartbeat_s}
    # Two sweeps started at once on a fresh database both try to create Optuna's schema; the
    # loser's CREATE fails. Retry: the second attempt finds the schema made by the winner.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec, **beats)
        except Exception as exc:
            text = str(exc).lower()
            if attempt == 4 or not ("already exists" in text or "duplicate" in text):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class OptunaPruningCallback:
    """`report(step, metrics) -> bool` (True = stop) for one trial of a shared Optuna study."""

    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        trial_number: int,
        metric: str = "AP",
        pruner: str = "none",
        pruner_args: dict[str, Any] | None = None,
    ) -> None:
        import optuna

        from hydra_plugins.retina_sweep_optuna.optuna_sweeper import build_pruner

        self.metric = metric
        # The pruner is not stored with the study: the job rebuilds the sweeper's own.
        self.study = optuna.load_study(
            study_name=study_name,
            storage=make_storage(storage),
            pruner=build_pruner(pruner, dict(pruner_args or {})),
        )
        storage_obj = self.study._storage
        self.trial_id = storage_obj.get_trial_id_from_study_id_trial_number(
            self.study._study_id, int(trial_number)
        )
        self.trial = optuna.trial.Trial(self.study, self.trial_id)

    def report(self, step: int, metrics: dict[str, Any]) -> bool:
        import optuna

        value = metrics.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        try:
            self.trial.report(float(value), int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            # A sweep took the trial for abandoned (its heartbeat was late) and enqueued it
            # again: stop, rather than train on beside the retry into the same checkpoints.
            log.warning("trial %d has already ended in the study: stopping", self.trial.number)
            return True
        return bool(self.trial.should_prune())

    def pruned(self, step: int) -> float:
        import optuna

        try:
            self.study._storage.set_trial_user_attr(self.trial_id, PRUNED_ATTR, int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # ended already (see report): its state in the study stays
        return math.nan
