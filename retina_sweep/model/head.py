"""RetinaNet head: a classification subnet and a box subnet, shared across pyramid levels.

Each subnet is ``num_convs`` 3x3 convs of ``channels`` channels with ReLU (and an optional
norm between conv and ReLU), then a 3x3 conv to ``A_loc * K`` class logits or ``A_loc * 4`` box
deltas (Sec. 4 of the paper). New convs are initialised with a Gaussian of std 0.01 and bias 0;
the final classification bias is ``-log((1 - pi) / pi)`` so that every anchor starts with
foreground probability ``pi`` (0.01): without it, the loss of the ~100k background anchors
swamps the first iterations and training diverges (Sec. 3.3, "Initialization").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .norm import GroupNorm32

__all__ = ["RetinaHead", "HEAD_NORMS", "LevelBatchNorm"]

HEAD_NORMS = (None, "GN", "BN")


class LevelBatchNorm(nn.Module):
    """One `BatchNorm2d` per pyramid level behind one shared conv ("domain-specific" BN, as
    detectron2's RetinaNet head does with `CycleBatchNormList`).

    The levels' activations differ in scale, so one BN called on each level in turn would train
    on per-level batch statistics but keep running statistics averaged over all levels: its
    eval-mode output would then differ from its training output on every level (measured: an
    output std of 0.38 to 1.55 in eval where training gave 1.0). `forward(x, level)` normalises
    an (N, C, H, W) map of level index `level` (0 = the finest level given to the head).
    """

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels))

    def forward(self, x: Tensor, level: int) -> Tensor:
        if not 0 <= level < len(self.norms):
            raise ValueError(f"level must be in 0..{len(self.norms) - 1}, got {level}")
        return self.norms[level](x)


def _norm(norm: str | None, channels: int, num_levels: int | None) -> nn.Module | None:
    if norm is None:
        return None
    if norm == "GN":
        # 32 groups (Group Normalization's default), fewer for narrow proxy heads.
        return GroupNorm32(math.gcd(32, channels), channels)
    if norm == "BN":
        return LevelBatchNorm(channels, int(num_levels or 0))
    raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")


def _subnet(
    in_channels: int, channels: int, num_convs: int, norm: str | None, num_levels: int | None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        norm_layer = _norm(norm, channels, num_levels)
        # A conv bias before a norm is redundant (the norm re-centres), so drop it there.
        conv = nn.Conv2d(
            in_channels if i == 0 else channels, channels, 3, padding=1, bias=norm_layer is None
        )
        layers.append(conv)
        if norm_layer is not None:
            layers.append(norm_layer)
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _flatten(x: Tensor, last: int) -> Tensor:
    """(N, A_loc * last, H, W) -> (N, H * W * A_loc, last), in (H, W, A_loc) order."""
    n, _, h, w = x.shape
    return x.view(n, -1, last, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, last)


class RetinaHead(nn.Module):
    """Classification and box subnets applied to every pyramid level with the same weights.

    Args:
        in_channels: channels of the pyramid maps.
        num_anchors: anchors per location A_loc.
        num_classes: K (no background class: a background anchor has all K targets 0).
        num_convs: 3x3 conv + ReLU blocks in each subnet (4 in the paper).
        channels: width of those convs (256 in the paper).
        prior_prob: foreground probability pi of every anchor at initialisation, in (0, 1).
        norm: ``None`` (paper), ``"GN"`` or ``"BN"`` between each conv and its ReLU. GN has
            no batch statistics and is shared by the levels with the convs; BN is one per level
            (`LevelBatchNorm`), as in detectron2.
        num_levels: pyramid levels the head is called on; required for ``norm="BN"``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        channels: int = 256,
        prior_prob: float = 0.01,
        norm: str | None = None,
        num_levels: int | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not (isinstance(num_anchors, int) and num_anchors >= 1):
            raise ValueError(f"num_anchors must be an integer >= 1, got {num_anchors!r}")
        if not (isinstance(num_convs, int) and num_convs >= 0):
            raise ValueError(f"num_convs must be an integer >= 0, got {num_convs!r}")
        if not (isinstance(channels, int) and channels >= 1):
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        if norm == "BN" and not (isinstance(num_levels, int) and num_levels >= 1):
            raise ValueError(
                f"norm='BN' needs num_levels (one BN per pyramid level), got {num_levels!r}"
            )
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.prior_prob = prior_prob
        self.cls_subnet = _subnet(in_channels, channels, num_convs, norm, num_levels)
        self.bbox_subnet = _subnet(in_channels, channels, num_convs, norm, num_levels)
        last_in = channels if num_convs > 0 else in_channels
        self.cls_score = nn.Conv2d(last_in, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(last_in, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pyramid maps [(N, C, H_l, W_l)] -> (cls_logits (N, A, K), bbox_deltas (N, A, 4)),
        A = sum_l H_l W_l A_loc, levels concatenated in input order, (H, W, A_loc) within a
        level; deltas are (dx, dy, dw, dh) for `BoxCoder`."""
        if self.num_levels is not None and len(features) != self.num_levels:
            raise ValueError(
                f"the head was built for {self.num_levels} levels, got {len(features)} maps"
            )
        logits, deltas = [], []
        for level, x in enumerate(features):
            cls = self.cls_score(_run(self.cls_subnet, x, level))
            box = self.bbox_pred(_run(self.bbox_subnet, x, level))
            logits.append(_flatten(cls, self.num_classes))
            deltas.append(_flatten(box, 4))
        return _cat(logits), _cat(deltas)


def _run(subnet: nn.Sequential, x: Tensor, level: int) -> Tensor:
    # A plain Sequential call unless a layer needs the level (`LevelBatchNorm`).
    for layer in subnet:
        x = layer(x, level) if isinstance(layer, LevelBatchNorm) else layer(x)
    return x


def _cat(tensors: list[Tensor]) -> Tensor:
    # A single level (c5_only) needs no copy.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)
