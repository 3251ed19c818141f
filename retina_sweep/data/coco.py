"""COCO-format detection datasets: real COCO 2017 and the synthetic proxy share this reader.

Conventions of the target dict (see docs/design.md):

- `boxes` (G, 4) float32 `xyxy` in the *transformed* image (resized, maybe flipped), continuous
  pixel coordinates: COCO's `[x, y, w, h]` becomes `[x, y, x + w, y + h]`.
- `labels` (G,) int64 contiguous labels 0..K-1; `label_to_cat_id` / `cat_id_to_label` map
  them to and from COCO category ids (COCO's are 1..90 with gaps; categories are sorted by id).
- `crowd_boxes` (Gc, 4) float32: `iscrowd=1` regions. They are kept apart because they are
  neither positives nor negatives: the detector ignores anchors on them and COCOeval ignores
  detections matched to them.
- `image_id` int, `scale_factor` float (the resize rule's factor, resized / original),
  `orig_size` (h, w) of the image file. The image is resized to whole pixels,
  `(round(h * f), round(w * f))`, so the boxes are scaled per axis by the exact ratios of the
  image sizes, `new_w / w` and `new_h / h` (as torchvision and detectron2 do), which differ from
  `scale_factor` by up to half a pixel over the image; the evaluation divides a predicted box
  by the same ratios (`retina_sweep.evaluation.to_coco_results` with `image_size`) to get the
  original image coordinates COCOeval expects.

Every problem with the files is reported up front where possible, with the offending path:
at construction the root, the annotation file (and its malformed entries, by index or id, with
the field) and the image folder, and whether every image file the dataset will use exists; an
unreadable image file, or one of another size than annotated, when it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    hflip_boxes,
    hflip_image,
    load_image,
    to_tensor_normalized,
)

__all__ = [
    "DatasetError",
    "MissingDataError",
    "CocoPaths",
    "coco_paths",
    "load_coco",
    "CocoDetection",
    "COCO_SPLITS",
]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the path."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A dataset file or folder does not exist (catchable as DatasetError or FileNotFoundError)."""


class CocoPaths(NamedTuple):
    """Annotation file and image folder of one split."""

    ann_file: Path
    img_dir: Path


# split name -> (annotation file under <root>/annotations, image folder under <root>).
# "minival" is the 5k-image 2014 split the paper tests on (the same images as val2017);
# "valminusminival" is the rest of val2014, which with train2014 makes trainval35k (= train2017).
COCO_SPLITS: dict[str, tuple[str, str]] = {
    "train2017": ("instances_train2017.json", "train2017"),
    "val2017": ("instances_val2017.json", "val2017"),
    "train": ("instances_train2017.json", "train2017"),
    "val": ("instances_val2017.json", "val2017"),
    "minival": ("instances_minival2014.json", "val2014"),
    "valminusminival": ("instances_valminusminival2014.json", "val2014"),
}


def coco_paths(root: str | Path, split: str) -> CocoPaths:
    """Paths of a COCO split under `root`, checked to exist.

    Expected layout (the official one)::

        root/annotations/instances_train2017.json   root/train2017/*.jpg
        root/annotations/instances_val2017.json     root/val2017/*.jpg
        root/annotations/instances_minival2014.json root/val2014/*.jpg   (optional, "minival")

    Raises `MissingDataError` naming the missing path and what was expected there, and
    `DatasetError` for an unknown split name.
    """
    if split not in COCO_SPLITS:
        raise DatasetError(f"unknown COCO split {split!r}; expected one of {sorted(COCO_SPLITS)}")
    if root is None or str(root) == "":
        raise DatasetError("COCO root is not set: give the folder holding annotations/ and images")
    root = Path(root).expanduser()
    ann_name, img_name = COCO_SPLITS[split]
    if not root.is_dir():
        raise MissingDataError(
            f"COCO root {root} does not exist or is not a folder; expected a folder with "
            f"annotations/{ann_name} and {img_name}/ (the official COCO layout)"
        )
    ann_file = root / "annotations" / ann_name
    if not ann_file.is_file():
        raise MissingDataError(
            f"COCO annotation file {ann_file} not found (split {split!r}); download the COCO "
            f"annotations and unpack them into {root / 'annotations'}"
        )
    img_dir = root / img_name
    if not img_dir.is_dir():
        raise MissingDataError(
            f"COCO image folder {img_dir} not found (split {split!r}); unpack {img_name}.zip "
            f"into {root}"
        )
    return CocoPaths(ann_file, img_dir)


def load_coco(ann_file: str | Path) -> COCO:
    """Load a COCO annotation JSON into a pycocotools `COCO`, quietly and with clear errors.

    pycocotools' own loader prints to stdout and lets a `json.JSONDecodeError` escape without
    the file name; here a missing file raises `MissingDataError` and a corrupt or malformed one
    `DatasetError`, both naming the file. Annotations without `area` or `iscrowd` get them (the
    box's `w * h`, 0; see `_fill_eval_fields`), so that COCOeval can score the file. Their
    `segmentation` is not kept (`_without_segmentation`): the result serves box detection and
    box evaluation only, not `annToMask` or `iouType="segm"`.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise MissingDataError(f"annotation file {ann_file} not found")
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f, object_hook=_without_segmentation)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"annotation file {ann_file} is not valid JSON: {e}") from e
    if not isinstance(dataset, dict):
        raise DatasetError(f"annotation file {ann_file}: expected a JSON object at the top level")
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise DatasetError(f"annotation file {ann_file} lacks the COCO key(s) {missing}")
    _check_index_fields(ann_file, dataset)
    _fill_eval_fields(ann_file, dataset)
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "creating index..." chatter
            coco.createIndex()
    except (KeyError, TypeError) as e:  # anything _check_index_fields did not foresee
        raise DatasetError(
            f"annotation file {ann_file}: pycocotools cannot index it ({type(e).__name__}: {e})"
        ) from e
    return coco


def _without_segmentation(obj: dict[str, Any]) -> dict[str, Any]:
    """`json.load` hook: drop each annotation's mask polygons / RLE as soon as it is parsed.

    Boxes are all this package trains on and evaluates (COCOeval "bbox" reads `bbox`, `area`,
    `iscrowd`), while the masks are most of a COCO file, and as Python lists of floats most of
    its memory, in each training process and (copied on write) in its DataLoader workers.
    Measured on a file of COCO's shape at 1/10 of train2017 (11.8k images, 86k annotations with
    48-coordinate polygons, 47 MB): `CocoDetection` took 267 MiB and 2.7 s with the masks, 95
    MiB and 1.3 s without, so about 2.7 GB against 1 GB per process for train2017."""
    obj.pop("segmentation", None)
    return obj


# The fields pycocotools' `createIndex` looks up in every entry of each list.
_INDEX_FIELDS: dict[str, tuple[str, ...]] = {
    "images": ("id",),
    "categories": ("id",),
    "annotations": ("id", "image_id", "category_id"),
}


def _check_index_fields(ann_file: Path, dataset: dict[str, Any]) -> None:
    """Check what `COCO.createIndex` relies on, so that a malformed entry gets a message naming
    the file, the entry (its index in the list, and its id when it has one) and the field,
    instead of a bare KeyError / TypeError from pycocotools."""
    for key, fields in _INDEX_FIELDS.items():
        entries = dataset[key]
        if not isinstance(entries, list):
            raise DatasetError(
                f"annotation file {ann_file}: {key!r} must be a list, got {type(entries).__name__}"
            )
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise DatasetError(
                    f"annotation file {ann_file}: {key}[{i}] is {_short(entry)}, expected an "
                    f"object with {', '.join(repr(f) for f in fields)}"
                )
            for field in fields:
                value = entry.get(field)
                if value is None or not _hashable(value):
                    entry_id = entry.get("id")
                    which = f"{key}[{i}]" + (
                        f" (id {entry_id!r})" if field != "id" and _hashable(entry_id) else ""
                    )
                    problem = "has no" if value is None else f"has {_short(value)} as"
                    raise DatasetError(
                        f"annotation file {ann_file}: {which} {problem} {field!r}"
                        + ("" if value is None else ", expected a number")
                    )


def _fill_eval_fields(ann_file: Path, dataset: dict[str, Any]) -> None:
    """Give every annotation the `area` and `iscrowd` that COCOeval reads.

    The COCO format has them, but many converters of other datasets leave them out, and
    pycocotools' COCOeval then fails with a bare `KeyError` at the first evaluation (after the
    whole training when there is no periodic one). A missing `iscrowd` is 0 (what this reader
    and pycocotools' `_prepare` assume) and a missing `area` is the box's `w * h` (what `loadRes`
    gives detections; COCO's own is the mask area). Values present but not numbers are a
    `DatasetError` naming the annotation.
    """
    no_area = no_crowd = 0
    for i, ann in enumerate(dataset["annotations"]):
        crowd = ann.get("iscrowd")
        if crowd is None:
            ann["iscrowd"] = 0
            no_crowd += 1
        elif type(crowd) not in (int, bool):
            raise DatasetError(
                f"annotation file {ann_file}: annotations[{i}] (id {ann['id']!r}) has "
                f"{_short(crowd)} as 'iscrowd', expected 0 or 1"
            )
        area = ann.get("area")
        if area is None:
            bbox = ann.get("bbox")
            if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
                w, h = bbox[2], bbox[3]
                if type(w) in (int, float) and type(h) in (int, float):
                    ann["area"] = float(max(w, 0) * max(h, 0))
                    no_area += 1
            # else: left to CocoDetection, which names a malformed bbox
        elif type(area) not in (int, float) or not math.isfinite(area):
            raise DatasetError(
                f"annotation file {ann_file}: annotations[{i}] (id {ann['id']!r}) has "
                f"{_short(area)} as 'area', expected a number"
            )
    if no_area or no_crowd:
        log.warning(
            "%s: %d annotations lack 'area' (set to the box's w * h) and %d lack 'iscrowd' "
            "(set to 0); COCOeval needs both",
            ann_file,
            no_area,
            no_crowd,
        )


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CocoDetection(Dataset):
    """A COCO-format detection dataset with the paper's transforms.

    Args:
        ann_file: COCO instances JSON.
        img_dir: folder holding the images named by `file_name`.
        train: enables the random horizontal flip.
        scale: shorter side of the network input, px (paper: 600).
        max_size: cap on the longer side, px (paper: 1000).
        flip_prob: flip probability when `train` (paper: 0.5).
        skip_empty: drop images without any non-crowd box (useless for training: they have no
            positive anchor). Keep them for evaluation (COCOeval counts their false positives).
        mean, std: normalisation of RGB in [0, 1].

    Item: `(image (3, H, W) float32 normalised, target)`, target as in the module docstring.
    """

    def __init__(
        self,
        *,
        ann_file: str | Path,
        img_dir: str | Path,
        train: bool,
        scale: int,
        max_size: int,
        flip_prob: float = 0.5,
        skip_empty: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise MissingDataError(
                f"image folder {self.img_dir} not found (images of {self.ann_file})"
            )
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.train = bool(train)
        self.scale = int(scale)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.skip_empty = bool(skip_empty)
        self.mean = tuple(mean)
        self.std = tuple(std)

        self.coco = load_coco(self.ann_file)
        cat_ids = []
        for i, c in enumerate(self.coco.dataset["categories"]):
            if not isinstance(c["id"], int) or isinstance(c["id"], bool):
                raise DatasetError(
                    f"annotation file {self.ann_file}: categories[{i}] has id {_short(c['id'])}, "
                    "expected an integer"
                )
            cat_ids.append(c["id"])
        cat_ids.sort()
        if len(set(cat_ids)) != len(cat_ids):
            raise DatasetError(f"annotation file {self.ann_file} has duplicate category ids")
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = dict(enumerate(cat_ids))
        self.num_classes = len(cat_ids)
        cats = self.coco.cats
        self.class_names: list[str] = [str(cats[c].get("name", c)) for c in cat_ids]

        self._records = self._parse_annotations()
        all_ids = sorted(self._records)
        if self.skip_empty:
            self.image_ids = [i for i in all_ids if len(self._records[i]["labels"]) > 0]
            skipped = len(all_ids) - len(self.image_ids)
            if skipped:
                log.info(
                    "%s: skipped %d of %d images without non-crowd boxes (skip_empty)",
                    self.ann_file,
                    skipped,
                    len(all_ids),
                )
        else:
            self.image_ids = all_ids
        # Images in the annotation file that are left out by `skip_empty` (see build_loader's
        # error for a training set that ends up smaller than one batch).
        self.num_skipped_empty = len(all_ids) - len(self.image_ids)
        self._check_image_files()

    def _check_image_files(self) -> None:
        """Every image this dataset will read exists, so that a missing file is reported now
        rather than when it is first read, maybe after a whole training.

        One listing of the image folder answers for the plain names in it (COCO's layout):
        a stat per file is 118k round trips for train2017, minutes on a network file system, in
        every training process. A name the listing lacks (or with a folder in it) gets its own
        stat, so anything the listing gets wrong is only slower, not a false alarm."""
        try:
            with os.scandir(self.img_dir) as entries:
                listed = {e.name for e in entries if e.is_file()}
        except OSError:
            listed = set()
        missing = [
            name
            for name in (self._records[i]["file_name"] for i in self.image_ids)
            if name not in listed and not (self.img_dir / name).is_file()
        ]
        if missing:
            raise MissingDataError(
                f"image folder {self.img_dir}: {len(missing)} of {len(self.image_ids)} image "
                f"files named in {self.ann_file} are missing, first: {', '.join(missing[:3])}"
            )

    def _parse_annotations(self) -> dict[int, dict[str, Any]]:
        """Per image: boxes / labels / crowd boxes in original coordinates, as numpy arrays."""
        per_image: dict[int, dict[str, list]] = {}
        for img in self.coco.dataset["images"]:
            try:
                image_id, w, h = int(img["id"]), int(img["width"]), int(img["height"])
                file_name = str(img["file_name"])
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(
                    f"annotation file {self.ann_file}: image entry {img!r} needs id, file_name, "
                    f"width and height ({e})"
                ) from e
            if image_id in per_image:
                # pycocotools keeps the last entry silently; the annotations of both would be
                # drawn on one image, at its size.
                raise DatasetError(
                    f"annotation file {self.ann_file}: image id {image_id} is listed twice in "
                    f"'images' ({per_image[image_id]['file_name']} and {file_name})"
                )
            if w <= 0 or h <= 0:
                raise DatasetError(
                    f"annotation file {self.ann_file}: image {image_id} ({file_name}) has size "
                    f"{img['width']}x{img['height']} (w x h); both must be positive"
                )
            per_image[image_id] = {
                "file_name": file_name,
                "size": (h, w),
                "boxes": [],
                "labels": [],
                "crowd": [],
            }

        degenerate = 0
        for ann in self.coco.dataset["annotations"]:
            rec = per_image.get(ann.get("image_id"))
            if rec is None:
                raise DatasetError(
                    f"annotation file {self.ann_file}: annotation {ann.get('id')} refers to "
                    f"image_id {ann.get('image_id')} which is not in 'images'"
                )
            cat = ann.get("category_id")
            if cat not in self.cat_id_to_label:
                raise DatasetError(
                    f"annotation file {self.ann_file}: annotation {ann.get('id')} has "
                    f"category_id {cat} which is not in 'categories'"
                )
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DatasetError(
                    f"annotation file {self.ann_file}: annotation {ann.get('id')} has bbox "
                    f"{bbox!r}, expected [x, y, width, height]"
                )
            if not all(type(v) in (int, float) and math.isfinite(v) for v in bbox):
                raise DatasetError(
                    f"annotation file {self.ann_file}: annotation {ann['id']} has bbox "
                    f"{_short(bbox)}; its 4 values must be finite numbers"
                )
            x, y, bw, bh = (float(v) for v in bbox)
            h, w = rec["size"]
            # Clip to the image (COCO has a few boxes overshooting by a fraction of a pixel),
            # then drop what has no area left: such a box has no IoU with any anchor and would
            # only produce NaN box targets (log of a zero width).
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if bw <= 0 or bh <= 0 or x2 <= x1 or y2 <= y1:
                degenerate += 1
                continue
            if ann.get("iscrowd", 0):
                rec["crowd"].append((x1, y1, x2, y2))
            else:
                rec["boxes"].append((x1, y1, x2, y2))
                rec["labels"].append(self.cat_id_to_label[cat])
        if degenerate:
            log.warning(
                "%s: dropped %d degenerate boxes (width or height <= 0 inside the image)",
                self.ann_file,
                degenerate,
            )
        self.num_degenerate = degenerate

        records: dict[int, dict[str, Any]] = {}
        for image_id, rec in per_image.items():
            records[image_id] = {
                "file_name": rec["file_name"],
                "size": rec["size"],
                "boxes": np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(rec["labels"], dtype=np.int64),
                "crowd": np.asarray(rec["crowd"], dtype=np.float32).reshape(-1, 4),
            }
        return records

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """Path of the image file of item `index`."""
        return self.img_dir / self._records[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int | tuple[int, float]) -> tuple[torch.Tensor, dict[str, Any]]:
        """`dataset[i]`, or `dataset[(i, draw)]` from the training samplers: `draw` in [0, 1)
        decides the flip (`draw < flip_prob`), so the augmentation does not depend on which
        process loads the image (retina_sweep/data/loader.py). A bare index draws from the
        global torch RNG."""
        draw: float | None = None
        if isinstance(index, tuple):
            index, draw = index
        image_id = self.image_ids[index]
        rec = self._records[image_id]
        path = self.img_dir / rec["file_name"]
        if not path.is_file():
            raise MissingDataError(
                f"image file {path} not found (image_id {image_id} of {self.ann_file})"
            )
        try:
            pil, orig_size, factor = load_image(path, self.scale, self.max_size)
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise DatasetError(f"cannot read image file {path}: {e}") from e
        if orig_size != rec["size"]:
            raise DatasetError(
                f"image file {path} is {orig_size[1]}x{orig_size[0]} (w x h) but "
                f"{self.ann_file} says {rec['size'][1]}x{rec['size'][0]}; the boxes would be wrong"
            )
        image = to_tensor_normalized(pil, self.mean, self.std)
        # Per axis, the ratio of the whole-pixel sizes: what the resampling did to the content
        # (the same as `factor` when the sizes are exact, as on the synthetic proxy). In float64,
        # so that the image's edge lands exactly on the resized edge.
        new_sizes = np.array([pil.width, pil.height] * 2, dtype=np.float64)
        old_sizes = np.array([orig_size[1], orig_size[0]] * 2, dtype=np.float64)
        boxes = torch.from_numpy((rec["boxes"] * new_sizes / old_sizes).astype(np.float32))
        crowd = torch.from_numpy((rec["crowd"] * new_sizes / old_sizes).astype(np.float32))
        if self.train and self.flip_prob > 0:
            if draw is None:
                draw = float(torch.rand(()))
            flip = draw < self.flip_prob
        else:
            flip = False
        if flip:
            width = image.shape[-1]
            image = hflip_image(image)
            boxes = hflip_boxes(boxes, width)
            crowd = hflip_boxes(crowd, width)
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(rec["labels"].copy()),
            "crowd_boxes": crowd,
            "image_id": int(image_id),
            "scale_factor": float(factor),
            "orig_size": orig_size,
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, "
            f"classes={self.num_classes}, train={self.train}, scale={self.scale}, "
            f"max_size={self.max_size})"
        )
