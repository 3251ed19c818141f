"""SGD parameter groups: the paper's decay on every weight, or detectron2's norm exemption."""

from __future__ import annotations

import torch
from torch import nn

from retina_sweep.model.norm import FrozenBatchNorm2d, GroupNorm32
from retina_sweep.train import optimizer_param_groups


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        FrozenBatchNorm2d(8),  # buffers only: nothing to optimise
        nn.Conv2d(8, 8, 3),
        GroupNorm32(4, 8),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 2, 1),
    )
    net[0].weight.requires_grad_(False)  # a frozen weight stays out of every group
    for norm in (net[3], net[4]):
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    return net


def test_one_group_in_model_order_when_norms_decay_like_every_weight() -> None:
    net = _net()
    trainable = [p for p in net.parameters() if p.requires_grad]
    for wd_norm in (None, 1e-4):
        groups = optimizer_param_groups(net, weight_decay=1e-4, weight_decay_norm=wd_norm)
        assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
        # The same tensors in the same order as model.parameters(): an optimizer (and its
        # checkpointed state) exactly as before the option existed.
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]


def test_norm_parameters_get_their_own_decay() -> None:
    net = _net()
    groups = optimizer_param_groups(net, weight_decay=1e-4, weight_decay_norm=0.0)
    norm_ids = {id(p) for m in (net[3], net[4]) for p in m.parameters()}
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == norm_ids
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in (net[0].bias, net[2].weight, net[2].bias, net[5].weight, net[5].bias)
    }


def test_one_sgd_step_decays_weights_and_spares_norms_in_closed_form() -> None:
    """With zero gradients, one SGD step (momentum buffer starts at the gradient) moves each
    parameter by -lr * wd * p: the convolutions shrink by (1 - lr * wd), the norms' scales and
    shifts stay where they are."""
    net = _net()
    lr, wd = 0.1, 0.01
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    opt = torch.optim.SGD(
        optimizer_param_groups(net, weight_decay=wd, weight_decay_norm=0.0), lr=lr, momentum=0.9
    )
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        if name.startswith(("3.", "4.")):
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
        elif p.requires_grad:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
        else:
            assert torch.equal(p.detach(), before[name])
