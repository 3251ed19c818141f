"""COCO box evaluation (pycocotools) and the inference loop that feeds it.

Metrics are returned in points (0-100), as the paper prints them: AP (mean over IoU
0.50:0.05:0.95), AP50, AP75, APs / APm / APl (COCO areas < 32^2, 32^2..96^2, > 96^2 px in the
original image), and the average recalls AR1, AR10, AR100, ARs, ARm, ARl. A metric that COCOeval
reports as -1 because no ground truth falls into its range (e.g. APl on a set without large
objects) is returned as NaN rather than as a fake number; the raw COCOeval `stats` (12 values,
0-1, -1 for absent) are returned too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["coco_evaluate", "evaluate", "to_coco_results", "STAT_NAMES"]

# Order of COCOeval.stats for iouType "bbox".
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (`COCO.loadRes([])` fails on an empty list)."""
    res = COCO()
    res.dataset = {
        "info": copy.deepcopy(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _check_detections(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> None:
    required = ("image_id", "category_id", "bbox", "score")
    for i, d in enumerate(detections):
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}: {d!r}")
    unknown_imgs = {d["image_id"] for d in detections} - set(coco_gt.imgs)
    if unknown_imgs:
        raise ValueError(
            f"detections refer to image ids not in the ground truth: {sorted(unknown_imgs)[:10]}"
        )
    unknown_cats = {d["category_id"] for d in detections} - set(coco_gt.cats)
    if unknown_cats:
        raise ValueError(
            f"detections refer to category ids not in the ground truth: {sorted(unknown_cats)}; "
            "map contiguous labels back with dataset.label_to_cat_id"
        )


def coco_evaluate(
    coco_gt: COCO,
    detections: Sequence[dict[str, Any]],
    *,
    img_ids: Iterable[int] | None = None,
    quiet: bool = True,
    area_thresholds: tuple[float, float] = (32.0, 96.0),
) -> dict[str, Any]:
    """COCO box AP of `detections` against `coco_gt`.

    Args:
        coco_gt: ground truth (a pycocotools `COCO`, e.g. `dataset.coco`).
        detections: COCO result dicts `{"image_id", "category_id", "bbox": [x, y, w, h],
            "score"}` in original image coordinates. May be empty (every AP is then 0 where
            there is ground truth). Not modified.
        img_ids: evaluate on these images only (e.g. the first `max_images` of a loader);
            default: every image of `coco_gt`. Images without ground truth count: their
            detections are false positives.
        quiet: swallow pycocotools' prints; False prints its usual summary.
        area_thresholds: side lengths (px) separating small / medium / large; COCO's are 32 and
            96 and are used by default.

    Returns:
        `{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}`
        in points (NaN where there is no ground truth in the range), plus `"stats"`: the raw
        COCOeval stats list (0-1, -1 for absent), and `"summary"`: pycocotools' printed table.
    """
    _check_detections(coco_gt, detections)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        if detections:
            # loadRes writes "area", "id", "segmentation" into the dicts: give it copies.
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        else:
            coco_dt = _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in img_ids)
        small, large = (float(t) ** 2 for t in area_thresholds)
        ev.params.areaRng = [[0.0, 1e10], [0.0, small], [small, large], [large, 1e10]]
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    if not quiet:
        print(summary.getvalue(), end="")
    stats = [float(s) for s in ev.stats]
    metrics: dict[str, Any] = {
        name: (100.0 * s if s >= 0 else math.nan) for name, s in zip(STAT_NAMES, stats, strict=True)
    }
    metrics["stats"] = stats
    metrics["summary"] = summary.getvalue()
    return metrics


def to_coco_results(
    output: dict[str, torch.Tensor],
    *,
    image_id: int,
    scale_factor: float,
    orig_size: tuple[int, int],
    label_to_cat_id: torch.Tensor,
    image_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections in network-input coordinates -> COCO result dicts.

    Args:
        output: `{"boxes": (D, 4) xyxy in the resized input, "scores": (D,), "labels": (D,)
            0..K-1}`.
        image_id: COCO image id.
        scale_factor: resized / original size of that image (target["scale_factor"]); used
            when `image_size` is not given.
        orig_size: (h, w) of the original image; boxes are clipped to it (a box may reach into
            the batch padding).
        label_to_cat_id: (K,) long tensor, category id of each label.
        image_size: (h, w) of the resized image the model saw (the loader's `image_sizes`):
            boxes are then divided per axis by `image_size / orig_size`, the exact ratios the
            dataset scaled the boxes by (`scale_factor` differs from them by the rounding of
            the resized size to whole pixels), as torchvision's and detectron2's
            post-processing do.

    Returns:
        `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]` in original pixels.
    """
    h, w = orig_size
    if image_size is None:
        sx = sy = float(scale_factor)
    else:
        sx, sy = image_size[1] / w, image_size[0] / h
    boxes = output["boxes"].detach().float().cpu()
    if sx == sy:
        boxes = boxes / sx
    else:
        boxes = torch.stack(
            [boxes[:, 0] / sx, boxes[:, 1] / sy, boxes[:, 2] / sx, boxes[:, 3] / sy], dim=1
        )
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, float(w))
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, float(h))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    cats = label_to_cat_id[output["labels"].detach().cpu().long()].tolist()
    return [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
        for b, s, c in zip(xywh, scores, cats, strict=True)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    dataset: Any,
    device: torch.device | str,
    *,
    max_images: int | None = None,
    results_file: str | Path | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run the detector over `loader`, evaluate with COCOeval, time the inference.

    Args:
        model: `model(images, image_sizes=image_sizes)` in eval mode returns one
            `{"boxes", "scores", "labels"}` per image in network-input coordinates. Its train /
            eval mode is restored afterwards.
        loader: yields `(images (N,3,Hp,Wp), targets, image_sizes)` (`build_loader(...,
            train=False)`); targets need "image_id", "scale_factor", "orig_size".
        dataset: gives `.coco` (ground truth) and `.label_to_cat_id`.
        device: where the model runs.
        max_images: stop after this many images and evaluate on those only.
        results_file: also write the COCO results JSON there.
        quiet: swallow pycocotools' prints.

    Returns:
        `coco_evaluate`'s metrics plus `ms_per_image`, `num_images`, `num_detections`.
        `ms_per_image` is the paper's inference time: model forward and post-processing
        (score threshold, top-k, NMS, all inside the model), with the host-to-device copy and
        data loading excluded, and the first batch excluded as warm-up (lazy initialisation,
        cuDNN autotuning, allocator growth), unless it is the only batch. On CUDA the clock is
        read after `torch.cuda.synchronize`.
    """
    device = torch.device(device)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    cat_lookup = torch.tensor(
        [dataset.label_to_cat_id[i] for i in range(len(dataset.label_to_cat_id))],
        dtype=torch.long,
    )
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    img_ids: list[int] = []
    timed_s, timed_images = 0.0, 0
    first_s, first_images = 0.0, 0
    try:
        for batch_index, (images, targets, image_sizes) in enumerate(loader):
            if max_images is not None and len(img_ids) >= max_images:
                break
            images = images.to(device, non_blocking=True)
            _sync(device)
            t0 = time.perf_counter()
            outputs = model(images, image_sizes=image_sizes)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if batch_index == 0:
                first_s, first_images = elapsed, len(images)
            else:
                timed_s, timed_images = timed_s + elapsed, timed_images + len(images)
            for output, target, size in zip(outputs, targets, image_sizes, strict=True):
                if max_images is not None and len(img_ids) >= max_images:
                    break
                img_ids.append(int(target["image_id"]))
                detections.extend(
                    to_coco_results(
                        output,
                        image_id=target["image_id"],
                        scale_factor=target["scale_factor"],
                        orig_size=tuple(target["orig_size"]),
                        label_to_cat_id=cat_lookup,
                        image_size=tuple(size),
                    )
                )
    finally:
        model.train(was_training)

    if results_file is not None:
        path = Path(results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(detections, f)
    if not img_ids:
        raise ValueError("evaluate: the loader yielded no images")
    metrics = coco_evaluate(dataset.coco, detections, img_ids=img_ids, quiet=quiet)
    if timed_images:
        ms = 1000.0 * timed_s / timed_images
    else:  # a single batch: the warm-up batch is all there is
        ms = 1000.0 * first_s / max(first_images, 1)
    metrics["ms_per_image"] = ms
    metrics["num_images"] = len(img_ids)
    metrics["num_detections"] = len(detections)
    return metrics
