"""`python -m retina_sweep.evaluate`: the COCO evaluation of trained weights, without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from PIL import Image

from retina_sweep.builders import build_datasets
from retina_sweep.config import ConfigError, config_hash
from retina_sweep.data.loader import build_loader
from retina_sweep.evaluate import checkpoint_path, evaluate_checkpoint
from retina_sweep.evaluation import evaluate
from retina_sweep.train import run

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, *extra: str):
    return compose_config(
        [
            "scale=smoke",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
            *extra,
        ]
    )


def _runs(tmp_path: Path, experiment: str):
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.get_experiment_by_name(experiment)
    return mlf, ([] if exp is None else mlf.search_runs([exp.experiment_id]))


def _reference_detections(cfg, ckpt: Path, out: Path) -> list[dict]:
    """The val detections of the checkpoint's weights, loaded and run here by hand."""
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all")
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    loader = build_loader(
        data.val, batch_size=2, train=False, num_workers=0, size_divisible=data.size_divisible
    )
    evaluate(model, loader, data.val, "cpu", results_file=out)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_a_trained_cell_evaluates_to_its_training_runs_metrics(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "train.eval_every=2")
    trained_ap = run(cfg)
    ckpt = tmp_path / "sweeps" / "checkpoints" / config_hash(cfg) / "last.pt"
    assert checkpoint_path(cfg) == ckpt  # the trial's own checkpoint, found by its hash
    metrics = evaluate_checkpoint(cfg)
    mlf, (train_run,) = _runs(tmp_path, "retina_sweep")
    assert metrics["AP"] == pytest.approx(trained_ap, abs=1e-9)
    for key in ("AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(train_run.data.metrics[key], abs=1e-9), key
    # Logged in its own experiment, under a tag sweeps do not look up: the training run stays
    # the cell's only FINISHED run, and the report reads training runs only.
    _, (ev,) = _runs(tmp_path, "retina_sweep-eval")
    assert ev.info.status == "FINISHED" and ev.data.tags["outcome"] == "completed"
    assert "config_hash" not in ev.data.tags
    assert ev.data.tags["eval_config_hash"] == config_hash(cfg)
    assert ev.data.tags["checkpoint"] == str(ckpt.resolve())
    assert ev.data.tags["checkpoint_iteration"] == "4"
    assert ev.data.metrics["AP"] == pytest.approx(metrics["AP"])
    assert {a.path for a in mlf.list_artifacts(ev.info.run_id, "eval")} == {
        "eval/coco_results.json",
        "eval/coco_summary.txt",
        "eval/per_category_AP.csv",
    }
    # The training run's final metrics carry the per-category AP too (classes with val ground
    # truth), and its table.
    per_category = {f"AP-{k}": v for k, v in metrics["per_category_AP"].items() if v == v}
    logged = {k: v for k, v in train_run.data.metrics.items() if k.startswith("AP-")}
    assert per_category and logged == pytest.approx(per_category, abs=1e-9)
    assert "eval/per_category_AP.csv" in {
        a.path for a in mlf.list_artifacts(train_run.info.run_id, "eval")
    }
    # The periodic evaluation (iteration 2 of 4) logs them too, as `val_AP-<name>`, beside
    # `val_AP`: one value each, at step 2, a category for each `AP-` of the final evaluation
    # that has ground truth.
    periodic = {k for k in train_run.data.metrics if k.startswith("val_AP-")}
    assert periodic and periodic <= {f"val_{k}" for k in per_category}
    for key in [*sorted(periodic), "val_AP"]:
        history = mlf.get_metric_history(train_run.info.run_id, key)
        assert [m.step for m in history] == [2], key

    # Other inference settings: another identity, so the checkpoint is given by path. The
    # detections are those of the checkpoint's weights (a score threshold of 0 keeps every
    # candidate, so wrong weights could not hide behind an empty result).
    other = _cfg(
        tmp_path,
        f"eval.checkpoint={ckpt}",
        "model.inference.score_thresh=0.0",
        "model.inference.detections_per_img=5",
        "tracking.enabled=false",
        f"paths.root={tmp_path}/other",
        "eval.visualize=2",
        "eval.visualize_score=0.0",
    )
    assert config_hash(other) != config_hash(cfg)
    out = evaluate_checkpoint(other)
    assert out["num_detections"] == 5 * out["num_images"]
    written = sorted(Path(tmp_path / "other" / "eval").glob("*/coco_results.json"))
    assert len(written) == 1
    # eval.visualize: the first two val images drawn, at their own size, with boxes on them.
    val = build_datasets(other.data, max_level=int(other.model.fpn.max_level)).val
    drawn = sorted((written[0].parent / "vis").glob("*.png"))
    assert sorted(p.name for p in drawn) == sorted(f"{i}.png" for i in val.image_ids[:2])
    for index in (0, 1):
        image = np.asarray(Image.open(written[0].parent / "vis" / f"{val.image_ids[index]}.png"))
        original = np.asarray(Image.open(val.image_path(index)).convert("RGB"))
        assert image.shape == original.shape and (image != original).any()
    got = json.loads(written[0].read_text())
    want = _reference_detections(other, ckpt, tmp_path / "want.json")
    assert len(got) == len(want) == 5 * out["num_images"]
    for g, w in zip(got, want, strict=True):
        assert (g["image_id"], g["category_id"]) == (w["image_id"], w["category_id"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=1e-4)


def test_a_bare_state_dict_loads_and_wrong_weights_are_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    torch.manual_seed(0)
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all")
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    metrics = evaluate_checkpoint(
        _cfg(tmp_path, "tracking.enabled=false", f"eval.checkpoint={bare}")
    )
    assert metrics["num_images"] == 8  # the smoke val split

    # Weights of another model: one message naming the file and what does not fit.
    wider = _cfg(
        tmp_path, "tracking.enabled=false", f"eval.checkpoint={bare}", "model.head.num_convs=2"
    )
    with pytest.raises(ConfigError, match=r"bare\.pt does not fit this config's model \(missing"):
        evaluate_checkpoint(wider)
    narrower = _cfg(
        tmp_path, "tracking.enabled=false", f"eval.checkpoint={bare}", "model.fpn.channels=8"
    )
    with pytest.raises(ConfigError, match=r"shape: "):
        evaluate_checkpoint(narrower)


def test_per_category_ap_is_written_printed_and_logged(tmp_path: Path, caplog) -> None:
    # Random weights, every candidate kept: some detections of every class.
    cfg = _cfg(tmp_path, "model.inference.score_thresh=0.0")
    torch.manual_seed(0)
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all")
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with caplog.at_level("INFO", logger="retina_sweep.evaluate"):
        metrics = evaluate_checkpoint(
            _cfg(tmp_path, "model.inference.score_thresh=0.0", f"eval.checkpoint={bare}")
        )
    (results,) = Path(tmp_path / "sweeps" / "eval").glob("*/coco_results.json")
    table = pd.read_csv(results.parent / "per_category_AP.csv")
    val = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level)).val
    names = [val.coco.cats[c]["name"] for c in sorted(val.coco.cats)]
    with_gt = {val.coco.cats[a["category_id"]]["name"] for a in val.coco.anns.values()}
    assert list(table.columns) == ["category", "AP"] and list(table["category"]) == names
    assert list(metrics["per_category_AP"]) == names
    ap = dict(zip(table["category"], table["AP"], strict=True))
    for name, value in metrics["per_category_AP"].items():
        assert ap[name] == pytest.approx(value, nan_ok=True), name
    # A class without val ground truth is an empty cell, the others' mean is the AP.
    assert {n for n in names if not np.isnan(ap[n])} == with_gt
    assert np.mean([ap[n] for n in with_gt]) == pytest.approx(metrics["AP"])
    assert "Per-category bbox AP:" in caplog.text and f"| {names[0]} " in caplog.text
    mlf, (ev,) = _runs(tmp_path, "retina_sweep-eval")
    logged = {k: v for k, v in ev.data.metrics.items() if k.startswith("AP-")}
    assert logged == {f"AP-{n}": pytest.approx(ap[n]) for n in with_gt}  # NaN left out
    artifacts = {a.path for a in mlf.list_artifacts(ev.info.run_id, "eval")}
    assert "eval/per_category_AP.csv" in artifacts


def test_a_missing_checkpoint_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    with pytest.raises(ConfigError, match=rf"{config_hash(cfg)}/last\.pt: this config.s cell"):
        evaluate_checkpoint(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retina_sweep.evaluate",
            "scale=smoke",
            "tracking.enabled=false",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
            f"eval.checkpoint={tmp_path}/nowhere.pt",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1]
        == f"retina_sweep.evaluate: missing checkpoint {tmp_path}/nowhere.pt: nothing to evaluate"
    )
    assert "Traceback" not in proc.stderr
