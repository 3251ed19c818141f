"""Normalisation layers that behave under autocast: GroupNorm32 and FrozenBatchNorm2d.

GroupNorm32 computes in float32 under autocast.

Under bfloat16 autocast on the CPU, `nn.GroupNorm` receives bf16 activations from the convolutions
and runs a slow mixed-type kernel. Measured on a 2-core Xeon with AMX (one torch thread): conv +
GroupNorm (batch 8 x 64 channels x 16 x 32, forward and backward) took 12.6 ms in bf16 against
6.0 ms with the GroupNorm in float32; a whole proxy training step (20 GroupNorms in the heads)
0.19-0.21 s against 0.22-0.25 s with plain GroupNorm. CUDA's autocast already runs `group_norm`
in float32; this class does the same on every device (its output is float32, not rounded to
bf16). Batch norm is left alone: the step was slower with it in float32 (the casts cost more
than the kernel saves).

FrozenBatchNorm2d (the paper's frozen batch norm: fixed statistics and affine) keeps the dtype of
its input. torchvision's `FrozenBatchNorm2d` multiplies a bf16 activation by float32 buffers, so
its output is promoted to float32 and every activation after it is twice as large until the next
convolution casts it back; on the proxy's stem (batch 8 x 64 channels x 64 x 128, channels_last,
one thread, forward and backward) it took 16.7 ms in bf16 against 7.4 ms here (11.0 / 10.2 ms in
float32). On a bf16 (or fp16) input it runs `F.batch_norm` in inference mode, the same affine map,
with the statistics and affine parameters in float32 inside the kernel (detectron2's
FrozenBatchNorm2d casts them to the input's dtype, for the same reason); on a float32 input it is
torchvision's arithmetic, bit for bit.

Outside autocast `GroupNorm32` is exactly `nn.GroupNorm` (same parameters, state-dict keys and
float32 arithmetic), so float32 training and checkpoints are unchanged. The next convolution casts
its float32 output back to the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

__all__ = ["GroupNorm32", "FrozenBatchNorm2d"]


class GroupNorm32(nn.GroupNorm):
    """`nn.GroupNorm` that runs in float32 under autocast (output float32)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's `FrozenBatchNorm2d` (same buffers and state-dict keys) whose output keeps the
    input's dtype: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel.

    Shapes: (N, C, H, W) -> (N, C, H, W), memory format preserved.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            # Bit for bit torchvision's arithmetic where no dtypes mix (float32 training and
            # inference): tests compare this model with torchvision's RetinaNet at 1e-5.
            return super().forward(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
