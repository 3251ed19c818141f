"""Feature pyramid of RetinaNet: torchvision's FPN over C_min..C5 plus P6/P7 from C5.

RetinaNet (Sec. 4 of the paper) builds P3..P5 with the usual FPN top-down pathway and lateral
connections, P6 with a 3x3 stride-2 conv on C5 (not P5 as in the FPN paper) and P7 with a ReLU
and a 3x3 stride-2 conv on P6. Variant ``"c5_only"`` is the ablation "features from only the
final ResNet layer": one map from C5 (1x1 lateral + 3x3 conv, no top-down pathway), level 5.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork

__all__ = ["RetinaFPN", "LastLevelsP6P7", "VARIANTS", "MIN_LEVEL", "MAX_LEVEL"]

VARIANTS = ("fpn", "c5_only")
MIN_LEVEL, MAX_LEVEL = 2, 7


def check_levels(min_level: int, max_level: int) -> None:
    """Raise ValueError unless ``MIN_LEVEL <= min_level <= max_level <= MAX_LEVEL``."""
    for name, value in (("min_level", min_level), ("max_level", max_level)):
        if not (isinstance(value, int) and MIN_LEVEL <= value <= MAX_LEVEL):
            raise ValueError(
                f"{name} must be an integer in {MIN_LEVEL}..{MAX_LEVEL}, got {value!r}"
            )
    if min_level > max_level:
        raise ValueError(f"min_level must be <= max_level={max_level}, got {min_level}")


class LastLevelsP6P7(nn.Module):
    """P6 = conv3x3/2(C5); P7 = conv3x3/2(ReLU(P6)) (P7 only if ``with_p7``).

    Always from C5, whatever the channel counts: torchvision's ``LastLevelP6P7`` switches to P5
    when C5 and P5 have the same width, which is not the paper's design.
    """

    def __init__(self, in_channels: int, out_channels: int, *, with_p7: bool = True) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1) if with_p7 else None
        for conv in (self.p6, self.p7):
            if conv is not None:
                # torchvision's / detectron2's init of the FPN convs ("c2_xavier_fill").
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.constant_(conv.bias, 0)

    def forward(self, c5: Tensor) -> list[Tensor]:
        p6 = self.p6(c5)
        if self.p7 is None:
            return [p6]
        return [p6, self.p7(F.relu(p6))]


class RetinaFPN(nn.Module):
    """Pyramid levels ``min_level..max_level`` (within P2..P7) of ``out_channels`` channels.

    Levels <= 5 come from a torchvision ``FeaturePyramidNetwork`` over C_min..C_top with
    ``top = min(max_level, 5)`` (the top-down pathway starts at the coarsest level kept, so
    every parameter is used); levels 6 and 7 from `LastLevelsP6P7` on C5.

    Args:
        in_channels: channels of the backbone maps, ``{"C2": c2, ..., "C5": c5}``.
        out_channels: channels of every output map.
        min_level, max_level: levels to output, ``2 <= min_level <= max_level <= 7``.
        variant: ``"fpn"`` or ``"c5_only"`` (one map, level 5, stride 32; min/max level then
            only describe the anchors, see `retina_sweep.model.detector.build_anchor_generator`).

    Attributes:
        levels: the levels produced, in output order (``[5]`` for c5_only).
        strides: ``2**level`` for each of ``levels``.
    """

    def __init__(
        self,
        *,
        in_channels: dict[str, int],
        out_channels: int,
        min_level: int = 3,
        max_level: int = 7,
        variant: str = "fpn",
    ) -> None:
        super().__init__()
        check_levels(min_level, max_level)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not (isinstance(out_channels, int) and out_channels >= 1):
            raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}")
        self.variant = variant
        self.out_channels = out_channels
        if variant == "c5_only":
            fpn_levels, extra_levels = [5], []
        else:
            fpn_levels = list(range(min_level, min(max_level, 5) + 1))
            extra_levels = list(range(max(min_level, 6), max_level + 1))
        self.in_features = [f"C{level}" for level in fpn_levels]
        needed = self.in_features + (["C5"] if extra_levels else [])
        missing = sorted({name for name in needed if name not in in_channels})
        if missing:
            raise ValueError(f"in_channels must have keys {missing}, got {sorted(in_channels)}")
        self.fpn = (
            FeaturePyramidNetwork([in_channels[name] for name in self.in_features], out_channels)
            if fpn_levels
            else None
        )
        self.extra = (
            LastLevelsP6P7(in_channels["C5"], out_channels, with_p7=max_level == 7)
            if extra_levels
            else None
        )
        # P7 is computed from P6: with min_level 7, P6 is computed but not output.
        self._drop_p6 = extra_levels == [7]
        self.levels: list[int] = fpn_levels + extra_levels
        self.strides: list[int] = [2**level for level in self.levels]

    def forward(self, feats: dict[str, Tensor]) -> list[Tensor]:
        """``{"C2": ..., "C5": ...}`` -> ``[P_min, ..., P_max]``, P_l of shape
        (N, out_channels, H / 2**l, W / 2**l) (rounded up by the stride-2 convs)."""
        outs: list[Tensor] = []
        if self.fpn is not None:
            pyramid = self.fpn(OrderedDict((name, feats[name]) for name in self.in_features))
            outs.extend(pyramid.values())
        if self.extra is not None:
            extra = self.extra(feats["C5"])
            outs.extend(extra[1:] if self._drop_p6 else extra)
        return outs
