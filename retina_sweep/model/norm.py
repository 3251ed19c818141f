"""GroupNorm that computes in float32 under autocast.

Under bfloat16 autocast on the CPU, `nn.GroupNorm` receives bf16 activations from the convolutions
and runs a slow mixed-type kernel. Measured on a 2-core Xeon with AMX (one torch thread): conv +
GroupNorm (batch 8 x 64 channels x 16 x 32, forward and backward) took 12.6 ms in bf16 against
6.0 ms with the GroupNorm in float32; a whole proxy training step (20 GroupNorms in the heads)
0.19-0.21 s against 0.22-0.25 s with plain GroupNorm. CUDA's autocast already runs `group_norm`
in float32; this class does the same on every device (its output is float32, not rounded to
bf16). Batch norm is left alone: the step was slower with it in float32 (the casts cost more
than the kernel saves).

Outside autocast `GroupNorm32` is exactly `nn.GroupNorm` (same parameters, state-dict keys and
float32 arithmetic), so float32 training and checkpoints are unchanged. The next convolution casts
its float32 output back to the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GroupNorm32"]


class GroupNorm32(nn.GroupNorm):
    """`nn.GroupNorm` that runs in float32 under autocast (output float32)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)
