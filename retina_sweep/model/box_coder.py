"""Box <-> regression-target transform of R-CNN / RetinaNet.

For an anchor of centre (xa, ya) and size (wa, ha) and a box of centre (x, y) and size (w, h):
``dx = wx (x - xa) / wa``, ``dy = wy (y - ya) / ha``, ``dw = ww log(w / wa)``,
``dh = wh log(h / ha)`` (weights (1, 1, 1, 1) for RetinaNet in every public implementation).
Widths are ``x2 - x1`` (no +1), as torchvision and detectron2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder"]


class BoxCoder:
    """Encode boxes as (dx, dy, dw, dh) deltas relative to anchors, and decode them back.

    Args:
        weights: (wx, wy, ww, wh) multipliers of the deltas, all > 0.
        clamp: upper bound of dw, dh (after dividing by the weights) before ``exp`` in
            `decode`, so that a wild prediction cannot overflow; ``log(1000 / 16)`` as
            torchvision and detectron2.
    """

    def __init__(
        self,
        *,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(not w > 0 for w in weights):
            raise ValueError(f"weights must be 4 numbers > 0, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def encode(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """Deltas that move ``anchors`` onto ``gt``: (..., 4) xyxy, broadcastable -> (..., 4)."""
        anchors = anchors.to(gt.dtype)
        wa = anchors[..., 2] - anchors[..., 0]
        ha = anchors[..., 3] - anchors[..., 1]
        xa = anchors[..., 0] + 0.5 * wa
        ya = anchors[..., 1] + 0.5 * ha
        w = gt[..., 2] - gt[..., 0]
        h = gt[..., 3] - gt[..., 1]
        x = gt[..., 0] + 0.5 * w
        y = gt[..., 1] + 0.5 * h
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (x - xa) / wa,
                wy * (y - ya) / ha,
                ww * torch.log(w / wa),
                wh * torch.log(h / ha),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from deltas: (..., 4) deltas and (..., 4) xyxy anchors (broadcastable) ->
        (..., 4) xyxy boxes, in the dtype of ``deltas``."""
        anchors = anchors.to(deltas.dtype)
        wa = anchors[..., 2] - anchors[..., 0]
        ha = anchors[..., 3] - anchors[..., 1]
        xa = anchors[..., 0] + 0.5 * wa
        ya = anchors[..., 1] + 0.5 * ha
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        x = dx * wa + xa
        y = dy * ha + ya
        half_w = 0.5 * torch.exp(dw) * wa
        half_h = 0.5 * torch.exp(dh) * ha
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clamp={self.clamp:.4f})"
