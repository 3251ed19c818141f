"""Losses of RetinaNet as pure functions of tensors.

`sigmoid_focal_loss` is the focal loss of "Focal Loss for Dense Object Detection" (Lin et al.),
eq. (5): ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)``, applied independently to each of the
K sigmoid outputs of every anchor. With ``gamma = 0`` it is the alpha-balanced cross entropy of
Table 1(a); with ``alpha < 0`` the alpha balancing is off.

The box losses (`smooth_l1_loss`, `l1_loss`) are elementwise on encoded box deltas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["sigmoid_focal_loss", "smooth_l1_loss", "l1_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_focal_args(alpha: float, gamma: float) -> None:
    if not gamma >= 0:  # also rejects NaN
        raise ValueError(f"gamma must be >= 0 (0 = alpha-balanced cross entropy), got {gamma}")
    if not alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], or < 0 for no balancing, got {alpha}")


def _pow(x: Tensor, exponent: float) -> Tensor:
    # The common exponents without a pow kernel (and without pow's 0 ** 0 corner cases).
    if exponent == 0:
        return torch.ones_like(x)
    if exponent == 1:
        return x
    if exponent == 2:
        return x * x
    return x.pow(exponent)


def _focal_general(
    logits: Tensor, targets: Tensor, alpha: float, gamma: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Loss and d loss / d logits for arbitrary targets in [0, 1] (elementwise).

    With p = sigmoid(x), q = 1 - p_t = p + t (1 - 2p), ce = BCE(x, t), a = alpha_t:
    ``L = a q^gamma ce`` and ``dL/dx = a (gamma q^(gamma-1) dq/dx ce + q^gamma (p - t))`` with
    ``dq/dx = p (1 - p) (1 - 2t)``.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    q = p + targets * (1 - 2 * p)
    modulator = _pow(q, gamma)
    loss = ce * modulator
    grad = None
    if need_grad:
        if gamma == 0:
            grad = p - targets
        else:
            # q ** (gamma - 1) is infinite at q = 0 when gamma < 1, where dq/dx is 0 too: the
            # product's limit is 0 (dq/dx carries a factor q for binary targets).
            q_pow = _pow(q, gamma - 1)
            if gamma < 1:
                q_pow = torch.where(q > 0, q_pow, torch.zeros_like(q_pow))
            dq = p * (1 - p) * (1 - 2 * targets)
            grad = gamma * q_pow * dq * ce + modulator * (p - targets)
    if alpha >= 0:
        alpha_t = targets * (2 * alpha - 1) + (1 - alpha)
        loss = loss * alpha_t
        if grad is not None:
            grad = grad * alpha_t
    return loss, grad


class _SigmoidFocalLoss(torch.autograd.Function):
    """Focal loss with its gradient computed in the forward pass.

    Why a custom function: in dense detection almost every target is 0 (one positive class on
    ~1% of the anchors), and for t = 0 the loss and its gradient have short closed forms,
    ``L = (1 - alpha) p^gamma softplus(x)`` and
    ``dL/dx = (1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p)``. The dense tensor is
    computed with those; the few non-zero targets are gathered and overwritten with the general
    formula (`_focal_general`). Computing the gradient while the intermediates are at hand saves
    autograd's graph of ~15 saved tensors. ``softplus(x)`` is evaluated as
    ``max(x, 0) - log(sigmoid(|x|))``: the log argument is in [0.5, 1], so the absolute error
    stays at float32 rounding (below 1e-7) for every x, and on CPU it is ~10x faster than the
    ``log1p`` kernel behind ``F.softplus`` and ``binary_cross_entropy_with_logits``. Its
    relative error grows for very negative x (softplus(x) ~ e^x there: 5e-4 at x = -10, and 0
    instead of ~4e-8 below x = -17), where each anchor's loss is below 1e-7 and no loss sum
    can see it; the gradient uses ``p`` and stays exact.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, alpha: float, gamma: float, need_grad: bool
    ) -> Tensor:
        # need_grad comes from the caller: grad mode is always off inside forward, and
        # ctx.needs_input_grad is True under torch.no_grad() too.
        p = torch.sigmoid(logits)
        softplus = logits.clamp(min=0).sub_(torch.sigmoid(logits.abs()).log_())  # BCE(x, 0)
        modulator = _pow(p, gamma)
        if alpha >= 0:
            modulator = modulator * (1 - alpha)
        loss = modulator * softplus
        grad = None
        if need_grad:
            # (gamma (1 - p) softplus + p) * modulator; in-place steps (addcmul is slow on CPU).
            grad = (1 - p).mul_(softplus)
            if gamma != 1:
                grad.mul_(gamma)
            grad.add_(p).mul_(modulator)
        positive = targets.nonzero(as_tuple=True)
        if positive[0].numel() > 0:
            loss_pos, grad_pos = _focal_general(
                logits[positive], targets[positive], alpha, gamma, need_grad
            )
            loss.index_put_(positive, loss_pos)
            if grad is not None:
                grad.index_put_(positive, grad_pos)
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss, elementwise (eq. 5 of the paper).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logits)``,
    ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0 (``p t + (1 - p)(1 - t)`` for
    soft targets), ``alpha_t = alpha t + (1 - alpha)(1 - t)``. ``log(p_t)`` is computed as
    a binary cross entropy with logits, which is stable for large ``|logits|``.

    Args:
        logits: float tensor of any shape, e.g. ``(N, A, K)`` class logits.
        targets: same shape as ``logits``, in [0, 1]: 1 for the positive class, 0 otherwise
            (one-hot over K for detection; background anchors are all-zero rows).
        alpha: weight of the positives in [0, 1] (negatives get ``1 - alpha``); any value < 0
            disables the balancing (all weights 1).
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        reduction: ``"none"`` (same shape as ``logits``), ``"mean"`` or ``"sum"``.

    Returns:
        The loss, float32 for reduced-precision inputs (the loss is computed in float32 so that
        AMP does not underflow the modulating factor), else the dtype of ``logits``.

    Raises:
        ValueError: ``gamma < 0``, ``alpha > 1``, an unknown ``reduction`` or mismatched shapes.
    """
    _check_focal_args(alpha, gamma)
    _check_reduction(reduction)
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = targets.to(logits.dtype)
    if targets.requires_grad:
        # Differentiable in the targets too (soft-label uses): plain autograd graph.
        loss, _ = _focal_general(logits, targets, alpha, gamma, need_grad=False)
    else:
        need_grad = logits.requires_grad and torch.is_grad_enabled()
        loss = _SigmoidFocalLoss.apply(logits, targets, float(alpha), float(gamma), need_grad)
    return _reduce(loss, reduction)


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float, reduction: str = "none") -> Tensor:
    """Smooth L1 (Huber / beta) loss, elementwise: ``0.5 d^2 / beta`` if ``|d| < beta`` else
    ``|d| - 0.5 beta``, with ``d = input - target``.

    ``beta = 0`` is exactly the L1 loss (detectron2's RetinaNet default); Detectron's RetinaNet
    uses ``beta = 0.11``.

    Raises:
        ValueError: ``beta < 0`` or an unknown ``reduction``.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0 (0 = L1), got {beta}")
    _check_reduction(reduction)
    if beta == 0:
        # The quadratic branch would divide by zero; its limit is L1.
        return l1_loss(input, target, reduction)
    diff = (input - target).abs()
    loss = torch.where(diff < beta, (0.5 / beta) * diff * diff, diff - 0.5 * beta)
    return _reduce(loss, reduction)


def l1_loss(input: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    """``|input - target|`` elementwise (torchvision's and mmdetection's RetinaNet box loss).

    Raises:
        ValueError: an unknown ``reduction``.
    """
    _check_reduction(reduction)
    return _reduce((input - target).abs(), reduction)
