"""Minibatch-sampling training strategies: OHEM, OHEM 1:3 and random 1:3 sampling.

These are the baselines of Table 1(d) of "Focal Loss for Dense Object Detection" (Lin et al.)
plus the classic RPN / Fast R-CNN sampling heuristic. Instead of summing a (focal) loss over
every anchor, each strategy picks a small minibatch of anchors per image and trains the plain
sigmoid cross entropy (alpha-free, gamma 0) and the box loss on that minibatch only.

- ``ohem``: per image, every non-ignored anchor is scored by its loss (cross entropy summed over
  the K classes, plus the box loss for foreground anchors); NMS over the anchors' *predicted
  boxes* ranked by that loss removes near-duplicates; the ``batch_size`` highest-loss survivors
  form the minibatch.
- ``ohem_1to3``: as ``ohem``, but the minibatch holds at most ``floor(batch_size * 0.25)``
  positives (the highest-loss surviving positives), filled with the highest-loss surviving
  negatives up to ``batch_size``; with few positives, negatives fill the batch.
- ``random_1to3``: uniform random sampling of at most ``floor(batch_size * pos_fraction)``
  positives and negatives up to ``batch_size`` per image, from a private seeded generator.

Conventions (see docs/design.md and docs/sampling.md):

- Selection runs under ``torch.no_grad()`` on detached values. The loss is then computed with
  gradient on the selected anchors only, so anchors that were not selected get exactly zero
  gradient (in ``cls_logits`` and in ``box_loss``).
- Normalisation: ``loss_cls = sum of CE over the selected anchors / S`` and
  ``loss_box = sum of box_loss over the selected foreground anchors / S``, where ``S`` is the
  number of anchors selected in the whole batch (at least 1). The detector's ``normalizer``
  (number of foreground anchors) is accepted for interface compatibility and ignored.
- Ignored anchors (``anchor_state == -1``) are never candidates: they are not scored, cannot be
  selected and cannot suppress other anchors in the NMS.
- NMS boxes: the ``boxes`` argument, which the detector fills with the boxes *predicted* for
  each anchor (box-head deltas decoded on the anchors, detached), not the anchors themselves.
  The paper only says that "each example is scored by its loss, non-maximum suppression (nms)
  is then applied"; deduplicating on the predicted boxes removes anchors that predict the same
  box (the duplicates the detector's own inference NMS would merge), and at initialisation the
  predicted boxes equal the anchors up to small deltas. Shrivastava et al.'s OHEM ran the NMS
  on its RoIs, whose one-stage analogue is the anchor; docs/sampling.md discusses the choice.
- Normalisation is the Fast R-CNN / OHEM minibatch mean (the paper is silent for its OHEM
  baselines): every minibatch example weighs ``1 / S`` whatever its label, which keeps the
  loss scale independent of how many positives the sampling happened to pick.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .sampling import STRATEGIES, LossStrategy

__all__ = [
    "OHEMStrategy",
    "OHEM1to3Strategy",
    "RandomSamplingStrategy",
    "OHEM_STRATEGIES",
    "per_anchor_ce",
    "ohem_select",
    "random_select",
    "minibatch_loss",
    "default_pre_nms_topk",
]

# Lower bound of the per-image NMS candidate pool (see `default_pre_nms_topk`).
_MIN_PRE_NMS_TOPK = 2000


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------
def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be an integer in [1, inf), got {batch_size!r}")
    return int(batch_size)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def default_pre_nms_topk(batch_size: int) -> int:
    """Per-image NMS candidate pool used when ``pre_nms_topk`` is not given.

    ``max(8 * batch_size, 2000)``: the highest-loss candidates only enter the NMS, which keeps
    the NMS input (and its O(M^2) IoU work) bounded independently of the anchor count.
    """
    return max(8 * batch_size, _MIN_PRE_NMS_TOPK)


def _check_inputs(
    cls_logits: Tensor,
    cls_targets: Tensor,
    anchor_state: Tensor,
    box_loss: Tensor,
    boxes: Tensor | None,
) -> None:
    if cls_logits.dim() != 3:
        raise ValueError(f"cls_logits must have shape (N, A, K), got {tuple(cls_logits.shape)}")
    n, a, _ = cls_logits.shape
    if cls_targets.shape != cls_logits.shape:
        raise ValueError(
            f"cls_targets must have the shape of cls_logits {tuple(cls_logits.shape)}, "
            f"got {tuple(cls_targets.shape)}"
        )
    if anchor_state.shape != (n, a):
        raise ValueError(
            f"anchor_state must have shape ({n}, {a}), got {tuple(anchor_state.shape)}"
        )
    if box_loss.shape != (n, a):
        raise ValueError(f"box_loss must have shape ({n}, {a}), got {tuple(box_loss.shape)}")
    if boxes is not None and boxes.shape != (n, a, 4):
        raise ValueError(f"boxes must have shape ({n}, {a}, 4), got {tuple(boxes.shape)}")


# --------------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------------
def per_anchor_ce(cls_logits: Tensor, cls_targets: Tensor) -> Tensor:
    """Sigmoid cross entropy of every anchor, summed over the K classes.

    Equal to ``sigmoid_focal_loss(cls_logits, cls_targets, alpha=-1, gamma=0).sum(-1)``
    (no alpha balancing, no focal modulation). Computed in float32.

    Args:
        cls_logits: (N, A, K) classification logits.
        cls_targets: (N, A, K) one-hot float targets (an all-zero row is background).

    Returns:
        (N, A) float32 tensor.
    """
    return F.binary_cross_entropy_with_logits(
        cls_logits.float(), cls_targets.float(), reduction="none"
    ).sum(dim=-1)


def _rows_to_mask(shape: tuple[int, int], index: Tensor, chosen: Tensor) -> Tensor:
    """(N, A) bool mask that is True at ``index[i, j]`` of row i wherever ``chosen[i, j]``.

    ``index`` may repeat anchors in a row for entries that are not chosen, so the mask is built
    by a scatter-add of counts (order independent) rather than a bool scatter.
    """
    counts = torch.zeros(shape, dtype=torch.int32, device=index.device)
    counts.scatter_add_(1, index, chosen.to(torch.int32))
    return counts > 0


def _take_ranked(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of every row (descending), ``k`` clipped to the row length."""
    k = min(k, values.shape[1])
    return values.topk(k, dim=1, largest=True, sorted=True)


def _balanced_from_ranked(
    pos_values: Tensor, neg_values: Tensor, batch_size: int, pos_fraction: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Positives first (at most ``floor(batch_size * pos_fraction)``), negatives fill the batch.

    Args:
        pos_values, neg_values: (N, M) ranking keys; ``-inf`` marks an entry that is not
            available (wrong label, ignored, suppressed). Higher ranks first.

    Returns:
        ``(pos_index, pos_chosen, neg_index, neg_chosen)``: column indices into the (N, M) inputs
        and whether each is in the minibatch, per image.
    """
    max_pos = int(math.floor(batch_size * pos_fraction + 1e-9))
    num_pos = (pos_values > float("-inf")).sum(dim=1).clamp(max=max_pos)  # (N,)
    num_neg = torch.minimum((neg_values > float("-inf")).sum(dim=1), batch_size - num_pos)

    _, pos_index = _take_ranked(pos_values, max_pos)
    _, neg_index = _take_ranked(neg_values, batch_size)
    pos_rank = torch.arange(pos_index.shape[1], device=pos_index.device)
    neg_rank = torch.arange(neg_index.shape[1], device=neg_index.device)
    pos_chosen = pos_rank[None, :] < num_pos[:, None]
    neg_chosen = neg_rank[None, :] < num_neg[:, None]
    return pos_index, pos_chosen, neg_index, neg_chosen


@torch.no_grad()
def ohem_select(
    scores: Tensor,
    boxes: Tensor,
    anchor_state: Tensor,
    *,
    batch_size: int,
    nms_thresh: float,
    pos_fraction: float | None = None,
    pre_nms_topk: int | None = None,
) -> Tensor:
    """Online hard example mining: which anchors form each image's minibatch.

    Per image: (1) the non-ignored anchors are ranked by ``scores`` (their loss); (2) only the
    ``pre_nms_topk`` highest-loss candidates are kept (for ``pos_fraction`` set, the top
    ``pre_nms_topk`` positives and the top ``pre_nms_topk`` negatives, so that low-loss
    positives are not crowded out by the many negatives); (3) NMS with IoU threshold
    ``nms_thresh`` over ``boxes``, ranked by loss, removes lower-loss near-duplicates -
    positives and negatives suppress each other, as in the paper ("after applying nms to all
    examples"); (4) the ``batch_size`` highest-loss survivors are selected, or, with
    ``pos_fraction``, at most ``floor(batch_size * pos_fraction)`` highest-loss surviving
    positives plus the highest-loss surviving negatives up to ``batch_size``.

    The NMS is one ``torchvision.ops.batched_nms`` call for the whole batch with the image index
    as the group id (no suppression across images). ``nms_thresh == 1.0`` disables the NMS
    (no IoU exceeds 1), and it is then skipped. An image may get fewer than ``batch_size``
    anchors when it has fewer valid anchors or when the NMS leaves fewer survivors in its
    candidate pool.

    Speed: a first pool of ``4 * batch_size`` candidates is tried; its result is kept only where
    it provably equals the result of the full pool (the NMS is prefix-stable in loss order), so
    the answer is the same as always using ``pre_nms_topk`` candidates, for less NMS work.

    Args:
        scores: (N, A) per-anchor loss used for ranking (higher = harder).
        boxes: (N, A, 4) xyxy boxes the NMS runs on - in this framework the boxes predicted by
            the box head (decoded deltas); see docs/sampling.md for why.
        anchor_state: (N, A) long, 1 foreground / 0 background / -1 ignore.
        batch_size: anchors per image in the minibatch, >= 1.
        nms_thresh: IoU threshold in (0, 1]; an anchor is suppressed by a higher-loss one whose
            box has IoU > ``nms_thresh`` with its own.
        pos_fraction: ``None`` for plain OHEM, or the largest fraction of positives in (0, 1]
            (0.25 = "OHEM 1:3").
        pre_nms_topk: candidates per image entering the NMS (``None`` =
            ``max(8 * batch_size, 2000)``); must be >= ``batch_size``.

    Returns:
        (N, A) bool mask of the selected anchors.
    """
    _check_batch_size(batch_size)
    nms_thresh = _check_fraction("nms_thresh", nms_thresh)
    if pos_fraction is not None:
        pos_fraction = _check_fraction("pos_fraction", pos_fraction)
    pre_nms_topk = _resolve_pre_nms_topk(pre_nms_topk, batch_size)
    if scores.dim() != 2 or anchor_state.shape != scores.shape:
        raise ValueError(
            "scores and anchor_state must both have shape (N, A), got "
            f"{tuple(scores.shape)} and {tuple(anchor_state.shape)}"
        )
    if boxes.shape != (*scores.shape, 4):
        raise ValueError(f"boxes must have shape (N, A, 4), got {tuple(boxes.shape)}")

    scores = scores.detach().float()
    fg = anchor_state == 1
    bg = anchor_state == 0
    # Greedy NMS ranked by loss is prefix-stable: an anchor's fate depends only on the anchors
    # ranked above it. So a small pool gives the full pool's answer whenever everything it
    # selects outranks every anchor it left out (the ``exact`` of `_select_from_pool`); the
    # full pool is run only for batches where that fails. The NMS is O(M^2) in the pool size M.
    full = min(pre_nms_topk, scores.shape[1])
    first = _FIRST_POOL_FACTOR * batch_size
    if 2 * first <= full:  # otherwise a failed shortcut would cost more than it can save
        selected, exact = _select_from_pool(
            scores, boxes, fg, bg, batch_size, nms_thresh, pos_fraction, first
        )
        if bool(exact.all()):
            return selected
    selected, _ = _select_from_pool(
        scores, boxes, fg, bg, batch_size, nms_thresh, pos_fraction, full
    )
    return selected


# The first, small NMS pool of `ohem_select`, in multiples of the minibatch size.
_FIRST_POOL_FACTOR = 4


def _select_from_pool(
    scores: Tensor,
    boxes: Tensor,
    fg: Tensor,
    bg: Tensor,
    batch_size: int,
    nms_thresh: float,
    pos_fraction: float | None,
    pool: int,
) -> tuple[Tensor, Tensor]:
    """Steps (2)-(4) of `ohem_select` with ``pool`` candidates (per label with ``pos_fraction``).

    Returns:
        ``(selected, exact)``: the (N, A) bool minibatch mask and an (N,) bool that is True where
        the result provably equals that of an NMS over every valid anchor of the image.
    """
    n, a = scores.shape
    neg_inf = float("-inf")

    # (2) Candidate pool per image, (N, M) ranking keys and anchor indices.
    if pos_fraction is None:
        valid = scores.masked_fill(~(fg | bg), neg_inf)
        cand_val, cand_idx = _take_ranked(valid, pool)
        left_out = [_best_left_out(valid, cand_idx)]
    else:
        pos_all = scores.masked_fill(~fg, neg_inf)
        neg_all = scores.masked_fill(~bg, neg_inf)
        pos_val, pos_idx = _take_ranked(pos_all, pool)
        neg_val, neg_idx = _take_ranked(neg_all, pool)
        cand_val = torch.cat([pos_val, neg_val], dim=1)
        cand_idx = torch.cat([pos_idx, neg_idx], dim=1)
        left_out = [_best_left_out(pos_all, pos_idx), _best_left_out(neg_all, neg_idx)]
    # Highest loss of a valid anchor outside the pool, per image (-inf when none is left out).
    outside = torch.stack(left_out).amax(dim=0)
    survive = cand_val > neg_inf

    # (3) One NMS call for the whole batch; the image index is the group id.
    if nms_thresh < 1.0:
        img, slot = survive.nonzero(as_tuple=True)
        if img.numel() > 0:
            cand_boxes = boxes.detach()[img, cand_idx[img, slot]].double()
            # batched_nms separates the groups by offsetting each by idx * (max coordinate + 1),
            # which assumes coordinates >= 0; predicted boxes may leave the image, so translate
            # them (IoU is translation invariant) to keep images from suppressing each other.
            # float64, as in `grouped_nms`: an early, exploding box makes the offsets large
            # enough to cost float32 the precision of the small boxes' IoU.
            cand_boxes = cand_boxes - cand_boxes.min()
            keep = batched_nms(cand_boxes, cand_val[img, slot].double(), img, nms_thresh)
            survive = torch.zeros_like(survive)
            survive[img[keep], slot[keep]] = True
    surv_val = cand_val.masked_fill(~survive, neg_inf)

    # (4) Highest-loss survivors, optionally balanced.
    if pos_fraction is None:
        chosen_val, slots = _take_ranked(surv_val, batch_size)
        chosen = chosen_val > neg_inf
        positives_exact = torch.ones_like(outside, dtype=torch.bool)
    else:
        cand_fg = fg.gather(1, cand_idx)
        pos_slot, pos_chosen, neg_slot, neg_chosen = _balanced_from_ranked(
            surv_val.masked_fill(~cand_fg, neg_inf),
            surv_val.masked_fill(cand_fg, neg_inf),
            batch_size,
            pos_fraction,
        )
        slots = torch.cat([pos_slot, neg_slot], dim=1)
        chosen = torch.cat([pos_chosen, neg_chosen], dim=1)
        chosen_val = cand_val.gather(1, slots)
        # With fewer positives than the cap, every positive's fate must be exact too: all of
        # them must outrank everything left out.
        max_pos = int(math.floor(batch_size * pos_fraction + 1e-9))
        capped = pos_chosen.sum(dim=1) == max_pos
        positives_exact = capped | (scores.masked_fill(~fg, float("inf")).amin(dim=1) > outside)
    # Exact: nothing was left out, or the minibatch is full and all of it outranks everything
    # left out.
    filled = chosen.sum(dim=1) == batch_size
    lowest = chosen_val.masked_fill(~chosen, float("inf")).amin(dim=1)
    exact = (outside == neg_inf) | (filled & (lowest > outside) & positives_exact)
    return _rows_to_mask((n, a), cand_idx.gather(1, slots), chosen), exact


def _best_left_out(values: Tensor, taken: Tensor) -> Tensor:
    """(N,) highest entry of each row of ``values`` whose column is not in ``taken``."""
    return values.scatter(1, taken, float("-inf")).amax(dim=1)


@torch.no_grad()
def random_select(
    anchor_state: Tensor,
    *,
    batch_size: int,
    pos_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random positive/negative sampling (the RPN / Fast R-CNN minibatch heuristic).

    Per image, ``min(#fg, floor(batch_size * pos_fraction))`` foreground anchors and
    ``min(#bg, batch_size - #selected fg)`` background anchors are drawn uniformly without
    replacement; ignored anchors are never drawn. The random keys are drawn on ``generator``'s
    device (CPU for a default ``torch.Generator()``) and moved to ``anchor_state``'s device, so
    a seeded generator gives the same selection on every device.

    Args:
        anchor_state: (N, A) long, 1 foreground / 0 background / -1 ignore.
        batch_size: anchors per image, >= 1.
        pos_fraction: largest fraction of positives, in (0, 1].
        generator: source of randomness (``None`` = the global generator).

    Returns:
        (N, A) bool mask of the selected anchors.
    """
    _check_batch_size(batch_size)
    pos_fraction = _check_fraction("pos_fraction", pos_fraction)
    if anchor_state.dim() != 2:
        raise ValueError(f"anchor_state must have shape (N, A), got {tuple(anchor_state.shape)}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(anchor_state.shape, generator=generator, device=gen_device)
    keys = keys.to(anchor_state.device)
    neg_inf = float("-inf")
    pos_slot, pos_chosen, neg_slot, neg_chosen = _balanced_from_ranked(
        keys.masked_fill(anchor_state != 1, neg_inf),
        keys.masked_fill(anchor_state != 0, neg_inf),
        batch_size,
        pos_fraction,
    )
    return _rows_to_mask(
        tuple(anchor_state.shape),
        torch.cat([pos_slot, neg_slot], dim=1),
        torch.cat([pos_chosen, neg_chosen], dim=1),
    )


def minibatch_loss(
    cls_logits: Tensor,
    cls_targets: Tensor,
    box_loss: Tensor,
    anchor_state: Tensor,
    selected: Tensor,
) -> dict[str, Tensor]:
    """Cross entropy and box loss averaged over the selected anchors of the whole batch.

    ``loss_cls = sum_{selected} CE / S`` and ``loss_box = sum_{selected, fg} box_loss / S`` with
    ``S = max(1, number of selected anchors)``. Only the selected entries are gathered into the
    graph, so every other anchor receives exactly zero gradient.

    Args:
        cls_logits: (N, A, K) logits; cls_targets: (N, A, K) one-hot float targets.
        box_loss: (N, A) per-anchor box loss summed over the 4 coordinates.
        anchor_state: (N, A) long, 1 foreground / 0 background / -1 ignore.
        selected: (N, A) bool minibatch mask (ignored anchors in it are dropped).

    Returns:
        ``{"loss_cls": scalar, "loss_box": scalar}``.
    """
    selected = selected & (anchor_state >= 0)
    num = selected.sum().clamp(min=1).to(torch.float32)
    logits = cls_logits[selected]
    loss_cls = F.binary_cross_entropy_with_logits(
        logits.float(), cls_targets[selected].float(), reduction="sum"
    )
    loss_box = box_loss[selected & (anchor_state == 1)].float().sum()
    return {"loss_cls": loss_cls / num, "loss_box": loss_box / num}


def _resolve_pre_nms_topk(pre_nms_topk: int | None, batch_size: int) -> int:
    if pre_nms_topk is None:
        return default_pre_nms_topk(batch_size)
    if (
        isinstance(pre_nms_topk, bool)
        or not isinstance(pre_nms_topk, Integral)
        or pre_nms_topk < batch_size
    ):
        raise ValueError(
            f"pre_nms_topk must be None or an integer in [batch_size={batch_size}, inf), "
            f"got {pre_nms_topk!r}"
        )
    return int(pre_nms_topk)


# --------------------------------------------------------------------------------------------
# Strategies (modules with the common call of docs/design.md)
# --------------------------------------------------------------------------------------------
class OHEMStrategy(LossStrategy):
    """Online hard example mining on a one-stage detector (Table 1(d), "OHEM" rows).

    Each non-ignored anchor is scored by its loss: the sigmoid cross entropy summed over the K
    classes (no alpha, gamma 0) plus, for foreground anchors, the box loss. NMS at
    ``nms_thresh`` over the **predicted (decoded) boxes**, ranked by loss, removes
    near-duplicates, and the ``batch_size`` highest-loss survivors of each image form the
    minibatch (see `ohem_select`). The loss is the cross entropy over the selected anchors plus
    the box loss over the selected foreground anchors, both divided by the number of selected
    anchors in the batch (see `minibatch_loss`); ``normalizer`` is ignored.

    ``needs_boxes`` is True: the detector must pass the decoded predicted boxes.

    Args:
        batch_size: minibatch anchors per image, >= 1 (paper grid: 128, 256, 512).
        nms_thresh: NMS IoU threshold in (0, 1] (paper grid: 0.5, 0.7; 1.0 disables the NMS).
        pos_fraction: ``None`` (plain OHEM) or the largest fraction of positives in (0, 1]
            (0.25 = "OHEM 1:3").
        pre_nms_topk: NMS candidates per image (``None`` = ``max(8 * batch_size, 2000)``),
            must be >= ``batch_size``.
    """

    def __init__(
        self,
        batch_size: int,
        nms_thresh: float,
        pos_fraction: float | None = None,
        *,
        pre_nms_topk: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _check_batch_size(batch_size)
        self.nms_thresh = _check_fraction("nms_thresh", nms_thresh)
        self.pos_fraction = (
            None if pos_fraction is None else _check_fraction("pos_fraction", pos_fraction)
        )
        self.pre_nms_topk = _resolve_pre_nms_topk(pre_nms_topk, self.batch_size)

    def select(
        self,
        cls_logits: Tensor,
        cls_targets: Tensor,
        anchor_state: Tensor,
        box_loss: Tensor,
        boxes: Tensor,
    ) -> Tensor:
        """(N, A) bool mask of the minibatch; computed without gradient."""
        with torch.no_grad():
            scores = per_anchor_ce(cls_logits.detach(), cls_targets)
            scores = scores + box_loss.detach().float().masked_fill(anchor_state != 1, 0.0)
            return ohem_select(
                scores,
                boxes,
                anchor_state,
                batch_size=self.batch_size,
                nms_thresh=self.nms_thresh,
                pos_fraction=self.pos_fraction,
                pre_nms_topk=self.pre_nms_topk,
            )

    def forward(
        self,
        *,
        cls_logits: Tensor,
        cls_targets: Tensor,
        anchor_state: Tensor,
        box_loss: Tensor,
        boxes: Tensor | None,
        normalizer: Tensor,
    ) -> dict[str, Tensor]:
        """See the class docstring; shapes as in docs/design.md."""
        if boxes is None:
            raise ValueError(
                "boxes must be the (N, A, 4) decoded predicted boxes for OHEM, got None"
            )
        _check_inputs(cls_logits, cls_targets, anchor_state, box_loss, boxes)
        selected = self.select(cls_logits, cls_targets, anchor_state, box_loss, boxes)
        return minibatch_loss(cls_logits, cls_targets, box_loss, anchor_state, selected)

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, nms_thresh={self.nms_thresh}, "
            f"pos_fraction={self.pos_fraction}, pre_nms_topk={self.pre_nms_topk}"
        )


class OHEM1to3Strategy(OHEMStrategy):
    """ "OHEM 1:3" (Table 1(d)): `OHEMStrategy` with ``pos_fraction=0.25`` by default.

    After the NMS over all examples, at most ``floor(batch_size * 0.25)`` positives (highest
    loss first) enter the minibatch, and surviving negatives (highest loss first) fill it up to
    ``batch_size``; with few positives the negatives fill the whole batch.
    """

    def __init__(
        self,
        batch_size: int,
        nms_thresh: float,
        pos_fraction: float = 0.25,
        *,
        pre_nms_topk: int | None = None,
    ) -> None:
        if pos_fraction is None:
            raise ValueError("pos_fraction must be a float in (0, 1] for ohem_1to3, got None")
        super().__init__(batch_size, nms_thresh, pos_fraction, pre_nms_topk=pre_nms_topk)


class RandomSamplingStrategy(LossStrategy):
    """Random 1:3 foreground/background sampling (the RPN / Fast R-CNN heuristic), no NMS.

    Per image, at most ``floor(batch_size * pos_fraction)`` foreground anchors and background
    anchors up to ``batch_size`` are drawn uniformly (see `random_select`); the loss is the
    cross entropy (no alpha, gamma 0) over the drawn anchors plus the box loss over the drawn
    foreground anchors, both divided by the number drawn in the batch (see `minibatch_loss`).

    The draws come from the strategy's own CPU ``torch.Generator`` seeded with ``seed``: two
    strategies with the same seed called in the same order select the same anchors, whatever
    the device, and the global RNG is neither used nor advanced.

    Args:
        batch_size: anchors per image, >= 1.
        pos_fraction: largest fraction of positives, in (0, 1].
        seed: seed of the private generator.
    """

    needs_boxes = False

    def __init__(self, batch_size: int, pos_fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = _check_batch_size(batch_size)
        self.pos_fraction = _check_fraction("pos_fraction", pos_fraction)
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def select(self, anchor_state: Tensor) -> Tensor:
        """(N, A) bool mask of the minibatch; advances the private generator."""
        return random_select(
            anchor_state,
            batch_size=self.batch_size,
            pos_fraction=self.pos_fraction,
            generator=self.generator,
        )

    def forward(
        self,
        *,
        cls_logits: Tensor,
        cls_targets: Tensor,
        anchor_state: Tensor,
        box_loss: Tensor,
        boxes: Tensor | None = None,
        normalizer: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """See the class docstring; ``boxes`` and ``normalizer`` are unused."""
        _check_inputs(cls_logits, cls_targets, anchor_state, box_loss, boxes)
        selected = self.select(anchor_state)
        return minibatch_loss(cls_logits, cls_targets, box_loss, anchor_state, selected)

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}, pos_fraction={self.pos_fraction}, seed={self.seed}"


# Registered into `retina_sweep.sampling.STRATEGIES` (config key ``loss.name``) here, so that
# importing either module first gives the full registry.
OHEM_STRATEGIES: dict[str, type[LossStrategy]] = {
    "ohem": OHEMStrategy,
    "ohem_1to3": OHEM1to3Strategy,
    "random_1to3": RandomSamplingStrategy,
}
STRATEGIES.update(OHEM_STRATEGIES)
