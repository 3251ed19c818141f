"""Optuna studies in the report: what each trial searched, how it ended and what it cost, and the
study's best trial against the best row of the grid table it competes with, compute included.

A study is the set of child runs of an Optuna sweep (`tags.optuna_trial` set), one study per
`tags.sweep`; `tables.yaml`'s `studies:` entry for its table tag names the grid table to compare
with (the `hpo` preset competes with Table 1(b), the `gamma` grid). Compute is counted in training
iterations, as the sweeper's `compute_budget` counts it: a pruned trial costs its `pruned_at`
step, any other trial its `train.iterations`. The grid's compute is its cells (at one seed, and
only those its table keeps: one experiment per row) times their iterations.

The best trial of a study is a maximum over noisy trials, so it is biased upwards like a grid's
best single-seed cell; runs of the same configuration with other seeds (from any sweep, e.g. a
grid multirun over `seed=1,2` with the trial's parameters) are shown beside it as mean ± std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .core import (
    OK,
    Table,
    TableSpec,
    _category_means,
    _key_value,
    _norm,
    _parse,
    latest_per_config,
    one_experiment_per_row,
    per_category_columns,
    run_state,
)

__all__ = [
    "Study",
    "load_study_specs",
    "study_runs",
    "build_study",
    "study_markdown",
    "study_html",
    "grid_compute",
    "studies_summary",
    "summary_markdown",
    "setup_text",
]

TRIAL_TAG = "tags.optuna_trial"


@dataclass
class Study:
    name: str
    table: str  # the study's table tag (its `studies:` entry)
    params: list[str]  # searched parameters, in the study's order
    rows: pd.DataFrame  # trial, <params>, state, AP, iterations, seed
    iterations: int
    best: dict[str, Any] | None  # trial, AP, params, seeds (mean, std, n) of its configuration
    reference: dict[str, Any] | None  # the compared grid table: best row, its AP, compute
    # From the study's parent run (`sweep/definition.json`): sampler, pruner, pruner_args,
    # compute_budget, ...; empty when the parent recorded none.
    setup: dict[str, Any] = field(default_factory=dict)
    compare: str | None = None  # the grid table id it competes with (tables.yaml `studies:`)
    # Per-category AP (points): `category`, `best trial` (the best trial's own run), `grid best`
    # (the compared table's best row, mean over its runs, as in `Table.per_category`), `Δ`
    # (best trial - grid best); NaN where a side has no value. Empty when neither logged any.
    per_category: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_study_specs() -> dict[str, dict[str, Any]]:
    """`tables.yaml`'s `studies:` entries: study table tag -> {compare: grid table id}."""
    from importlib import resources

    import yaml

    text = resources.files("retina_sweep.report").joinpath("tables.yaml").read_text()
    return {str(k): dict(v or {}) for k, v in (yaml.safe_load(text).get("studies") or {}).items()}


def study_runs(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Child runs of Optuna sweeps (`optuna_trial` tag), by study (`tags.sweep`)."""
    if runs.empty or TRIAL_TAG not in runs:
        return {}
    trials = runs[runs[TRIAL_TAG].notna() & (runs[TRIAL_TAG].astype(str) != "")]
    return {str(name): group for name, group in trials.groupby("tags.sweep", sort=True)}


def _iterations(row: pd.Series) -> int:
    pruned = _parse(row.get("tags.pruned_at"))
    if row.get("state") == "pruned" and pruned is not None:
        return int(pruned)
    full = _parse(row.get("params.train.iterations"))
    return int(full) if full is not None else 0


def _searched(runs: pd.DataFrame, space: list[str] | None) -> list[str]:
    """The study's searched keys: its recorded space, else the model/loss/data/train params that
    vary among its trials."""
    if space:
        return [k for k in space if f"params.{k}" in runs]
    varying = []
    for col in runs.columns:
        if not col.startswith("params.") or col.split(".")[1] not in ("model", "loss", "data"):
            continue
        if runs[col].nunique(dropna=False) > 1:
            varying.append(col[len("params.") :])
    return varying


def grid_compute(spec: TableSpec, runs: pd.DataFrame) -> tuple[int, int]:
    """(cells, iterations) of a grid table at one seed: its distinct cells (row keys and
    best-over keys) among the runs the table itself keeps (`one_experiment_per_row`: a run of
    other settings in a row, e.g. a longer schedule, is not a cell of the grid), and the sum of
    their `train.iterations`."""
    if runs.empty:
        return 0, 0
    keyed = latest_per_config(runs).copy()
    keys = spec.keys + spec.best_over
    for key in keys:
        keyed[key["name"]] = [_key_value(key, r) for _, r in keyed.iterrows()]
    keyed, _ = one_experiment_per_row(keyed, spec)
    cells: dict[tuple, int] = {}
    for _, r in keyed.iterrows():
        cell = tuple(_norm(r[k["name"]]) for k in keys)
        full = _parse(r.get("params.train.iterations"))
        cells.setdefault(cell, int(full) if full is not None else 0)
    return len(cells), sum(cells.values())


def _same_config(every: pd.DataFrame, trial: pd.Series, params: list[str]) -> pd.DataFrame:
    """Finished runs anywhere in the experiment with the trial's searched values and iterations
    (other seeds of its configuration), latest per seed."""
    if every.empty:
        return every
    mask = pd.Series(True, index=every.index)
    for key in [*params, "train.iterations"]:
        col = f"params.{key}"
        if col not in every:
            return every.iloc[0:0]
        want = _norm(_parse(trial.get(col)))
        mask &= every[col].map(lambda v, want=want: _norm(_parse(v)) == want)
    same = latest_per_config(every[mask])
    if same.empty:
        return same
    same = same[same["state"] == OK]
    seed_col = "tags.seed" if "tags.seed" in same else "params.seed"
    return same.sort_values("start_time").groupby(seed_col).tail(1)


def build_study(
    name: str,
    runs: pd.DataFrame,
    *,
    table: str,
    every_run: pd.DataFrame,
    space: list[str] | None = None,
    reference: Table | None = None,
    reference_runs: pd.DataFrame | None = None,
    metric: str = "AP",
    setup: dict[str, Any] | None = None,
    compare: str | None = None,
) -> Study:
    """One study of the report from its trial runs (see the module docstring)."""
    runs = runs.copy()
    runs["_trial"] = runs[TRIAL_TAG].map(lambda v: int(float(v)))
    # A trial number is one job; keep its latest run if it was ever relaunched.
    runs = runs.sort_values("start_time").groupby("_trial").tail(1).sort_values("_trial")
    runs["state"] = runs.apply(run_state, axis=1)
    params = _searched(runs, space)
    records = []
    for _, r in runs.iterrows():
        rec: dict[str, Any] = {"trial": int(r["_trial"])}
        for key in params:
            rec[key.rsplit(".", 1)[-1]] = _parse(r.get(f"params.{key}"))
        rec["state"] = r["state"]
        value = r.get(f"metrics.{metric}")
        rec[metric] = float(value) if r["state"] == OK and pd.notna(value) else math.nan
        rec["iterations"] = _iterations(r)
        records.append(rec)
    rows = pd.DataFrame(records)
    iterations = int(rows["iterations"].sum()) if not rows.empty else 0

    best = None
    done = rows[rows[metric].notna()] if not rows.empty else rows
    if not done.empty:
        top = done.loc[done[metric].idxmax()]
        trial_run = runs[runs["_trial"] == top["trial"]].iloc[0]
        seeds = _same_config(every_run, trial_run, params)
        values = seeds[f"metrics.{metric}"].astype(float) if not seeds.empty else pd.Series([])
        best = {
            "trial": int(top["trial"]),
            metric: float(top[metric]),
            "params": {k: _parse(trial_run.get(f"params.{k}")) for k in params},
            "seeds_mean": float(values.mean()) if len(values) else math.nan,
            "seeds_std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "seeds_n": int(len(values)),
        }

    ref = None
    ref_categories: dict[str, float] = {}
    if reference is not None and not reference.rows.empty and metric in reference.rows:
        ok = reference.rows[reference.rows[metric].notna()]
        if not ok.empty:
            top = ok.loc[ok[metric].idxmax()]
            if not reference.per_category.empty:
                # `Table.per_category` is aligned with `Table.rows` by position.
                pc_row = reference.per_category.iloc[reference.rows.index.get_loc(top.name)]
                ref_categories = {
                    c: float(pc_row[c])
                    for c in per_category_columns(reference)
                    if pd.notna(pc_row[c])
                }
            names = reference.spec.key_names + [b["name"] for b in reference.spec.best_over]
            cells, grid_iters = grid_compute(
                reference.spec, reference_runs if reference_runs is not None else pd.DataFrame()
            )
            ref = {
                "table": reference.spec.id,
                "title": reference.spec.title,
                "row": {n: top.get(n) for n in names if n in top},
                metric: float(top[metric]),
                "std": float(top.get(f"{metric} std", math.nan)),
                "n": int(top.get("n", 0)),
                "cells": cells,
                "iterations": grid_iters,
            }
    per_category = _study_per_category(
        runs[runs["_trial"] == best["trial"]] if best else None, ref_categories
    )
    return Study(
        name, table, params, rows, iterations, best, ref, dict(setup or {}), compare, per_category
    )


def _study_per_category(best_run: pd.DataFrame | None, theirs: dict[str, float]) -> pd.DataFrame:
    """`Study.per_category`: the best trial's `AP-<category>` metrics beside `theirs`, the
    compared table's best row's per-category AP (`build_study` picks that row)."""
    ours = _category_means(best_run)[1] if best_run is not None else {}
    cats = sorted({*ours, *theirs})
    if not cats:
        return pd.DataFrame()
    frame = pd.DataFrame(
        {
            "category": cats,
            "best trial": [ours.get(c, math.nan) for c in cats],
            "grid best": [theirs.get(c, math.nan) for c in cats],
        }
    )
    frame["Δ"] = frame["best trial"] - frame["grid best"]
    return frame


def per_category_markdown(study: Study) -> list[str]:
    """The study's per-category lines (none when no run logged per-category AP)."""
    pc = study.per_category
    if pc.empty or study.best is None:
        return []
    grid = f"Table {study.reference['table']} best row" if study.reference else "grid best"
    cols = ["category", f"best trial {study.best['trial']}", grid, "Δ"]
    out = [
        "",
        "Per-category AP (points) of the best trial's run beside the grid's best row (mean over "
        "its runs): where the searched setting gains or loses.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in pc.itertuples(index=False):
        delta = "—" if math.isnan(r[3]) else f"{r[3]:+.1f}"
        out.append(f"| {r[0]} | {_f(r[1])} | {_f(r[2])} | {delta} |")
    return out


def setup_text(setup: dict[str, Any]) -> str:
    """``sampler tpe (seed 0, n_startup_trials 4), pruner hyperband (min_resource 100, ...),
    compute budget 8.4 trials`` from a study's recorded definition."""

    def args(d: Any) -> str:
        return f" ({', '.join(f'{k} {v}' for k, v in d.items())})" if d else ""

    parts = []
    if "sampler" in setup:
        seed = {"seed": setup["seed"]} if setup.get("seed") is not None else {}
        sargs = {**seed, **(setup.get("sampler_args") or {})}
        parts.append(f"sampler {setup['sampler']}{args(sargs)}")
    if "pruner" in setup:
        pargs = setup.get("pruner_args") if setup["pruner"] != "none" else None
        parts.append(f"pruner {setup['pruner']}{args(pargs)}")
    if setup.get("compute_budget") is not None:
        parts.append(f"compute budget {setup['compute_budget']} trials")
    return ", ".join(parts)


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if not v.is_integer() or digits == 1 else f"{v:.0f}"
    return str(v)


def _pm(mean: float, std: float, n: int) -> str:
    if n > 1 and not math.isnan(std):
        return f"{mean:.1f} ± {std:.1f} ({n} seeds)"
    return f"{mean:.1f} (1 seed)"


def study_markdown(study: Study, metric: str = "AP") -> str:
    """The study as a Markdown section: its trials, then the summary lines."""
    out = [f"### Optuna study `{study.name}` (table tag `{study.table}`)", ""]
    if study.rows.empty:
        return "\n".join([*out, "_No trials yet._", ""])
    cols = list(study.rows.columns)
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for row in study.rows.itertuples(index=False):
        cells = []
        for col, v in zip(cols, row, strict=True):
            cells.append(_f(v, 1 if col == metric else 3) if isinstance(v, float) else _f(v))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if study.setup:
        out.append(f"- {setup_text(study.setup)}")
    states = study.rows["state"].value_counts()
    out.append(
        f"- {len(study.rows)} trials ("
        + ", ".join(f"{n} {s}" for s, n in states.items())
        + f"), **{study.iterations:,} training iterations** (a pruned trial counts the iterations "
        "it trained, any other its full train.iterations)"
    )
    if study.best is not None:
        b = study.best
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]} {_f(v, 3)}" for k, v in b["params"].items())
        line = f"- best trial {b['trial']}: **{metric} {b[metric]:.1f}** ({shown})"
        if b["seeds_n"] > 1:
            line += f"; this configuration over seeds: {_pm(b['seeds_mean'], b['seeds_std'], b['seeds_n'])}"
        out.append(line)
    ref = study.reference
    if ref is not None and study.best is not None:
        row = ", ".join(f"{k} {_f(v, 2)}" for k, v in ref["row"].items())
        out.append(
            f"- Table {ref['table']}'s best row ({row}): {metric} {_pm(ref[metric], ref['std'], ref['n'])}; "
            f"best trial {study.best[metric] - ref[metric]:+.1f} {metric}"
            + (
                f", its configuration's seed mean {study.best['seeds_mean'] - ref[metric]:+.1f}"
                if study.best["seeds_n"] > 1
                else ""
            )
        )
        if ref["iterations"]:
            share = 100.0 * study.iterations / ref["iterations"]
            out.append(
                f"- compute: {study.iterations:,} iterations = **{share:.1f} %** of Table "
                f"{ref['table']}'s grid ({ref['cells']} cells at one seed, "
                f"{ref['iterations']:,} iterations)"
            )
    elif ref is None and study.compare is not None:
        out.append(
            f"- no finished runs of Table {study.compare}'s grid in this store, so no comparison "
            "with it (run its sweep into the same MLflow store, e.g. `+sweep=gamma` for 1b)"
        )
    out += per_category_markdown(study)
    out.append("")
    return "\n".join(out)


def studies_summary(studies: list[Study], metric: str = "AP") -> pd.DataFrame:
    """One row per study, side by side (e.g. the same budget with and without pruning): trials by
    state, iterations spent and their share of the compared grid's, the best trial and its gap
    to the grid's best row."""
    records = []
    for st in studies:
        states = st.rows["state"].value_counts() if not st.rows.empty else pd.Series(dtype=int)
        ref, best = st.reference, st.best
        grid_iters = ref["iterations"] if ref else 0
        records.append(
            {
                "study": st.name,
                "sampler": st.setup.get("sampler"),
                "pruner": st.setup.get("pruner"),
                "trials": len(st.rows),
                "completed": int(states.get(OK, 0)),
                "pruned": int(states.get("pruned", 0)),
                "iterations": st.iterations,
                "% of grid": 100.0 * st.iterations / grid_iters if grid_iters else math.nan,
                f"best {metric}": best[metric] if best else math.nan,
                "best trial": best["trial"] if best else None,
                f"grid best {metric}": ref[metric] if ref else math.nan,
                "vs grid best": best[metric] - ref[metric] if best and ref else math.nan,
            }
        )
    frame = pd.DataFrame.from_records(records)
    # Integers stay integers beside studies without a best trial (no 6.0 in the CSV).
    return frame.astype({"best trial": "Int64"}) if not frame.empty else frame


def summary_markdown(summary: pd.DataFrame) -> str:
    """`studies_summary` as a Markdown table."""
    if summary.empty:
        return ""
    cols = list(summary.columns)
    out = ["### Optuna studies side by side", "", "| " + " | ".join(cols) + " |"]
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for row in summary.itertuples(index=False):
        cells = []
        for col, v in zip(cols, row, strict=True):
            if col == "iterations":
                cells.append(f"{int(v):,}")
            elif col == "best trial":
                cells.append("—" if pd.isna(v) else str(int(v)))
            elif col == "vs grid best":
                cells.append("—" if pd.isna(v) else f"{v:+.1f}")
            else:
                cells.append(_f(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join([*out, ""])


def study_html(study: Study, metric: str = "AP") -> str:
    """The study as an HTML fragment (its trial table and summary lines)."""
    import html

    md = study_markdown(study, metric).splitlines()
    title = md[0].removeprefix("### ").replace("`", "")
    bullets = [html.escape(line[2:]).replace("**", "") for line in md if line.startswith("- ")]
    table = (
        ""
        if study.rows.empty
        else study.rows.to_html(index=False, na_rep="—", float_format=lambda v: f"{v:.3g}")
    )
    items = "".join(f"<li>{b}</li>" for b in bullets)
    per_cat = ""
    if not study.per_category.empty and study.best is not None:
        frame = study.per_category.rename(
            columns={"best trial": f"best trial {study.best['trial']}"}
        )
        per_cat = "<p>Per-category AP (points), best trial vs the grid's best row</p>" + (
            frame.to_html(index=False, na_rep="—", float_format=lambda v: f"{v:.1f}")
        )
    return f"<h3>{html.escape(title)}</h3>{table}<ul>{items}</ul>{per_cat}"
