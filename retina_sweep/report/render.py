"""Render report tables as Markdown, LaTeX (booktabs), CSV and HTML, and the index page.

Each table's per-category AP (`Table.per_category`) is a section of its Markdown and HTML, and
its own CSV and LaTeX files, `table_<id>_per_category.{csv,tex}` (the LaTeX one transposed:
categories down, the table's rows across).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .core import Table, per_category_columns

__all__ = [
    "display_frame",
    "per_category_display",
    "per_category_latex",
    "per_category_markdown",
    "to_markdown",
    "to_latex",
    "to_html",
    "write_table",
    "write_index",
]


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if not v.is_integer() or digits else f"{v:g}"
    return str(v)


def _key(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def display_frame(table: Table) -> pd.DataFrame:
    """The table as strings, in the paper's layout: keys | ours (mean ± std) | paper | Δ | runs."""
    spec, df = table.spec, table.rows
    cols: dict[str, list[str]] = {}
    if df.empty:
        return pd.DataFrame()
    for name in spec.key_names + [b["name"] for b in spec.best_over]:
        cols[name] = [_key(v) for v in df.get(name, [None] * len(df))]
    for m in spec.metrics:
        digits = 0 if m == "ms_per_image" else 1
        label = "ms/img" if m == "ms_per_image" else m
        cols[label] = [
            _num(mean, digits) + (f" ± {std:.1f}" if not math.isnan(std) else "")
            if not (isinstance(mean, float) and math.isnan(mean))
            else "—"
            for mean, std in zip(df[m], df.get(f"{m} std", [math.nan] * len(df)), strict=True)
        ]
    for extra in [c for c in df.columns if c.startswith("paper ") and not _is_metric_col(c)]:
        cols[extra] = [_key(v) for v in df[extra]]
    for m in spec.metrics:
        col = f"paper {m}"
        if col in df:
            label = "paper time (M40)" if m == "ms_per_image" else col
            if label in cols:
                continue
            cols[label] = [_num(v, 0 if m == "ms_per_image" else 1) for v in df[col]]
    if "Δ AP" in df:
        cols["Δ AP"] = ["—" if math.isnan(v) else f"{v:+.1f}" for v in df["Δ AP"].astype(float)]
    cols["runs"] = [str(state) for state in df["state"]]
    return pd.DataFrame(cols)


def per_category_display(table: Table) -> pd.DataFrame:
    """`table.per_category` as strings, for the rows with a finished run (a `missing` or failed
    row has no AP to break down; the CSV keeps every row): the row columns, `runs` (how many runs
    the values average), then one column per category (AP, one decimal; — where no run has a
    value). Empty when no run of the table logged per-category AP."""
    df = table.per_category
    cats = per_category_columns(table)
    if df.empty or not cats:
        return pd.DataFrame()
    finished = table.rows["n"].to_numpy() > 0 if "n" in table.rows else df["n"].to_numpy() > 0
    df = df[finished]
    cols: dict[str, list[str]] = {n: [_key(v) for v in df[n]] for n in table.spec.row_names}
    cols["runs"] = [str(int(v)) for v in df["n"]]
    for c in cats:
        cols[c] = [_num(float(v)) for v in df[c]]
    return pd.DataFrame(cols)


PER_CATEGORY_INTRO = (
    "COCO AP (IoU .50:.95, points) per category, from the `AP-<category>` metrics of the same "
    "runs as the row's AP, mean over the same seeds: a setting can cost some classes far more "
    "than its mean AP shows (e.g. small objects with 1 anchor scale per octave). Rows without a "
    "finished run are not shown."
)


def _per_category_notes(table: Table) -> list[str]:
    """Rows whose per-category AP averages fewer runs than their AP (runs from before it was
    logged)."""
    rows, pc = table.rows, table.per_category
    if rows.empty or pc.empty or "n" not in rows:
        return []
    notes = []
    for i in range(len(pc)):
        n_all, n_cat = int(rows["n"].iloc[i]), int(pc["n"].iloc[i])
        if n_cat < n_all:
            label = ", ".join(f"{n} {_key(pc[n].iloc[i])}" for n in table.spec.row_names if n in pc)
            runs = f"{n_all} finished run{'s' if n_all > 1 else ''}"
            if n_cat == 0:
                notes.append(f"{label}: no per-category AP in its {runs} (older runs)")
            else:
                notes.append(f"{label}: per-category AP from {n_cat} of its {runs}")
    return notes


def per_category_markdown(table: Table) -> list[str]:
    """The per-category section of a table's Markdown, as lines (none for a table without runs)."""
    if table.rows.empty:
        return []
    out = ["#### Per-category AP", ""]
    df = per_category_display(table)
    if df.empty:
        out.append(
            "_No run of this table logged per-category AP (`AP-<category>` metrics; runs trained "
            "before they were logged have none)._"
        )
        return out
    out += [PER_CATEGORY_INTRO, ""]
    out.append("| " + " | ".join(df.columns) + " |")
    out.append("|" + "|".join("---" for _ in df.columns) + "|")
    out += ["| " + " | ".join(row) + " |" for row in df.itertuples(index=False)]
    notes = _per_category_notes(table)
    if notes:
        out.append("")
        out += [f"- {line}" for line in notes]
    return out


def _is_metric_col(col: str) -> bool:
    return col in {
        f"paper {m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ms_per_image")
    }


def _trend_lines(table: Table) -> list[str]:
    lines = []
    if table.spearman is not None:
        lines.append(
            f"Spearman rank correlation of our AP with the paper's over {table.spearman_n} rows: "
            f"**{table.spearman:+.2f}**"
        )
    elif table.spec.paper and table.spearman_n >= 3:
        lines.append(
            f"Spearman rank correlation: n/a (our AP or the paper's is the same in all "
            f"{table.spearman_n} rows with both values; it is undefined for constant values)"
        )
    elif table.spec.paper:
        lines.append(
            f"Spearman rank correlation: n/a ({table.spearman_n} rows with both values; needs 3)"
        )
    for c in table.checks:
        mark = {"holds": "✔", "fails": "✘"}.get(c["status"], "?")
        lines.append(f"{mark} {c['name']}: **{c['status']}** — {c['detail']}")
    lines += list(table.notes)  # runs left out of a row, and why
    if table.precisions:
        counts = ", ".join(f"{k} x {v}" for k, v in table.precisions.items())
        mixed = len(table.precisions) > 1
        lines.append(
            f"Training precision of the runs: {counts}"
            + (" (mixed: rows may differ by the precision as well as the setting)" if mixed else "")
        )
    return lines


def to_markdown(table: Table) -> str:
    df = display_frame(table)
    out = [f"### {table.spec.title}", ""]
    if df.empty:
        out.append(
            f"_No runs yet._ Produce them with `python -m retina_sweep +sweep={table.spec.sweep}`."
        )
        return "\n".join(out) + "\n"
    header = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    out += [header, sep]
    out += ["| " + " | ".join(row) + " |" for row in df.itertuples(index=False)]
    out.append("")
    out += [f"- {line}" for line in _trend_lines(table)]
    if table.paper_reference is not None:
        out += [
            "",
            "None of our rows has the paper's settings (another scale); the paper's rows, for "
            "reference:",
            "",
        ]
        ref = table.paper_reference
        out.append("| " + " | ".join(ref.columns) + " |")
        out.append("|" + "|".join("---" for _ in ref.columns) + "|")
        for row in ref.itertuples(index=False):
            out.append("| " + " | ".join(_key(v) for v in row) + " |")
    out.append("")
    out.append(
        "_Ours: mean ± std over seeds of the latest finished run per config and seed, one "
        "experiment per row (the settings of its latest finished run); paper: Lin et al., "
        "Focal Loss for Dense Object Detection, Table 1 (COCO minival, ResNet-50/101-FPN)._"
    )
    section = per_category_markdown(table)
    if section:
        out += ["", *section]
    return "\n".join(out) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("±", r"$\pm$"),
        ("Δ", r"$\Delta$"),
        ("—", "--"),
        ("✔", "yes"),
        ("✘", "no"),
    ):
        s = s.replace(a, b)
    return s


def _latex_table(df: pd.DataFrame, caption: str) -> str:
    """A booktabs `table` of string cells, first column left-aligned, the others right."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * (len(df.columns) - 1) + "}",
        r"\toprule",
        " & ".join(_tex_escape(str(c)) for c in df.columns) + r" \\",
        r"\midrule",
    ]
    lines += [
        " & ".join(_tex_escape(v) for v in row) + r" \\" for row in df.itertuples(index=False)
    ]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\caption{" + _tex_escape(caption) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    df = display_frame(table)
    if df.empty:
        return f"% {table.spec.title}: no runs yet\n"
    return _latex_table(df, table.spec.title)


def per_category_latex(table: Table) -> str:
    """The table's per-category AP as LaTeX, transposed: one row per category and one column per
    row of the table with a finished run (COCO's 80 categories would not fit across a page), the
    first body row the number of runs each column averages. A comment line when no run logged
    per-category AP."""
    df = per_category_display(table)
    if df.empty:
        return f"% {table.spec.title}: no run logged per-category AP\n"
    names = list(table.spec.row_names)
    heads = [
        ", ".join(f"{n} {v}" for n, v in zip(names, row, strict=True))
        for row in df[names].itertuples(index=False)
    ]
    cats = per_category_columns(table)
    body = {"category": ["runs", *cats]}
    for j, head in enumerate(heads):
        body[head] = [df["runs"].iloc[j], *(df[c].iloc[j] for c in cats)]
    caption = f"{table.spec.title}: COCO AP per category (points), mean over the row's runs"
    return _latex_table(pd.DataFrame(body), caption)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1rem 0;font-size:14px}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
li{margin:.2rem 0} .fig{max-width:560px;border:1px solid #eee;margin:.5rem}
code{background:#f5f5f5;padding:1px 4px}
"""


def to_html(table: Table) -> str:
    df = display_frame(table)
    body = [f"<h2>{html.escape(table.spec.title)}</h2>"]
    if df.empty:
        body.append(
            f"<p><em>No runs yet.</em> Produce them with "
            f"<code>python -m retina_sweep +sweep={html.escape(table.spec.sweep)}</code>.</p>"
        )
    else:
        body.append(df.to_html(index=False, escape=True, border=0))
        body.append(
            "<ul>" + "".join(f"<li>{_md_inline(x)}</li>" for x in _trend_lines(table)) + "</ul>"
        )
        if table.paper_reference is not None:
            body.append("<p>None of our rows has the paper's settings; the paper's rows:</p>")
            body.append(table.paper_reference.to_html(index=False, border=0, na_rep="—"))
        per_cat = per_category_display(table)
        if not per_cat.empty:
            body.append("<h3>Per-category AP</h3>")
            body.append(f"<p>{_md_inline(PER_CATEGORY_INTRO)}</p>")
            body.append(per_cat.to_html(index=False, escape=True, border=0))
            notes = _per_category_notes(table)
            if notes:
                body.append("<ul>" + "".join(f"<li>{_md_inline(x)}</li>" for x in notes) + "</ul>")
    return _page(table.spec.title, "\n".join(body))


def _md_inline(s: str) -> str:
    s = html.escape(s)
    parts = s.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_table(table: Table, out_dir: Path, formats: list[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"table_{table.spec.id}"
    written = []
    if "md" in formats:
        written.append(out_dir / f"{stem}.md")
        written[-1].write_text(to_markdown(table))
    if "tex" in formats:
        written.append(out_dir / f"{stem}.tex")
        written[-1].write_text(to_latex(table))
        written.append(out_dir / f"{stem}_per_category.tex")
        written[-1].write_text(per_category_latex(table))
    if "csv" in formats:
        written.append(out_dir / f"{stem}.csv")
        table.rows.drop(columns=[c for c in table.rows.columns if c.startswith("_")]).to_csv(
            written[-1], index=False
        )
        # One row per row of the table above, one column per category (see Table.per_category).
        written.append(out_dir / f"{stem}_per_category.csv")
        table.per_category.to_csv(written[-1], index=False)
    if "html" in formats:
        written.append(out_dir / f"{stem}.html")
        written[-1].write_text(to_html(table))
    return written


def write_study(study, out_dir: Path, formats: list[str]) -> list[Path]:
    """`study_<name>.md/.csv/.html` for an Optuna study (see report/studies.py)."""
    from .studies import study_html, study_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"study_{study.name}"
    written = []
    if "md" in formats:
        written.append(out_dir / f"{stem}.md")
        written[-1].write_text(study_markdown(study))
    if "csv" in formats:
        written.append(out_dir / f"{stem}.csv")
        study.rows.to_csv(written[-1], index=False)
    if "html" in formats:
        written.append(out_dir / f"{stem}.html")
        written[-1].write_text(_page(f"study {study.name}", study_html(study)))
    return written


def write_index(
    out_dir: Path,
    tables: list[Table],
    figures: list[Path],
    title: str,
    studies: list | None = None,
    study_summary: pd.DataFrame | None = None,
) -> Path:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        "<p>Rebuilt from tracked MLflow runs by <code>python -m retina_sweep.report</code>; "
        "paper values from Lin et al., <i>Focal Loss for Dense Object Detection</i>, Table 1.</p>"
    )
    for t in tables:
        link = f"table_{t.spec.id}.html"
        parts.append(to_html(t).split("<body>", 1)[1].rsplit("</body>", 1)[0])
        parts.append(
            f"<p>Files: <a href='{link}'>html</a> · <a href='table_{t.spec.id}.md'>md</a> · "
            f"<a href='table_{t.spec.id}.tex'>tex</a> · <a href='table_{t.spec.id}.csv'>csv</a> · "
            f"<a href='table_{t.spec.id}_per_category.csv'>per-category csv</a></p>"
        )
    if studies:
        from .studies import study_html

        parts.append("<h2>Optuna studies</h2>")
        if len(studies) > 1 and study_summary is not None:
            parts.append(
                study_summary.to_html(
                    index=False, na_rep="—", float_format=lambda v: f"{v:.1f}", border=0
                )
            )
        parts += [study_html(s) for s in studies]
    if figures:
        parts.append("<h2>Figures</h2>")
        for f in figures:
            if f.suffix == ".png":
                rel = f.relative_to(out_dir).as_posix()
                pdf = rel[:-4] + ".pdf"
                parts.append(
                    f"<figure><img class='fig' src='{rel}' alt='{html.escape(f.stem)}'>"
                    f"<figcaption>{html.escape(f.stem)} (<a href='{pdf}'>pdf</a>)</figcaption>"
                    "</figure>"
                )
    path = out_dir / "index.html"
    path.write_text(_page(title, "\n".join(parts)))
    return path
