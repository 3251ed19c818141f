"""Matcher labels on constructed IoU matrices, agreement with torchvision's Matcher, crowd."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from retina_sweep.model.matcher import Matcher, anchor_state, box_ioa

FG, BG, IGN = 1, 0, -1


def test_thresholds_without_low_quality():
    iou = torch.tensor(
        [
            # anchors: 0     1     2     3     4     5
            [0.90, 0.50, 0.45, 0.40, 0.39, 0.10],  # gt 0
            [0.20, 0.10, 0.30, 0.20, 0.10, 0.70],  # gt 1
        ]
    )[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    m = Matcher(fg_iou_thresh=0.5, bg_iou_thresh=0.4, allow_low_quality_matches=False)
    # >= 0.5 foreground (0.5 included), [0.4, 0.5) ignore (0.4 included), < 0.4 background.
    assert m(iou, valid).tolist() == [[0, 0, -2, -2, -1, 1]]


def test_low_quality_matches_with_ties():
    iou = torch.tensor(
        [
            [0.30, 0.10, 0.30, 0.00, 0.60],  # gt 0: best 0.6 at anchor 4 (already fg)
            [0.20, 0.35, 0.10, 0.35, 0.00],  # gt 1: best 0.35 at anchors 1 and 3 (a tie)
            [0.32, 0.00, 0.05, 0.00, 0.00],  # gt 2: best 0.32 at anchor 0
        ]
    )[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    plain = Matcher(allow_low_quality_matches=False)(iou, valid)
    assert plain.tolist() == [[-1, -1, -1, -1, 0]]
    low = Matcher(allow_low_quality_matches=True)(iou, valid)
    # Anchors 1 and 3 (tie) go to gt 1; anchor 0 is gt 2's best and its own best gt is gt 2.
    assert low.tolist() == [[2, 1, -1, 1, 0]]


def test_low_quality_anchor_gets_its_own_best_gt():
    # Anchor 0 is gt 1's best (0.3) but gt 0 overlaps it more (0.35): like torchvision and
    # detectron2, the promoted anchor is matched to its own highest-IoU gt, gt 0.
    iou = torch.tensor([[0.35, 0.9], [0.30, 0.0]])[None]
    out = Matcher()(iou, torch.ones(1, 2, dtype=torch.bool))
    assert out.tolist() == [[0, 0]]


def test_gt_without_overlap_claims_nothing():
    # torchvision would give all anchors (IoU 0 = the gt's "best") to the gt; we do not.
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.6, 0.0]])[None]
    out = Matcher()(iou, torch.ones(1, 2, dtype=torch.bool))
    assert out.tolist() == [[-1, 1, -1]]
    # torchvision: gt 0's "best" anchors are all of them (IoU 0, tied); each is promoted.
    assert TVMatcher(0.5, 0.4, True)(iou[0].clone()).tolist() == [1, 1, 0]


def test_padding_gts_never_match():
    iou = torch.tensor([[[0.2, 0.7, 0.1], [0.99, 0.99, 0.99]], [[0.99, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, False], [False, False]])
    out = Matcher()(iou, valid)
    assert out.tolist() == [[-1, 0, -1], [-1, -1, -1]]


def test_no_gt_slots():
    out = Matcher()(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 5) and (out == -1).all()


@pytest.mark.parametrize("low_quality", [False, True])
def test_batched_matches_torchvision_per_image(low_quality):
    g = torch.Generator().manual_seed(0)
    counts = [3, 1, 5, 2]
    gmax, a = max(counts), 40
    iou = torch.rand(len(counts), gmax, a, generator=g) * 0.8
    valid = torch.arange(gmax)[None] < torch.tensor(counts)[:, None]
    ours = Matcher(fg_iou_thresh=0.5, bg_iou_thresh=0.3, allow_low_quality_matches=low_quality)
    theirs = TVMatcher(0.5, 0.3, allow_low_quality_matches=low_quality)
    out = ours(iou, valid)
    for i, c in enumerate(counts):
        assert out[i].tolist() == theirs(iou[i, :c].clone()).tolist()
    assert (out >= 0).any() and (out == -2).any() and (out == -1).any()


def test_crowd_regions_turn_background_into_ignore():
    # 4 anchors; gt IoU makes anchor 0 fg, anchor 1 ignore, anchors 2 and 3 background.
    iou = torch.tensor([[[0.8, 0.45, 0.1, 0.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    crowd_ioa = torch.tensor([[[0.9, 0.9, 0.5, 0.49], [0.0, 0.0, 0.0, 0.95]]])
    m = Matcher(allow_low_quality_matches=False)
    # Foreground stays, ignore stays, background covered >= 0.5 becomes ignore.
    assert m(iou, valid, crowd_ioa).tolist() == [[0, -2, -2, -2]]
    # The second crowd slot is padding: anchor 3 (covered only by it) stays background.
    crowd_valid = torch.tensor([[True, False]])
    assert m(iou, valid, crowd_ioa, crowd_valid).tolist() == [[0, -2, -2, -1]]


def test_box_ioa_hand_values():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor(
        [[5.0, 5.0, 15.0, 15.0], [2.0, 2.0, 4.0, 4.0], [20.0, 20.0, 30.0, 30.0], [0, 0, 20, 20]]
    )
    # 25 / 100; anchor inside the box; disjoint; box inside the anchor: 100 / 400.
    torch.testing.assert_close(box_ioa(boxes, anchors), torch.tensor([[0.25, 1.0, 0.0, 0.25]]))


def test_anchor_state():
    matched = torch.tensor([[3, 0, -1, -2, 7]])
    assert anchor_state(matched).tolist() == [[FG, FG, BG, IGN, FG]]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fg_iou_thresh": 0.3, "bg_iou_thresh": 0.4}, "bg_iou_thresh"),
        ({"bg_iou_thresh": -0.1}, "bg_iou_thresh"),
        ({"fg_iou_thresh": 1.5}, "fg_iou_thresh"),
        ({"crowd_ioa_thresh": 0.0}, "crowd_ioa_thresh"),
    ],
)
def test_matcher_rejects_bad_thresholds(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Matcher(**kwargs)


def test_matcher_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gt_valid"):
        Matcher()(torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
