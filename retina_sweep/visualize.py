"""Detections drawn on their images: what a trained cell finds, to look at beside its AP.

`draw_detections` takes COCO-format results (what `retina_sweep.evaluation.evaluate` writes as
``coco_results.json``: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the
original image's pixels) and the ground truth of the same COCO file, and writes one PNG per
image: the ground-truth boxes in green, the detections above a score threshold in red with their
class and score, over the original image (`torchvision.utils.draw_bounding_boxes`). Crowd
regions, which neither count as objects nor as false positives, are drawn in grey.
`python -m retina_sweep.evaluate eval.visualize=16` draws the first 16 val images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

__all__ = ["draw_detections", "GT_COLOR", "DET_COLOR", "CROWD_COLOR"]

GT_COLOR = (0, 200, 0)
DET_COLOR = (230, 30, 30)
CROWD_COLOR = (150, 150, 150)


def _xyxy(bboxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """(N, 4) COCO [x, y, w, h] -> (N, 4) xyxy float."""
    b = torch.tensor([list(map(float, bb)) for bb in bboxes], dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def draw_detections(
    coco: Any,
    img_dir: str | Path,
    results: Iterable[dict[str, Any]],
    image_ids: Sequence[int],
    out_dir: str | Path,
    *,
    score_thresh: float = 0.3,
    width: int = 1,
) -> list[Path]:
    """Write ``<out_dir>/<image_id>.png`` for each of `image_ids`; returns the paths written.

    Args:
        coco: the ground truth, a `pycocotools.coco.COCO` (``dataset.coco``).
        img_dir: the folder of the images' ``file_name``.
        results: COCO-format detections of (at least) these images, original pixels.
        image_ids: the images to draw, in this order.
        out_dir: where the PNGs go (created).
        score_thresh: detections at or above this score are drawn (the evaluation keeps scores
            above 0.05, most of them noise to the eye).
        width: line width in pixels.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {int(i) for i in image_ids}
    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in results:
        if int(det["image_id"]) in wanted and float(det["score"]) >= score_thresh:
            per_image[int(det["image_id"])].append(det)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in coco.loadCats(coco.getCatIds())}
    written = []
    for image_id in image_ids:
        info = coco.imgs[int(image_id)]
        with Image.open(Path(img_dir) / info["file_name"]) as pil:
            image = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(image_id)]))
        crowd = [a["bbox"] for a in anns if a.get("iscrowd", 0)]
        gts = [a for a in anns if not a.get("iscrowd", 0)]
        dets = sorted(per_image.get(int(image_id), []), key=lambda d: float(d["score"]))
        # Detections first, ground truth on top: where a detection sits on its object, the
        # object's outline stays visible.
        layers = [
            (
                _xyxy([d["bbox"] for d in dets]),
                [
                    f"{names.get(int(d['category_id']), d['category_id'])} {d['score']:.2f}"
                    for d in dets
                ],
                DET_COLOR,
            ),
            (_xyxy(crowd), None, CROWD_COLOR),
            (_xyxy([a["bbox"] for a in gts]), None, GT_COLOR),
        ]
        for boxes, labels, color in layers:
            if len(boxes):
                image = draw_bounding_boxes(image, boxes, labels=labels, colors=color, width=width)
        path = out / f"{int(image_id)}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    return written
