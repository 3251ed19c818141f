"""GroupNorm32: exactly nn.GroupNorm in float32, float32 statistics under bf16 autocast."""

from __future__ import annotations

import torch
from torch import nn

from retina_sweep.model.norm import GroupNorm32


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
