"""COCO box evaluation (pycocotools) and the inference loop that feeds it.

Metrics are returned in points (0-100), as the paper prints them: AP (mean over IoU
0.50:0.05:0.95), AP50, AP75, APs / APm / APl (COCO areas < 32^2, 32^2..96^2, > 96^2 px in the
original image), and the average recalls AR1, AR10, AR100, ARs, ARm, ARl. A metric that COCOeval
reports as -1 because no ground truth falls into its range (e.g. APl on a set without large
objects) is returned as NaN rather than as a fake number; the raw COCOeval `stats` (12 values,
0-1, -1 for absent) are returned too.

Per-category AP (IoU 0.50:0.95, all areas, 100 detections), as detectron2's COCOEvaluator logs
it (``bbox/AP-<name>``), is read off the same accumulated COCOeval (`per_category_ap`): no second
evaluation, so it costs nothing even for COCO's 80 classes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .signals import raise_pending

__all__ = [
    "coco_evaluate",
    "evaluate",
    "infer",
    "Inference",
    "mean_ms_per_image",
    "merge_shards",
    "per_category_ap",
    "per_category_metrics",
    "per_category_table",
    "format_per_category",
    "shard_max_images",
    "to_coco_results",
    "STAT_NAMES",
]

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
        COCOeval stats list (0-1, -1 for absent), `"summary"`: pycocotools' printed table, and
        `"per_category_AP"`: `{category name: AP}` in points for each category of `coco_gt`
        in id order (`per_category_ap`; NaN for a category without ground truth in the
        evaluated images). The name is the category's ``name`` (its id when it has none).
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
    metrics["per_category_AP"] = per_category_ap(
        ev.eval["precision"], _category_names(coco_gt, ev.params.catIds)
    )
    return metrics


def _category_names(coco_gt: COCO, cat_ids: Sequence[int]) -> list[str]:
    """The display name of each of `cat_ids`: its ``name``, else its id; a name that several
    categories share gets ``" (id N)"`` appended, so that every category keeps its own AP."""
    names = [str(coco_gt.cats[c].get("name") or c) for c in cat_ids]
    shared = {n for n in names if names.count(n) > 1}
    return [f"{n} (id {c})" if n in shared else n for n, c in zip(names, cat_ids, strict=True)]


def per_category_ap(precision: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Per-category AP in points from COCOeval's accumulated precision, as detectron2 does.

    Args:
        precision: ``COCOeval.eval["precision"]`` after ``accumulate()``, shape (T, R, K, A, M):
            T IoU thresholds (0.50:0.05:0.95), R recall thresholds (101), K categories (in
            ``params.catIds`` order), A area ranges (index 0: all), M max-detection settings
            (last: 100); -1 where a category has no ground truth.
        names: (K,) the categories' names, in the order of axis 2; distinct.

    Returns:
        ``{name: AP}`` in the order of `names`: for category k the mean, in points (0-100), of
        ``precision[:, :, k, 0, -1]`` over its entries > -1, i.e. the mean over IoU thresholds
        and recall thresholds (COCO's 101-point interpolated AP), NaN when the category has no
        ground truth in the evaluated images. When every category has ground truth the mean of
        the values is COCOeval's ``stats[0]`` (AP) in points.
    """
    precision = np.asarray(precision)
    if precision.ndim != 5:
        raise ValueError(f"precision must be (T, R, K, A, M), got shape {precision.shape}")
    if precision.shape[2] != len(names):
        raise ValueError(f"{len(names)} names for {precision.shape[2]} categories")
    if len(set(names)) != len(names):
        raise ValueError(f"category names must be distinct: {list(names)}")
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[str(name)] = 100.0 * float(np.mean(p)) if p.size else math.nan
    return out


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")
_MLFLOW_KEY_MAX = 250


def per_category_metrics(
    per_category: Mapping[str, float], prefix: str = "AP-"
) -> dict[str, float]:
    """`per_category_ap`'s values as MLflow metrics, ``{prefix + name: AP}``, NaN left out.

    A name's characters other than ASCII letters, digits, ``_ - .`` and space become ``_`` (a
    ``/`` too: MLflow would read it as a path), keys are cut to MLflow's 250 characters, and a
    key that two names map to gets ``-2``, ``-3``, ... appended. No key equals a summary metric
    (``AP``, ``AP50``, ...: none of them contains ``-``), so the objectives stay apart.
    """
    out: dict[str, float] = {}
    for name, ap in per_category.items():
        if ap is None or math.isnan(ap):
            continue
        key = (prefix + _MLFLOW_UNSAFE.sub("_", str(name)))[:_MLFLOW_KEY_MAX]
        unique, n = key, 1
        while unique in out:
            n += 1
            unique = f"{key[: _MLFLOW_KEY_MAX - len(str(n)) - 1]}-{n}"
        out[unique] = float(ap)
    return out


def per_category_table(per_category: Mapping[str, float]) -> pd.DataFrame:
    """`per_category_ap`'s mapping as a (K, 2) table: columns ``category`` and ``AP`` (points,
    NaN for a category without ground truth), in category id order."""
    return pd.DataFrame(
        {"category": list(per_category), "AP": [float(v) for v in per_category.values()]}
    )


def format_per_category(per_category: Mapping[str, float], pairs_per_row: int = 3) -> str:
    """detectron2's per-category table: a markdown (pipe) table of ``category | AP`` pairs,
    `pairs_per_row` pairs a row, filled row by row, AP with 3 decimals (``nan`` without ground
    truth); an empty string for no category."""
    items = [(str(n), f"{float(v):.3f}") for n, v in per_category.items()]
    if not items:
        return ""
    ncols = min(pairs_per_row, len(items))
    rows = [
        [cell for pair in items[i : i + ncols] for cell in pair]
        for i in range(0, len(items), ncols)
    ]
    rows[-1] += [""] * (2 * ncols - len(rows[-1]))
    header = ["category", "AP"] * ncols
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(2 * ncols)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


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


def shard_max_images(max_images: int | None, rank: int, world_size: int) -> int | None:
    """How many of its images rank `rank` infers when `max_images` caps a sharded evaluation.

    `ShardSampler` gives rank r the items r, r + world_size, ... of the split, in order; the
    first `max_images` items of the split (what one process evaluates) are then the first
    `len(range(r, max_images, world_size))` items of each rank's shard (0 for a rank beyond the
    cap). None (no cap) stays None.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if max_images is None:
        return None
    return len(range(rank, int(max_images), world_size))


def merge_shards(shards: Sequence[Sequence[Any]]) -> list[Any]:
    """Per-rank lists of items in `ShardSampler` order -> the items in the split's order.

    Rank r's k-th item is item r + k * world_size of the split: reading the shards round-robin
    (item k of rank 0, of rank 1, ...) rebuilds the order one process would have seen.
    """
    merged: list[Any] = []
    longest = max((len(s) for s in shards), default=0)
    for k in range(longest):
        for shard in shards:
            if k < len(shard):
                merged.append(shard[k])
    return merged


@dataclass
class Inference:
    """One process's pass over its loader: per image `(image_id, detections)` in loader order,
    and the forward timing (seconds and images of the first batch, and of the others)."""

    images: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    first_s: float = 0.0
    first_images: int = 0
    timed_s: float = 0.0
    timed_images: int = 0

    def ms_per_image(self) -> float | None:
        """The forward time per image without the warm-up batch (or of the warm-up batch when
        it was the only one); None when no image was run."""
        if self.timed_images:
            return 1000.0 * self.timed_s / self.timed_images
        if self.first_images:
            return 1000.0 * self.first_s / self.first_images
        return None


def mean_ms_per_image(parts: Sequence[Inference]) -> float | None:
    """The mean of the ranks' `ms_per_image` (each timed on its own shard, without its own
    warm-up batch), leaving out ranks that ran no image; None when none did."""
    per_rank = [m for m in (p.ms_per_image() for p in parts) if m is not None]
    return sum(per_rank) / len(per_rank) if per_rank else None


@torch.inference_mode()
def infer(
    model: torch.nn.Module,
    loader: Iterable,
    dataset: Any,
    device: torch.device | str,
    *,
    max_images: int | None = None,
) -> Inference:
    """Run the detector over the first `max_images` images of `loader` (all: None; none: 0),
    in this process only. See `evaluate` for the arguments and the timing."""
    device = torch.device(device)
    cat_lookup = torch.tensor(
        [dataset.label_to_cat_id[i] for i in range(len(dataset.label_to_cat_id))],
        dtype=torch.long,
    )
    was_training = model.training
    model.eval()
    out = Inference()
    try:
        for batch_index, (images, targets, image_sizes) in enumerate(loader):
            raise_pending()  # a SIGTERM / SIGINT whose interrupt a finalizer swallowed
            if max_images is not None and len(out.images) >= max_images:
                break
            images = images.to(device, non_blocking=True)
            _sync(device)
            t0 = time.perf_counter()
            outputs = model(images, image_sizes=image_sizes)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if batch_index == 0:
                out.first_s, out.first_images = elapsed, len(images)
            else:
                out.timed_s += elapsed
                out.timed_images += len(images)
            for output, target, size in zip(outputs, targets, image_sizes, strict=True):
                if max_images is not None and len(out.images) >= max_images:
                    break
                dets = to_coco_results(
                    output,
                    image_id=target["image_id"],
                    scale_factor=target["scale_factor"],
                    orig_size=tuple(target["orig_size"]),
                    label_to_cat_id=cat_lookup,
                    image_size=tuple(size),
                )
                out.images.append((int(target["image_id"]), dets))
    finally:
        model.train(was_training)
    return out


def _check_sharded(loader: Any, rank: int, world_size: int) -> None:
    from .data.loader import ShardSampler

    sampler = getattr(loader, "sampler", None)
    if not (
        isinstance(sampler, ShardSampler)
        and sampler.rank == rank
        and sampler.world_size == world_size
    ):
        raise ValueError(
            "evaluate(distributed=True) needs a loader sharded by ShardSampler over this "
            f"process group (rank {rank} of {world_size}): build_loader(..., train=False, "
            f"distributed=True); got sampler {sampler!r}"
        )


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    dataset: Any,
    device: torch.device | str,
    *,
    max_images: int | None = None,
    results_file: str | Path | None = None,
    quiet: bool = True,
    distributed: bool = False,
) -> dict[str, Any] | None:
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
        distributed: a sharded evaluation over the initialised process group, called by every
            rank with the same model: `loader` must be `build_loader(..., train=False,
            distributed=True)` (`ShardSampler`: rank r gets images r, r + N, ... of the split).
            Each rank infers its shard, the detections are gathered to rank 0
            (`gather_object`), which runs COCOeval on their union, writes `results_file` and
            returns the metrics; the other ranks return None. `max_images` still means the first
            `max_images` images of the split, so each rank infers only its images among them
            (`shard_max_images`), and the metrics, detections and results file are those of one
            process over the unsharded loader. With a world of one process it is the plain
            evaluation.

    Returns:
        `coco_evaluate`'s metrics plus `ms_per_image`, `num_images`, `num_detections` (None on
        ranks other than 0 of a distributed evaluation).
        `ms_per_image` is the paper's inference time: model forward and post-processing
        (score threshold, top-k, NMS, all inside the model), with the host-to-device copy and
        data loading excluded, and the first batch excluded as warm-up (lazy initialisation,
        cuDNN autotuning, allocator growth), unless it is the only batch. On CUDA the clock is
        read after `torch.cuda.synchronize`. In a distributed evaluation each rank times its
        own shard that way (its own first batch is its warm-up) and `ms_per_image` is the mean
        of the ranks' per-image times (ranks that ran no image left out): the latency of one
        device with the per-rank batch, comparable to a single process's, not the wall time of
        the whole evaluation divided by the images (which would shrink with the number of
        ranks).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    rank, world_size = 0, 1
    if distributed:
        rank = torch.distributed.get_rank()
        world_size = torch.distributed.get_world_size()
    if world_size == 1:
        result = infer(model, loader, dataset, device, max_images=max_images)
        images = result.images
        ms = result.ms_per_image()
    else:
        _check_sharded(loader, rank, world_size)
        local = infer(
            model,
            loader,
            dataset,
            device,
            max_images=shard_max_images(max_images, rank, world_size),
        )
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(local, gathered, dst=0)
        if rank != 0:
            return None
        assert gathered is not None
        images = merge_shards([g.images for g in gathered])
        ms = mean_ms_per_image(gathered)

    detections = [d for _, dets in images for d in dets]
    img_ids = [image_id for image_id, _ in images]
    if results_file is not None:
        path = Path(results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(detections, f)
    if not img_ids:
        raise ValueError("evaluate: the loader yielded no images")
    metrics = coco_evaluate(dataset.coco, detections, img_ids=img_ids, quiet=quiet)
    metrics["ms_per_image"] = ms
    metrics["num_images"] = len(img_ids)
    metrics["num_detections"] = len(detections)
    return metrics
