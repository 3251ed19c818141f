"""Training strategies: how the per-anchor losses become the two training losses.

Every strategy is an ``nn.Module`` with the same keyword-only call (docs/design.md)::

    strategy(cls_logits=..., cls_targets=..., anchor_state=..., box_loss=..., boxes=...,
             normalizer=...) -> {"loss_cls": Tensor, "loss_box": Tensor}

`FocalStrategy` is the paper's: the focal loss summed over *all* non-ignored anchors and the
box loss over the foreground anchors, both divided by the normaliser (the number of
foreground anchors). Minibatch-sampling strategies (OHEM, random 1:3) subclass `LossStrategy`
and register themselves in `STRATEGIES`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .losses import _check_focal_args, sigmoid_focal_loss

__all__ = ["LossStrategy", "FocalStrategy", "STRATEGIES", "build_strategy", "normalized_sum"]


def normalized_sum(per_anchor: Tensor, normalizer: Tensor) -> Tensor:
    """``sum_i sum_a per_anchor[i, a] / normalizer_i``.

    Args:
        per_anchor: (N, A) loss of each anchor (0 where it must not count).
        normalizer: scalar (one normaliser for the batch, e.g. the number of foreground anchors
            in the batch), or (N,) (one per image, e.g. torchvision's ``N * max(1, fg_i)``).
    """
    if normalizer.dim() == 0:
        return per_anchor.sum() / normalizer
    return (per_anchor.sum(dim=1) / normalizer).sum()


class LossStrategy(nn.Module):
    """Base class of the training strategies (see the module docstring).

    Subclasses implement `forward` with the keyword arguments below. ``needs_boxes`` tells the
    detector whether to decode the predicted boxes for every anchor (OHEM's NMS needs them);
    when it is False the detector passes ``boxes=None`` and skips the decoding.
    """

    needs_boxes: bool = True

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
        """Compute ``{"loss_cls", "loss_box"}``.

        Args:
            cls_logits: (N, A, K) class logits (A = anchors of all levels, (H, W, A_loc) order).
            cls_targets: (N, A, K) float one-hot targets; all-zero rows for background and
                ignored anchors.
            anchor_state: (N, A) long, 1 foreground, 0 background, -1 ignore (never in a loss).
            box_loss: (N, A) box regression loss of each anchor summed over the 4 deltas, 0 where
                the anchor is not foreground (differentiable w.r.t. the box deltas).
            boxes: (N, A, 4) decoded predicted boxes, xyxy, detached; ``None`` if the strategy
                sets ``needs_boxes = False``.
            normalizer: scalar or (N,) tensor, see `normalized_sum`.
        """
        raise NotImplementedError


class FocalStrategy(LossStrategy):
    """Focal loss over all non-ignored anchors (the paper's training; ``gamma=0`` is the
    alpha-balanced cross entropy of Table 1(a)).

    ``loss_cls = sum over anchors with state >= 0 of FL(cls_logits, cls_targets) / normalizer``
    and ``loss_box = sum of box_loss / normalizer``.

    Args:
        alpha: weight of the positives in [0, 1]; < 0 disables the balancing.
        gamma: focusing parameter >= 0.
    """

    needs_boxes = False

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        _check_focal_args(alpha, gamma)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(
        self,
        *,
        cls_logits: Tensor,
        cls_targets: Tensor,
        anchor_state: Tensor,
        box_loss: Tensor,
        boxes: Tensor | None = None,
        normalizer: Tensor,
    ) -> dict[str, Tensor]:
        loss = sigmoid_focal_loss(cls_logits, cls_targets, self.alpha, self.gamma).sum(dim=-1)
        # Mask after summing over K: the (N, A) mask costs 1/K of an (N, A, K) one.
        loss = loss.masked_fill(anchor_state < 0, 0.0)
        return {
            "loss_cls": normalized_sum(loss, normalizer),
            "loss_box": normalized_sum(box_loss, normalizer),
        }

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


# Config name (``loss.name``) -> strategy class; other modules add their strategies here.
STRATEGIES: dict[str, type[LossStrategy]] = {
    "focal": FocalStrategy,
}


def build_strategy(name: str, **params: Any) -> LossStrategy:
    """The strategy registered as ``name`` in `STRATEGIES`, built with ``params``.

    Raises:
        ValueError: ``name`` is not registered.
    """
    if name not in STRATEGIES:
        raise ValueError(f"name must be one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](**params)


# ohem.py subclasses LossStrategy and registers its strategies into STRATEGIES, so it is imported
# after this module's names exist. When ohem.py is imported first, this finds it partially
# initialised in sys.modules and its own last line completes the registry.
from . import ohem  # noqa: E402, F401
