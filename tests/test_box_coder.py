"""Box coder: hand-computed encoding, round trip, torchvision agreement, clamp."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from retina_sweep.model.box_coder import BoxCoder


def test_hand_computed_encode():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), 10 x 10
    gt = torch.tensor([[2.0, 4.0, 12.0, 24.0]])  # centre (7, 14), 10 x 20
    deltas = BoxCoder().encode(gt, anchor)
    torch.testing.assert_close(deltas, torch.tensor([[0.2, 0.9, 0.0, math.log(2)]]))
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(gt, anchor)
    torch.testing.assert_close(weighted, torch.tensor([[2.0, 9.0, 0.0, 5 * math.log(2)]]))


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    wh = 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    gt, anchors = _random_boxes(200, g), _random_boxes(200, g)
    coder = BoxCoder(weights=weights)
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt)
    deltas = torch.randn(200, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(coder.encode(coder.decode(deltas, anchors), anchors), deltas)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_matches_torchvision(weights):
    g = torch.Generator().manual_seed(1)
    gt, anchors = _random_boxes(50, g).float(), _random_boxes(50, g).float()
    ours, theirs = BoxCoder(weights=weights), TVBoxCoder(weights)
    torch.testing.assert_close(ours.encode(gt, anchors), theirs.encode_single(gt, anchors))
    deltas = torch.randn(50, 4, generator=g) * 2
    torch.testing.assert_close(ours.decode(deltas, anchors), theirs.decode_single(deltas, anchors))


def test_broadcasting_batched_shapes():
    g = torch.Generator().manual_seed(2)
    anchors = _random_boxes(7, g)
    deltas = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    boxes = BoxCoder().decode(deltas, anchors)  # anchors (A, 4) broadcast over N
    assert boxes.shape == (3, 7, 4)
    torch.testing.assert_close(boxes[1], BoxCoder().decode(deltas[1], anchors))


def test_decode_clamps_size_deltas():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    coder = BoxCoder()
    box = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), anchor)
    # exp(clamp) * 16 = 1000 / 16 * 16 = 1000, centred on the anchor centre (8, 8).
    torch.testing.assert_close(box, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    small = coder.decode(torch.tensor([[0.0, 0.0, -50.0, -50.0]]), anchor)
    assert torch.isfinite(small).all()  # no clamp from below: exp underflows to 0 width


def test_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        BoxCoder(weights=(1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder(weights=(1.0, 1.0))
