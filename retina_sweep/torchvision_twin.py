"""torchvision's RetinaNet with the same architecture as ours, and the weight copy between them.

Used by the oracle test (our detector, configured the torchvision way, must agree with it) and
by the benchmark (ours against torchvision on identical architecture and inputs).

torchvision's head always has 4 convs per subnet and no normalisation, its anchors are truncated
to integer sizes and rounded, its P6 comes from C5 when `LastLevelP6P7(in_channels=C5, ...)`
gets C5's channel count (as the paper), and its input transform is made a no-op here (mean 0,
std 1, min/max size equal to the input size) so both models see the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import ResNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .model.backbone import DEPTHS

__all__ = ["TWIN_SETTINGS", "build_torchvision_twin", "copy_weights_to_torchvision"]


# Our `build_retinanet` arguments that reproduce torchvision's choices (see docs/model.md).
TWIN_SETTINGS: dict[str, Any] = dict(
    freeze_at=0,
    backbone_norm="frozen_bn",
    min_level=3,
    max_level=7,
    truncate_anchor_sizes=True,
    round_cell_anchors=True,
    head_convs=4,
    box_loss="l1",
    normalizer="per_image",
)


def build_torchvision_twin(
    *,
    depth: int,
    num_classes: int,
    channels: int,
    image_size: int,
    detections_per_img: int = 100,
) -> TVRetinaNet:
    """torchvision's RetinaNet with our architecture at `TWIN_SETTINGS` (P3-P7, 4-conv head)."""
    block, layers = DEPTHS[depth]  # the block tables are torchvision's own
    body = ResNet(block, layers, norm_layer=FrozenBatchNorm2d)
    c3 = 128 * block.expansion
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[c3, 2 * c3, 4 * c3],
        out_channels=channels,
        extra_blocks=LastLevelP6P7(4 * c3, channels),
    )
    if 4 * c3 == channels:
        raise ValueError("channels equal to C5's would make torchvision take P6 from P5")
    sizes = tuple(
        (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512]
    )
    anchor_generator = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return TVRetinaNet(
        backbone,
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=anchor_generator,
        head=RetinaNetHead(channels, 9, num_classes),
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=detections_per_img,
        topk_candidates=1000,
    )


def copy_weights_to_torchvision(ours: nn.Module, theirs: TVRetinaNet) -> None:
    """Load our state dict into torchvision's model under its key names (strict)."""
    mapping: dict[str, torch.Tensor] = {}
    for key, value in ours.state_dict().items():
        if key.startswith("backbone."):
            new = "backbone.body." + key[len("backbone.") :]
        elif key.startswith("fpn.fpn."):
            new = "backbone.fpn." + key[len("fpn.fpn.") :]
        elif key.startswith("fpn.extra."):
            new = "backbone.fpn.extra_blocks." + key[len("fpn.extra.") :]
        elif key.startswith("head.cls_subnet."):
            idx, rest = key[len("head.cls_subnet.") :].split(".", 1)
            new = f"head.classification_head.conv.{int(idx) // 2}.0.{rest}"
        elif key.startswith("head.bbox_subnet."):
            idx, rest = key[len("head.bbox_subnet.") :].split(".", 1)
            new = f"head.regression_head.conv.{int(idx) // 2}.0.{rest}"
        elif key.startswith("head.cls_score."):
            new = "head.classification_head.cls_logits." + key.rsplit(".", 1)[1]
        elif key.startswith("head.bbox_pred."):
            new = "head.regression_head.bbox_reg." + key.rsplit(".", 1)[1]
        elif key == "loss_normalizer":
            continue
        else:
            raise KeyError(f"no torchvision name for our parameter {key}")
        mapping[new] = value
    theirs.load_state_dict(mapping, strict=True)
