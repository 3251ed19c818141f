"""Sweep machinery shared by the Hydra sweepers of retina_sweep (grid and Optuna).

A sweep preset (`conf/sweep/*.yaml`) describes its cells as data:

    sweep:
      name: anchors
      table: 1c
      grid:                      # crossed: every combination (a product)
        loss.alpha: [0.25, 0.5]
      rows:                      # listed: one cell per row, not crossed with each other
        - {model.anchors.scales_per_octave: 1, model.anchors.aspect_ratios: [1.0]}
        - {model.anchors.scales_per_octave: 3, model.anchors.aspect_ratios: [0.5, 1.0, 2.0]}

Cells = (command-line sweeps) x grid x rows, each repeated for `sweep.seeds` seeds; a command-line
value (swept or fixed) of a key the grid sweeps replaces that axis. A key may also be a config
group (`loss: [focal, ohem]`). This module turns that into Hydra override lists,
finds the cells that already have a FINISHED MLflow run (resume), and keeps the sweep's MLflow
parent run: created when the sweep starts, reused when the same sweep is launched again, closed
with a summary of its children.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "Cell",
    "SweepError",
    "format_value",
    "expand_cells",
    "unique_cells",
    "add_table_tag",
    "finished_hashes",
    "ParentRun",
    "Progress",
    "latest_per_cell",
]

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")


def format_value(value: Any) -> str:
    """A Python value as Hydra override syntax (`[0.5,1.0]`, `null`, `true`, `'a b'`)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


@dataclass
class Cell:
    """One trial of a sweep: its overrides (beyond the base command line) and a label."""

    overrides: dict[str, Any]
    seed: int
    label: str = ""
    config_hash: str | None = None
    extra: list[str] = field(default_factory=list)

    def override_list(self) -> list[str]:
        out = [f"{k}={format_value(v)}" for k, v in self.overrides.items()]
        return out + [f"seed={self.seed}", f"sweep.cell={format_value(self.label)}"] + self.extra


class SweepError(ValueError):
    """A sweep's cells cannot be expanded as asked (an empty axis, a key set twice). The message
    names the key; the grid sweeper prints it and exits with status 2 before any trial."""


def expand_cells(
    *,
    grid: Mapping[str, Sequence[Any]] | None,
    rows: Sequence[Mapping[str, Any]] | None,
    cli_sweeps: Mapping[str, Sequence[Any]] | None = None,
    seeds: int = 1,
    base_seed: int = 0,
    cli_fixed: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """All cells of a sweep in a stable order: cli x grid x rows, then seeds innermost.

    A command-line value of a key the grid sweeps replaces that axis, in the grid's place: a
    command-line sweep (`cli_sweeps`, `loss.gamma=0,2`) by its values, a fixed value
    (`cli_fixed`, `loss.alpha=0.25`) by that one value. `cli_fixed` may hold every fixed
    command-line override; those of keys outside the grid and the rows are left to the caller.
    A key the rows set cannot be given on the command line (a row is one listed combination;
    the rows would overwrite the value): `SweepError` naming the key.

    Config-group keys (no dot, e.g. `loss`) are put first in each cell so that Hydra selects the
    group before the keys inside it are set.
    """
    grid = dict(grid or {})
    cli_sweeps = dict(cli_sweeps or {})
    cli_fixed = dict(cli_fixed or {})
    row_list = [dict(r) for r in (rows or [])] or [{}]
    row_keys = {k for r in row_list for k in r}
    for k in [*cli_sweeps, *cli_fixed]:
        if k in row_keys:
            raise SweepError(
                f"{k} is set by the preset's sweep.rows, so a command-line value of it would be "
                "overwritten; give the rows you want instead ('sweep.rows=[{...}]')"
            )
    for k in grid:
        if k in cli_fixed:
            grid[k] = [cli_fixed[k]]  # a fixed command-line value: a one-value axis
            cli_sweeps.pop(k, None)
        elif k in cli_sweeps:
            grid[k] = cli_sweeps.pop(k)  # a command-line sweep replaces the preset's axis
    axes: list[tuple[str, list[Any]]] = []
    for source in (cli_sweeps, grid):
        for k, values in source.items():
            values = list(values)
            if not values:
                raise SweepError(f"sweep axis {k} has no values")
            axes.append((k, values))
    if seeds < 1:
        raise SweepError(f"sweep.seeds must be >= 1, got {seeds}")
    cells: list[Cell] = []
    for combo in itertools.product(*[v for _, v in axes]) if axes else [()]:
        for row in row_list:
            overrides: dict[str, Any] = {}
            for (k, _), v in zip(axes, combo, strict=True):
                overrides[k] = v
            for k, v in row.items():
                if k in overrides:
                    raise SweepError(f"sweep key {k} is both a grid axis and in a row")
                overrides[k] = v
            overrides = dict(sorted(overrides.items(), key=lambda kv: "." in kv[0]))
            # A swept `seed` is the cell's base seed; `seeds` repeats count up from it. Swept
            # seeds closer than `seeds` apart repeat a seed: `unique_cells` drops the repeats.
            first_seed = int(overrides.pop("seed", base_seed))
            label = ",".join(f"{_short(k)}={format_value(v)}" for k, v in overrides.items())
            for s in range(seeds):
                cells.append(Cell(overrides=overrides, seed=first_seed + s, label=label or "base"))
    return cells


def unique_cells(cells: Sequence[Cell]) -> tuple[list[Cell], list[Cell]]:
    """(the cells, first of each config hash kept, in order; the dropped repeats).

    Two cells with one config hash are one experiment: launched both, they would train it twice
    (and race for its checkpoint). Cells without a hash are all kept.
    """
    kept: list[Cell] = []
    dropped: list[Cell] = []
    seen: set[str] = set()
    for cell in cells:
        if cell.config_hash is not None and cell.config_hash in seen:
            dropped.append(cell)
            continue
        if cell.config_hash is not None:
            seen.add(cell.config_hash)
        kept.append(cell)
    return kept, dropped


ALSO_TABLES_TAG = "also_tables"


def add_table_tag(mlf, run_id: str, table: str) -> None:
    """Record that the finished run `run_id` also fills `table` (tag `also_tables`, comma list).

    Trials are identified by config hash, so a cell two presets share (CE alpha .25 in 1(a) is
    focal gamma 0, alpha .25 in 1(b)) is trained once; the report reads this tag to find it.
    """
    tags = mlf.get_run(run_id).data.tags
    if tags.get("table") == table:
        return
    also = [t for t in tags.get(ALSO_TABLES_TAG, "").split(",") if t]
    if table not in also:
        mlf.set_tag(run_id, ALSO_TABLES_TAG, ",".join([*also, table]))


def finished_hashes(
    mlf, experiment: str, hashes: Iterable[str], *, include_diverged: bool = True
) -> dict[str, str]:
    """config hash -> run id of a FINISHED run with that hash, in `experiment`."""
    hashes = sorted(set(hashes))
    exp = mlf.get_experiment_by_name(experiment)
    if exp is None or not hashes:
        return {}
    found: dict[str, str] = {}
    # MLflow's filter language has no IN / OR for tags: one indexed query per hash.
    for h in hashes:
        runs = mlf.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.config_hash = '{h}' AND attributes.status = 'FINISHED'",
            max_results=50,
            order_by=["attributes.start_time DESC"],
        )
        for r in runs:
            if not include_diverged and r.data.tags.get("outcome") == "diverged":
                continue
            if r.data.tags.get("is_parent") == "true":
                continue
            found[h] = r.info.run_id
            break
    return found


def sweep_hash(name: str | None, hashes: Sequence[str]) -> str:
    blob = json.dumps([name, sorted(hashes)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_per_cell(runs: Iterable[Any]) -> list[Any]:
    """Per config hash, the latest FINISHED run, else the latest run of any status (the rule of
    `retina_sweep.report.core.latest_per_config`, on MLflow `Run` objects); a run without a
    `config_hash` tag is a cell of its own. In the order of their start times."""
    finished: dict[str, Any] = {}
    latest: dict[str, Any] = {}

    def start(r: Any) -> int:
        return getattr(r.info, "start_time", None) or 0

    for r in sorted(runs, key=start):
        key = r.data.tags.get("config_hash") or r.info.run_id
        latest[key] = r
        if r.info.status == "FINISHED":
            finished[key] = r
    return sorted(({**latest, **finished}).values(), key=start)


class ParentRun:
    """The MLflow parent run of a sweep; every trial is its child (`mlflow.parentRunId`)."""

    def __init__(self, mlf, experiment_id: str, run_id: str, shash: str | None = None) -> None:
        self.mlf = mlf
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.shash = shash  # the sweep's `sweep_hash` tag: what finds a duplicate parent

    @staticmethod
    def _parents(mlf, exp_id: str, shash: str) -> list[Any]:
        """The active parent runs of the sweep `shash`, the canonical one first: the earliest
        start time, ties broken by run id, so that every process picks the same."""
        from .tracking import retry

        runs = retry(
            lambda: mlf.search_runs(
                [exp_id],
                filter_string=f"tags.sweep_hash = '{shash}' AND tags.is_parent = 'true'",
                max_results=1000,
                order_by=["attributes.start_time ASC"],
            )
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    @classmethod
    def open(
        cls,
        mlf,
        experiment: str,
        *,
        name: str | None,
        table: str | None,
        shash: str,
        definition: Mapping[str, Any],
        kind: str = "grid",
    ) -> ParentRun:
        """Reuse the parent of the same sweep (same cells) if there is one, else create it.

        Sweeper processes started together (Optuna workers on one study) each look the parent
        up, and each created its own when none existed yet. On a SQLite store the look-up and
        the creation hold the store's `parents` lock. A tracking server (or any other store) has
        no lock all processes share, so a process that created the parent searches again
        (`resolve_duplicates`): of the parents two processes created at once, each picks the
        canonical one (the earliest), and the other is merged into it and deleted.
        """
        from .tracking import experiment_id, git_commit, retry, store_lock

        with store_lock(mlf.tracking_uri, "parents"):
            exp_id = retry(lambda: experiment_id(mlf, experiment))
            existing = cls._parents(mlf, exp_id, shash)
            if existing:
                parent = cls(mlf, exp_id, existing[0].info.run_id, shash)
                parent.resolve_duplicates()  # left by a race of earlier sweeps
                retry(lambda: mlf.update_run(parent.run_id, status="RUNNING"))
                log.info("resuming sweep %s in its MLflow parent run %s", name, parent.run_id)
                return parent
            tags = {
                "is_parent": "true",
                "sweep": name or "",
                "table": table or "",
                "sweep_hash": shash,
                "sweeper": kind,
            }
            commit = git_commit()
            if commit:
                tags["git_commit"] = commit
            run = retry(
                lambda: mlf.create_run(exp_id, run_name=f"sweep:{name or 'multirun'}", tags=tags)
            )
            parent = cls(mlf, exp_id, run.info.run_id, shash)
            retry(lambda: mlf.log_dict(parent.run_id, dict(definition), "sweep/definition.json"))
        parent.resolve_duplicates()
        return parent

    def resolve_duplicates(self) -> str:
        """Make this the sweep's canonical parent run, merging every other active parent of the
        sweep into it (their children re-parented, the duplicate tagged `duplicate_of` and
        deleted). Returns the canonical run id, which `run_id` is from then on.

        Processes racing without a lock may each see only some of the parents created at once,
        but a parent that is not the earliest of those a process sees is not the earliest of
        all: merging it is never wrong, and every process converges on the earliest as soon as
        it sees them all. A sweeper calls this before each launch and `close` calls it, so the
        children a process launched under a parent merged meanwhile follow it. (Start times are
        the creating clients' clocks: a clock behind by more than the race lasts can make a
        later parent the canonical one; children still end up under one parent.)
        """
        if self.shash is None:
            return self.run_id
        runs = self._parents(self.mlf, self.experiment_id, self.shash)
        if not runs:
            return self.run_id  # the store does not show ours yet: nothing to merge with
        canonical = runs[0].info.run_id
        losers = {r.info.run_id for r in runs[1:]}
        if self.run_id != canonical:
            losers.add(self.run_id)
        for run_id in sorted(losers):
            self._merge(run_id, canonical)
        if self.run_id != canonical:
            log.info("MLflow parent run %s merged into %s (same sweep)", self.run_id, canonical)
            self.run_id = canonical
        return canonical

    def _merge(self, loser: str, canonical: str) -> None:
        """Re-parent the children of parent run ``loser`` to ``canonical`` and delete it."""
        from mlflow.entities import RunTag

        from .tracking import retry

        children = retry(
            lambda: self.mlf.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{loser}'",
                max_results=10000,
            )
        )
        moved = [RunTag("mlflow.parentRunId", canonical)]
        for r in children:
            retry(lambda r=r: self.mlf.log_batch(r.info.run_id, tags=moved))
        try:
            retry(lambda: self.mlf.set_tag(loser, "duplicate_of", canonical))
            retry(lambda: self.mlf.delete_run(loser))
        except Exception as exc:  # another process merged it first
            log.debug("duplicate parent run %s not deleted here: %s", loser, exc)

    def children(self) -> list[Any]:
        return self.mlf.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=10000,
        )

    def summarize(self, metric: str = "AP") -> dict[str, Any]:
        """The children counted by cell: per config hash, its latest FINISHED run, else its latest
        run of any status (as the report's `latest_per_config` keeps them), so a relaunch that
        retries a FAILED cell, or `sweep.force=true` recomputing a finished one, does not count
        the cell twice. `status` and `outcome` count those cells, `best_{metric}` is the best of
        them; `runs` counts every child. `iterations_trained` is the compute spent: the training
        iterations (`train.iterations`) of every completed child plus `pruned_at` of every pruned
        one, each run counted, a superseded one too, since its compute was spent."""
        children = self.children()
        counts: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        best, best_run = -math.inf, None
        iterations = 0
        for r in children:
            out = r.data.tags.get("outcome", "unknown")
            if out == "pruned" and "pruned_at" in r.data.tags:
                iterations += int(r.data.tags["pruned_at"])
            elif out == "completed" and "train.iterations" in r.data.params:
                iterations += int(r.data.params["train.iterations"])
        for r in latest_per_cell(children):
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
            out = r.data.tags.get("outcome", "unknown")
            outcomes[out] = outcomes.get(out, 0) + 1
            value = r.data.metrics.get(metric)
            if value is not None and not math.isnan(value) and value > best:
                best, best_run = value, r
        summary = {
            "children": sum(counts.values()),
            "runs": len(children),
            "status": counts,
            "outcome": outcomes,
            f"best_{metric}": None if best_run is None else best,
            "best_run_id": None if best_run is None else best_run.info.run_id,
            "best_cell": None if best_run is None else best_run.data.tags.get("cell"),
            "iterations_trained": iterations,
        }
        return summary

    def settle_children(self) -> list[str]:
        """End the children that recorded their final outcome but are still RUNNING.

        A trial tags its outcome, then sets its status; a process killed between the two (a
        parallel launcher kills its workers right after they were told to stop) leaves a run
        tagged `killed` that says RUNNING forever. The trial's own tag is its last word, so the
        status it maps to is set here. Returns the run ids that were ended.
        """
        from .tracking import OUTCOME_STATUS, retry

        settled = []
        for r in self.children():
            status = OUTCOME_STATUS.get(r.data.tags.get("outcome", ""))
            if r.info.status == "RUNNING" and status is not None:
                retry(lambda r=r, status=status: self.mlf.set_terminated(r.info.run_id, status))
                settled.append(r.info.run_id)
        return settled

    def close(self, status: str = "FINISHED", metric: str = "AP") -> dict[str, Any]:
        from mlflow.entities import Metric, RunTag

        from .tracking import retry

        self.resolve_duplicates()  # children launched under a parent merged meanwhile follow
        self.settle_children()
        summary = self.summarize(metric)
        now = int(time.time() * 1000)
        counts = {f"n_{k.lower()}": v for k, v in summary["status"].items()}
        counts |= {f"n_{k}": v for k, v in summary["outcome"].items()}
        # A relaunch reuses the parent: a count that dropped to zero (the FAILED cell that its
        # retry finished) must say 0, not keep the previous launch's value.
        logged = retry(lambda: self.mlf.get_run(self.run_id)).data.metrics
        counts |= {k: 0 for k in logged if k.startswith("n_") and k not in counts}
        counts["n_runs"] = summary["runs"]
        metrics = [Metric(k, float(v), now, 0) for k, v in counts.items()]
        metrics.append(Metric("iterations_trained", float(summary["iterations_trained"]), now, 0))
        if summary[f"best_{metric}"] is not None:
            metrics.append(Metric(f"best_{metric}", float(summary[f"best_{metric}"]), now, 0))
        tags = [RunTag("best_cell", str(summary["best_cell"]))] if summary["best_cell"] else []
        retry(lambda: self.mlf.log_batch(self.run_id, metrics=metrics, tags=tags))
        retry(lambda: self.mlf.log_dict(self.run_id, summary, "sweep/summary.json"))
        retry(lambda: self.mlf.set_terminated(self.run_id, status=status))
        return summary


class Progress:
    """One line per finished trial: `[k/N] cell: AP=.. | elapsed .. | ETA ..`.

    ``done`` counts trials finished before this process started; processes that share the work
    (several sweeps on one Optuna study) pass the shared count to `update`, so k/N and the ETA
    describe the whole study, at its pace since this process started.

    ``batch`` is the number of trials launched together and reported together when the slowest
    of them ends (the grid sweeper's `n_jobs` batches): the ETA then counts batches, so the first
    line of a batch of 2 does not predict twice the sweep's real time.
    """

    def __init__(
        self, total: int, *, name: str | None = None, echo=print, done: int = 0, batch: int = 1
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.total = total
        self.done = self.base = done
        self.start = time.perf_counter()
        self.name = name or "sweep"
        self.echo = echo
        self.batch = batch

    def update(self, label: str, value: float | None, status: str, done: int | None = None) -> str:
        self.done = self.done + 1 if done is None else done
        elapsed = time.perf_counter() - self.start
        ran = max(self.done - self.base, 1)
        left = max(self.total - self.done, 0)
        eta = elapsed / math.ceil(ran / self.batch) * math.ceil(left / self.batch)
        ap = "n/a" if value is None or math.isnan(value) else f"{value:.2f}"
        line = (
            f"[{self.name} {self.done}/{self.total}] {label}: {status} AP={ap} | "
            f"elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}"
        )
        self.echo(line)
        return line


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
