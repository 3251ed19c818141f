"""Anchor-to-ground-truth assignment by IoU, for a whole padded batch at once.

An anchor is foreground (matched to its highest-IoU gt box) if that IoU is >= ``fg_iou_thresh``,
background if < ``bg_iou_thresh`` and ignored in between (paper: 0.5 / 0.4). With low-quality
matches, each gt box also claims its highest-IoU anchors (ties included), so that no gt box is
left without an anchor (torchvision's and detectron2's ``allow_low_quality_matches``).

Crowd regions (COCO ``iscrowd`` boxes) are not matched; instead a background anchor whose
intersection with a crowd box covers at least ``crowd_ioa_thresh`` (0.5) of the anchor's own
area becomes ignored: it is mostly inside a region of unannotated objects, so calling it
background would teach the classifier to reject real objects. Foreground anchors stay
foreground.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher", "anchor_state", "box_ioa"]


def box_ioa(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Intersection over the anchor's area: (M, 4) x (A, 4) xyxy -> (M, A) in [0, 1].

    Anchors of zero area give 0.
    """
    lt = torch.max(boxes[:, None, :2], anchors[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], anchors[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return inter / area.clamp(min=torch.finfo(area.dtype).tiny)


class Matcher:
    """Assign each anchor a gt index, ``BELOW_LOW_THRESHOLD`` (-1, background) or
    ``BETWEEN_THRESHOLDS`` (-2, ignore).

    Args:
        fg_iou_thresh: IoU >= this is foreground.
        bg_iou_thresh: IoU < this is background; ``0 <= bg_iou_thresh <= fg_iou_thresh <= 1``.
        allow_low_quality_matches: also match each gt box to its highest-IoU anchors (ties
            included; each such anchor gets its own highest-IoU gt, as torchvision). A gt box
            whose best IoU is 0 claims nothing (torchvision would then match every anchor).
        crowd_ioa_thresh: background anchors covered at least this much by a crowd box become
            ignored (see the module docstring); in (0, 1].
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        allow_low_quality_matches: bool = True,
        crowd_ioa_thresh: float = 0.5,
    ) -> None:
        if not 0 <= fg_iou_thresh <= 1:
            raise ValueError(f"fg_iou_thresh must be in [0, 1], got {fg_iou_thresh}")
        if not 0 <= bg_iou_thresh <= fg_iou_thresh:
            raise ValueError(
                f"bg_iou_thresh must be in [0, fg_iou_thresh={fg_iou_thresh}], got {bg_iou_thresh}"
            )
        if not 0 < crowd_ioa_thresh <= 1:
            raise ValueError(f"crowd_ioa_thresh must be in (0, 1], got {crowd_ioa_thresh}")
        self.fg_iou_thresh = float(fg_iou_thresh)
        self.bg_iou_thresh = float(bg_iou_thresh)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.crowd_ioa_thresh = float(crowd_ioa_thresh)

    def __call__(
        self,
        iou: Tensor,
        gt_valid: Tensor,
        crowd_ioa: Tensor | None = None,
        crowd_valid: Tensor | None = None,
    ) -> Tensor:
        """Match a padded batch.

        Args:
            iou: (N, G, A) IoU of every (padded) gt box with every anchor.
            gt_valid: (N, G) bool, False for padding gt slots (they never match).
            crowd_ioa: optional (N, C, A) intersection-over-anchor-area with crowd boxes
                (`box_ioa`).
            crowd_valid: (N, C) bool, False for padding crowd slots; all valid if omitted.

        Returns:
            matched_idxs: (N, A) long, gt index in 0..G-1, -1 background or -2 ignore.
        """
        if iou.dim() != 3 or gt_valid.shape != iou.shape[:2]:
            raise ValueError(
                f"iou must be (N, G, A) and gt_valid (N, G), got {tuple(iou.shape)} and "
                f"{tuple(gt_valid.shape)}"
            )
        n, g, a = iou.shape
        if g == 0:
            matched = torch.full(
                (n, a), self.BELOW_LOW_THRESHOLD, dtype=torch.long, device=iou.device
            )
        else:
            # Padding gts get IoU -1: below every threshold and never an anchor's best.
            iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
            best_iou, best_gt = iou.max(dim=1)  # (N, A): first gt on ties, as torchvision
            below = torch.full_like(best_gt, self.BELOW_LOW_THRESHOLD)
            between = torch.full_like(best_gt, self.BETWEEN_THRESHOLDS)
            matched = torch.where(
                best_iou >= self.fg_iou_thresh,
                best_gt,
                torch.where(best_iou >= self.bg_iou_thresh, between, below),
            )
            if self.allow_low_quality_matches:
                best_per_gt = iou.max(dim=2, keepdim=True).values  # (N, G, 1)
                # best_per_gt > 0 also drops padding gts (-1) and gts no anchor overlaps.
                is_best = (iou == best_per_gt) & (best_per_gt > 0)
                matched = torch.where(is_best.any(dim=1), best_gt, matched)
        if crowd_ioa is not None and crowd_ioa.shape[1] > 0:
            covered = crowd_ioa >= self.crowd_ioa_thresh
            if crowd_valid is not None:
                covered &= crowd_valid[:, :, None]
            near_crowd = covered.any(dim=1) & (matched == self.BELOW_LOW_THRESHOLD)
            matched = matched.masked_fill(near_crowd, self.BETWEEN_THRESHOLDS)
        return matched

    def __repr__(self) -> str:
        return (
            f"Matcher(fg_iou_thresh={self.fg_iou_thresh}, bg_iou_thresh={self.bg_iou_thresh}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches}, "
            f"crowd_ioa_thresh={self.crowd_ioa_thresh})"
        )


def anchor_state(matched_idxs: Tensor) -> Tensor:
    """(N, A) matched indices -> (N, A) long state: 1 foreground, 0 background, -1 ignore."""
    # gt index i >= 0 -> i + 1 >= 1 -> 1; BELOW_LOW_THRESHOLD -1 -> 0; BETWEEN_THRESHOLDS -2 -> -1.
    return (matched_idxs + 1).clamp(max=1)
