"""Image and box transforms of the paper's recipe: shorter-side resize, horizontal flip, normalise.

The paper trains and tests with a single scale: the shorter image side is resized to `scale`
pixels (600 in Table 1) with the longer side capped at `max_size` (1000), and the only
augmentation is a horizontal flip. Boxes follow the image: they are scaled with it and mirrored
with it. Everything here works on `xyxy` boxes in continuous pixel coordinates
(a box covering pixel columns 0..9 is x1 = 0, x2 = 10), so a flip is exactly `x' = W - x`.

Whether an image is flipped is decided by `CocoDetection.__getitem__` from the random number the
training sampler hands it with the index (retina_sweep/data/loader.py), so the flips of a run
are a function of its seed and of the position in the epoch, whatever the number of workers.

The image is resized to whole pixels, so its exact scale differs per axis from the rule's
factor by up to half a pixel over the image; `CocoDetection` scales boxes by the exact ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resize_factor",
    "resized_size",
    "load_image",
    "scale_boxes",
    "hflip_boxes",
    "hflip_image",
    "to_tensor_normalized",
]

# torchvision's ImageNet statistics for RGB images in [0, 1]; the ImageNet-pretrained backbones
# were trained with them, so the input must use the same ones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_factor(height: int, width: int, scale: int, max_size: int) -> float:
    """The factor (resized / original) that makes the shorter side `scale` pixels.

    If that would make the longer side exceed `max_size`, the factor is reduced so the longer
    side is exactly `max_size` (the paper's 600 / 1000 rule, as in Detectron).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({height}, {width})")
    if scale <= 0 or max_size <= 0:
        raise ValueError(f"scale and max_size must be positive, got {scale}, {max_size}")
    factor = scale / min(height, width)
    if max(height, width) * factor > max_size:
        factor = max_size / max(height, width)
    return factor


def resized_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) of the resized image, rounded to the nearest pixel, at least 1."""
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def load_image(
    path: str | Path, scale: int, max_size: int
) -> tuple[Image.Image, tuple[int, int], float]:
    """Decode an image as RGB and resize it by the paper's rule, cheaply.

    Returns `(resized image, original (h, w), factor)` with `factor = resized / original`.
    For JPEG, `Image.draft` lets libjpeg decode directly at 1/2, 1/4 or 1/8 of the size (never
    below the target), which cuts the decode cost of a downscale several times; PIL's
    `reducing_gap` then does a cheap box reduction before the final bilinear resampling. The
    factor is always computed from the original size, so boxes do not depend on these shortcuts.

    Raises `FileNotFoundError` naming the file if it does not exist.
    """
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    with img:
        width, height = img.size
        factor = resize_factor(height, width, scale, max_size)
        new_h, new_w = resized_size(height, width, factor)
        if img.format == "JPEG" and factor < 1.0:
            img.draft("RGB", (new_w, new_h))
        img = img.convert("RGB")
        if img.size != (new_w, new_h):
            img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=2.0)
        else:
            img.load()
    return img, (height, width), factor


def scale_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale (G, 4) `xyxy` boxes by `factor` (the image resize factor)."""
    return boxes * factor


def hflip_boxes(boxes: torch.Tensor, width: int | float) -> torch.Tensor:
    """Mirror (G, 4) `xyxy` boxes in an image of width `width`: x1' = W - x2, x2' = W - x1."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def hflip_image(image: torch.Tensor) -> torch.Tensor:
    """Mirror a (C, H, W) image left-right."""
    return image.flip(-1)


def to_tensor_normalized(
    image: Image.Image | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, scaled to [0, 1] then `(x - mean) / std`."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True)  # PIL exposes a read-only buffer; torch wants to own it
    tensor = torch.from_numpy(array).permute(2, 0, 1).float()
    # One fused affine map: (x / 255 - mean) / std = x * a + b.
    a = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    b = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(3, 1, 1)
    return tensor.mul_(a).add_(b)
