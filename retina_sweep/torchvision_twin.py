"""torchvision's RetinaNet with the same architecture as ours, and the weight copy between them.

Used by the oracle test (our detector, configured the torchvision way, must agree with it) and
by the benchmark (ours against torchvision on identical architecture and inputs).

torchvision's head has 4 convs per subnet (no norm, or GroupNorm through `norm_layer`), its
anchors are truncated to integer sizes and rounded, its P6 comes from C5 when
`LastLevelP6P7(in_channels=C5, ...)` gets C5's channel count (as the paper), and its input
transform is made a no-op here (mean 0, std 1, min/max size equal to the input size) so both
models see the same tensors.

Two geometries: torchvision's own (`TWIN_SETTINGS`: P3-P7, 4-conv heads, no norm), and the CPU
proxy's (`PROXY_TWIN`: P2-P6 with anchors 4x their stride, 2-conv GroupNorm heads, stem and res2
frozen). For the second, torchvision's head is cut to its first 2 convs and a P6-only extra block
stands in for `LastLevelP6P7`; everything else is torchvision's code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import ResNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from .model.backbone import DEPTHS

__all__ = ["TWIN_SETTINGS", "PROXY_TWIN", "build_torchvision_twin", "copy_weights_to_torchvision"]


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

# The same, at the CPU proxy's geometry (`scale=proxy`): P2-P6 with the paper's anchors halved
# (16..256 px, 4x their stride), 2-conv GroupNorm heads, stem and res2 frozen, frozen BN.
PROXY_TWIN: dict[str, Any] = {
    **TWIN_SETTINGS,
    "freeze_at": 2,
    "min_level": 2,
    "max_level": 6,
    "base_size": 32,
    "head_convs": 2,
    "head_norm": "GN",
}


class _LastLevelP6(ExtraFPNBlock):
    """P6 = conv3x3/2(C5), as `LastLevelP6P7` computes it, without P7 (a P2-P6 pyramid)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)

    def forward(self, p: list, c: list, names: list) -> tuple[list, list]:
        p.append(self.p6(c[-1]))
        names.append("p6")
        return p, names


def build_torchvision_twin(
    *,
    depth: int,
    num_classes: int,
    channels: int,
    image_size: int | tuple[int, int],
    detections_per_img: int = 100,
    min_level: int = 3,
    max_level: int = 7,
    base_size: int = 32,
    head_convs: int = 4,
    head_norm: str | None = None,
    freeze_at: int = 0,
) -> TVRetinaNet:
    """torchvision's RetinaNet with our architecture: `TWIN_SETTINGS` by default (P3-P7, 4-conv
    head), `PROXY_TWIN`'s geometry with its keys (P2-P6, 2-conv GN head, stem and res2 frozen).

    `image_size` is the input's (h, w), or one side for square inputs; the inputs must already
    be that size (torchvision's resize is then the identity).
    """
    if not 2 <= min_level <= 5 or max_level not in (6, 7):
        raise ValueError(f"levels P{min_level}-P{max_level}: the twin has P2..P5 and P6[/P7]")
    if not 1 <= head_convs <= 4 or head_norm not in (None, "GN"):
        raise ValueError(f"head_convs 1..4 and head_norm None or GN, got {head_convs}, {head_norm}")
    block, layers = DEPTHS[depth]  # the block tables are torchvision's own
    body = ResNet(block, layers, norm_layer=FrozenBatchNorm2d)
    # torchvision's own freezing (resnet_fpn_backbone's trainable_layers): the stem, then res2.
    for name, param in body.named_parameters():
        if (freeze_at >= 1 and name.startswith(("conv1.", "bn1."))) or (
            freeze_at >= 2 and name.startswith("layer1.")
        ):
            param.requires_grad_(False)
    fpn_levels = range(min_level, 6)
    c5 = 512 * block.expansion
    if c5 == channels:
        raise ValueError("channels equal to C5's would make torchvision take P6 from P5")
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{level - 1}": str(i) for i, level in enumerate(fpn_levels)},
        in_channels_list=[c5 >> (5 - level) for level in fpn_levels],
        out_channels=channels,
        extra_blocks=LastLevelP6P7(c5, channels) if max_level == 7 else _LastLevelP6(c5, channels),
    )
    levels = range(min_level, max_level + 1)
    sizes = tuple(
        (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
        for x in (base_size * 2.0 ** (level - 3) for level in levels)
    )
    anchor_generator = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    norm_layer = None
    if head_norm == "GN":
        groups = math.gcd(32, channels)  # as ours: 32 groups, fewer for narrow heads

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(groups, c)

    head = RetinaNetHead(channels, 9, num_classes, norm_layer=norm_layer)
    head.classification_head.conv = head.classification_head.conv[:head_convs]
    head.regression_head.conv = head.regression_head.conv[:head_convs]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return TVRetinaNet(
        backbone,
        num_classes=num_classes,
        min_size=min(h, w),
        max_size=max(h, w),
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=detections_per_img,
        topk_candidates=1000,
    )


def copy_weights_to_torchvision(ours: nn.Module, theirs: TVRetinaNet) -> None:
    """Load our state dict into torchvision's model under its key names (strict)."""
    mapping: dict[str, torch.Tensor] = {}
    # Our subnet is [conv, (norm,) ReLU] * num_convs; torchvision's is [Conv2dNormActivation]
    # * num_convs, each (conv, [norm,] ReLU).
    convs = sum(isinstance(m, nn.Conv2d) for m in ours.head.cls_subnet)
    per_block = len(ours.head.cls_subnet) // max(1, convs)
    for key, value in ours.state_dict().items():
        if key.startswith("backbone."):
            new = "backbone.body." + key[len("backbone.") :]
        elif key.startswith("fpn.fpn."):
            new = "backbone.fpn." + key[len("fpn.fpn.") :]
        elif key.startswith("fpn.extra."):
            new = "backbone.fpn.extra_blocks." + key[len("fpn.extra.") :]
        elif key.startswith(("head.cls_subnet.", "head.bbox_subnet.")):
            subnet, idx, rest = key[len("head.") :].split(".", 2)
            tower = "classification_head" if subnet == "cls_subnet" else "regression_head"
            block, part = divmod(int(idx), per_block)
            new = f"head.{tower}.conv.{block}.{part}.{rest}"
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
