"""`python -m retina_sweep.report`: the paper's Table 1 rebuilt from tracked runs.

`build_report(...)` is the library function behind the command (and `make demo`): it reads the
runs from MLflow, builds every table that has runs (or the ones asked for), writes Markdown,
LaTeX, CSV and HTML per table (and each table's per-category AP: a Markdown/HTML section,
`table_<id>_per_category.csv`, a heatmap), the figures and an `index.html`, logs the files as
artifacts of the sweep's MLflow parent run, and returns the Markdown text and the paths written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .core import (
    Table,
    build_table,
    check_store,
    load_paper,
    load_runs,
    load_specs,
    per_category_columns,
    resolve_cross_checks,
    runs_of_table,
    tables_of,
)
from .studies import (
    Study,
    build_study,
    load_study_specs,
    studies_summary,
    study_markdown,
    study_runs,
    summary_markdown,
)

__all__ = ["build_report", "figure4_candidates", "Report"]

log = logging.getLogger(__name__)
FORMATS = ("md", "tex", "csv", "html")


@dataclass
class Report:
    markdown: str
    out_dir: Path
    tables: dict[str, Table]
    files: list[Path] = field(default_factory=list)
    index: Path | None = None
    studies: list[Study] = field(default_factory=list)


def build_report(
    *,
    tracking_uri: str | None = None,
    experiment: str = "retina_sweep",
    table: str | None = None,
    sweep: str | None = None,
    formats: list[str] | tuple[str, ...] = FORMATS,
    out: str | Path | None = None,
    log_to_parent: bool = True,
    figure4_run: str | None = None,
) -> Report:
    """Build the report (see module docstring). `table`/`sweep` narrow it; `out` is its folder;
    `figure4_run` names the run whose checkpoint draws Figure 4 (default: the newest gamma 2 /
    alpha .25 run, else gamma 2, else any focal-loss run)."""
    from ..tracking import resolve_uri
    from . import figures
    from .render import to_markdown, write_index, write_study, write_table

    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ValueError(f"format must be a subset of {','.join(FORMATS)}, got {bad}")
    uri = resolve_uri(tracking_uri)
    specs = load_specs()
    study_specs = load_study_specs()
    if table is not None and table not in specs and table not in study_specs:
        raise ValueError(f"table must be one of {', '.join([*specs, *study_specs])}, got {table!r}")
    paper = load_paper()
    # Before MLflow opens the store: it would create a missing SQLite file, and the report would
    # then overwrite the previous one (reports/<name>/) with empty tables.
    check_store(uri, experiment)
    # A table's cells may have been trained by another sweep (shared config hash), so tables are
    # built from every run of the experiment, selected by table; `sweep` narrows what is shown.
    every_run = load_runs(tracking_uri=uri, experiment=experiment)
    all_runs = every_run
    if sweep is not None and not every_run.empty:
        in_sweep = every_run["tags.sweep"] == sweep if "tags.sweep" in every_run else False
        all_runs = every_run[in_sweep].reset_index(drop=True)

    if table is not None:
        wanted = [table] if table in specs else []
    elif sweep is not None:
        wanted = [tid for tid, s in specs.items() if s.sweep == sweep]
        if not all_runs.empty and "tags.table" in all_runs:
            wanted += [t for t in all_runs["tags.table"].dropna().unique() if t in specs]
        wanted = list(dict.fromkeys(wanted))
    else:
        present = set().union(*tables_of(all_runs)) if not all_runs.empty else set()
        wanted = [tid for tid in specs if tid in present] or list(specs)

    # Cross-table checks (1b vs 1a) need the other table too, even when not shown.
    needed = set(wanted) | {
        c["other"] for tid in wanted for c in specs[tid].checks if c.get("other")
    }
    studies_in = study_runs(all_runs)
    if table is not None:
        studies_in = {n: r for n, r in studies_in.items() if table in set(r["tags.table"].dropna())}
    study_tags = {n: str(r["tags.table"].dropna().iloc[0]) for n, r in studies_in.items()}
    # A study is compared with a grid table (tables.yaml `studies:`), which it needs built.
    compare = {n: study_specs.get(tag, {}).get("compare") for n, tag in study_tags.items()}
    needed |= {c for c in compare.values() if c in specs}
    tables: dict[str, Table] = {}
    table_runs: dict[str, pd.DataFrame] = {}
    for tid in [t for t in specs if t in needed]:
        runs = every_run
        if not runs.empty and "tags.table" in runs:
            runs = runs[runs_of_table(runs, tid)]
        else:
            runs = pd.DataFrame()
        table_runs[tid] = runs
        tables[tid] = build_table(specs[tid], runs, paper)
    resolve_cross_checks(tables)
    definitions = {n: _study_definition(uri, experiment, n) for n in studies_in}
    studies = [
        build_study(
            n,
            r,
            table=study_tags[n],
            every_run=every_run,
            space=list(definitions[n]["space"]) if "space" in definitions[n] else None,
            reference=tables.get(compare[n]) if compare[n] else None,
            reference_runs=table_runs.get(compare[n]) if compare[n] else None,
            setup={k: v for k, v in definitions[n].items() if k != "space"},
            compare=compare[n],
        )
        for n, r in studies_in.items()
    ]

    name = sweep or table or "all"
    out_dir = Path(out) if out is not None else Path("reports") / name
    files: list[Path] = []
    shown = [tables[t] for t in wanted]
    for t in shown:
        files += write_table(t, out_dir, list(formats))
    for st in studies:
        files += write_study(st, out_dir, list(formats))
    summary = studies_summary(studies)
    if not summary.empty:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "md" in formats:
            files.append(out_dir / "studies.md")
            files[-1].write_text(summary_markdown(summary))
        if "csv" in formats:
            files.append(out_dir / "studies.csv")
            summary.to_csv(files[-1], index=False)
    figs = _figures(shown, paper, out_dir / "figures", figures)
    fig4, shares, shares_title = _figure4(
        every_run if figure4_run else all_runs, uri, out_dir / "figures", figures, figure4_run
    )
    figs += fig4
    files += figs
    shares_md = ""
    if shares is not None:
        shares_md = figures.loss_shares_markdown(shares, shares_title)
        files.append(out_dir / "figures" / "fig4_loss_shares.csv")
        shares.to_csv(files[-1], index=False)
        files.append(out_dir / "figures" / "fig4_loss_shares.md")
        files[-1].write_text(shares_md)
    index = None
    if "html" in formats:
        index = write_index(
            out_dir,
            shown,
            figs,
            f"retina_sweep report: {name}",
            studies=studies,
            study_summary=summary,
        )
        files.append(index)
    markdown = "\n".join(
        [
            *(to_markdown(t) for t in shown),
            *([summary_markdown(summary)] if len(studies) > 1 else []),
            *(study_markdown(s) for s in studies),
            *([shares_md] if shares_md else []),
        ]
    )
    if log_to_parent and sweep is not None:
        _log_to_parent(uri, experiment, sweep, out_dir)
    return Report(markdown, out_dir, tables, files, index, studies)


def _figures(tables: list[Table], paper: pd.DataFrame, fig_dir: Path, figures) -> list[Path]:
    out = [p for p in figures.focal_loss_curves(fig_dir / "fig1_focal_loss")]
    for t in tables:
        rows = t.rows[t.rows["AP"].notna()] if "AP" in t.rows else t.rows
        if rows.empty:
            continue
        p = paper[paper["table"] == t.spec.id]
        if t.spec.id == "1a":
            out += figures.ap_vs_param(
                fig_dir / "ap_vs_alpha",
                rows,
                x="alpha",
                paper=p,
                paper_x="alpha",
                title="CE (gamma 0): AP vs alpha (Table 1(a))",
            )
        elif t.spec.id == "1b":
            out += figures.ap_vs_param(
                fig_dir / "ap_vs_gamma",
                rows,
                x="gamma",
                paper=p,
                paper_x="gamma",
                title="FL: AP vs gamma, best alpha (Table 1(b))",
            )
        elif t.spec.id == "1e" and "ms_per_image" in rows:
            out += figures.speed_accuracy(fig_dir / "speed_accuracy", rows, p)
    for t in tables:  # every table: its per-category AP (none drawn when no run logged it)
        out += figures.per_category_heatmap(
            fig_dir / f"per_category_{t.spec.id}",
            t.per_category,
            row_columns=t.spec.row_names,
            categories=per_category_columns(t),
            title=f"{t.spec.title}: AP per category",
        )
    return out


def _study_definition(uri: str, experiment: str, study: str) -> dict[str, Any]:
    """The definition recorded by the study's latest Optuna parent run (`sweep/definition.json`:
    searched space, sampler, pruner, budget); empty if there is none."""
    from ..tracking import client

    try:
        mlf = client(uri)
        exp = mlf.get_experiment_by_name(experiment)
        parents = mlf.search_runs(
            [exp.experiment_id],
            filter_string=(
                f"tags.is_parent = 'true' AND tags.sweep = '{study}' AND tags.sweeper = 'optuna'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            return {}
        local = mlf.download_artifacts(parents[0].info.run_id, "sweep/definition.json")
        return dict(json.loads(Path(local).read_text()))
    except Exception as exc:  # the study still shows, with the varying params instead
        log.info("study %s: no recorded definition (%s)", study, exc)
        return {}


def _log_to_parent(uri: str, experiment: str, sweep: str, out_dir: Path) -> None:
    """Attach the report files to the sweep's latest MLflow parent run."""
    from ..tracking import client, retry

    mlf = client(uri)
    exp = mlf.get_experiment_by_name(experiment)
    if exp is None:
        return
    parents = mlf.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.is_parent = 'true' AND tags.sweep = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if parents:
        retry(lambda: mlf.log_artifacts(parents[0].info.run_id, str(out_dir), "report"))
        log.info("report logged to parent run %s", parents[0].info.run_id)


def figure4_candidates(runs: pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """The runs Figure 4 may be drawn from, best first (their checkpoints are checked later).

    `run_id` alone when given (a ValueError when it is not in `runs`); otherwise the finished,
    completed focal-loss runs: the paper's default cell first (gamma 2, alpha .25: its Figure 4 is
    of a converged model trained with it), those of the `gamma` sweep (Table 1(b), where nothing
    but the loss varies) before the others (e.g. the `anchors` sweep's 4 x 3 row has the same
    loss), then the other gamma-2 runs, then the rest, each group newest first.
    """
    if run_id is not None:
        chosen = runs[runs["run_id"] == run_id] if "run_id" in runs else runs.iloc[:0]
        if chosen.empty:
            raise ValueError(f"figure4_run={run_id}: no such run in this store")
        return chosen
    if runs.empty:
        return runs
    done = runs[(runs["status"] == "FINISHED") & (runs.get("tags.outcome") == "completed")]
    if "params.loss.name" in done:
        done = done[done["params.loss.name"] == "focal"]
    done = done.sort_values("start_time", ascending=False)
    if "params.loss.gamma" not in done:
        return done
    is_two = pd.to_numeric(done["params.loss.gamma"], errors="coerce") == 2.0
    alpha = done.get("params.loss.alpha", pd.Series(index=done.index, dtype=object))
    paper = is_two & (pd.to_numeric(alpha, errors="coerce") == 0.25)
    in_1b = runs_of_table(done, "1b")
    groups = [paper & in_1b, paper & ~in_1b, is_two & ~paper, ~is_two]
    return pd.concat([done[g] for g in groups])


def _figure4(
    runs: pd.DataFrame, uri: str, fig_dir: Path, figures, run_id: str | None = None
) -> tuple[list[Path], pd.DataFrame | None, str]:
    """The paper's Figure 4 and its loss shares from one finished focal-loss run's checkpoint.

    The run is `run_id` when given, else the first of `figure4_candidates` whose checkpoint is
    here (the paper's gamma 2 / alpha .25 cell preferred). Returns the
    figure's files, the shares (None when no run qualifies) and a title naming the run.
    """
    chosen = figure4_candidates(runs, run_id)  # raises for an unknown run_id
    if chosen.empty or "params.paths.checkpoints" not in chosen:
        if run_id is not None:
            raise ValueError(f"figure4_run={run_id}: the run records no checkpoint folder")
        return [], None, ""
    from ..tracking import client

    for _, run in chosen.iterrows():
        ckpt = Path(run["params.paths.checkpoints"]) / str(run["tags.config_hash"]) / "last.pt"
        if not ckpt.exists():
            if run_id is not None:
                raise ValueError(f"figure4_run={run_id}: its checkpoint {ckpt} is not there")
            continue
        title = (
            f"Figure 4's loss shares: run {run['run_id']} (gamma {run.get('params.loss.gamma')}, "
            f"alpha {run.get('params.loss.alpha')}, seed {run.get('params.seed')}), val images"
        )
        try:
            mlf = client(uri)
            local = mlf.download_artifacts(run["run_id"], "config/resolved.yaml")
            paths, shares = figures.figure4_from_checkpoint(
                fig_dir / "fig4_loss_cdf", config_yaml=Path(local).read_text(), checkpoint=ckpt
            )
            return paths, shares, title
        except Exception as exc:  # a report must not fail because one figure cannot be drawn
            if run_id is not None:
                raise ValueError(f"figure4_run={run_id}: {exc}") from exc
            log.warning("Figure 4 skipped (run %s): %s", run["run_id"], exc)
            return [], None, ""
    log.info("Figure 4 skipped: no finished focal-loss run with its checkpoint in this folder")
    return [], None, ""
