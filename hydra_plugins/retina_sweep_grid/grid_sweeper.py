"""A Hydra sweeper for retina_sweep's paper ablations.

Compared with Hydra's basic sweeper it
- expands the preset's `sweep.grid` (crossed) and `sweep.rows` (listed) and `sweep.seeds`,
  together with any command-line sweep (`loss.gamma=0,1,2`): a command-line value, swept or
  fixed, of a key the grid sweeps replaces that axis; one of a key the rows set is an error;
- launches each config hash once (cells that are the same experiment are dropped, and counted);
- composes and validates every cell before launching any, so a bad value stops the sweep before
  work is wasted;
- skips cells whose config hash already has a FINISHED MLflow run (unless `sweep.force=true`),
  and says which;
- opens one MLflow parent run for the sweep (reused when the same sweep is relaunched), makes every
  trial its child, and closes it with a summary of the children;
- keeps going when a trial fails, and prints one progress line per finished trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

# Standard library only (no torch): cheap enough for Hydra's plugin discovery.
from retina_sweep.signals import SWEEP_GRACE_S, check_grace, terminate_as_interrupt

log = logging.getLogger(__name__)


@dataclass
class RetinaGridSweeperConf:
    _target_: str = "hydra_plugins.retina_sweep_grid.grid_sweeper.RetinaGridSweeper"
    # Trials handed to the launcher at once; null = the launcher's n_jobs (1 for the basic one).
    max_batch_size: Any = None
    # Seconds worker processes get to record their trials as killed after SIGTERM or Ctrl-C
    # reaches the sweep (retina_sweep.signals); raise it on a slow shared tracking store.
    grace_s: float = SWEEP_GRACE_S


class RetinaGridSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, grace_s: float = SWEEP_GRACE_S) -> None:
        self.max_batch_size = max_batch_size
        self.grace_s = check_grace(grace_s, key="hydra.sweeper.grace_s")
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

    # -- helpers -----------------------------------------------------------------------------
    def _split_cli(
        self, arguments: list[str]
    ) -> tuple[list[tuple[str, str, Any]], dict[str, list[Any]]]:
        """(the fixed overrides as (key, override line, value), the sweeps as key -> values).

        A fixed override's key is its config key or group without the `+`/`++` prefix (what a
        preset's grid names); a deletion (`~key`) keeps its prefix, so it matches no grid key.
        """
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        fixed: list[tuple[str, str, Any]] = []
        sweeps: dict[str, list[Any]] = {}
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                if override.is_discrete_sweep() or override.is_range_sweep():
                    sweeps[override.get_key_element()] = list(override.sweep_iterator())
                else:
                    from retina_sweep.sweep import SweepError

                    raise SweepError(
                        f"{override.input_line}: interval sweeps need an optimiser "
                        "(hydra/sweeper=optuna), not the grid sweeper"
                    )
            else:
                plain = override.package is None and not override.is_delete()
                key = override.key_or_group if plain else override.get_key_element()
                fixed.append((key, override.input_line, override.value() if plain else None))
        return fixed, sweeps

    def _batch_size(self) -> int:
        if self.max_batch_size:
            return int(self.max_batch_size)
        n_jobs = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None)
        return max(1, int(n_jobs)) if n_jobs else 1

    # -- the sweep ---------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        # SIGTERM (a scheduler's time limit, `kill`) closes the parent run as KILLED, as Ctrl-C
        # does, instead of ending the process with the parent RUNNING; worker processes get
        # either signal forwarded and `grace_s` seconds to record their trials
        # (retina_sweep.signals).
        with terminate_as_interrupt(grace_s=self.grace_s):
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> Any:
        from retina_sweep.config import config_hash, validate
        from retina_sweep.sweep import (
            ParentRun,
            Progress,
            SweepError,
            add_table_tag,
            expand_cells,
            finished_hashes,
            sweep_hash,
            unique_cells,
        )
        from retina_sweep.tracking import client

        cfg = self.config
        spec = cfg.sweep
        name = spec.name or "multirun"
        grid = OmegaConf.to_container(spec.grid, resolve=True) if spec.grid else None
        from retina_sweep.config import exit_on_bad_input
        from retina_sweep.train import prepare

        loader = self.hydra_context.config_loader
        trial_cfgs = []
        # Nothing has been launched or logged yet: a bad value or file is one line and exit 2.
        with exit_on_bad_input(f"[{name}] stopped before any trial", SweepError):
            fixed_overrides, cli_sweeps = self._split_cli(arguments)
            # A command-line value of a key the preset's grid sweeps replaces that axis (a fixed
            # one by its single value), so the grid does not overwrite it in every cell; one of
            # a key the rows set is an error naming it (docs/usage.md, Sweeps).
            cells = expand_cells(
                grid=grid,
                rows=OmegaConf.to_container(spec.rows, resolve=True) if spec.rows else None,
                cli_sweeps=cli_sweeps,
                seeds=int(spec.seeds),
                base_seed=int(cfg.seed),
                cli_fixed={key: value for key, _, value in fixed_overrides},
            )
            # The fixed values the grid took over are set by each cell.
            fixed = [line for key, line, _ in fixed_overrides if key not in (grid or {})]

            # Compose and validate every cell first: a bad value stops the sweep before any
            # training.
            for cell in cells:
                trial_cfg = loader.load_sweep_config(
                    master_config=cfg, sweep_overrides=fixed + cell.override_list()
                )
                validate(trial_cfg)
                cell.config_hash = config_hash(trial_cfg)
                trial_cfgs.append(trial_cfg)

            # Shared resources (synthetic data, pretrained backbone) once, before parallel trials.
            prepared: set[str] = set()
            for trial_cfg in trial_cfgs:
                key = repr(OmegaConf.to_container(trial_cfg.data, resolve=True)) + repr(
                    OmegaConf.to_container(trial_cfg.model.backbone, resolve=True)
                )
                if key not in prepared:
                    prepared.add(key)
                    prepare(trial_cfg)

        # Cells with one config hash are one experiment (a swept seed overlapping the
        # `sweep.seeds` repeats, values that differ only in spelling): launch the first only.
        cells, repeats = unique_cells(cells)
        if repeats:
            print(
                f"[{name}] dropped {len(repeats)} duplicate cell(s), the same experiment as "
                "another cell: " + ", ".join(f"{c.label} seed={c.seed}" for c in repeats)
            )

        sweep_dir = Path(cfg.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")

        tracking = cfg.tracking
        mlf = client(tracking.uri) if tracking.enabled else None
        done: dict[str, str] = {}
        if mlf is not None and not spec.force:
            done = finished_hashes(mlf, tracking.experiment, [c.config_hash for c in cells])
        todo = [c for c in cells if c.config_hash not in done]
        skipped = [c for c in cells if c.config_hash in done]
        print(
            f"[{name}] {len(cells)} trials: {len(todo)} to run, {len(skipped)} already finished"
            + (" (sweep.force=true recomputes them)" if skipped else "")
        )
        for c in skipped:
            print(f"[{name}] skip {c.label} seed={c.seed}: finished run {done[c.config_hash]}")
        if mlf is not None and spec.table:
            # A cell shared with another table (CE alpha .25 is also focal gamma 0 in 1(b)) runs
            # once; the run is tagged so this table's report finds it too.
            for run_id in sorted({done[c.config_hash] for c in skipped}):
                add_table_tag(mlf, run_id, str(spec.table))

        parent = None
        if mlf is not None:
            definition = {
                "name": spec.name,
                "table": spec.table,
                "arguments": list(arguments),
                "grid": OmegaConf.to_container(spec.grid, resolve=True),
                "rows": OmegaConf.to_container(spec.rows, resolve=True),
                "seeds": int(spec.seeds),
                "cells": [
                    {"label": c.label, "seed": c.seed, "config_hash": c.config_hash} for c in cells
                ],
            }
            parent = ParentRun.open(
                mlf,
                tracking.experiment,
                name=spec.name,
                table=spec.table,
                shash=sweep_hash(spec.name, [c.config_hash for c in cells]),
                definition=definition,
            )
            for c in todo:
                c.extra.append(f"tracking.parent_run_id={parent.run_id}")

        batch_size = self._batch_size()
        # Torch threads per trial as the launcher set them (launcher=parallel: cores / n_jobs).
        threads = OmegaConf.select(cfg, "train.threads", default=None)
        progress = Progress(len(todo), name=name, batch=batch_size)
        returns: list[list[JobReturn]] = []
        status = "FINISHED"
        failed = 0
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                batch = [fixed + c.override_list() for c in chunk]
                if threads and len(chunk) < batch_size:
                    # A last, partial batch (21 cells on 2 jobs ends with one): its trials get
                    # the threads of the missing ones instead of leaving cores idle. Threads are
                    # not part of a trial's identity (they change float rounding, not the cell).
                    more = f"train.threads={int(threads) * batch_size // len(chunk)}"
                    batch = [b + [more] for b in batch]
                results = self.launcher.launch(batch, initial_job_idx=start)
                for cell, result in zip(chunk, results, strict=True):
                    if result.status == JobStatus.COMPLETED:
                        value, state = result.return_value, "done"
                    else:
                        value, state = None, "FAILED"
                        failed += 1
                        log.error("trial %s failed: %r", cell.label, result._return_value)
                    progress.update(f"{cell.label} seed={cell.seed}", _as_float(value), state)
                returns.append(list(results))
            if todo and failed == len(todo):
                status = "FAILED"  # nothing of the sweep's own work finished
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if parent is not None:
                summary = parent.close(status=status)
                print(f"[{name}] MLflow parent run {parent.run_id}: {summary}")
        if failed:
            # The sweep went on past them (the finished trials are kept), but a script or a
            # cluster job must see that something failed: exit 1, as a test runner does.
            print(
                f"[{name}] {failed} of {len(todo)} trials FAILED; each MLflow run has the error in "
                "its `error` tag. Running the same command again retries only them."
            )
            raise SystemExit(1)
        return returns


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
