"""RetinaFPN: levels, strides and shapes per configuration; P6/P7 from C5; c5_only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retina_sweep.model.fpn import RetinaFPN

IN_CHANNELS = {"C2": 8, "C3": 12, "C4": 16, "C5": 20}


def _feats(size: int = 64, n: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"C{lv}": torch.randn(n, IN_CHANNELS[f"C{lv}"], size // 2**lv, size // 2**lv, generator=g)
        for lv in range(2, 6)
    }


@pytest.mark.parametrize(
    ("min_level", "max_level", "variant", "levels"),
    [
        (3, 7, "fpn", [3, 4, 5, 6, 7]),
        (2, 6, "fpn", [2, 3, 4, 5, 6]),
        (3, 5, "fpn", [3, 4, 5]),
        (4, 4, "fpn", [4]),
        (6, 7, "fpn", [6, 7]),
        (7, 7, "fpn", [7]),
        (3, 7, "c5_only", [5]),
    ],
)
def test_levels_strides_and_shapes(min_level, max_level, variant, levels):
    fpn = RetinaFPN(
        in_channels=IN_CHANNELS,
        out_channels=6,
        min_level=min_level,
        max_level=max_level,
        variant=variant,
    )
    assert fpn.levels == levels
    assert fpn.strides == [2**lv for lv in levels]
    outs = fpn(_feats(128, n=2))
    assert [tuple(o.shape) for o in outs] == [(2, 6, 128 // 2**lv, 128 // 2**lv) for lv in levels]
    # Every parameter is used (DistributedDataParallel needs no find_unused_parameters).
    sum(o.sum() for o in outs).backward()
    for name, p in fpn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_p6_from_c5_even_when_widths_match():
    # C5 width == FPN width: torchvision's LastLevelP6P7 would switch to P5; the paper uses C5.
    in_channels = {**IN_CHANNELS, "C5": 6}
    fpn = RetinaFPN(in_channels=in_channels, out_channels=6, min_level=3, max_level=7)
    feats = _feats()
    feats["C5"] = torch.randn(1, 6, 2, 2)
    p3, p4, p5, p6, p7 = fpn(feats)
    conv6, conv7 = fpn.extra.p6, fpn.extra.p7
    expected_p6 = F.conv2d(feats["C5"], conv6.weight, conv6.bias, stride=2, padding=1)
    torch.testing.assert_close(p6, expected_p6)
    torch.testing.assert_close(
        p7, F.conv2d(F.relu(p6), conv7.weight, conv7.bias, stride=2, padding=1)
    )


def test_top_down_pathway():
    fpn = RetinaFPN(in_channels=IN_CHANNELS, out_channels=6, min_level=3, max_level=7)
    feats = _feats()
    before = fpn(feats)
    feats2 = dict(feats, C5=feats["C5"] + 1.0)
    after = fpn(feats2)
    # C5 reaches P3 through the top-down pathway.
    assert not torch.allclose(before[0], after[0])
    # P3..P4 only: the top-down pathway starts at C4, so C5 is not used at all.
    short = RetinaFPN(in_channels=IN_CHANNELS, out_channels=6, min_level=3, max_level=4)
    torch.testing.assert_close(short(feats)[0], short(feats2)[0])
    # P4 = 3x3 conv of (lateral(C4) + upsampled P5 lateral): hand computation.
    inner, layer = fpn.fpn.inner_blocks, fpn.fpn.layer_blocks
    lat5 = inner[2](feats["C5"])
    lat4 = inner[1](feats["C4"]) + F.interpolate(lat5, size=feats["C4"].shape[-2:], mode="nearest")
    torch.testing.assert_close(before[1], layer[1](lat4))


def test_c5_only_is_lateral_plus_output_conv_of_c5():
    fpn = RetinaFPN(in_channels=IN_CHANNELS, out_channels=6, variant="c5_only")
    feats = _feats()
    (p5,) = fpn(feats)
    expected = fpn.fpn.layer_blocks[0](fpn.fpn.inner_blocks[0](feats["C5"]))
    torch.testing.assert_close(p5, expected)
    assert fpn.extra is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_level": 1}, "min_level"),
        ({"max_level": 8}, "max_level"),
        ({"min_level": 5, "max_level": 4}, "min_level"),
        ({"variant": "bifpn"}, "variant"),
        ({"out_channels": 0}, "out_channels"),
        ({"min_level": 2, "in_channels": {"C3": 4, "C4": 4, "C5": 4}}, "in_channels"),
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    args = {"in_channels": IN_CHANNELS, "out_channels": 6}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        RetinaFPN(**args)
