"""The bench's pieces that are not timings: the convolution share and the Markdown."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_sweep.bench import conv_share, to_markdown


def test_conv_share_separates_convolutions_from_other_work() -> None:
    # A conv large enough (about 0.7 GFLOP) that its kernel, not the small allocation ops around
    # it, dominates even on a loaded machine (a 64 x 64 x 16 one measured 0.86 beside a sweep).
    x = torch.randn(2, 32, 128, 128)
    w = torch.randn(32, 32, 3, 3)
    m = torch.randn(512, 512)

    def convs() -> None:
        F.conv2d(x, w, padding=1)

    def matmuls() -> None:
        m @ m

    assert conv_share(convs) > 0.9
    assert conv_share(matmuls) == 0.0


def test_markdown_shows_ratios_and_ceilings() -> None:
    row = dict(
        setting="proxy",
        train_ours=2.0,
        train_tv=1.0,
        train_ratio=2.0,
        infer_ours=30.0,
        infer_tv=20.0,
        infer_ratio=1.5,
        train_ceiling=1.25,
        infer_ceiling=1.6,
    )
    gpu = {k: v for k, v in row.items() if "ceiling" not in k} | {"setting": "gpu"}
    text = to_markdown({"model": [row, gpu]})
    assert "| proxy | 2.00 | 1.00 | **2.00x** | 1.25x | 30.0 | 20.0 | **1.50x** | 1.60x |" in text
    assert "| gpu | 2.00 | 1.00 | **2.00x** | n/a | 30.0 | 20.0 | **1.50x** | n/a |" in text
