"""Resize / flip / normalise: the box arithmetic must follow the pixels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retina_sweep.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    hflip_boxes,
    hflip_image,
    load_image,
    resize_factor,
    resized_size,
    scale_boxes,
    to_tensor_normalized,
)


@pytest.mark.parametrize(
    ("hw", "scale", "max_size", "expected"),
    [
        ((480, 640), 600, 1000, 600 / 480),  # shorter side -> 600, longer 800 < 1000
        ((640, 480), 600, 1000, 600 / 480),  # portrait: the shorter side is the width
        ((300, 1200), 600, 1000, 1000 / 1200),  # 2400 > 1000: the longer side is capped
        ((128, 256), 128, 256, 1.0),  # the synthetic proxy at its native size
        ((100, 100), 50, 1000, 0.5),  # downscale
    ],
)
def test_resize_factor(hw, scale, max_size, expected):
    f = resize_factor(*hw, scale, max_size)
    assert f == pytest.approx(expected)
    h, w = resized_size(*hw, f)
    assert min(h, w) <= scale and max(h, w) <= max_size
    # One of the two constraints is tight.
    assert min(h, w) == scale or max(h, w) == max_size


def test_resize_factor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        resize_factor(0, 10, 600, 1000)


def test_resized_size_rounds_to_nearest():
    assert resized_size(333, 500, 600 / 333) == (600, 901)  # 500 * 1.8018 = 900.9
    assert resized_size(3, 3, 0.1) == (1, 1)  # never 0


def test_hflip_boxes_formula_and_involution():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 8.0]])
    flipped = hflip_boxes(boxes, 100)
    expected = torch.tensor([[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 8.0]])
    assert torch.equal(flipped, expected)  # x1' = W - x2, x2' = W - x1, y unchanged
    assert torch.equal(hflip_boxes(flipped, 100), boxes)
    assert torch.equal(boxes[0], torch.tensor([10.0, 5.0, 30.0, 25.0]))  # input not modified


def test_hflip_moves_pixels_and_boxes_together():
    # A bright block covering pixel columns 3..6 and rows 2..4: box [3, 2, 7, 5].
    image = torch.zeros(3, 8, 11)
    image[:, 2:5, 3:7] = 1.0
    box = torch.tensor([[3.0, 2.0, 7.0, 5.0]])
    fimg, fbox = hflip_image(image), hflip_boxes(box, image.shape[-1])
    x1, y1, x2, y2 = (int(v) for v in fbox[0])
    assert (fimg[:, y1:y2, x1:x2] == 1.0).all()
    assert fimg.sum() == image.sum()  # nothing else is bright
    assert (x1, x2) == (4, 8)


def test_scale_boxes():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(scale_boxes(boxes, 2.5), torch.tensor([[2.5, 5.0, 7.5, 10.0]]))


def _block_image(h, w, box, color=(255, 255, 255)):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = color
    return arr


def test_load_image_resize_scales_content_like_boxes(tmp_path):
    # 40 x 60 PNG with a block at [10, 8, 30, 20]; scale 80 -> factor 2.
    path = tmp_path / "a.png"
    Image.fromarray(_block_image(40, 60, (10, 8, 30, 20))).save(path)
    img, orig, f = load_image(path, scale=80, max_size=1000)
    assert orig == (40, 60) and f == 2.0 and img.size == (120, 80)
    arr = np.asarray(img)[..., 0]
    box = torch.tensor([[10.0, 8.0, 30.0, 20.0]]) * f
    x1, y1, x2, y2 = (int(v) for v in box[0])
    # Bilinear resampling blurs one pixel at the edges; the interior and the far outside are exact.
    assert (arr[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1] == 255).all()
    outside = np.ones_like(arr, dtype=bool)
    outside[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = False
    assert (arr[outside] == 0).all()


def test_load_image_jpeg_draft_keeps_geometry(tmp_path):
    # Downscaling a JPEG by 4 uses libjpeg's reduced decode; size and factor must not change.
    path = tmp_path / "b.jpg"
    Image.fromarray(_block_image(300, 400, (100, 60, 300, 240), (200, 30, 30))).save(
        path, quality=95
    )
    img, orig, f = load_image(path, scale=75, max_size=1000)
    assert orig == (300, 400) and f == 0.25 and img.size == (100, 75)
    arr = np.asarray(img).astype(int)
    inner = arr[17:58, 27:73]  # block at [25, 15, 75, 60] after scaling, minus an edge margin
    assert np.abs(inner.mean(axis=(0, 1)) - (200, 30, 30)).max() < 12
    assert arr[:12].mean() < 10  # above the block: black


def test_load_image_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing, 10, 10)


def test_to_tensor_normalized_values():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 255, 0, 128
    t = to_tensor_normalized(arr)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    expected = [
        (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
        (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    for c in range(3):
        assert torch.allclose(t[c], torch.full((2, 3), expected[c]), atol=1e-5)


def test_to_tensor_normalized_rejects_grey():
    with pytest.raises(ValueError, match="RGB"):
        to_tensor_normalized(np.zeros((4, 4), dtype=np.uint8))
