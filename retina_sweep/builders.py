"""Builders that turn the nested config groups into objects.

The Hydra entry point instantiates `cfg.model` (whose `_target_` is `build_model`) and `cfg.loss`
(`retina_sweep.sampling.build_strategy`); the library modules themselves take plain keyword
arguments and know nothing about Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["build_model", "build_datasets", "Datasets"]


def build_model(
    *,
    num_classes: int,
    backbone: Mapping[str, Any],
    fpn: Mapping[str, Any],
    anchors: Mapping[str, Any],
    head: Mapping[str, Any],
    matcher: Mapping[str, Any],
    box_loss: str,
    smooth_l1_beta: float,
    normalizer: str,
    inference: Mapping[str, Any],
    strategy: nn.Module,
) -> nn.Module:
    """A `RetinaNet` from the `model` config group (see conf/model/retinanet.yaml)."""
    from .model.detector import build_retinanet

    return build_retinanet(
        num_classes=num_classes,
        depth=backbone["depth"],
        pretrained=backbone.get("pretrained"),
        freeze_at=backbone.get("freeze_at", 0),
        backbone_norm=backbone.get("norm", "frozen_bn"),
        fpn_channels=fpn["channels"],
        min_level=fpn["min_level"],
        max_level=fpn["max_level"],
        fpn_variant=fpn.get("variant", "fpn"),
        base_size=anchors["base_size"],
        scales_per_octave=anchors["scales_per_octave"],
        aspect_ratios=list(anchors["aspect_ratios"]),
        truncate_anchor_sizes=anchors.get("truncate", False),
        head_convs=head["num_convs"],
        head_channels=head["channels"],
        head_norm=head.get("norm"),
        prior_prob=head["prior_prob"],
        strategy=strategy,
        fg_iou=matcher["fg_iou"],
        bg_iou=matcher["bg_iou"],
        allow_low_quality=matcher["allow_low_quality"],
        box_loss=box_loss,
        smooth_l1_beta=smooth_l1_beta,
        normalizer=normalizer,
        score_thresh=inference["score_thresh"],
        topk_candidates=inference["topk_candidates"],
        nms_thresh=inference["nms_thresh"],
        detections_per_img=inference["detections_per_img"],
    )


@dataclass
class Datasets:
    train: Any
    val: Any
    num_classes: int
    size_divisible: int


def build_datasets(data: Mapping[str, Any], *, max_level: int) -> Datasets:
    """Train and val `CocoDetection` for `data.kind` synthetic (generated, cached) or coco."""
    from .data.coco import CocoDetection, DatasetError, coco_paths

    kind = data["kind"]
    if kind == "synthetic":
        from .data.synthetic import generate

        params = dict(data.get("synthetic") or {})
        splits = generate(data.get("cache_dir"), **params)
        train_paths = (splits.train_json, splits.train_images)
        val_paths = (splits.val_json, splits.val_images)
    elif kind == "coco":
        train_paths = coco_paths(data["root"], data["train_split"])
        val_paths = coco_paths(data["root"], data["val_split"])
    else:  # validated earlier; kept for direct library use
        raise ValueError(f"data.kind must be synthetic or coco, got {kind!r}")

    common = dict(scale=int(data["scale"]), max_size=int(data["max_size"]))
    train = CocoDetection(
        ann_file=Path(train_paths[0]),
        img_dir=Path(train_paths[1]),
        train=True,
        flip_prob=float(data.get("flip_prob", 0.5)),
        skip_empty=bool(data.get("skip_empty", True)),
        **common,
    )
    val = CocoDetection(
        ann_file=Path(val_paths[0]),
        img_dir=Path(val_paths[1]),
        train=False,
        flip_prob=0.0,
        skip_empty=False,
        **common,
    )
    if train.num_classes != int(data["num_classes"]):
        raise ValueError(
            f"data.num_classes={data['num_classes']} but {train_paths[0]} has "
            f"{train.num_classes} categories: set data.num_classes={train.num_classes}"
        )
    if val.label_to_cat_id != train.label_to_cat_id:
        # Labels are indices into the sorted category ids of each file: any difference would
        # mislabel the evaluation (or index past the last class), so it is an error.
        train_ids, val_ids = set(train.cat_id_to_label), set(val.cat_id_to_label)
        raise DatasetError(
            f"the categories of the val annotation file {val_paths[0]} differ from those of the "
            f"train annotation file {train_paths[0]} ({val.num_classes} vs {train.num_classes}): "
            f"ids only in train {sorted(train_ids - val_ids)}, "
            f"only in val {sorted(val_ids - train_ids)}; both splits must list the same categories"
        )
    return Datasets(train, val, train.num_classes, 2**max_level)


def as_list(x: Any) -> list:
    return list(x) if isinstance(x, Sequence) and not isinstance(x, str) else [x]
