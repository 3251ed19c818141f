"""RetinaHead: prior-probability init, output layout (H, W, A) x K, norms, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from retina_sweep.model.head import LevelBatchNorm, RetinaHead


def test_bias_and_weight_init():
    torch.manual_seed(0)
    head = RetinaHead(in_channels=64, num_anchors=9, num_classes=20, num_convs=2, channels=64)
    torch.testing.assert_close(head.cls_score.bias, torch.full((180,), -math.log(99.0)))
    assert head.cls_score.bias[0].item() == pytest.approx(-4.59512, abs=1e-5)
    torch.testing.assert_close(head.bbox_pred.bias, torch.zeros(36))
    for conv in [m for m in head.modules() if isinstance(m, nn.Conv2d)]:
        std = conv.weight.std().item()
        assert 0.009 < std < 0.011, std
        assert abs(conv.weight.mean().item()) < 0.002
    for module in (head.cls_subnet[0], head.bbox_subnet[2]):
        torch.testing.assert_close(module.bias, torch.zeros(64))
    # pi = 0.01 -> every anchor starts at foreground probability 0.01 (weights ~ 0).
    probs = torch.sigmoid(head([torch.zeros(1, 64, 3, 3)])[0])
    torch.testing.assert_close(probs, torch.full_like(probs, 0.01))


def test_other_prior():
    head = RetinaHead(in_channels=8, num_anchors=1, num_classes=2, num_convs=0, prior_prob=0.2)
    torch.testing.assert_close(head.cls_score.bias, torch.full((2,), -math.log(4.0)))


def test_output_layout_is_h_w_a_then_k():
    # No tower; the final convs copy input channel 0 (centre tap) and add a per-output bias, so
    # logits[n, (y W + x) A + a, k] = input[n, 0, y, x] + bias[a K + k].
    a_loc, k = 3, 4
    head = RetinaHead(in_channels=2, num_anchors=a_loc, num_classes=k, num_convs=0)
    with torch.no_grad():
        for conv, width in ((head.cls_score, k), (head.bbox_pred, 4)):
            conv.weight.zero_()
            conv.weight[:, 0, 1, 1] = 1.0
            conv.bias.copy_(torch.arange(a_loc * width, dtype=torch.float32) * 100)
    x1 = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).view(2, 2, 2, 3)  # (N, C, H, W)
    x2 = torch.randn(2, 2, 1, 2)
    logits, deltas = head([x1, x2])
    assert logits.shape == (2, (6 + 2) * a_loc, k) and deltas.shape == (2, 8 * a_loc, 4)
    for n in range(2):
        for y in range(2):
            for x in range(3):
                for a in range(a_loc):
                    i = (y * 3 + x) * a_loc + a
                    expected = x1[n, 0, y, x] + 100 * (a * k + torch.arange(k))
                    torch.testing.assert_close(logits[n, i], expected)
                    torch.testing.assert_close(
                        deltas[n, i], x1[n, 0, y, x] + 100 * (a * 4 + torch.arange(4.0))
                    )
    # The second level follows the first, with the same weights (shared head).
    second = logits[:, 6 * a_loc :].view(2, 1, 2, a_loc, k)
    torch.testing.assert_close(second[..., 0, 0], x2[:, 0])


def test_towers_and_norms():
    head = RetinaHead(
        in_channels=16, num_anchors=2, num_classes=3, num_convs=3, channels=48, norm="GN"
    )
    convs = [m for m in head.cls_subnet if isinstance(m, nn.Conv2d)]
    norms = [m for m in head.cls_subnet if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 3 and len(norms) == 3
    assert convs[0].in_channels == 16 and convs[-1].out_channels == 48
    assert all(conv.bias is None for conv in convs)  # a norm follows: bias redundant
    assert norms[0].num_groups == 16  # 32 does not divide 48: the largest divisor <= 32
    assert (
        RetinaHead(in_channels=8, num_anchors=1, num_classes=1, channels=64, norm="GN")
        .cls_subnet[1]
        .num_groups
        == 32
    )
    bn = RetinaHead(
        in_channels=8,
        num_anchors=1,
        num_classes=1,
        num_convs=1,
        channels=8,
        norm="BN",
        num_levels=3,
    )
    assert isinstance(bn.cls_subnet[1], LevelBatchNorm) and isinstance(bn.cls_subnet[2], nn.ReLU)
    assert len(bn.cls_subnet[1].norms) == 3
    # Separate subnets: the classification and box towers do not share weights.
    assert head.cls_subnet[0].weight.data_ptr() != head.bbox_subnet[0].weight.data_ptr()
    out = head([torch.randn(2, 16, 4, 4)])
    assert out[0].shape == (2, 32, 3) and out[1].shape == (2, 32, 4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_anchors": 0}, "num_anchors"),
        ({"num_convs": -1}, "num_convs"),
        ({"channels": 0}, "channels"),
        ({"prior_prob": 0.0}, "prior_prob"),
        ({"prior_prob": 1.0}, "prior_prob"),
        ({"norm": "LN"}, "norm"),
        ({"norm": "BN"}, "num_levels"),  # one BN per level: the head must know how many
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    args = {"in_channels": 8, "num_anchors": 9, "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        RetinaHead(**args)


def test_bn_head_normalises_each_level_alike_in_training_and_in_eval():
    """Levels differ in scale (here x1, x4, x16). One BN per level (detectron2's domain-specific
    BN) keeps running statistics that match each level's batch statistics, so after training on
    a fixed input the eval output equals the training output. A single BN shared by the levels
    trains on per-level statistics but averages the levels into its running ones: its eval
    output was off by a factor of 0.4-1.6 on every level."""
    torch.manual_seed(0)
    head = RetinaHead(
        in_channels=4,
        num_anchors=1,
        num_classes=2,
        num_convs=1,
        channels=4,
        norm="BN",
        num_levels=3,
    )
    feats = [torch.randn(4, 4, 8, 8) * s + s for s in (1.0, 4.0, 16.0)]
    head.train()
    with torch.no_grad():
        for _ in range(150):  # momentum 0.1: the running statistics converge to the batch's
            trained = head(feats)
        head.eval()
        evaluated = head(feats)
    for got, want in zip(evaluated, trained, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    # The levels were normalised separately: each BN saw one level's scale.
    means = [float(bn.running_mean.abs().mean()) for bn in head.cls_subnet[1].norms]
    assert means[0] < means[1] < means[2]
    with pytest.raises(ValueError, match="3 levels, got 2"):
        head(feats[:2])
