"""Focal loss and box losses: closed forms, torchvision agreement, gradients, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from retina_sweep.losses import l1_loss, sigmoid_focal_loss, smooth_l1_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("x", "t", "alpha", "gamma"),
    [(0.0, 1.0, 0.25, 2.0), (2.0, 0.0, 0.25, 2.0), (-1.5, 1.0, 0.25, 0.5), (3.0, 1.0, -1, 1.0)],
)
def test_focal_loss_closed_form_on_scalars(x, t, alpha, gamma):
    p = _sigmoid(x)
    p_t = p if t == 1 else 1 - p
    alpha_t = 1.0 if alpha < 0 else (alpha if t == 1 else 1 - alpha)
    expected = -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
    got = sigmoid_focal_loss(torch.tensor([x]), torch.tensor([t]), alpha, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_hand_value():
    # x = 0: p = 0.5; positive: 0.25 * 0.5^2 * log 2.
    got = sigmoid_focal_loss(torch.zeros(1), torch.ones(1), alpha=0.25, gamma=2.0)
    assert got.item() == pytest.approx(0.0625 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.25, 0.75, 0.0, 1.0, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_loss_matches_torchvision_values_and_gradients(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, 7, generator=g) * 6
    logits[0, :4, 0] = torch.tensor([-30.0, 30.0, -80.0, 80.0])  # saturated sigmoids
    targets = (torch.rand(6, 50, 7, generator=g) < 0.1).float()
    targets[0, :4, 0] = torch.tensor([1.0, 0.0, 0.0, 1.0])

    ours_x = logits.clone().requires_grad_()
    tv_x = logits.clone().requires_grad_()
    ours = sigmoid_focal_loss(ours_x, targets, alpha, gamma)
    ref = tv_focal_loss(tv_x, targets, alpha, gamma)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    weights = torch.rand(ours.shape, generator=g)  # a non-uniform upstream gradient
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    # torchvision's autograd graph gives NaN where a sigmoid saturates with gamma < 1
    # ((1 - p_t)^gamma has an infinite slope at 0); ours stays finite (limit 0).
    assert torch.isfinite(ours_x.grad).all()
    finite = torch.isfinite(tv_x.grad)
    assert finite.float().mean() > 0.99
    torch.testing.assert_close(ours_x.grad[finite], tv_x.grad[finite], rtol=1e-5, atol=1e-6)


def test_focal_loss_soft_targets_match_torchvision():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=g) * 3
    targets = torch.rand(200, generator=g)
    targets[:50] = 0.0
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = sigmoid_focal_loss(x1, targets, 0.25, 2.0)
    ref = tv_focal_loss(x2, targets, 0.25, 2.0)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_gradcheck(gamma):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.zeros(4, 5, dtype=torch.float64)
    targets[0, 1] = targets[2, 3] = 1.0
    targets[3, 0] = 0.3  # a soft target goes through the general formula
    assert torch.autograd.gradcheck(
        lambda x: sigmoid_focal_loss(x, targets, 0.25, gamma), (logits,)
    )


def test_gamma_zero_is_alpha_balanced_cross_entropy_with_gradients():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, 5, generator=g) * 4
    targets = (torch.rand(3, 40, 5, generator=g) < 0.2).float()
    alpha = 0.75
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fl = sigmoid_focal_loss(x1, targets, alpha=alpha, gamma=0.0)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    ce = alpha_t * F.binary_cross_entropy_with_logits(x2, targets, reduction="none")
    torch.testing.assert_close(fl, ce)
    fl.sum().backward()
    ce.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_focal_loss_never_exceeds_cross_entropy():
    logits = torch.linspace(-12, 12, 241).repeat(2, 1)
    targets = torch.stack([torch.zeros(241), torch.ones(241)])
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    for gamma in (0.5, 1.0, 2.0, 5.0):
        fl = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma)
        assert (fl <= ce + 1e-7).all()
        # Strictly smaller wherever the example is not hopeless (p_t < 1 and > 0).
        assert (fl < ce).all()
    # Well-classified examples (p_t > 0.5) are down-weighted by at least (1 - p_t)^gamma < 0.5^2.
    easy = ((logits > 0) == (targets > 0)) & (logits.abs() > 0.1)
    fl2 = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0)
    assert (fl2[easy] <= 0.25 * ce[easy]).all()


def test_focal_loss_extreme_logits_are_finite():
    logits = torch.tensor([-500.0, -100.0, 100.0, 500.0, -500.0, 500.0], requires_grad=True)
    targets = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    # Confident mistakes cost alpha_t * |x|; confident right answers cost ~0.
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.0, 75.0, 375.0, 125.0, 0.0]))
    torch.testing.assert_close(logits.grad, torch.tensor([0.0, 0.0, 0.75, 0.75, -0.25, 0.0]))


def test_focal_loss_without_grad_and_with_target_grad():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(30, generator=g)
    targets = (torch.rand(30, generator=g) < 0.3).float()
    with torch.no_grad():
        a = sigmoid_focal_loss(logits.clone().requires_grad_(), targets)
    torch.testing.assert_close(a, tv_focal_loss(logits, targets))
    # Gradient w.r.t. the targets (soft-label uses) matches torchvision's autograd graph.
    t1, t2 = targets.clone().requires_grad_(), targets.clone().requires_grad_()
    sigmoid_focal_loss(logits, t1).sum().backward()
    tv_focal_loss(logits, t2).sum().backward()
    torch.testing.assert_close(t1.grad, t2.grad)


def test_focal_loss_reductions_and_half_precision():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, generator=g)
    targets = (torch.rand(4, 6, generator=g) < 0.5).float()
    none = sigmoid_focal_loss(logits, targets)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, reduction="sum"), none.sum())
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, reduction="mean"), none.mean())
    half = sigmoid_focal_loss(logits.half(), targets.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, sigmoid_focal_loss(logits.half().float(), targets))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma": -0.5}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"alpha": 1.5}, "alpha"),
        ({"reduction": "max"}, "reduction"),
    ],
)
def test_focal_loss_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), **kwargs)


def test_focal_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(torch.zeros(3, 2), torch.zeros(3))


def test_smooth_l1_hand_values():
    pred = torch.tensor([0.0, 0.0, 0.0, 1.0])
    target = torch.tensor([0.5, 2.0, -0.05, 1.0])
    # beta 1: |d| = 0.5 -> 0.5 * 0.25 / 1; |d| = 2 -> 2 - 0.5; 0.05 -> 0.00125; 0 -> 0.
    torch.testing.assert_close(
        smooth_l1_loss(pred, target, beta=1.0), torch.tensor([0.125, 1.5, 0.00125, 0.0])
    )
    # beta 0.11 (Detectron): 0.05 is in the quadratic zone: 0.5 * 0.0025 / 0.11.
    got = smooth_l1_loss(pred, target, beta=0.11)
    torch.testing.assert_close(got, torch.tensor([0.445, 1.945, 0.0025 / 0.22, 0.0]))


@pytest.mark.parametrize("beta", [0.0, 0.11, 1.0])
def test_smooth_l1_matches_torch(beta):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(
            smooth_l1_loss(a, b, beta, reduction),
            F.smooth_l1_loss(a, b, reduction=reduction, beta=beta),
        )


def test_smooth_l1_beta_zero_is_l1_and_l1_values():
    a = torch.tensor([1.0, -2.0, 0.5])
    b = torch.tensor([0.0, 1.0, 0.5])
    torch.testing.assert_close(l1_loss(a, b), torch.tensor([1.0, 3.0, 0.0]))
    torch.testing.assert_close(smooth_l1_loss(a, b, beta=0.0), l1_loss(a, b))
    assert l1_loss(a, b, reduction="sum").item() == 4.0


def test_box_losses_reject_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(torch.zeros(2), torch.zeros(2), beta=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
