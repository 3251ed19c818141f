"""Foreground/background imbalance of a detector configuration on a dataset.

The paper's point is the extreme imbalance of dense detectors ("~100k candidate locations per
image", nearly all easy negatives). `anchor_statistics` measures it for a config: anchors per
image, foreground (matched) anchors, ignored anchors, and the background:foreground ratio, with
the detector's own anchor generator and matcher; and how well the anchors cover the objects
(objects whose best anchor IoU is below the foreground threshold get a positive only from the
matcher's low-quality rule, or none without it).

    python -m retina_sweep.imbalance [overrides] [images=200]    # e.g. model.anchors.aspect_ratios=[1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import box_iou


@torch.no_grad()
def anchor_statistics(model: Any, dataset: Any, *, num_images: int = 100) -> dict[str, float]:
    """Mean per-image anchor counts of `model` (a RetinaNet) over the first `num_images` items.

    Every image is padded to the dataset's own size rounded up to the coarsest stride, as the
    training batches are, so the counts are those the loss sees.
    """
    from .data.loader import collate

    stride = 2 ** max(model_levels(model))
    totals = {
        "anchors": 0.0,
        "foreground": 0.0,
        "ignored": 0.0,
        "background": 0.0,
        "objects": 0.0,
        "objects_below_fg_iou": 0.0,
    }
    best_ious: list[torch.Tensor] = []
    fg_thresh = float(model.matcher.fg_iou_thresh)
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
        if len(targets[0]["boxes"]):
            best = box_iou(targets[0]["boxes"], anchors).max(dim=1).values
            best_ious.append(best)
            totals["objects_below_fg_iou"] += float((best < fg_thresh).sum())
    out = {f"{k}_per_image": v / max(n, 1) for k, v in totals.items()}
    out["bg_to_fg_ratio"] = totals["background"] / max(totals["foreground"], 1.0)
    out["foreground_per_object"] = totals["foreground"] / max(totals["objects"], 1.0)
    out["objects_below_fg_iou_fraction"] = totals["objects_below_fg_iou"] / max(
        totals["objects"], 1.0
    )
    out["mean_best_iou"] = float(torch.cat(best_ious).mean()) if best_ious else float("nan")
    out["images"] = float(n)
    return out


def model_levels(model: Any) -> list[int]:
    levels = getattr(model.fpn, "levels", None)
    return list(levels) if levels else [7]


def main(argv: list[str] | None = None) -> int:
    """Print `anchor_statistics` of the composed config (overrides as for the main command)."""
    import sys

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from .builders import build_datasets
    from .config import validate

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    images = 200
    overrides = []
    for a in args:
        if a.startswith("images="):
            images = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    with initialize_config_module(config_module="retina_sweep.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    cfg.model.backbone.pretrained = None  # the counts do not depend on the weights
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all").eval()
    stats = anchor_statistics(model, data.train, num_images=images)
    print(" ".join(overrides) or "(defaults)")
    for key, value in stats.items():
        print(f"  {key:32s} {value:,.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
