"""`python -m retina_sweep.evaluate [overrides]`: COCO evaluation of trained weights, no training.

detectron2's ``--eval-only``. The config is composed exactly as for a training run (same groups,
same overrides); the weights are

- ``eval.checkpoint=PATH`` when given: a checkpoint written by a training run (``last.pt``) or a
  bare ``state_dict`` of the detector;
- otherwise the trial's own checkpoint, ``paths.checkpoints/<config hash>/last.pt``: the cell
  that ``python -m retina_sweep <the same overrides>`` trained.

Inference settings (``model.inference.*``: score threshold, top-k, NMS, detections per image) are
part of a trial's identity, so evaluating a trained cell with other ones takes its checkpoint by
path: ``python -m retina_sweep.evaluate eval.checkpoint=sweeps/checkpoints/<hash>/last.pt
model.inference.nms_thresh=0.6``. Everything else about the model must match the weights; a
mismatch stops with one message naming the checkpoint and the first keys that differ.

``eval.visualize=N`` also draws the first N val images with their ground truth (green) and the
detections scoring at least ``eval.visualize_score`` (red; `retina_sweep.visualize`) into
``vis/`` beside the results.

The metrics are logged to MLflow in their own experiment (``<tracking.experiment>-eval``), so that
an evaluation is never taken for a trained cell: sweeps skip cells by their FINISHED training
runs, and the report reads training runs only. The COCO results JSON
(``coco_results.json``, detectron2's ``coco_instances_results.json``), pycocotools' summary
(``coco_summary.txt``) and the per-category AP (``per_category_AP.csv``: columns ``category``,
``AP`` in points, one row per category in id order, empty AP for a category without ground
truth in the val split) are written to the run's output folder and logged as artifacts
(``eval/``). As detectron2's COCOEvaluator, the per-category AP (IoU 0.50:0.95, all areas, 100
detections) is also printed as a table and logged as metrics ``AP-<category name>``
(`retina_sweep.evaluation.per_category_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, config_hash, exit_on_bad_input, validate
from .tracking import RunTracker, config_params

__all__ = ["evaluate_checkpoint", "checkpoint_path", "load_weights"]

log = logging.getLogger(__name__)

EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ms_per_image")


def checkpoint_path(cfg: DictConfig) -> Path:
    """``eval.checkpoint``, else the trial's own ``paths.checkpoints/<config hash>/last.pt``."""
    given = OmegaConf.select(cfg, "eval.checkpoint", default=None)
    if given:
        return Path(str(given)).expanduser()
    return Path(cfg.paths.checkpoints) / config_hash(cfg) / "last.pt"


def load_weights(model: torch.nn.Module, path: Path) -> int | None:
    """Load a training checkpoint (``{"model": ..., "iteration": ...}``) or a bare state dict
    into `model`, strictly; returns the checkpoint's iteration (None for a bare state dict).

    Raises:
        ConfigError: the file is missing or unreadable, or its tensors do not fit `model` (the
            message names the file and the first missing, unexpected or mis-shaped keys).
    """
    if not path.is_file():
        raise ConfigError(f"missing checkpoint {path}: nothing to evaluate")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"unreadable checkpoint {path}: {type(exc).__name__}: {exc}") from None
    iteration = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        iteration = int(state["iteration"]) if "iteration" in state else None
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state dict ({type(state).__name__})")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{name}: {', '.join(keys[:3])}{more}")
        raise ConfigError(
            f"checkpoint {path} does not fit this config's model ({'; '.join(parts)}): "
            "evaluate it with the model.* settings it was trained with"
        )
    model.load_state_dict(state, strict=True)
    return iteration


def _output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # library use, tests: no Hydra job around
        return Path(cfg.paths.root) / "eval" / time.strftime("%Y-%m-%d_%H-%M-%S")


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the weights `checkpoint_path(cfg)` on the val split of `cfg.data` with the model
    of `cfg`; returns `retina_sweep.evaluation.evaluate`'s metrics (AP in points, ...).

    Bad input (a config value, a missing dataset file, a missing or non-fitting checkpoint) is
    raised before any image is read.
    """
    from .builders import build_datasets
    from .data.loader import build_loader
    from .evaluation import (
        evaluate,
        format_per_category,
        per_category_metrics,
        per_category_table,
    )
    from .train import check_data_files, pick_device

    validate(cfg)
    device = pick_device(cfg.device)
    check_data_files(cfg)
    path = checkpoint_path(cfg)
    if not path.is_file() and not OmegaConf.select(cfg, "eval.checkpoint", default=None):
        raise ConfigError(
            f"missing checkpoint {path}: this config's cell ({config_hash(cfg)}) has not been "
            "trained here (python -m retina_sweep with the same overrides trains it), or give "
            "eval.checkpoint=PATH"
        )
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))

    # The weights come from the checkpoint: no pretrained backbone is loaded (or, for the proxy,
    # trained on a cold cache) only to be overwritten.
    backbone = {**OmegaConf.to_container(cfg.model.backbone, resolve=True), "pretrained": None}
    strategy = instantiate(cfg.loss, _convert_="all")
    model = instantiate(cfg.model, strategy=strategy, _convert_="all", backbone=backbone)
    iteration = load_weights(model, path)
    model.to(device).eval()

    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    loader = build_loader(
        data.val,
        batch_size=max(1, int(cfg.train.batch_size) // max(1, int(cfg.train.devices))),
        train=False,
        num_workers=int(cfg.train.num_workers),
        size_divisible=data.size_divisible,
    )
    out = _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "coco_results.json"

    t = cfg.tracking
    tracker = RunTracker(
        enabled=bool(t.enabled),
        uri=t.uri,
        experiment=f"{t.experiment}-eval",
        run_name=t.run_name or f"eval {path.parent.name}",
    )
    tracker.start(
        tags={
            "checkpoint": str(path.resolve()),
            "checkpoint_iteration": iteration,
            # The identity of the evaluated settings, under its own name: `config_hash` is what
            # sweeps look up finished training runs by.
            "eval_config_hash": config_hash(cfg),
            "seed": cfg.seed,
            "loss": cfg.loss.name,
        },
        params=config_params(cfg),
    )
    try:
        log.info("evaluating %s (iteration %s) on %s", path, iteration, device)
        metrics = evaluate(model, loader, data.val, device, results_file=results)
    except BaseException as exc:
        tracker.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    final = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    step = iteration if iteration is not None else 0
    tracker.log_metrics({k: v for k, v in final.items() if not math.isnan(v)}, step=step)
    per_category = metrics.get("per_category_AP") or {}
    tracker.log_metrics(per_category_metrics(per_category), step=step)
    (out / "coco_summary.txt").write_text(str(metrics.get("summary", "")))
    per_category_table(per_category).to_csv(out / "per_category_AP.csv", index=False)
    tracker.log_artifact(results, "eval")
    tracker.log_artifact(out / "coco_summary.txt", "eval")
    tracker.log_artifact(out / "per_category_AP.csv", "eval")
    n_vis = int(OmegaConf.select(cfg, "eval.visualize", default=0) or 0)
    if n_vis:
        from .visualize import draw_detections

        drawn = draw_detections(
            data.val.coco,
            data.val.img_dir,
            json.loads(results.read_text()),
            data.val.image_ids[:n_vis],
            out / "vis",
            score_thresh=float(OmegaConf.select(cfg, "eval.visualize_score", default=0.3)),
        )
        for path in drawn:
            tracker.log_artifact(path, "eval/vis")
        log.info("drew %d images with their detections under %s", len(drawn), out / "vis")
    tracker.finish("completed")
    log.info("COCO metrics: %s", ", ".join(f"{k}={v:.2f}" for k, v in final.items()))
    if per_category:
        log.info("Per-category bbox AP:\n%s", format_per_category(per_category))
    log.info("detections: %s", results)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    with exit_on_bad_input("retina_sweep.evaluate"):
        return float(evaluate_checkpoint(cfg).get("AP", math.nan))


if __name__ == "__main__":
    main()
