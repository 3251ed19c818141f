"""Anchor sizes and boxes: hand-computed values, torchvision agreement, order, cache, checks."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.retinanet import _default_anchorgen

from retina_sweep.model.anchors import AnchorGenerator, paper_anchor_sizes


def test_paper_sizes_exact():
    sizes = paper_anchor_sizes(3, 7)
    assert len(sizes) == 5
    for level, level_sizes in zip(range(3, 8), sizes, strict=True):
        base = 32 * 2 ** (level - 3)
        assert level_sizes == pytest.approx([base, base * 2 ** (1 / 3), base * 2 ** (2 / 3)])
    assert sizes[0][1] == pytest.approx(40.3175, abs=1e-4)
    assert sizes[-1][0] == 512


def test_paper_sizes_truncated_match_torchvision():
    sizes = paper_anchor_sizes(3, 7, truncate=True)
    assert sizes[0] == [32, 40, 50]
    assert [list(s) for s in _default_anchorgen().sizes] == sizes


def test_paper_sizes_other_settings():
    # 2 scales per octave at base 16 over P2..P3: 16 * 2^(l-3) * 2^(i/2).
    sizes = paper_anchor_sizes(2, 3, base_size=16, scales_per_octave=2)
    assert sizes[0] == pytest.approx([8, 8 * math.sqrt(2)])
    assert sizes[1] == pytest.approx([16, 16 * math.sqrt(2)])
    assert paper_anchor_sizes(5, 5, scales_per_octave=1) == [[128.0]]


def test_hand_computed_anchors_small_map():
    # One level, size 8, ratios 1 and 4 (h/w), stride 4, a 2 x 3 map.
    # r = 1: w = h = 8 -> (-4, -4, 4, 4); r = 4: h = 8 * 2, w = 8 / 2 -> (-2, -8, 2, 8).
    gen = AnchorGenerator(sizes=[[8.0]], aspect_ratios=[1.0, 4.0], strides=[4])
    anchors = gen([(2, 3)])
    expected = []
    for y in (0, 4):  # (H, W, A) order
        for x in (0, 4, 8):
            expected.append([x - 4, y - 4, x + 4, y + 4])
            expected.append([x - 2, y - 8, x + 2, y + 8])
    torch.testing.assert_close(anchors, torch.tensor(expected, dtype=torch.float32))
    # offset 0.5 moves every centre by half a stride.
    shifted = AnchorGenerator(sizes=[[8.0]], aspect_ratios=[1.0, 4.0], strides=[4], offset=0.5)
    torch.testing.assert_close(shifted([(2, 3)]), anchors + 2.0)


def test_cell_anchor_order_area_and_ratio():
    gen = AnchorGenerator(sizes=[[10.0, 20.0]], aspect_ratios=[0.5, 2.0], strides=[8])
    cell = gen([(1, 1)])
    assert gen.num_anchors_per_location == 4
    w = cell[:, 2] - cell[:, 0]
    h = cell[:, 3] - cell[:, 1]
    # Ratio-major, size-minor: (0.5, 10), (0.5, 20), (2, 10), (2, 20).
    torch.testing.assert_close(w * h, torch.tensor([100.0, 400.0, 100.0, 400.0]))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 2.0, 2.0]))
    torch.testing.assert_close(cell[:, :2] + cell[:, 2:], torch.zeros(4, 2))  # centred at 0


def test_multi_level_concatenation():
    sizes = paper_anchor_sizes(3, 4)
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16])
    anchors = gen([(4, 4), (2, 2)])
    assert anchors.shape == (9 * 16 + 9 * 4, 4)
    p4 = AnchorGenerator(sizes=sizes[1:], aspect_ratios=[0.5, 1.0, 2.0], strides=[16])([(2, 2)])
    torch.testing.assert_close(anchors[9 * 16 :], p4)
    # The last P3 location is (x, y) = (24, 24); its square anchor of size 32 is (8, 8, 40, 40).
    torch.testing.assert_close(anchors[9 * 15 + 3], torch.tensor([8.0, 8.0, 40.0, 40.0]))


@pytest.mark.parametrize("ratios", [[0.5, 1.0, 2.0], [0.25, 1.0, 3.0, 5.0]])
def test_round_cell_anchors_match_torchvision(ratios):
    sizes = paper_anchor_sizes(3, 5, truncate=True)
    ours = AnchorGenerator(
        sizes=sizes, aspect_ratios=ratios, strides=[8, 16, 32], round_cell_anchors=True
    )
    theirs = TVAnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * 3)
    for i in range(3):
        torch.testing.assert_close(ours.cell_anchors(i), theirs.cell_anchors[i], rtol=0, atol=0)
    # Exact (unrounded) corners differ from the rounded ones by at most 0.5.
    exact = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=[8, 16, 32])
    diff = (exact.cell_anchors(0) - ours.cell_anchors(0)).abs()
    assert diff.max() <= 0.5 and diff.max() > 0


def test_anchors_are_cached_per_shape():
    gen = AnchorGenerator(sizes=[[32.0], [64.0]], aspect_ratios=[1.0], strides=[8, 16])
    a = gen([(4, 4), (2, 2)])
    assert gen([(4, 4), (2, 2)]) is a  # same tensor: not recomputed
    b = gen([(8, 8), (4, 4)])
    assert b is not a and b.shape == (80, 4)
    assert gen([(4, 4), (2, 2)]) is a
    gen.double()  # moving / casting the module drops the cache
    c = gen([(4, 4), (2, 2)])
    assert c is not a
    torch.testing.assert_close(c.float(), a)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"aspect_ratios": [1.0, 0.0]}, "aspect_ratios"),
        ({"aspect_ratios": [-2.0]}, "aspect_ratios"),
        ({"aspect_ratios": []}, "aspect_ratios"),
        ({"sizes": [[32.0], [64.0, 80.0]]}, "sizes"),
        ({"sizes": [[32.0]]}, "sizes"),
        ({"sizes": [[32.0], [-1.0]]}, "sizes"),
        ({"strides": [8, 0]}, "strides"),
        ({"offset": 1.0}, "offset"),
    ],
)
def test_anchor_generator_rejects_bad_arguments(kwargs, name):
    args = {"sizes": [[32.0], [64.0]], "aspect_ratios": [1.0], "strides": [8, 16]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        AnchorGenerator(**args)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((1, 5), {}, "min_level"),
        ((3, 8), {}, "max_level"),
        ((5, 4), {}, "min_level"),
        ((3, 7), {"scales_per_octave": 0}, "scales_per_octave"),
        ((3, 7), {"base_size": 0}, "base_size"),
    ],
)
def test_paper_sizes_reject_bad_arguments(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        paper_anchor_sizes(*args, **kwargs)


def test_wrong_number_of_feature_shapes():
    gen = AnchorGenerator(sizes=[[32.0]], aspect_ratios=[1.0], strides=[8])
    with pytest.raises(ValueError, match="feature_shapes"):
        gen([(4, 4), (2, 2)])
