"""Anchor boxes of RetinaNet.

At level l the anchors have areas ``(base_size * 2**(l - 3) * 2**(i / scales_per_octave))**2``
for ``i < scales_per_octave`` and every aspect ratio (h / w): 32..512 px over P3..P7 with 3
scales and 3 ratios (A_loc = 9) in the paper. Anchors are centred at
``(x * stride + offset * stride, y * stride + offset * stride)`` for every feature-map cell.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .fpn import check_levels

__all__ = ["paper_anchor_sizes", "AnchorGenerator"]

_CACHE_SIZE = 16


def paper_anchor_sizes(
    min_level: int,
    max_level: int,
    base_size: float = 32,
    scales_per_octave: int = 3,
    truncate: bool = False,
) -> list[list[float]]:
    """Anchor sizes (sqrt of the area) of levels ``min_level..max_level``, one list per level:
    ``base_size * 2**(level - 3) * 2**(i / scales_per_octave)``, ``i < scales_per_octave``.

    ``truncate=True`` reproduces torchvision's ``int()`` sizes (32, 40, 50 at P3 instead of
    32, 40.3, 50.8).

    Raises:
        ValueError: levels outside 2..7 or ``min_level > max_level``, ``base_size <= 0`` or
            ``scales_per_octave < 1``.
    """
    check_levels(min_level, max_level)
    if not base_size > 0:
        raise ValueError(f"base_size must be > 0, got {base_size}")
    if not (isinstance(scales_per_octave, int) and scales_per_octave >= 1):
        raise ValueError(f"scales_per_octave must be an integer >= 1, got {scales_per_octave!r}")
    sizes = []
    for level in range(min_level, max_level + 1):
        octave = base_size * 2.0 ** (level - 3)
        level_sizes = [octave * 2.0 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        sizes.append([float(int(s)) if truncate else s for s in level_sizes])
    return sizes


def _cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round_: bool) -> Tensor:
    """(len(ratios) * len(sizes), 4) zero-centred xyxy anchors, ratio-major (torchvision's
    order): ``[r0 s0, r0 s1, ..., r1 s0, ...]``. Ratio r = h / w keeps the area: h = s sqrt(r),
    w = s / sqrt(r)."""
    if round_:
        # torchvision's arithmetic, in float32, so that the rounding is bit-identical.
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    anchors = []
    for r in aspect_ratios:
        for s in sizes:
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float64).float()


class AnchorGenerator(nn.Module):
    """Anchors of all pyramid levels, shared by every image of a padded batch.

    Args:
        sizes: per level, the anchor sizes (sqrt of the area, px); every level must have the
            same number of sizes (the head predicts the same A_loc everywhere).
        aspect_ratios: h / w ratios (> 0), the same for every level.
        strides: per level, the feature stride in px (``2**level``).
        offset: anchor centre offset in cells, in [0, 1): 0 puts centres on ``x * stride``
            (torchvision, detectron2's RetinaNet), 0.5 at cell centres.
        round_cell_anchors: round the zero-centred anchor corners to integers, as torchvision.

    Attributes:
        num_anchors_per_location: A_loc = len(sizes[l]) * len(aspect_ratios).

    Output order: per level (H, W, A_loc) with A_loc ratio-major (see `_cell_anchors`), levels
    concatenated in the order of ``sizes``, so index i matches index i of the head outputs.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float],
        strides: Sequence[int],
        offset: float = 0.0,
        round_cell_anchors: bool = False,
    ) -> None:
        super().__init__()
        if len(sizes) == 0 or len(sizes) != len(strides):
            raise ValueError(
                f"sizes must have one list per level ({len(strides)} strides), got {len(sizes)}"
            )
        if len({len(s) for s in sizes}) != 1 or len(sizes[0]) == 0:
            raise ValueError(
                f"sizes must have the same non-zero number of sizes on every level, got {sizes}"
            )
        if any(not s > 0 for level in sizes for s in level):
            raise ValueError(f"sizes must be > 0, got {sizes}")
        if len(aspect_ratios) == 0 or any(not r > 0 for r in aspect_ratios):
            raise ValueError(
                f"aspect_ratios must be a non-empty list of numbers > 0, got {aspect_ratios}"
            )
        if any(not (isinstance(s, int) and s >= 1) for s in strides):
            raise ValueError(f"strides must be integers >= 1, got {strides}")
        if not 0 <= offset < 1:
            raise ValueError(f"offset must be in [0, 1), got {offset}")
        self.sizes = [[float(s) for s in level] for level in sizes]
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.strides = list(strides)
        self.offset = float(offset)
        self.round_cell_anchors = round_cell_anchors
        self.num_anchors_per_location = len(self.sizes[0]) * len(self.aspect_ratios)
        for i, level_sizes in enumerate(self.sizes):
            # Non-persistent: derived from the config, moved by .to(device), not checkpointed.
            self.register_buffer(
                f"cell_anchors_{i}",
                _cell_anchors(level_sizes, self.aspect_ratios, round_cell_anchors),
                persistent=False,
            )
        # (feature shapes, device) -> (A, 4) anchors; the shapes repeat every iteration.
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def cell_anchors(self, level_index: int) -> Tensor:
        """(A_loc, 4) zero-centred anchors of level ``level_index`` (0 = first level)."""
        return getattr(self, f"cell_anchors_{level_index}")

    def _grid_anchors(self, feature_shapes: Sequence[tuple[int, int]]) -> Tensor:
        out = []
        for i, ((h, w), stride) in enumerate(zip(feature_shapes, self.strides, strict=True)):
            cell = self.cell_anchors(i)
            shift = self.offset * stride
            xs = torch.arange(w, dtype=torch.float32, device=cell.device) * stride + shift
            ys = torch.arange(h, dtype=torch.float32, device=cell.device) * stride + shift
            ys, xs = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + cell[None]).reshape(-1, 4))
        return torch.cat(out)

    def forward(
        self, feature_shapes: Sequence[tuple[int, int]], device: torch.device | None = None
    ) -> Tensor:
        """(A, 4) xyxy anchors for feature maps of the given (H, W), one shape per level.

        Cached per (shapes, device): callers must not modify the result in place.
        ``device`` defaults to the module's device.
        """
        if len(feature_shapes) != len(self.strides):
            raise ValueError(
                f"feature_shapes must have one (H, W) per level ({len(self.strides)}), got "
                f"{len(feature_shapes)}"
            )
        shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
        device = torch.device(device) if device is not None else self.cell_anchors(0).device
        key = (shapes, str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self._grid_anchors(shapes).to(device)
            self._cache[key] = anchors
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return anchors

    def _apply(self, fn, recurse=True):
        # .to() / .half() change the buffers: drop anchors computed from the old ones.
        self._cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
            f"offset={self.offset}, round_cell_anchors={self.round_cell_anchors}"
        )
