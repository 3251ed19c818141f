"""Detections and ground truth drawn on their images (retina_sweep.visualize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retina_sweep.visualize import CROWD_COLOR, DET_COLOR, GT_COLOR, draw_detections


def _coco(tmp_path: Path) -> COCO:
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 8, "file_name": "b.png", "height": 40, "width": 60},
        ],
        "categories": [{"id": 3, "name": "disc"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [5, 6, 20, 10],
                "iscrowd": 0,
                "area": 200,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [2, 30, 8, 6],
                "iscrowd": 1,
                "area": 48,
            },
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return COCO(str(path))


def test_ground_truth_detections_and_crowds_in_their_colours(tmp_path: Path) -> None:
    coco = _coco(tmp_path)
    results = [
        {"image_id": 7, "category_id": 3, "bbox": [30.0, 20.0, 10.0, 10.0], "score": 0.9},
        {"image_id": 7, "category_id": 3, "bbox": [45.0, 2.0, 10.0, 10.0], "score": 0.1},
        {"image_id": 8, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.95},
    ]
    written = draw_detections(coco, tmp_path, results, [7], tmp_path / "vis", score_thresh=0.3)
    assert written == [tmp_path / "vis" / "7.png"]  # only the images asked for
    px = np.asarray(Image.open(written[0]))
    assert px.shape == (40, 60, 3)  # the original image's size
    # Corners (y, x) of the outlines: x1, y1 and x1 + w, y1 + h, both ends inclusive.
    assert tuple(px[6, 5]) == GT_COLOR and tuple(px[16, 25]) == GT_COLOR
    assert tuple(px[20, 30]) == DET_COLOR and tuple(px[30, 40]) == DET_COLOR
    assert tuple(px[30, 2]) == CROWD_COLOR and tuple(px[36, 10]) == CROWD_COLOR
    assert tuple(px[11, 15]) == (0, 0, 0)  # inside the ground-truth box: not filled
    assert tuple(px[2, 45]) == (0, 0, 0)  # below the score threshold: not drawn
    assert tuple(px[38, 58]) == (0, 0, 0)  # background stays as it was
    with pytest.raises(ValueError, match="score_thresh"):
        draw_detections(coco, tmp_path, results, [7], tmp_path / "vis", score_thresh=2.0)
