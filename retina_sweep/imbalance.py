"""Foreground/background imbalance of a detector configuration on a dataset.

The paper's point is the extreme imbalance of dense detectors ("~100k candidate locations per
image", nearly all easy negatives). `anchor_statistics` measures it for a config: anchors per
image, foreground (matched) anchors, ignored anchors, and the background:foreground ratio, with
the detector's own anchor generator and matcher.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def anchor_statistics(model: Any, dataset: Any, *, num_images: int = 100) -> dict[str, float]:
    """Mean per-image anchor counts of `model` (a RetinaNet) over the first `num_images` items.

    Every image is padded to the dataset's own size rounded up to the coarsest stride, as the
    training batches are, so the counts are those the loss sees.
    """
    from .data.loader import collate

    stride = 2 ** max(model_levels(model))
    totals = {"anchors": 0.0, "foreground": 0.0, "ignored": 0.0, "background": 0.0, "objects": 0.0}
    n = min(num_images, len(dataset))
    for i in range(n):
        images, targets, _ = collate([dataset[i]], size_divisible=stride)
        feats = model.fpn(model.backbone(images))
        anchors = model.anchor_generator([tuple(f.shape[-2:]) for f in feats])
        matched, _, _ = model.match(anchors, targets)
        totals["anchors"] += anchors.shape[0]
        totals["foreground"] += float((matched >= 0).sum())
        totals["ignored"] += float((matched == -2).sum())
        totals["background"] += float((matched == -1).sum())
        totals["objects"] += float(len(targets[0]["boxes"]))
    out = {f"{k}_per_image": v / max(n, 1) for k, v in totals.items()}
    out["bg_to_fg_ratio"] = totals["background"] / max(totals["foreground"], 1.0)
    out["images"] = float(n)
    return out


def model_levels(model: Any) -> list[int]:
    levels = getattr(model.fpn, "levels", None)
    return list(levels) if levels else [7]
