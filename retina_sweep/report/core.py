"""Tables of the paper's Table 1 rebuilt from MLflow runs, with the paper's values beside ours.

Pipeline: `load_runs` (mlflow.search_runs -> pandas, parents dropped) -> `latest_per_config`
(the latest FINISHED run of each config hash; a config with none keeps its latest run so its
failure shows) -> `build_table(spec, runs, paper)` (rows keyed by the spec's params; per row one
experiment, `one_experiment_per_row`: the settings of its latest finished run, one run per seed;
seeds aggregated as mean ± std with n, best-over selection, paper match in the paper's row order,
difference, Spearman, headline checks). Every table is described by data (`tables.yaml`), not by code.
Beside each table, its per-category AP (`Table.per_category`): the `AP-<category name>` metrics of
the same runs as each row's AP, averaged over the same seeds.
"""

from __future__ import annotations

import ast
import math
from contextlib import closing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from retina_sweep.config import HASH_EXCLUDE, HASH_SECTIONS
from retina_sweep.sweep import ALSO_TABLES_TAG

__all__ = [
    "TableSpec",
    "Table",
    "load_specs",
    "load_paper",
    "load_runs",
    "check_store",
    "runs_of_table",
    "tables_of",
    "latest_per_config",
    "build_table",
    "per_category_columns",
    "METHOD_NAMES",
    "CATEGORY_METRIC_PREFIX",
]

METHOD_NAMES = {"focal": "FL", "ohem": "OHEM", "ohem_1to3": "OHEM 1:3", "random_1to3": "random 1:3"}
OK = "ok"
# Per-category AP as each training run logs it (`evaluation.per_category_metrics`), as a column of
# `mlflow.search_runs`' frame: `metrics.AP-<category name>`.
CATEGORY_METRIC_PREFIX = "metrics.AP-"


@dataclass
class TableSpec:
    id: str
    title: str
    sweep: str
    keys: list[dict[str, Any]]
    metrics: list[str]
    best_over: list[dict[str, Any]] = field(default_factory=list)
    paper: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key_names(self) -> list[str]:
        return [k["name"] for k in self.keys]

    @property
    def row_names(self) -> list[str]:
        """The columns that name a row of the table: its keys, then its best_over params."""
        return self.key_names + [b["name"] for b in self.best_over]


@dataclass
class Table:
    spec: TableSpec
    rows: pd.DataFrame  # display-ready numbers: key columns, metric means/stds/n, paper, diff
    spearman: float | None
    spearman_n: int
    checks: list[dict[str, Any]]
    paper_reference: pd.DataFrame | None  # paper rows when none of ours match (other scale)
    num_runs: int
    # Training precision (the runs' `precision` tag) -> number of runs behind the table; runs
    # from before the tag existed count as "fp32 (untagged)".
    precisions: dict[str, int] = field(default_factory=dict)
    # Runs left out of a row (other settings than the row's experiment, repeats of a seed).
    notes: list[str] = field(default_factory=list)
    # Per-category AP, one row per row of `rows` (same order): the row columns
    # (`spec.row_names`), `n` (how many of the row's finished runs logged per-category AP: fewer
    # than the row's `n` when some predate it) and one column per category (AP in points, mean
    # over those runs; NaN where none has a value), categories in name order
    # (`per_category_columns`).
    per_category: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_specs(path: str | Path | None = None) -> dict[str, TableSpec]:
    """The table registry (`tables.yaml` beside this module unless `path`)."""
    if path is None:
        text = resources.files("retina_sweep.report").joinpath("tables.yaml").read_text()
    else:
        text = Path(path).read_text()
    raw = yaml.safe_load(text)["tables"]
    return {tid: TableSpec(id=str(tid), **spec) for tid, spec in raw.items()}


def load_paper(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's Table 1 (a)-(e), as shipped in `retina_sweep/reference/paper_table1.csv`."""
    if path is None:
        ref = resources.files("retina_sweep").joinpath("reference/paper_table1.csv")
        with resources.as_file(ref) as p:
            return pd.read_csv(p, dtype={"table": str})
    return pd.read_csv(path, dtype={"table": str})


def check_store(uri: str, experiment: str) -> None:
    """Refuse, with one clear ValueError, a store the report cannot read runs from, before
    MLflow touches it: a `sqlite:///` file that does not exist (MLflow would create an empty store
    there and the report would overwrite a good one with empty tables), a file that is not an
    MLflow store, or an `experiment` the store does not have (the message lists those it has).
    `uri` is resolved (`tracking.resolve_uri`: a relative SQLite path is already absolute)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:":
            _check_sqlite_file(Path(path), uri)
    from retina_sweep.tracking import client

    mlf = client(uri)
    if mlf.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in mlf.search_experiments())
        have = f"its experiments: {', '.join(names)}" if names else "it has none"
        raise ValueError(f"experiment={experiment}: no such experiment in {uri} ({have})")


def _check_sqlite_file(db: Path, uri: str) -> None:
    import sqlite3

    hint = (
        "run a sweep first, or pass tracking_uri=sqlite:////abs/path/mlflow.db "
        "(sqlite:/// + a relative path, sqlite://// + an absolute one)"
    )
    if not db.is_file():
        what = "is a folder" if db.is_dir() else "does not exist"
        raise ValueError(f"tracking_uri={uri}: the MLflow store {db} {what}; {hint}")
    try:  # read-only: MLflow would initialise any SQLite file as a store
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"tracking_uri={uri}: {db} is not an SQLite database ({exc})") from exc
    if "experiments" not in tables:
        raise ValueError(f"tracking_uri={uri}: {db} is not an MLflow store (no experiments table)")


def load_runs(
    *,
    tracking_uri: str,
    experiment: str = "retina_sweep",
    sweep: str | None = None,
    table: str | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """Trial runs (parents dropped) with `mlflow.search_runs`, as a pandas DataFrame."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        return pd.DataFrame()
    filters = []
    if sweep:
        filters.append(f"tags.sweep = '{sweep}'")
    if table:
        filters.append(f"tags.table = '{table}'")
    if parent_run_id:
        filters.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    df = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=" AND ".join(filters),
        max_results=50000,
        output_format="pandas",
    )
    if df.empty:
        return df
    if "tags.is_parent" in df:
        df = df[df["tags.is_parent"].fillna("") != "true"]
    return df.reset_index(drop=True)


def tables_of(runs: pd.DataFrame) -> pd.Series:
    """Per run, the tables it fills: its `table` tag, plus its `also_tables` (a cell shared with
    another preset, trained once and tagged by the sweep that skipped it, see `add_table_tag`)."""
    own = runs["tags.table"] if "tags.table" in runs else pd.Series("", index=runs.index)
    also_col = f"tags.{ALSO_TABLES_TAG}"
    also = runs[also_col] if also_col in runs else pd.Series("", index=runs.index)
    return pd.Series(
        [
            {t for t in [o, *a.split(",")] if t}
            for o, a in zip(own.fillna(""), also.fillna(""), strict=True)
        ],
        index=runs.index,
    )


def runs_of_table(runs: pd.DataFrame, table: str) -> pd.Series:
    """Mask of the runs that fill `table` (see `tables_of`)."""
    return tables_of(runs).map(lambda ts: table in ts)


def run_state(row: pd.Series) -> str:
    """ok | diverged | pruned | failed | killed | running, from MLflow status and outcome tag."""
    outcome = row.get("tags.outcome")
    status = row.get("status")
    if status == "FINISHED":
        return "diverged" if outcome == "diverged" else OK
    if status == "FAILED":
        return "failed"
    if status == "KILLED":
        return "pruned" if outcome == "pruned" else "killed"
    return "running"


def latest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, per config hash, the latest FINISHED run, else the latest run of any status."""
    if df.empty:
        return df
    df = df.copy()
    df["state"] = df.apply(run_state, axis=1)
    hash_col = "tags.config_hash"
    if hash_col not in df:
        df[hash_col] = df["run_id"]
    df[hash_col] = df[hash_col].fillna(df["run_id"])
    df = df.sort_values("start_time")
    finished = df[df["status"] == "FINISHED"].groupby(hash_col).tail(1)
    others = df[~df[hash_col].isin(finished[hash_col])].groupby(hash_col).tail(1)
    return pd.concat([finished, others]).sort_values("start_time").reset_index(drop=True)


def _parse(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return {"null": None, "None": None, "true": True, "false": False}.get(value, value)
    return value


def _key_value(key: dict[str, Any], row: pd.Series) -> Any:
    raw = _parse(row.get(f"params.{key['param']}"))
    transform = key.get("transform")
    if transform == "count":
        return len(raw) if isinstance(raw, list | tuple) else raw
    if transform == "method":
        return METHOD_NAMES.get(raw, raw)
    if transform == "levels":
        lo = _parse(row.get("params.model.fpn.min_level"))
        hi = _parse(row.get("params.model.fpn.max_level"))
        variant = _parse(row.get("params.model.fpn.variant"))
        return "C5 only" if variant == "c5_only" else f"P{lo}-P{hi}"
    if isinstance(raw, float) and raw.is_integer() and key.get("integer"):
        return int(raw)
    return raw


def _norm(v: Any) -> Any:
    """A comparable form of a key value (3 == 3.0, NaN/None == missing)."""
    if v is None:
        return None
    if isinstance(v, float):
        if math.isnan(v):
            return None
        return round(v, 6)
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return round(float(v), 6)
    return v


def _ident_value(v: Any) -> Any:
    """A hashable, comparable form of a logged param ('2' == '2.0', lists as tuples)."""
    v = _parse(v)
    if isinstance(v, list | tuple):
        return tuple(_ident_value(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _ident_value(x)) for k, x in v.items()))
    return _norm(v)


def _key_params(spec: TableSpec) -> set[str]:
    out = {k["param"] for k in spec.keys + spec.best_over}
    if any(k.get("transform") == "levels" for k in spec.keys):
        out |= {"model.fpn.min_level", "model.fpn.max_level", "model.fpn.variant"}
    return out


def _is_identity_param(name: str) -> bool:
    """A param that defines the experiment (config.HASH_SECTIONS less HASH_EXCLUDE); the seed,
    sweep.*, tracking.*, paths.*, device and the like do not."""
    if name.split(".", 1)[0] not in HASH_SECTIONS or name == "seed":
        return False
    return not any(name == e or name.startswith(e + ".") for e in HASH_EXCLUDE)


def _shown(v: Any) -> str:
    if v is None:
        return "not logged"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    return str(v)


def _row_label(names: list[str], values: tuple) -> str:
    return ", ".join(f"{n} {_shown(_norm(v))}" for n, v in zip(names, values, strict=True))


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def one_experiment_per_row(keyed: pd.DataFrame, spec: TableSpec) -> tuple[pd.DataFrame, list[str]]:
    """Per row (the spec's keys), the runs of one experiment: those whose identity params (the
    logged config less the row's keys, the seed and runtime keys) equal those of the row's latest
    FINISHED run (else its latest run); then per cell (keys and best_over) and seed the latest
    FINISHED run, else the latest. Returns the runs kept and a note per row that left some out
    (how many, one param that differs and its values)."""
    if keyed.empty:
        return keyed, []
    keys = _key_params(spec)
    id_cols = sorted(
        c
        for c in keyed.columns
        if c.startswith("params.") and _is_identity_param(c[7:]) and c[7:] not in keys
    )
    keyed = keyed.copy()
    keyed["_vals"] = [
        tuple(_ident_value(v) for v in r) for r in keyed[id_cols].itertuples(index=False)
    ]
    seed_col = next((c for c in ("params.seed", "tags.seed") if c in keyed), None)
    seeds = keyed[seed_col] if seed_col else pd.Series(None, index=keyed.index)
    keyed["_seed"] = [
        _ident_value(s) if _ident_value(s) is not None else rid
        for s, rid in zip(seeds, keyed["run_id"], strict=True)
    ]
    names = spec.key_names
    keyed["_rkey"] = [tuple(_norm(v) for v in r) for r in keyed[names].itertuples(index=False)]
    keyed = keyed.sort_values("start_time", kind="stable")
    kept, notes = [], []
    for rkey, row in keyed.groupby("_rkey", sort=False):
        # A param that equals the seed in every run of the row (`loss.seed: ${seed}` of random
        # 1:3) says nothing beyond the seed.
        cols = [
            i
            for i in range(len(id_cols))
            if not all(v[i] == sd for v, sd in zip(row["_vals"], row["_seed"], strict=True))
        ]
        row = row.assign(_ident=[tuple(v[i] for i in cols) for v in row["_vals"]])
        finished = row[row["status"] == "FINISHED"]
        ref = (finished if len(finished) else row).iloc[-1]
        same = row[row["_ident"] == ref["_ident"]]
        other = row[row["_ident"] != ref["_ident"]]
        label = _row_label(names, rkey)
        if len(other):
            differ = next(i for i in cols if any(v[i] != ref["_vals"][i] for v in other["_vals"]))
            values = sorted(
                {_shown(v[differ]) for v in other["_vals"] if v[differ] != ref["_vals"][differ]}
            )
            notes.append(
                f"{label}: {_runs(len(other))} of other settings left out "
                f"({id_cols[differ][7:]} {', '.join(values)}; kept {_shown(ref['_vals'][differ])})"
            )
        cell = [*names, *(b["name"] for b in spec.best_over)]
        same = same.assign(
            _cell=[tuple(_norm(v) for v in r) for r in same[cell].itertuples(index=False)],
            _fin=(same["status"] == "FINISHED").astype(int),
        )
        # Stable: among finished (or among not finished) runs the latest start comes last.
        one = same.sort_values("_fin", kind="stable").groupby(["_cell", "_seed"]).tail(1)
        if len(one) < len(same):
            n = len(same) - len(one)
            notes.append(
                f"{label}: {n} earlier run{'s' if n > 1 else ''} of the same seed left out "
                "(same logged settings, another config hash)"
            )
        kept.append(one.drop(columns=["_cell", "_fin", "_ident"]))
    out = pd.concat(kept).sort_values("start_time", kind="stable")
    return out.drop(columns=["_vals", "_seed", "_rkey"]), notes


def _fmt_state(states: list[str]) -> str:
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: kv[0] != OK))


def _aggregate(group: pd.DataFrame, metrics: list[str]) -> dict[str, Any]:
    ok = group[group["state"] == OK]
    out: dict[str, Any] = {"n": len(ok), "state": _fmt_state(list(group["state"]))}
    for m in metrics:
        col = f"metrics.{m}"
        values = ok[col].dropna().astype(float) if col in ok else pd.Series(dtype=float)
        out[m] = float(values.mean()) if len(values) else math.nan
        out[f"{m} std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return out


def _category_means(group: pd.DataFrame) -> tuple[int, dict[str, float]]:
    """The per-category AP of one cell: over its finished runs (those `_aggregate` averages)
    that logged any `AP-<name>` metric, the mean per category of the runs that have it. Returns
    how many runs that is and ``{category name: mean AP}``, categories without a value left out."""
    ok = group[group["state"] == OK]
    cols = [c for c in ok.columns if c.startswith(CATEGORY_METRIC_PREFIX)]
    if ok.empty or not cols:
        return 0, {}
    values = ok[cols].apply(pd.to_numeric, errors="coerce")
    values = values[values.notna().any(axis=1)]
    means = values.mean()  # per column, NaN skipped; NaN when no run has the category
    n = len(CATEGORY_METRIC_PREFIX)
    return len(values), {c[n:]: float(v) for c, v in means.items() if not math.isnan(v)}


def _per_category_frame(spec: TableSpec, rows: pd.DataFrame) -> pd.DataFrame:
    """`Table.per_category` from the table's final rows (their `_cat_n` and `_cats` columns, set
    per cell by `_category_means`; absent for a paper row without runs)."""
    names = spec.row_names
    if rows.empty:
        return pd.DataFrame(columns=[*names, "n"])
    out = pd.DataFrame({n: rows[n] if n in rows else None for n in names}, index=rows.index)
    counts = rows["_cat_n"] if "_cat_n" in rows else pd.Series(0, index=rows.index)
    out["n"] = counts.fillna(0).astype(int)
    cats = [c if isinstance(c, dict) else {} for c in rows.get("_cats", [None] * len(rows))]
    taken = {*names, "n"}
    for cat in sorted({k for c in cats for k in c}):
        # A category named like a row column (or `n`) keeps its metric name instead.
        col = f"AP-{cat}" if cat in taken else cat
        out[col] = [c.get(cat, math.nan) for c in cats]
    return out.reset_index(drop=True)


def per_category_columns(table: Table) -> list[str]:
    """The category columns of `table.per_category` (every column but the row columns and `n`)."""
    fixed = {*table.spec.row_names, "n"}
    return [c for c in table.per_category.columns if c not in fixed]


def _paper_rows(spec: TableSpec, paper: pd.DataFrame) -> pd.DataFrame:
    p = paper[paper["table"] == spec.paper["table"]].copy()
    rename = {src: dst for src, dst in spec.paper["match"].items()}
    out = pd.DataFrame({dst: p[src].map(_norm_paper) for src, dst in rename.items()})
    for m in spec.metrics:
        src = "time_ms" if m == "ms_per_image" else m
        out[f"paper {m}"] = p[src].values if src in p else math.nan
    for src, dst in (spec.paper.get("show") or {}).items():
        out[dst] = p[src].values
    out["_porder"] = range(len(out))
    return out.reset_index(drop=True)


def _norm_paper(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def build_table(spec: TableSpec, runs: pd.DataFrame, paper: pd.DataFrame | None) -> Table:
    """One table of the report from the runs of its sweep/table (see module docstring)."""
    names = spec.key_names
    best_names = [b["name"] for b in spec.best_over]
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    if not runs.empty:
        runs = latest_per_config(runs)
        keyed = runs.copy()
        for key in spec.keys + spec.best_over:
            keyed[key["name"]] = [_key_value(key, r) for _, r in keyed.iterrows()]
        # Same keys, other settings (another scale, another gamma in 1(a)): not more seeds.
        keyed, notes = one_experiment_per_row(keyed, spec)
        runs = runs[runs["run_id"].isin(keyed["run_id"])]
        group_cols = names + best_names
        # Normalise per value, not with DataFrame.map: pandas turns the None of a float column
        # back into NaN, and NaN != NaN would split a row (FL has no OHEM batch) from its paper row.
        keyed["_gkey"] = [
            tuple(_norm(v) for v in r) for r in keyed[group_cols].itertuples(index=False)
        ]
        for gkey, group in keyed.groupby("_gkey", sort=False):
            rec = dict(zip(group_cols, [group.iloc[0][c] for c in group_cols], strict=True))
            rec["_key"] = gkey[: len(names)]
            rec.update(_aggregate(group, spec.metrics))
            # From the same runs as the row's AP (for best_over: the cell's, kept or not below).
            rec["_cat_n"], rec["_cats"] = _category_means(group)
            records.append(rec)
    ours = pd.DataFrame(records)
    if best_names and not ours.empty:
        # Per row key, keep the best_over value with the highest mean AP (as the paper's 1(b)).
        ours["_ap"] = ours["AP"].fillna(-math.inf)
        ours = ours.sort_values("_ap", ascending=False).groupby("_key", sort=False).head(1)
        ours = ours.drop(columns="_ap")

    paper_ref = None
    if spec.paper and paper is not None:
        prow = _paper_rows(spec, paper)
        prow["_key"] = [tuple(_norm(v) for v in r) for r in prow[names].itertuples(index=False)]
        our_keys = set(ours["_key"]) if not ours.empty else set()
        if not our_keys:
            # No runs yet: the table says so and shows the paper's rows for reference.
            paper_ref = prow.drop(columns=["_key", "_porder"])
            merged = ours
        elif not our_keys & set(prow["_key"]):
            # Ours ran at another scale (e.g. the proxy's depth x scale grid): no row matches.
            paper_ref = prow.drop(columns=["_key", "_porder"])
            merged = ours
        else:
            if ours.empty:
                merged = prow.copy()
            else:
                merged = ours.merge(prow.drop(columns=names), on="_key", how="outer")
                for i, n in enumerate(names):
                    fill = merged["_key"].map(lambda k, i=i: k[i])
                    merged[n] = merged[n].where(merged[n].notna(), fill)
            if "state" not in merged:
                merged["state"] = math.nan
            merged["state"] = merged["state"].fillna("missing")
            if "n" not in merged:
                merged["n"] = 0
            merged["n"] = merged["n"].fillna(0).astype(int)
            for m in spec.metrics:
                if m not in merged:
                    merged[m] = math.nan
                    merged[f"{m} std"] = math.nan
            merged["Δ AP"] = merged["AP"] - merged["paper AP"]
    else:
        merged = ours
    if not merged.empty:
        merged = _sort_rows(merged, spec)
    merged = merged.reset_index(drop=True)
    per_category = _per_category_frame(spec, merged)
    merged = merged.drop(columns=[c for c in ("_cat_n", "_cats") if c in merged])
    rho, n_rho = _spearman(merged)
    checks = run_checks(spec, merged)
    n_runs = 0 if runs.empty else len(runs)
    precisions: dict[str, int] = {}
    if not runs.empty:
        tags = (
            runs["tags.precision"] if "tags.precision" in runs else pd.Series("", index=runs.index)
        )
        # Before the tag, every CPU run trained in float32 (autocast was CUDA-only).
        counts = tags.fillna("").replace("", "fp32 (untagged)").value_counts()
        precisions = {str(k): int(v) for k, v in counts.sort_index().items()}
    return Table(
        spec,
        merged,
        rho,
        n_rho,
        checks,
        paper_ref,
        n_runs,
        precisions,
        notes,
        per_category,
    )


def _sort_keys(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    try:
        return df.sort_values(spec.key_names, kind="stable", na_position="first")
    except TypeError:
        return df


def _sort_rows(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    if "_porder" not in df:
        return _sort_keys(df, spec)
    # The paper's rows in their published order (`_porder`: their order in paper_table1.csv),
    # then ours without a paper row, by their keys.
    in_paper = df[df["_porder"].notna()].sort_values("_porder", kind="stable")
    ours_only = _sort_keys(df[df["_porder"].isna()], spec)
    return pd.concat([in_paper, ours_only]).drop(columns="_porder")


def _spearman(df: pd.DataFrame) -> tuple[float | None, int]:
    if df.empty or "paper AP" not in df or "AP" not in df:
        return None, 0
    both = df[["AP", "paper AP"]].dropna()
    if len(both) < 3 or both["AP"].nunique() < 2 or both["paper AP"].nunique() < 2:
        return None, len(both)
    from scipy.stats import spearmanr

    return float(spearmanr(both["AP"], both["paper AP"]).statistic), len(both)


# ---------------------------------------------------------------------------------------------
# Headline checks
# ---------------------------------------------------------------------------------------------
def _match(df: pd.DataFrame, where: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for col, want in where.items():
        wants = want if isinstance(want, list) else [want]
        mask &= df[col].map(_norm).isin([_norm(w) for w in wants])
    return mask


def _spread(rows: pd.DataFrame) -> float:
    """The larger seed std of ``rows``: the rows a check compares, not the whole table (one
    noisy row elsewhere in the table says nothing about the two rows being compared)."""
    stds = rows["AP std"].dropna() if "AP std" in rows else pd.Series(dtype=float)
    return float(stds.max()) if len(stds) else 0.0


def _best(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.loc[[rows["AP"].idxmax()]]


def run_checks(spec: TableSpec, df: pd.DataFrame, others: dict[str, Table] | None = None):
    """Evaluate the spec's headline checks; each result says holds / fails / n/a and why."""
    results = []
    have = df[df["AP"].notna()] if not df.empty and "AP" in df else pd.DataFrame()
    for check in spec.checks:
        res = {"name": check["name"], "status": "n/a", "detail": "not enough finished rows"}
        kind = check["kind"]
        if kind == "beats_table":
            res["detail"] = f"needs table {check['other']} (computed in the full report)"
            res["_deferred"] = check
        elif len(have) >= 2:
            if kind in ("lowest", "near_best"):
                sel = have[_match(have, check["row"])]
                if len(sel):
                    sel = sel.iloc[[0]]
                    value = float(sel["AP"].iloc[0])
                    if kind == "lowest":
                        rest = have.drop(sel.index)
                        other = rest.loc[[rest["AP"].idxmin()]]  # the runner-up from below
                        margin = float(other["AP"].iloc[0]) - value
                    else:
                        other = _best(have)
                        margin = value - float(other["AP"].iloc[0])
                    spread = _spread(pd.concat([sel, other]))
                    if kind == "lowest":
                        # A tie with the runner-up (two CE rows collapsed to 0 AP) is the bottom.
                        tied = abs(margin) < 1e-9
                        res.update(_verdict(margin > 0 or tied, margin, spread, tied=tied))
                    else:
                        res.update(_near_best_verdict(margin, spread))
            elif kind == "best_below":
                a = have[_match(have, check["rows"])]
                b = have[_match(have, check["than"])]
                if len(a) and len(b):
                    margin = float(b["AP"].max()) - float(a["AP"].max())
                    spread = _spread(pd.concat([_best(a), _best(b)]))
                    res.update(_verdict(margin > 0, margin, spread))
        results.append(res)
    return results


def _verdict(ok: bool, margin: float, spread: float, tied: bool = False) -> dict[str, str]:
    """A strict ordering (margin > 0): the margin, and whether it exceeds 2 seed std."""
    if tied:
        note = " (tied at the bottom)"
    elif spread > 0:
        side = "beyond the seed spread" if abs(margin) > 2 * spread else "within noise"
        note = f" ({side}, 2 std = {2 * spread:.1f} AP)"
    else:
        note = ""
    return {
        "status": "holds" if ok else "fails",
        "detail": f"margin {margin:+.1f} AP, seed std of the compared rows {spread:.1f}{note}",
    }


def _near_best_verdict(margin: float, spread: float) -> dict[str, str]:
    """At or near the best: within max(1 AP, 2 seed std) of it; the wording names the one used."""
    if 2 * spread > 1.0:
        tolerance, name = 2 * spread, f"noise (2 std = {2 * spread:.1f} AP)"
    else:
        tolerance, name = 1.0, "the 1-AP tolerance"
    ok = margin >= -tolerance
    if margin >= 0:
        where = "the best row"
    elif ok:
        where = f"within {name}"
    else:
        where = f"beyond {name}"
    return {
        "status": "holds" if ok else "fails",
        "detail": f"margin {margin:+.1f} AP, seed std of the compared rows {spread:.1f} ({where})",
    }


def resolve_cross_checks(tables: dict[str, Table]) -> None:
    """Checks that compare two tables (e.g. best FL of 1(b) > best CE of 1(a))."""
    for table in tables.values():
        for res in table.checks:
            check = res.pop("_deferred", None)
            if check is None:
                continue
            other = tables.get(check["other"])
            mine = table.rows.dropna(subset=["AP"]) if "AP" in table.rows else pd.DataFrame()
            theirs = (
                other.rows.dropna(subset=["AP"])
                if other is not None and "AP" in other.rows
                else pd.DataFrame()
            )
            if len(mine) and check.get("exclude"):
                # e.g. 1(b)'s gamma 0 row is CE itself, not a focal loss
                mine = mine[~_match(mine, check["exclude"])]
            if len(mine) and len(theirs):
                margin = float(mine["AP"].max()) - float(theirs["AP"].max())
                spread = max(_spread(_best(mine)), _spread(_best(theirs)))
                res.update(_verdict(margin > 0, margin, spread))
            else:
                res["detail"] = (
                    f"needs finished runs in tables {table.spec.id} and {check['other']}"
                )
