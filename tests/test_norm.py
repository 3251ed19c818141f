"""GroupNorm32 (exactly nn.GroupNorm in float32, float32 under bf16 autocast) and FrozenBatchNorm2d
(torchvision's, keeping the input dtype)."""

from __future__ import annotations

import torch
import torchvision.ops
from torch import nn

from retina_sweep.model.norm import FrozenBatchNorm2d, GroupNorm32


def _pair() -> tuple[nn.GroupNorm, GroupNorm32]:
    torch.manual_seed(0)
    ref = nn.GroupNorm(4, 16)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = GroupNorm32(4, 16)
    ours.load_state_dict(ref.state_dict())  # same keys: checkpoints load either way
    return ref, ours


def test_equals_group_norm_outside_autocast() -> None:
    ref, ours = _pair()
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_under_bf16_autocast_runs_in_float32() -> None:
    ref, ours = _pair()
    x = torch.randn(2, 16, 5, 7).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x)
        plain = ref(x)
    assert plain.dtype == torch.bfloat16  # what nn.GroupNorm gives: its output rounded to bf16
    assert got.dtype == torch.float32
    # Float32 arithmetic on the (bf16) input: equal to nn.GroupNorm on that input upcast.
    torch.testing.assert_close(got, ref(x.float()), rtol=1e-5, atol=1e-5)


def _frozen_pair() -> tuple[torchvision.ops.FrozenBatchNorm2d, FrozenBatchNorm2d]:
    torch.manual_seed(0)
    ref = torchvision.ops.FrozenBatchNorm2d(16)
    ref.weight.normal_()
    ref.bias.normal_()
    ref.running_mean.normal_()
    ref.running_var.uniform_(0.5, 2.0)
    ours = FrozenBatchNorm2d(16)
    ours.load_state_dict(ref.state_dict())  # torchvision's keys: its checkpoints load as they are
    return ref, ours


def test_frozen_bn_is_the_affine_map_of_its_statistics() -> None:
    ref, ours = _frozen_pair()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    got = ours(x)
    # Closed form, per channel: (x - mean) / sqrt(var + eps) * weight + bias.
    shape = (1, -1, 1, 1)
    expected = (x - ours.running_mean.view(shape)) / torch.sqrt(
        ours.running_var.view(shape) + ours.eps
    ) * ours.weight.view(shape) + ours.bias.view(shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref(x), rtol=0, atol=0)  # torchvision's arithmetic in float32
    # The gradient reaches the input (a frozen stage still passes gradients through) and nothing
    # of the layer itself is trainable.
    (grad,) = torch.autograd.grad(got.sum(), x)
    scale = ours.weight / torch.sqrt(ours.running_var + ours.eps)
    torch.testing.assert_close(grad, scale.view(shape).expand_as(x), rtol=1e-5, atol=1e-5)
    assert list(ours.parameters()) == []


def test_frozen_bn_keeps_bf16_and_channels_last() -> None:
    ref, ours = _frozen_pair()
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(xb)
        promoted = ref(xb)
    assert promoted.dtype == torch.float32  # torchvision's: bf16 x float32 buffers
    assert got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), ref(xb.float()), rtol=2e-2, atol=2e-2)
