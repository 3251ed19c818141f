"""The report rebuilds the paper's tables from a constructed MLflow store with known runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from retina_sweep.report import build_report
from retina_sweep.report.core import (
    build_table,
    latest_per_config,
    load_paper,
    load_specs,
    per_category_columns,
)
from retina_sweep.report.figures import loss_cdf, loss_shares, loss_shares_markdown
from retina_sweep.report.render import per_category_latex, to_latex, to_markdown


class Store:
    def __init__(self, path: Path) -> None:
        self.uri = f"sqlite:///{path}/m.db"
        self.mlf = MlflowClient(tracking_uri=self.uri)
        self.exp = self.mlf.create_experiment(
            "retina_sweep", artifact_location=(path / "a").as_uri()
        )
        self.t = 0

    def run(
        self,
        *,
        table,
        sweep,
        params,
        ap,
        seed=0,
        status="FINISHED",
        outcome="completed",
        chash=None,
        extra=None,
        tags=None,
    ):
        self.t += 1
        tags = {
            "table": table,
            "sweep": sweep,
            "seed": str(seed),
            "outcome": outcome,
            "config_hash": chash or f"{sweep}-{sorted(params.items())}-{seed}",
            **(tags or {}),
        }
        run = self.mlf.create_run(self.exp, start_time=1_000_000 + self.t, tags=tags)
        metrics = []
        if ap is not None:
            metrics = [
                Metric("AP", ap, 0, 0),
                Metric("AP50", ap + 10, 0, 0),
                Metric("AP75", ap - 5, 0, 0),
            ]
        for k, v in (extra or {}).items():
            metrics.append(Metric(k, v, 0, 0))
        self.mlf.log_batch(
            run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()]
        )
        self.mlf.set_terminated(run.info.run_id, status=status)
        return run.info.run_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    # Table 1(a): CE over alpha, 2 seeds each; alpha .10 collapses.
    for alpha, aps in {
        0.1: (0.5, 0.7),
        0.25: (10.0, 12.0),
        0.5: (20.0, 22.0),
        0.75: (25.0, 27.0),
    }.items():
        for seed, ap in enumerate(aps):
            s.run(
                table="1a",
                sweep="alpha",
                params={"loss.alpha": alpha, "loss.gamma": 0.0},
                ap=ap,
                seed=seed,
            )
    # 0.9: failed, 0.99: diverged; 0.999 never ran.
    s.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.9, "loss.gamma": 0.0},
        ap=None,
        status="FAILED",
        outcome="failed",
    )
    s.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.99, "loss.gamma": 0.0},
        ap=None,
        outcome="diverged",
    )
    # Table 1(b): gamma x alpha; best alpha per gamma must be picked.
    grid = {
        (0.0, 0.25): 5.0,
        (0.0, 0.75): 26.0,
        (1.0, 0.25): 30.0,
        (1.0, 0.75): 28.0,
        (2.0, 0.25): 31.0,
        (2.0, 0.75): 29.0,
        (5.0, 0.25): 24.0,
        (5.0, 0.75): 20.0,
    }
    for (gamma, alpha), ap in grid.items():
        s.run(table="1b", sweep="gamma", params={"loss.gamma": gamma, "loss.alpha": alpha}, ap=ap)
    # A duplicate of (2.0, 0.25) with the same config hash, started later: the latest wins.
    h = "gamma-dup"
    s.run(table="1b", sweep="gamma", params={"loss.gamma": 2.0, "loss.alpha": 0.5}, ap=1.0, chash=h)
    s.run(
        table="1b", sweep="gamma", params={"loss.gamma": 2.0, "loss.alpha": 0.5}, ap=33.0, chash=h
    )
    return s


def test_table_1a_cells_seeds_and_missing(store: Store) -> None:
    report = build_report(tracking_uri=store.uri, table="1a", out=Path(store.uri[10:]).parent / "r")
    rows = report.tables["1a"].rows.set_index("alpha")
    assert rows.loc[0.25, "AP"] == pytest.approx(11.0)
    assert rows.loc[0.25, "AP std"] == pytest.approx(math.sqrt(2.0))
    assert rows.loc[0.25, "n"] == 2
    assert rows.loc[0.9, "state"] == "1 failed" and math.isnan(rows.loc[0.9, "AP"])
    assert rows.loc[0.99, "state"] == "1 diverged"
    assert rows.loc[0.999, "state"] == "missing"
    # the paper's values beside ours (Table 1(a): alpha .75 -> 31.1 / 49.4 / 33.0)
    assert rows.loc[0.75, "paper AP"] == pytest.approx(31.1)
    assert rows.loc[0.75, "paper AP50"] == pytest.approx(49.4)
    assert rows.loc[0.75, "Δ AP"] == pytest.approx(26.0 - 31.1)
    md = report.markdown
    assert "| 0.999 |" in md and "missing" in md and "failed" in md and "diverged" in md


def test_table_1b_best_alpha_duplicates_and_trends(store: Store, tmp_path: Path) -> None:
    report = build_report(tracking_uri=store.uri, sweep="gamma", out=tmp_path / "g")
    t = report.tables["1b"]
    rows = t.rows.set_index("gamma")
    assert rows.loc[0.0, "best alpha"] == 0.75 and rows.loc[0.0, "AP"] == 26.0
    assert rows.loc[1.0, "best alpha"] == 0.25 and rows.loc[1.0, "AP"] == 30.0
    # the later duplicate (33.0) replaced the earlier run (1.0) of the same config
    assert rows.loc[2.0, "best alpha"] == 0.5 and rows.loc[2.0, "AP"] == 33.0
    assert rows.loc[2.0, "paper AP"] == pytest.approx(34.0)  # paper: gamma 2, alpha .25
    assert rows.loc[0.1, "state"] == "missing"
    # Spearman over gammas {0, 1, 2, 5}: ours 26, 30, 33, 24 vs paper 31.1, 33.7, 34.0, 32.2
    # ranks ours (2, 3, 4, 1), paper (1, 3, 4, 2): rho = 1 - 6 * (1 + 0 + 0 + 1) / (4 * 15) = 0.8
    assert t.spearman == pytest.approx(0.8)
    checks = {c["name"]: c for c in t.checks}
    assert checks["gamma 2 is at or near the best gamma"]["status"] == "holds"
    # best FL (33) beats best CE (26, from table 1(a) of the same store)
    assert checks["the best focal loss beats the best alpha-balanced CE"]["status"] == "holds"
    for suffix in ("md", "tex", "csv", "html"):
        assert (tmp_path / "g" / f"table_1b.{suffix}").exists()
    assert (tmp_path / "g" / "index.html").read_text().count("<table") >= 1
    assert (tmp_path / "g" / "figures" / "ap_vs_gamma.png").exists()
    assert (tmp_path / "g" / "figures" / "fig1_focal_loss.pdf").exists()


def test_lowest_check_fails_when_the_row_is_not_lowest(store: Store) -> None:
    spec = load_specs()["1a"]
    from retina_sweep.report.core import load_runs

    runs = load_runs(tracking_uri=store.uri, table="1a")
    runs.loc[runs["params.loss.alpha"] == "0.1", "metrics.AP"] = 99.0
    t = build_table(spec, runs, load_paper())
    assert t.checks[0]["status"] == "fails"


def test_noise_verdict_uses_the_compared_rows_not_the_noisiest_row(store: Store) -> None:
    # alpha .10 (0.5, 0.7) vs the runner-up alpha .25 (10, 12): margin 10.4 AP against a seed
    # std of 1.4 between them. A very noisy row elsewhere (alpha .6: 5 and 45, std 28) must not
    # turn that into "within noise".
    for seed, ap in enumerate((5.0, 45.0)):
        store.run(
            table="1a",
            sweep="alpha",
            params={"loss.alpha": 0.6, "loss.gamma": 0.0},
            ap=ap,
            seed=seed,
        )
    report = build_report(tracking_uri=store.uri, table="1a", out=Path(store.uri[10:]).parent / "r")
    check = report.tables["1a"].checks[0]
    assert check["status"] == "holds"
    assert "margin +10.4 AP" in check["detail"]
    assert "compared rows 1.4 (beyond the seed spread, 2 std = 2.8 AP)" in check["detail"]


def test_latest_finished_run_per_config_wins_over_a_later_failure(store: Store) -> None:
    from retina_sweep.report.core import load_runs

    h = "same-config"
    store.run(table="1a", sweep="alpha", params={"loss.alpha": 0.5}, ap=21.0, chash=h)
    store.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.5},
        ap=None,
        chash=h,
        status="FAILED",
        outcome="failed",
    )
    kept = latest_per_config(load_runs(tracking_uri=store.uri, table="1a"))
    kept = kept[kept["tags.config_hash"] == h]
    assert len(kept) == 1 and kept.iloc[0]["state"] == "ok"


def test_paper_reference_values_spot_checks() -> None:
    paper = load_paper()
    row = paper[(paper["table"] == "1b") & (paper["gamma"] == 2.0)].iloc[0]
    assert (row["alpha"], row["AP"]) == (0.25, 34.0)
    assert paper[(paper["table"] == "1d") & (paper["method"] == "FL")]["AP"].item() == 36.0
    e = paper[(paper["table"] == "1e") & (paper["depth"] == 101) & (paper["scale"] == 800)]
    assert e["AP"].item() == 37.8 and e["time_ms"].item() == 198


def test_a_table_without_runs_names_its_sweep(tmp_path: Path) -> None:
    store = Store(tmp_path)
    report = build_report(tracking_uri=store.uri, table="1c", out=tmp_path / "c")
    assert "python -m retina_sweep +sweep=anchors" in report.markdown
    assert "% Table 1(c)" in to_latex(report.tables["1c"])
    assert "No runs yet" in to_markdown(report.tables["1c"])


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table must be one of"):
        build_report(tracking_uri=f"sqlite:///{tmp_path}/m.db", table="9z")
    with pytest.raises(ValueError, match="format"):
        build_report(tracking_uri=f"sqlite:///{tmp_path}/m.db", formats=["docx"])


def test_a_missing_sqlite_store_is_refused_not_created(tmp_path: Path) -> None:
    # MLflow would initialise a new, empty store there, and the report would overwrite a good
    # report with empty tables and exit 0.
    db = tmp_path / "no" / "dir" / "x.db"
    out = tmp_path / "r"
    with pytest.raises(
        ValueError, match=re.escape(f"MLflow store {db} does not exist; run a sweep first")
    ):
        build_report(tracking_uri=f"sqlite:///{db}", out=out)
    assert not db.exists() and not db.parent.exists() and not out.exists()
    # The command: one line naming the file, non-zero exit, nothing written.
    from retina_sweep.report.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([f"tracking_uri=sqlite:///{db}", f"out={out}"])
    assert str(exc.value).startswith("report: ") and "\n" not in str(exc.value)
    assert str(db) in str(exc.value) and "sqlite:////" in str(exc.value)
    assert not db.parent.exists() and not out.exists()
    # A file that is there but is not an MLflow store is not turned into one either.
    (tmp_path / "empty.db").touch()
    with pytest.raises(ValueError, match="is not an MLflow store"):
        build_report(tracking_uri=f"sqlite:///{tmp_path}/empty.db", out=out)
    assert (tmp_path / "empty.db").stat().st_size == 0 and not out.exists()


def test_an_unknown_experiment_is_refused_with_the_stores_names(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.mlf.create_experiment("other_study")
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="experiment=nope: no such experiment") as exc:
        build_report(tracking_uri=store.uri, experiment="nope", out=out)
    assert "other_study" in str(exc.value) and "retina_sweep" in str(exc.value)
    assert not out.exists()
    assert store.mlf.get_experiment_by_name("nope") is None  # not created either


def test_loss_cdf_matches_a_hand_computation() -> None:
    # 2 positives, 2 negatives, one class; gamma 0 -> plain BCE per anchor.
    logits = torch.tensor([[2.0], [0.0], [-3.0], [1.0]])
    targets = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    state = torch.tensor([1, 1, 0, 0])
    out = loss_cdf(logits, targets, state, gammas=(0.0, 2.0))
    pos = torch.nn.functional.softplus(-torch.tensor([2.0, 0.0]))  # -log sigmoid(x)
    pos = torch.sort(pos / pos.sum()).values
    assert out[0.0]["pos"] == pytest.approx(torch.cumsum(pos, 0).numpy())
    assert out[0.0]["pos_x"] == pytest.approx([0.5, 1.0])
    assert out[0.0]["neg"][-1] == pytest.approx(1.0)
    # a larger gamma concentrates the negatives' loss on the hard one (logit 1.0)
    assert out[2.0]["neg"][0] < out[0.0]["neg"][0]


def test_loss_shares_match_a_hand_computation() -> None:
    # One class; positives at logits 2 and 0, negatives at -3 (p = .047, easy below .1) and 1.
    logits = torch.tensor([[2.0], [0.0], [-3.0], [1.0]])
    targets = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    state = torch.tensor([1, 1, 0, 0])
    sp = torch.nn.functional.softplus
    p_neg = torch.sigmoid(torch.tensor([-3.0, 1.0]))
    p_pos = torch.sigmoid(torch.tensor([2.0, 0.0]))
    df = loss_shares(logits, targets, state, gammas=(0.0, 2.0), easy_prob=0.1, carry=0.9)
    assert df.attrs == {
        "positives": 2,
        "negatives": 2,
        "easy_negatives": 1,
        "easy_prob": 0.1,
        "carry": 0.9,
        "alpha": -1.0,
    }
    assert "no alpha" in loss_shares_markdown(df, "t")
    weighted = loss_shares(logits, targets, state, gammas=(2.0,), alpha=0.25)
    assert "alpha 0.25" in loss_shares_markdown(weighted, "t")
    for g, row in zip((0.0, 2.0), df.itertuples(), strict=True):
        # FL = -(1 - p_t)^g log p_t; for a negative, p_t = 1 - p and -log(1 - p) = softplus(x).
        pos = float(((1 - p_pos) ** g * sp(-torch.tensor([2.0, 0.0]))).sum())
        easy, hard = (p_neg**g * sp(torch.tensor([-3.0, 1.0]))).tolist()
        total = pos + easy + hard
        assert row.gamma == g
        assert row.pos_share == pytest.approx(pos / total)
        assert row.easy_neg_share == pytest.approx(easy / total)
        assert row.other_neg_share == pytest.approx(hard / total)
        assert row.neg_to_pos == pytest.approx((easy + hard) / pos)
        assert row.easy_neg_to_pos == pytest.approx(easy / pos)
        # The hard negative alone carries more than 90 % of the negatives' loss: 1 of 2.
        assert hard / (easy + hard) > 0.9 and row.neg_fraction_carrying == 0.5
    # A larger gamma moves the loss onto the hardest examples: here the hard negative (p = .73,
    # harder than either positive) gains share, and the easy negative's loss relative to the
    # positives' falls about 95-fold.
    assert df.other_neg_share[1] > df.other_neg_share[0]
    assert df.easy_neg_to_pos[1] < df.easy_neg_to_pos[0] / 90
    with pytest.raises(ValueError, match="easy_prob"):
        loss_shares(logits, targets, state, easy_prob=1.0)
    with pytest.raises(ValueError, match="carry"):
        loss_shares(logits, targets, state, carry=0.0)
    with pytest.raises(ValueError, match=r"\(M,\)"):
        loss_shares(logits, targets, state[:3])


def test_figure4_prefers_the_papers_cell_then_gamma_2_newest_first() -> None:
    from retina_sweep.report import figure4_candidates

    def run(
        rid,
        gamma,
        start,
        status="FINISHED",
        outcome="completed",
        loss="focal",
        alpha="0.5",
        table="1b",
        also=None,
    ):
        return {
            "run_id": rid,
            "tags.table": table,
            "tags.also_tables": also,
            "params.loss.gamma": gamma,
            "params.loss.alpha": alpha,
            "params.loss.name": loss,
            "status": status,
            "tags.outcome": outcome,
            "start_time": pd.Timestamp(start),
        }

    runs = pd.DataFrame(
        [
            run("g1-new", "1.0", "2026-11-27 12:00"),
            run("g2-old", "2.0", "2026-11-27 09:00"),
            run("g2-new", "2", "2026-11-27 10:00"),
            run("paper-cell", "2.0", "2026-11-27 08:00", alpha="0.25"),
            # the same loss in the anchors sweep (another anchor row): after the gamma sweep's
            run("paper-loss-4x3", "2.0", "2026-11-27 15:00", alpha="0.25", table="1c"),
            # the default cell trained by the anchors sweep first, then shared with Table 1(b)
            run("paper-shared", "2.0", "2026-11-27 07:00", alpha="0.25", table="1c", also="1a,1b"),
            run("g2-running", "2.0", "2026-11-27 13:00", status="RUNNING"),
            run("g2-pruned", "2.0", "2026-11-27 13:00", outcome="pruned"),
            run("ce", "0.0", "2026-11-27 14:00", loss="ohem"),
        ]
    )
    order = ["paper-cell", "paper-shared", "paper-loss-4x3", "g2-new", "g2-old", "g1-new"]
    assert figure4_candidates(runs)["run_id"].tolist() == order
    assert figure4_candidates(runs, "g1-new")["run_id"].tolist() == ["g1-new"]
    with pytest.raises(ValueError, match="figure4_run=zzz: no such run"):
        figure4_candidates(runs, "zzz")


@pytest.mark.slow
def test_figure4_is_computed_from_a_trained_checkpoint(tmp_path: Path) -> None:
    from helpers import compose_config

    from retina_sweep.train import run

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_config(
        [
            "scale=smoke",
            f"tracking.uri={uri}",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
            "sweep.table=1b",
            "sweep.name=gamma",
        ]
    )
    run(cfg)
    report = build_report(tracking_uri=uri, sweep="gamma", out=tmp_path / "r")
    # The run's own `AP-<category>` metrics fill its row's per-category AP; their mean is COCO's
    # AP (each category's AP averages the same IoU x recall grid).
    t = report.tables["1b"]
    cats = per_category_columns(t)
    (i,) = [i for i in range(len(t.rows)) if t.rows["n"].iloc[i] == 1]
    values = t.per_category.loc[i, cats].astype(float)
    assert len(cats) >= 2 and t.per_category.loc[i, "n"] == 1 and values.notna().all()
    assert values.mean() == pytest.approx(t.rows.loc[i, "AP"], abs=1e-3)
    fig = tmp_path / "r" / "figures" / "fig4_loss_cdf.png"
    assert fig in report.files and fig.stat().st_size > 1000
    # Its numbers: the loss shares of the same predictions, in the files and the Markdown.
    shares = pd.read_csv(tmp_path / "r" / "figures" / "fig4_loss_shares.csv")
    assert shares["gamma"].tolist() == [0.0, 0.5, 1.0, 2.0, 5.0]
    parts = shares[["pos_share", "easy_neg_share", "other_neg_share"]].sum(axis=1)
    assert parts.to_numpy() == pytest.approx(1.0)
    assert "Figure 4's loss shares: run " in report.markdown
    # A run named on the command line that is not in the store is one clear error.
    with pytest.raises(ValueError, match="figure4_run=nope: no such run"):
        build_report(tracking_uri=uri, sweep="gamma", out=tmp_path / "r2", figure4_run="nope")
    # The report was also attached to the sweep's parent run when there is one; here there is
    # none, and nothing failed because of it.
    assert (tmp_path / "r" / "index.html").read_text().count("fig4_loss_cdf") >= 1


def test_a_cell_trained_by_another_sweep_fills_both_tables(store: Store, tmp_path: Path) -> None:
    """CE alpha .999 is never run by the alpha sweep here; a gamma-sweep run with the same config
    (tagged `also_tables=1a` by the alpha sweep that skipped it) fills the 1(a) row."""
    from retina_sweep.sweep import add_table_tag

    rid = store.run(
        table="1b", sweep="gamma", params={"loss.gamma": 0.0, "loss.alpha": 0.999}, ap=7.0
    )
    before = build_report(tracking_uri=store.uri, sweep="alpha", out=tmp_path / "a0")
    assert before.tables["1a"].rows.set_index("alpha").loc[0.999, "state"] == "missing"
    add_table_tag(store.mlf, rid, "1a")
    add_table_tag(store.mlf, rid, "1a")  # idempotent
    add_table_tag(store.mlf, rid, "1b")  # its own table: no tag
    assert store.mlf.get_run(rid).data.tags["also_tables"] == "1a"
    after = build_report(tracking_uri=store.uri, sweep="alpha", out=tmp_path / "a1")
    row = after.tables["1a"].rows.set_index("alpha").loc[0.999]
    assert row["AP"] == pytest.approx(7.0) and row["n"] == 1
    # and it still counts in 1(b) (gamma 0 keeps its best alpha .75 at 26.0)
    full = build_report(tracking_uri=store.uri, out=tmp_path / "all")
    assert full.tables["1b"].rows.set_index("gamma").loc[0.0, "AP"] == pytest.approx(26.0)


def test_fl_row_of_1d_meets_its_paper_row(tmp_path: Path) -> None:
    """FL has no OHEM batch/NMS (NaN in a float column beside OHEM's numbers); it must still be
    matched with the paper's FL row (36.0 AP), not listed twice."""
    s = Store(tmp_path)
    s.run(table="1d", sweep="ohem", params={"loss.name": "focal", "loss.alpha": 0.25}, ap=30.0)
    s.run(
        table="1d",
        sweep="ohem",
        params={"loss.name": "ohem", "loss.batch_size": 128, "loss.nms_thresh": 0.7},
        ap=20.0,
    )
    rows = build_report(tracking_uri=s.uri, table="1d", out=tmp_path / "d").tables["1d"].rows
    fl = rows[rows["method"] == "FL"]
    assert len(fl) == 1
    assert fl["AP"].iloc[0] == pytest.approx(30.0) and fl["paper AP"].iloc[0] == pytest.approx(36.0)


def test_an_optuna_study_is_reported_against_its_grid_table(tmp_path: Path) -> None:
    s = Store(tmp_path)
    # The grid it competes with (Table 1(b)): 4 cells of 400 iterations; gamma 1 / alpha .5 is
    # the best row with two seeds (30 and 34 -> 32 +- 2.83).
    for (gamma, alpha), aps in {
        (1.0, 0.25): (20.0,),
        (1.0, 0.5): (30.0, 34.0),
        (2.0, 0.25): (28.0,),
        (2.0, 0.5): (25.0,),
    }.items():
        for seed, ap in enumerate(aps):
            p = {"loss.gamma": gamma, "loss.alpha": alpha, "train.iterations": 400}
            s.run(table="1b", sweep="gamma", params=p, ap=ap, seed=seed)

    def trial(number, alpha, gamma, ap, **kw):
        p = {"loss.alpha": alpha, "loss.gamma": gamma, "train.iterations": 400}
        tags = {"optuna_trial": str(number), **kw.pop("tags", {})}
        s.run(table="hpo", sweep="study_a", params=p, ap=ap, tags=tags, **kw)

    trial(0, 0.3, 3.0, 10.0)
    trial(1, 0.2, 1.5, 31.0)
    trial(2, 0.8, 4.0, None, status="KILLED", outcome="pruned", tags={"pruned_at": "100"})
    trial(3, 0.6, 0.5, None, status="FAILED", outcome="failed")
    # Trial 1's configuration with another seed, run later by a plain multirun.
    p = {"loss.alpha": 0.2, "loss.gamma": 1.5, "train.iterations": 400}
    s.run(table="", sweep="study_a_best", params=p, ap=27.0, seed=1)

    out = tmp_path / "r"
    report = build_report(tracking_uri=s.uri, table="hpo", out=out)
    assert report.tables.keys() == {"1b"}  # built for the comparison, not shown
    (study,) = report.studies
    assert study.name == "study_a"
    assert list(study.rows["trial"]) == [0, 1, 2, 3]
    assert list(study.rows["state"]) == ["ok", "ok", "pruned", "failed"]
    # pruned: its pruned_at step; failed: the full count, as the sweeper's compute budget.
    assert list(study.rows["iterations"]) == [400, 400, 100, 400]
    assert study.iterations == 1300
    assert study.best["trial"] == 1 and study.best["AP"] == pytest.approx(31.0)
    assert study.best["seeds_n"] == 2 and study.best["seeds_mean"] == pytest.approx(29.0)
    ref = study.reference
    assert ref["row"] == {"gamma": 1.0, "best alpha": 0.5}
    assert ref["AP"] == pytest.approx(32.0) and ref["n"] == 2
    assert (ref["cells"], ref["iterations"]) == (4, 1600)
    md = report.markdown
    assert "1,300 training iterations" in md and "81.2 %" in md  # 1300 / 1600
    assert "best trial -1.0 AP" in md and "seed mean -3.0" in md
    assert (out / "study_study_a.csv").exists() and (out / "study_study_a.md").exists()
    assert "Optuna studies" in (out / "index.html").read_text()
    # A second study on the same budget without pruning, side by side with the first.
    s.run(
        table="hpo",
        sweep="study_b",
        params={"loss.alpha": 0.4, "loss.gamma": 2.0, "train.iterations": 400},
        ap=33.5,
        tags={"optuna_trial": "0"},
    )
    # study_b's parent run recorded its definition (as the Optuna sweeper does): the report shows
    # its sampler and pruner.
    parent = s.mlf.create_run(
        s.exp, tags={"is_parent": "true", "sweep": "study_b", "sweeper": "optuna", "table": "hpo"}
    )
    definition = {
        "space": {"loss.alpha": "interval(0.1, 0.9)", "loss.gamma": "interval(0.0, 5.0)"},
        "sampler": "tpe",
        "seed": 0,
        "sampler_args": {"n_startup_trials": 4},
        "pruner": "none",
        "pruner_args": {"min_resource": 100},
        "compute_budget": 8.4,
    }
    s.mlf.log_dict(parent.info.run_id, definition, "sweep/definition.json")
    both = build_report(tracking_uri=s.uri, table="hpo", out=tmp_path / "r3")
    rows = pd.read_csv(tmp_path / "r3" / "studies.csv").set_index("study")
    assert list(rows.index) == ["study_a", "study_b"]
    assert rows.loc["study_a", ["trials", "completed", "pruned", "iterations"]].tolist() == [
        4,
        2,
        1,
        1300,
    ]
    assert rows.loc["study_b", "% of grid"] == pytest.approx(25.0)  # 400 / 1600
    assert rows.loc["study_b", "vs grid best"] == pytest.approx(1.5)  # 33.5 - 32.0
    assert "| study_b | tpe | none | 1 | 1 | 0 | 400 | 25.0 | 33.5 | 0 | 32.0 | +1.5 |" in (
        both.markdown
    )
    assert "| study_a | — | — | 4 | 2 | 1 | 1,300 |" in both.markdown
    assert rows.loc["study_b", "best trial"] == 0 and rows.loc["study_a", "best trial"] == 1
    # pruner_args are not shown for pruner none (a preset's args stay when the command line
    # turns pruning off)
    assert (
        "- sampler tpe (seed 0, n_startup_trials 4), pruner none, compute budget 8.4 trials"
        in both.markdown
    )
    assert "<td>study_b</td>" in (tmp_path / "r3" / "index.html").read_text()
    # A study without its grid in the store says why it has no comparison; a study without a
    # finished trial leaves its best trial empty (and the others' stay integers).
    s2 = Store(tmp_path / "lone")
    s2.run(
        table="hpo",
        sweep="lone",
        params={"loss.alpha": 0.4, "loss.gamma": 2.0, "train.iterations": 400},
        ap=None,
        status="FAILED",
        outcome="failed",
        tags={"optuna_trial": "0"},
    )
    s2.run(
        table="hpo",
        sweep="other",
        params={"loss.alpha": 0.4, "loss.gamma": 2.0, "train.iterations": 400},
        ap=20.0,
        tags={"optuna_trial": "3"},
    )
    lone = build_report(tracking_uri=s2.uri, table="hpo", out=tmp_path / "r4")
    assert "no finished runs of Table 1b's grid in this store" in lone.markdown
    assert "| lone | — | — | 1 | 0 | 0 | 400 | — | — | — | — | — |" in lone.markdown
    assert "| other | — | — | 1 | 1 | 0 | 400 | — | 20.0 | 3 | — | — |" in lone.markdown
    # The grid tables alone do not show studies.
    assert build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r2").studies == []


def test_a_studys_best_trial_shows_its_per_category_ap_beside_the_grids_best_row(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path)
    # Grid best row: gamma 1, alpha .5 over two seeds (circle 10 / 20 -> 15; square on seed 1
    # only); a worse row with other per-category values must not be the one compared.
    for (gamma, alpha), runs in {
        (1.0, 0.5): ((30.0, {"AP-circle": 10.0}), (34.0, {"AP-circle": 20.0, "AP-square": 50.0})),
        (2.0, 0.25): ((28.0, {"AP-circle": 90.0, "AP-square": 90.0}),),
    }.items():
        for seed, (ap, cats) in enumerate(runs):
            p = {"loss.gamma": gamma, "loss.alpha": alpha, "train.iterations": 400}
            s.run(table="1b", sweep="gamma", params=p, ap=ap, seed=seed, extra=cats)
    for number, ap, cats in ((0, 10.0, {"AP-circle": 99.0}), (1, 36.0, {"AP-circle": 18.5})):
        p = {"loss.alpha": 0.3 + number, "loss.gamma": 1.5, "train.iterations": 400}
        tags = {"optuna_trial": str(number)}
        s.run(table="hpo", sweep="study_a", params=p, ap=ap, tags=tags, extra=cats)
    out = tmp_path / "r"
    (study,) = build_report(tracking_uri=s.uri, table="hpo", out=out).studies
    pc = study.per_category.set_index("category")
    assert list(pc.index) == ["circle", "square"]
    assert pc.loc["circle", "best trial"] == pytest.approx(18.5)  # trial 1's run, not trial 0's
    assert pc.loc["circle", "grid best"] == pytest.approx(15.0)
    assert pc.loc["circle", "Δ"] == pytest.approx(3.5)
    assert math.isnan(pc.loc["square", "best trial"]) and pc.loc["square", "grid best"] == 50.0
    md = (out / "study_study_a.md").read_text()
    assert "| category | best trial 1 | Table 1b best row | Δ |" in md
    assert "| circle | 18.5 | 15.0 | +3.5 |" in md
    assert "| square | — | 50.0 | — |" in md
    assert "best trial 1</th>" in (out / "index.html").read_text()


def test_a_studys_grid_compute_counts_the_cells_its_table_keeps(tmp_path: Path) -> None:
    """A run of other settings in a grid row (here a 50-iteration probe) is left out of the
    table, so it is not a cell of the grid the study is measured against either."""
    s = Store(tmp_path)
    probe = {"loss.gamma": 1.0, "loss.alpha": 0.75, "train.iterations": 50}
    s.run(table="1b", sweep="gamma", params=probe, ap=5.0)  # earlier: the row keeps the grid's
    for (gamma, alpha), ap in {(1.0, 0.25): 20.0, (1.0, 0.5): 30.0, (2.0, 0.25): 28.0}.items():
        p = {"loss.gamma": gamma, "loss.alpha": alpha, "train.iterations": 400}
        s.run(table="1b", sweep="gamma", params=p, ap=ap)
    p = {"loss.alpha": 0.2, "loss.gamma": 1.5, "train.iterations": 400}
    s.run(table="hpo", sweep="study", params=p, ap=25.0, tags={"optuna_trial": "0"})
    report = build_report(tracking_uri=s.uri, table="hpo", out=tmp_path / "r")
    assert any("left out (train.iterations 50" in n for n in report.tables["1b"].notes)
    ref = report.studies[0].reference
    assert (ref["cells"], ref["iterations"]) == (3, 1200)


def test_a_table_says_which_precision_its_runs_trained_in(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for alpha, prec in ((0.25, "bf16"), (0.5, "bf16"), (0.75, None)):
        s.run(
            table="1a",
            sweep="alpha",
            params={"loss.alpha": alpha, "loss.gamma": 0.0},
            ap=10 * alpha,
            tags={"precision": prec} if prec else None,
        )
    report = build_report(tracking_uri=s.uri, table="1a", out=tmp_path / "r")
    assert report.tables["1a"].precisions == {"bf16": 2, "fp32 (untagged)": 1}
    assert "Training precision of the runs: bf16 x 2, fp32 (untagged) x 1 (mixed" in report.markdown


def test_a_row_keeps_one_experiment_and_names_what_it_left_out(tmp_path: Path) -> None:
    """Runs with the same row keys but other settings are other experiments, not more seeds."""
    s = Store(tmp_path)

    def ce(alpha, ap, seed=0, **params):
        p = {"loss.alpha": alpha, "loss.gamma": 0.0, "train.iterations": 400, **params}
        return s.run(table="1a", sweep="alpha", params=p, ap=ap, seed=seed)

    # alpha .25 at seed 0: a short run (50 iterations, an older default), then the real one.
    ce(0.25, 10.0, **{"train.iterations": 50})
    ce(0.25, 32.0)
    # `+sweep=alpha loss.gamma=0,2`: focal-loss runs tagged 1a beside the CE ones (ints logged).
    ce(0.5, 20.0, seed=0, **{"loss.gamma": 0})
    ce(0.5, 22.0, seed=1, **{"loss.gamma": 0})
    ce(0.5, 30.0, seed=0, **{"loss.gamma": 2})
    # alpha .75: the same settings and seed twice under two config hashes (e.g. a pretraining
    # version bump): one seed, the later run.
    s.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.75, "loss.gamma": 0.0, "train.iterations": 400},
        ap=25.0,
        chash="old",
    )
    s.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.75, "loss.gamma": 0.0, "train.iterations": 400},
        ap=27.0,
        chash="new",
    )
    # alpha .9: a finished run, then a failed one of other settings: the finished one is kept.
    ce(0.9, 24.0)
    s.run(
        table="1a",
        sweep="alpha",
        params={"loss.alpha": 0.9, "loss.gamma": 0.0, "train.iterations": 800},
        ap=None,
        status="FAILED",
        outcome="failed",
    )
    t = build_report(tracking_uri=s.uri, table="1a", out=tmp_path / "r").tables["1a"]
    rows = t.rows.set_index("alpha")
    assert rows.loc[0.25, "n"] == 1 and rows.loc[0.25, "AP"] == pytest.approx(32.0)
    assert rows.loc[0.25, "state"] == "1 ok"
    # the latest run's experiment (gamma 2) is the row; the two CE seeds are left out
    assert rows.loc[0.5, "n"] == 1 and rows.loc[0.5, "AP"] == pytest.approx(30.0)
    assert rows.loc[0.75, "n"] == 1 and rows.loc[0.75, "AP"] == pytest.approx(27.0)
    assert rows.loc[0.9, "state"] == "1 ok" and rows.loc[0.9, "AP"] == pytest.approx(24.0)
    notes = "\n".join(t.notes)
    assert "alpha 0.25: 1 run of other settings left out (train.iterations 50; kept 400)" in notes
    assert "alpha 0.5: 2 runs of other settings left out (loss.gamma 0; kept 2)" in notes
    assert "alpha 0.75: 1 earlier run of the same seed left out" in notes
    assert "alpha 0.9: 1 run of other settings left out (train.iterations 800; kept 400)" in notes
    md = to_markdown(t)
    assert "alpha 0.5: 2 runs of other settings left out" in md


def test_best_over_compares_cells_of_one_experiment(tmp_path: Path) -> None:
    """Table 1(b)'s best alpha per gamma is chosen among runs of the same settings."""
    s = Store(tmp_path)
    for alpha, iters, ap in ((0.25, 50, 40.0), (0.5, 400, 30.0), (0.75, 400, 28.0)):
        p = {"loss.gamma": 2.0, "loss.alpha": alpha, "train.iterations": iters}
        s.run(table="1b", sweep="gamma", params=p, ap=ap)
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r").tables["1b"]
    row = t.rows.set_index("gamma").loc[2.0]
    assert row["best alpha"] == 0.5 and row["AP"] == pytest.approx(30.0)
    assert any(n.startswith("gamma 2: 1 run of other settings left out") for n in t.notes)


def test_rows_come_in_the_papers_order_then_ours(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for sc, ar in ((3, 3), (1, 1), (5, 3), (2, 3), (1, 3), (2, 1)):
        ratios = [0.5, 1.0, 2.0] if ar == 3 else [1.0]
        p = {"model.anchors.scales_per_octave": sc, "model.anchors.aspect_ratios": ratios}
        s.run(table="1c", sweep="anchors", params=p, ap=float(sc + ar))
    t = build_report(tracking_uri=s.uri, table="1c", out=tmp_path / "c").tables["1c"]
    got = list(zip(t.rows["#sc"].astype(int), t.rows["#ar"].astype(int), strict=True))
    # the paper's 1(c): 1x1, 2x1, 3x1, 1x3, 2x3, 3x3, 4x3; ours-only (5x3) after
    assert got == [(1, 1), (2, 1), (3, 1), (1, 3), (2, 3), (3, 3), (4, 3), (5, 3)]
    assert t.rows.set_index(["#sc", "#ar"]).loc[(4, 3), "state"] == "missing"

    s.run(table="1d", sweep="ohem", params={"loss.name": "focal", "loss.alpha": 0.25}, ap=30.0)
    for batch, nms in ((512, 0.5), (128, 0.7)):
        p = {"loss.name": "ohem", "loss.batch_size": batch, "loss.nms_thresh": nms}
        s.run(table="1d", sweep="ohem", params=p, ap=20.0)
    d = build_report(tracking_uri=s.uri, table="1d", out=tmp_path / "d").tables["1d"]
    assert list(d.rows["method"]) == ["OHEM"] * 6 + ["OHEM 1:3"] * 3 + ["FL"]
    assert list(d.rows["batch"].iloc[:3]) == [128, 256, 512]
    assert list(d.rows["nms"].iloc[:4]) == [0.7, 0.7, 0.7, 0.5]


def _check(table, name_start: str) -> dict:
    return next(c for c in table.checks if c["name"].startswith(name_start))


def test_near_best_decides_and_words_with_the_same_tolerance(tmp_path: Path) -> None:
    # gamma 2: 30.0 and 30.42 (mean 30.21, std 0.30); the best, gamma 1: 31.0. Margin -0.8 is
    # inside the 1-AP tolerance although beyond 2 std (0.6).
    s = Store(tmp_path)
    for seed, ap in enumerate((30.0, 30.42)):
        p = {"loss.gamma": 2.0, "loss.alpha": 0.25}
        s.run(table="1b", sweep="gamma", params=p, ap=ap, seed=seed)
    s.run(table="1b", sweep="gamma", params={"loss.gamma": 1.0, "loss.alpha": 0.25}, ap=31.0)
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r").tables["1b"]
    c = _check(t, "gamma 2 is at or near")
    assert c["status"] == "holds"
    assert "within the 1-AP tolerance" in c["detail"] and "beyond" not in c["detail"]
    # 2 std wider than 1 AP: the tolerance is 2 std, and the wording says so
    s.run(
        table="1b", sweep="gamma", params={"loss.gamma": 1.0, "loss.alpha": 0.25}, ap=36.0, seed=1
    )
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r2").tables["1b"]
    c = _check(t, "gamma 2 is at or near")  # margin 30.21 - 33.5 = -3.3, 2 std = 7.1
    assert c["status"] == "holds" and "within noise (2 std = 7.1 AP)" in c["detail"]
    s.run(table="1b", sweep="gamma", params={"loss.gamma": 0.5, "loss.alpha": 0.25}, ap=40.0)
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r3").tables["1b"]
    c = _check(t, "gamma 2 is at or near")  # margin -9.8 against the single-seed 40.0
    assert c["status"] == "fails" and "beyond the 1-AP tolerance" in c["detail"]


def test_a_tie_at_the_bottom_holds_for_a_lowest_check(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for alpha, ap in ((0.1, 0.0), (0.25, 0.0), (0.5, 20.0)):
        s.run(table="1a", sweep="alpha", params={"loss.alpha": alpha, "loss.gamma": 0.0}, ap=ap)
    t = build_report(tracking_uri=s.uri, table="1a", out=tmp_path / "r").tables["1a"]
    c = _check(t, "CE with alpha .10 collapses")
    assert c["status"] == "holds" and "tied" in c["detail"]


def test_best_focal_loss_check_leaves_out_gamma_0(tmp_path: Path) -> None:
    # 1(b)'s gamma-0 row is CE itself: at 26.5 it beats 1(a)'s best CE (26.0), but no focal
    # loss (gamma > 0) does.
    s = Store(tmp_path)
    for alpha, ap in ((0.1, 0.5), (0.75, 26.0)):
        s.run(table="1a", sweep="alpha", params={"loss.alpha": alpha, "loss.gamma": 0.0}, ap=ap)
    for gamma, alpha, ap in ((0.0, 0.75, 26.5), (1.0, 0.25, 25.0), (2.0, 0.25, 24.0)):
        s.run(table="1b", sweep="gamma", params={"loss.gamma": gamma, "loss.alpha": alpha}, ap=ap)
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r").tables["1b"]
    c = _check(t, "the best focal loss beats")
    assert c["status"] == "fails" and "margin -1.0 AP" in c["detail"]


def test_spearman_of_constant_values_says_why_not_needs_3(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for alpha in (0.25, 0.5, 0.75):
        s.run(table="1a", sweep="alpha", params={"loss.alpha": alpha, "loss.gamma": 0.0}, ap=5.0)
    t = build_report(tracking_uri=s.uri, table="1a", out=tmp_path / "r").tables["1a"]
    md = to_markdown(t)
    assert t.spearman is None and "needs 3" not in md
    assert "undefined for constant values" in md


def test_gammas_logged_as_ints_land_in_their_rows(tmp_path: Path) -> None:
    # A command-line sweep `loss.gamma=0,2` logs '0' and '2', not '0.0' and '2.0'.
    s = Store(tmp_path)
    s.run(table="1b", sweep="gamma", params={"loss.gamma": 0, "loss.alpha": 0.75}, ap=20.0)
    s.run(table="1b", sweep="gamma", params={"loss.gamma": 2, "loss.alpha": 0.25}, ap=30.0)
    s.run(
        table="1b", sweep="gamma", params={"loss.gamma": "2.0", "loss.alpha": 0.25}, ap=32.0, seed=1
    )
    t = build_report(tracking_uri=s.uri, table="1b", out=tmp_path / "r").tables["1b"]
    assert len(t.rows) == 7  # the paper's 7 gammas, no extra rows
    rows = t.rows.set_index("gamma")
    assert rows.loc[0.0, "AP"] == pytest.approx(20.0) and rows.loc[0.0, "paper AP"] == 31.1
    assert rows.loc[2.0, "n"] == 2 and rows.loc[2.0, "AP"] == pytest.approx(31.0)
    assert rows.loc[2.0, "paper AP"] == 34.0
    assert list(t.rows["gamma"]) == [0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def test_paper_table_1b_matches_the_paper() -> None:
    paper = load_paper()
    b = paper[paper["table"] == "1b"]
    got = [(g, a, ap) for g, a, ap in zip(b["gamma"], b["alpha"], b["AP"], strict=True)]
    assert got == [
        (0.0, 0.75, 31.1),
        (0.1, 0.75, 31.4),
        (0.2, 0.75, 31.9),
        (0.5, 0.5, 32.9),
        (1.0, 0.25, 33.7),
        (2.0, 0.25, 34.0),
        (5.0, 0.25, 32.2),
    ]


def test_a_param_that_follows_the_seed_does_not_split_a_row(tmp_path: Path) -> None:
    """random 1:3 logs `loss.seed: ${seed}`: its seeds are one experiment; a fixed data seed
    that differs is not."""
    s = Store(tmp_path)
    for seed, ap, data_seed in ((0, 20.0, 0), (1, 22.0, 0), (2, 40.0, 7)):
        p = {"loss.name": "random_1to3", "loss.batch_size": 128, "loss.nms_thresh": 0.5}
        p |= {"loss.seed": seed, "data.synthetic.seed": data_seed, "seed": seed}
        s.run(table="1d", sweep="ohem", params=p, ap=ap, seed=seed)
    for seed, ap in ((0, 30.0), (1, 32.0)):
        p = {"loss.name": "random_1to3", "loss.batch_size": 256, "loss.nms_thresh": 0.5}
        p |= {"loss.seed": seed, "data.synthetic.seed": 0, "seed": seed}
        s.run(table="1d", sweep="ohem", params=p, ap=ap, seed=seed)
    t = build_report(tracking_uri=s.uri, table="1d", out=tmp_path / "d").tables["1d"]
    rows = t.rows[t.rows["method"] == "random 1:3"].set_index("batch")
    assert rows.loc[256, "n"] == 2 and rows.loc[256, "AP"] == pytest.approx(31.0)
    # batch 128: the latest run (data seed 7) is the experiment; seeds 0 and 1 are another one
    assert rows.loc[128, "n"] == 1 and rows.loc[128, "AP"] == pytest.approx(40.0)
    assert t.notes == [
        "method random 1:3, batch 128, nms 0.5: 2 runs of other settings left out "
        "(data.synthetic.seed 0; kept 7)"
    ]


def test_per_category_ap_uses_the_rows_runs_seeds_averaged(tmp_path: Path) -> None:
    """Per row the `AP-<name>` metrics of the runs behind its AP: seeds averaged, Table 1(b)'s
    chosen alpha only, a diverged run left out; a run without them gives NaN, never a number."""
    s = Store(tmp_path)

    def fl(gamma, alpha, ap, seed=0, cats=None, **kw):
        p = {"loss.gamma": gamma, "loss.alpha": alpha}
        s.run(table="1b", sweep="gamma", params=p, ap=ap, seed=seed, extra=cats, **kw)

    # gamma 2: alpha .25 is the best (30.5); alpha .75 (20.0) has other per-category values.
    fl(2.0, 0.25, 30.0, seed=0, cats={"AP-circle": 10.0, "AP-square": 40.0})
    fl(2.0, 0.25, 31.0, seed=1, cats={"AP-circle": 20.0, "AP-square": 42.0})
    fl(2.0, 0.25, None, seed=2, cats={"AP-circle": 99.0}, outcome="diverged")
    fl(2.0, 0.75, 20.0, cats={"AP-circle": 90.0, "AP-square": 90.0})
    # gamma 1: the best alpha's run predates per-category AP; the other alpha's has it.
    fl(1.0, 0.25, 25.0)
    fl(1.0, 0.75, 24.0, cats={"AP-circle": 80.0, "AP-square": 80.0})
    # gamma 5: one of two seeds logged it.
    fl(5.0, 0.25, 22.0, seed=0, cats={"AP-circle": 30.0})
    fl(5.0, 0.25, 24.0, seed=1)
    out = tmp_path / "r"
    report = build_report(tracking_uri=s.uri, table="1b", out=out)
    t = report.tables["1b"]
    pc = t.per_category
    assert list(pc.columns) == ["gamma", "best alpha", "n", "circle", "square"]
    # aligned with the table's rows, the paper's gammas without runs included
    assert list(pc["gamma"]) == list(t.rows["gamma"])
    rows = pc.set_index("gamma")
    assert rows.loc[2.0, "best alpha"] == 0.25 and rows.loc[2.0, "n"] == 2
    assert rows.loc[2.0, "circle"] == pytest.approx(15.0)  # (10 + 20) / 2, not 90 nor 99
    assert rows.loc[2.0, "square"] == pytest.approx(41.0)
    assert rows.loc[1.0, "best alpha"] == 0.25 and rows.loc[1.0, "n"] == 0
    assert math.isnan(rows.loc[1.0, "circle"]) and math.isnan(rows.loc[1.0, "square"])
    assert rows.loc[5.0, "n"] == 1 and rows.loc[5.0, "circle"] == pytest.approx(30.0)
    assert math.isnan(rows.loc[5.0, "square"])
    assert rows.loc[0.5, "n"] == 0 and math.isnan(rows.loc[0.5, "circle"])  # missing row
    # the table's own columns are unchanged
    assert not any(c.startswith("_cat") or c == "circle" for c in t.rows.columns)

    csv = pd.read_csv(out / "table_1b_per_category.csv").set_index("gamma")
    assert csv.loc[2.0, "circle"] == pytest.approx(15.0) and math.isnan(csv.loc[1.0, "circle"])
    assert len(csv) == len(t.rows)
    assert "square" not in pd.read_csv(out / "table_1b.csv").columns
    md = (out / "table_1b.md").read_text()
    assert md == to_markdown(t) and "#### Per-category AP" in report.markdown
    assert "| gamma | best alpha | runs | circle | square |" in md
    assert "| 2 | 0.25 | 2 | 15.0 | 41.0 |" in md
    assert "| 1 | 0.25 | 0 | — | — |" in md
    assert "| 0.5 |" not in md.split("#### Per-category AP")[1]  # no finished run: not shown
    assert "gamma 1, best alpha 0.25: no per-category AP in its 1 finished run" in md
    assert "gamma 5, best alpha 0.25: per-category AP from 1 of its 2 finished runs" in md
    assert "<h3>Per-category AP</h3>" in (out / "index.html").read_text()
    # LaTeX: transposed, one column per row with a finished run (gammas 1, 2, 5 in table order)
    tex = (out / "table_1b_per_category.tex").read_text()
    assert tex == per_category_latex(t)
    assert (
        r"category & gamma 1, best alpha 0.25 & gamma 2, best alpha 0.25 & gamma 5, best alpha 0.25 \\"
        in tex
    )
    assert r"runs & 0 & 2 & 1 \\" in tex
    assert r"circle & -- & 15.0 & 30.0 \\" in tex
    assert r"square & -- & 41.0 & -- \\" in tex
    assert r"\begin{tabular}{lrrr}" in tex
    fig = out / "figures" / "per_category_1b.png"
    assert fig in report.files and fig.stat().st_size > 1000


def test_a_table_without_per_category_metrics_says_so(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "r"
    report = build_report(tracking_uri=store.uri, table="1a", out=out)
    t = report.tables["1a"]
    assert list(t.per_category.columns) == ["alpha", "n"]
    assert list(t.per_category["alpha"]) == list(t.rows["alpha"])
    assert (t.per_category["n"] == 0).all()
    assert "No run of this table logged per-category AP" in report.markdown
    assert list(pd.read_csv(out / "table_1a_per_category.csv").columns) == ["alpha", "n"]
    assert (out / "table_1a_per_category.tex").read_text().startswith("% ")
    assert not (out / "figures" / "per_category_1a.png").exists()
