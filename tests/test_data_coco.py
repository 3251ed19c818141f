"""COCO-format dataset, collate and loader on a tiny hand-written dataset."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from retina_sweep.builders import build_datasets
from retina_sweep.data.coco import (
    CocoDetection,
    DatasetError,
    MissingDataError,
    coco_paths,
    load_coco,
)
from retina_sweep.data.loader import EpochShuffleSampler, build_loader, collate
from retina_sweep.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Category ids with gaps, like COCO's 1..90.
CATS = [{"id": 3, "name": "cat3"}, {"id": 7, "name": "cat7"}, {"id": 11, "name": "cat11"}]
# (id, file, h, w)
IMAGES = [(1, "a.png", 40, 60), (2, "b.png", 30, 30), (5, "c.png", 20, 50), (9, "d.png", 24, 24)]
ANNS = [
    # image 1: two boxes of different classes, one crowd region, one zero-width box
    {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 8, 20, 12], "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 11, "bbox": [40, 0, 20, 40], "iscrowd": 0},
    {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 30, 10, 10], "iscrowd": 1},
    {"id": 4, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},
    # image 2: one box, overshooting the border by 2 px (clipped)
    {"id": 5, "image_id": 2, "category_id": 3, "bbox": [20, 20, 12, 8], "iscrowd": 0},
    # image 5: only a degenerate box (negative height) -> no valid box
    {"id": 6, "image_id": 5, "category_id": 7, "bbox": [1, 1, 5, -3], "iscrowd": 0},
    # image 9: only a crowd region -> no positive box
    {"id": 7, "image_id": 9, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 1},
]


def _write_dataset(root, images=IMAGES, anns=ANNS, cats=CATS):
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, name, h, w in images:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
    for a in anns:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    data = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
        "annotations": anns,
        "categories": cats,
    }
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


@pytest.fixture
def tiny(tmp_path):
    return _write_dataset(tmp_path)


def _ds(tiny, **kw):
    ann_file, img_dir = tiny
    args = dict(ann_file=ann_file, img_dir=img_dir, train=False, scale=80, max_size=1000)
    args.update(kw)
    return CocoDetection(**args)


def test_label_mapping_roundtrip(tiny):
    ds = _ds(tiny)
    assert ds.num_classes == 3
    assert ds.cat_id_to_label == {3: 0, 7: 1, 11: 2}
    assert ds.label_to_cat_id == {0: 3, 1: 7, 2: 11}
    for cat, label in ds.cat_id_to_label.items():
        assert ds.label_to_cat_id[label] == cat
    assert ds.class_names == ["cat3", "cat7", "cat11"]


def test_target_boxes_labels_crowd_and_scale(tiny):
    ds = _ds(tiny, skip_empty=False)
    assert ds.image_ids == [1, 2, 5, 9]
    image, t = ds[0]
    # 40 x 60 with scale 80 -> factor 2 -> 80 x 120.
    assert t["scale_factor"] == 2.0 and t["orig_size"] == (40, 60) and t["image_id"] == 1
    assert image.shape == (3, 80, 120) and image.dtype == torch.float32
    # xywh -> xyxy, times the factor; the crowd region is kept apart, the zero-width box dropped.
    assert torch.equal(
        t["boxes"], torch.tensor([[20.0, 16.0, 60.0, 40.0], [80.0, 0.0, 120.0, 80.0]])
    )
    assert t["boxes"].dtype == torch.float32
    assert torch.equal(t["labels"], torch.tensor([1, 2]))  # cat 7 -> 1, cat 11 -> 2
    assert t["labels"].dtype == torch.int64
    assert torch.equal(t["crowd_boxes"], torch.tensor([[0.0, 60.0, 20.0, 80.0]]))
    # Image 2 (30 x 30, factor 80/30): the overshooting box is clipped to the image first.
    _, t2 = ds[1]
    f = 80 / 30
    assert torch.allclose(t2["boxes"], torch.tensor([[20.0, 20.0, 30.0, 28.0]]) * f)
    # Image 5 has no valid box: empty (0, 4) tensors, not missing keys.
    _, t5 = ds[2]
    assert t5["boxes"].shape == (0, 4) and t5["labels"].shape == (0,)
    assert t5["crowd_boxes"].shape == (0, 4)


def test_masks_are_not_kept_in_memory(tmp_path):
    # Box detection only: the polygons / RLE of a COCO file (most of its size and memory) are
    # dropped as the JSON is parsed; the boxes, areas and crowd flags COCOeval reads stay.
    anns = copy.deepcopy(ANNS)
    anns[0]["segmentation"] = [[10.0, 8.0, 30.0, 8.0, 30.0, 20.0]]
    anns[2]["segmentation"] = {"counts": [0, 5, 95], "size": [40, 60]}
    ann_file, _ = _write_dataset(tmp_path, anns=anns)
    ds = _ds((ann_file, tmp_path / "images"))
    assert all("segmentation" not in a for a in ds.coco.dataset["annotations"])
    assert ds.coco.anns[1]["bbox"] == [10, 8, 20, 12] and ds.coco.anns[3]["iscrowd"] == 1
    assert ds.coco.anns[1]["area"] == 240.0


def test_degenerate_boxes_dropped_and_logged(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="retina_sweep.data.coco"):
        ds = _ds(tiny)
    assert ds.num_degenerate == 2
    assert "dropped 2 degenerate boxes" in caplog.text and "ann.json" in caplog.text


def test_skip_empty(tiny):
    # Image 5 (only a degenerate box) and image 9 (only crowd) have no positive box.
    assert _ds(tiny, skip_empty=True).image_ids == [1, 2]
    assert len(_ds(tiny, skip_empty=False)) == 4


def test_max_size_caps_the_longer_side(tiny):
    ds = _ds(tiny, scale=80, max_size=100, skip_empty=False)
    image, t = ds[0]  # 40 x 60: 80 / 40 = 2 would give 120 > 100 -> 100 / 60
    assert t["scale_factor"] == pytest.approx(100 / 60)
    assert image.shape[1:] == (67, 100)


def test_boxes_follow_the_whole_pixel_resize_per_axis(tmp_path):
    # 43 x 64 at scale 60: factor 60 / 43 = 1.3953 would make the width 89.3, rounded to 89
    # pixels. The content is stretched by 89 / 64 = 1.3906 horizontally, so a box on the image's
    # right edge must end at x = 89 (it ended at 89.3, outside the image) and a flip must map
    # the full-image box onto itself.
    images = [(1, "odd.png", 43, 64)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 43], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [32, 0, 32, 43], "iscrowd": 1},
    ]
    ann_file, img_dir = _write_dataset(tmp_path, images=images, anns=anns)
    for flip in (0.0, 1.0):
        ds = CocoDetection(
            ann_file=ann_file, img_dir=img_dir, train=True, scale=60, max_size=1000, flip_prob=flip
        )
        image, t = ds[0]
        assert image.shape[1:] == (60, 89)
        assert t["scale_factor"] == pytest.approx(60 / 43)  # the resize rule's factor
        assert torch.equal(t["boxes"], torch.tensor([[0.0, 0.0, 89.0, 60.0]]))
        half = [[44.5, 0.0, 89.0, 60.0]] if flip == 0.0 else [[0.0, 0.0, 44.5, 60.0]]
        assert torch.equal(t["crowd_boxes"], torch.tensor(half))


def test_flip_prob_one_mirrors_image_and_boxes(tiny):
    plain = _ds(tiny, train=True, flip_prob=0.0)
    flipped = _ds(tiny, train=True, flip_prob=1.0)
    im0, t0 = plain[0]
    im1, t1 = flipped[0]
    width = im0.shape[-1]
    assert torch.equal(im1, im0.flip(-1))
    b0 = t0["boxes"]
    assert torch.equal(t1["boxes"][:, 0], width - b0[:, 2])
    assert torch.equal(t1["boxes"][:, 2], width - b0[:, 0])
    assert torch.equal(t1["boxes"][:, 1::2], b0[:, 1::2])
    assert torch.equal(t1["crowd_boxes"][:, 0], width - t0["crowd_boxes"][:, 2])
    # Evaluation never flips, whatever flip_prob says.
    im2, _ = _ds(tiny, train=False, flip_prob=1.0)[0]
    assert torch.equal(im2, im0)


def test_flip_follows_torch_rng(tiny):
    ds = _ds(tiny, train=True, flip_prob=0.5)

    def flips(seed):
        torch.manual_seed(seed)
        return [bool(ds[0][1]["boxes"][0, 0] != 20.0) for _ in range(16)]

    a, b = flips(1), flips(1)
    assert a == b and 0 < sum(a) < 16


def test_image_normalised_with_imagenet_stats(tmp_path):
    ann_file, img_dir = _write_dataset(
        tmp_path,
        images=[(1, "a.png", 8, 8)],
        anns=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 0}],
    )
    Image.fromarray(np.full((8, 8, 3), (255, 0, 128), dtype=np.uint8)).save(img_dir / "a.png")
    image, _ = CocoDetection(ann_file=ann_file, img_dir=img_dir, train=False, scale=8, max_size=8)[
        0
    ]
    for c, v in enumerate((1.0, 0.0, 128 / 255)):
        assert torch.allclose(image[c], torch.tensor((v - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


# ---- errors -----------------------------------------------------------------------------------


def test_coco_paths_layout_and_errors(tmp_path):
    with pytest.raises(MissingDataError, match=str(tmp_path / "nowhere")):
        coco_paths(tmp_path / "nowhere", "val2017")
    root = tmp_path / "coco"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        coco_paths(root, "val2017")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(DatasetError, match="val2017"):
        coco_paths(root, "val2017")
    (root / "val2017").mkdir()
    paths = coco_paths(root, "val2017")
    assert paths.ann_file == root / "annotations" / "instances_val2017.json"
    assert paths.img_dir == root / "val2017"
    assert tuple(paths) == (paths.ann_file, paths.img_dir)  # unpacks like a tuple
    with pytest.raises(MissingDataError, match="instances_minival2014.json"):
        coco_paths(root, "minival")
    with pytest.raises(DatasetError, match="unknown COCO split 'test'"):
        coco_paths(root, "test")


def test_missing_annotation_file_and_image_dir(tiny, tmp_path):
    ann_file, img_dir = tiny
    with pytest.raises(MissingDataError, match="missing.json"):
        CocoDetection(
            ann_file=tmp_path / "missing.json", img_dir=img_dir, train=True, scale=8, max_size=8
        )
    with pytest.raises(MissingDataError, match="no_images"):
        CocoDetection(
            ann_file=ann_file, img_dir=tmp_path / "no_images", train=True, scale=8, max_size=8
        )


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [1, 2')
    with pytest.raises(DatasetError, match="broken.json.*not valid JSON"):
        CocoDetection(ann_file=bad, img_dir=tmp_path / "img", train=True, scale=8, max_size=8)
    partial = tmp_path / "partial.json"
    partial.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"partial.json lacks .*'annotations'"):
        load_coco(partial)


def test_unknown_category_is_an_error(tmp_path):
    ann = [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2], "iscrowd": 0}]
    ann_file, img_dir = _write_dataset(tmp_path, images=[(1, "a.png", 8, 8)], anns=ann)
    with pytest.raises(DatasetError, match="category_id 99"):
        CocoDetection(ann_file=ann_file, img_dir=img_dir, train=True, scale=8, max_size=8)


def test_missing_image_file_named_on_read(tiny):
    ann_file, img_dir = tiny
    ds = _ds(tiny)
    (img_dir / "b.png").unlink()
    _ = ds[0]  # other images still load
    with pytest.raises(MissingDataError, match="b.png"):
        ds[1]


def test_image_files_checked_with_one_listing(tiny, monkeypatch):
    # 118k stats for train2017 (minutes on a network file system, in every process): the flat
    # image folder is listed once instead; only names it lacks, or with a folder, get a stat.
    from pathlib import Path

    ann_file, img_dir = tiny
    (img_dir / "sub").mkdir()
    Image.new("RGB", (24, 24)).save(img_dir / "sub" / "d.png")
    data = json.loads(ann_file.read_text())
    data["images"][3]["file_name"] = "sub/d.png"
    ann_file.write_text(json.dumps(data))
    stats = []
    real_is_file = Path.is_file

    def counting_is_file(self, *args, **kwargs):
        if img_dir in self.parents:
            stats.append(self.relative_to(img_dir).as_posix())
        return real_is_file(self, *args, **kwargs)

    monkeypatch.setattr(Path, "is_file", counting_is_file)
    ds = _ds(tiny, skip_empty=False)
    assert len(ds) == 4 and stats == ["sub/d.png"]  # a folder in the name: its own stat
    (img_dir / "c.png").unlink()
    stats.clear()
    with pytest.raises(MissingDataError, match=r"1 of 4 image files .* first: c.png$"):
        _ds(tiny, skip_empty=False)


def test_image_size_mismatch_named(tiny):
    ann_file, img_dir = tiny
    Image.fromarray(np.zeros((31, 30, 3), dtype=np.uint8)).save(img_dir / "b.png")
    with pytest.raises(DatasetError, match="b.png is 30x31"):
        _ds(tiny)[1]


def _malformed(tmp_path, edit):
    """The tiny dataset's annotation file after `edit(data)`; returns (ann_file, img_dir)."""
    ann_file, img_dir = _write_dataset(tmp_path, anns=copy.deepcopy(ANNS))
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


def _drop(key, index, field):
    return lambda data: data[key][index].pop(field)


def _set(key, index, field, value):
    return lambda data: data[key][index].__setitem__(field, value)


@pytest.mark.parametrize(
    "edit, message",
    [
        # pycocotools' createIndex would raise a bare KeyError / TypeError on these
        (_drop("annotations", 2, "id"), r"annotations\[2\] has no 'id'"),
        (_drop("annotations", 4, "image_id"), r"annotations\[4\] \(id 5\) has no 'image_id'"),
        (_set("annotations", 4, "image_id", None), r"annotations\[4\] \(id 5\) has no 'image_id'"),
        (_drop("annotations", 1, "category_id"), r"annotations\[1\] \(id 2\) has no 'category_id'"),
        (
            _set("annotations", 0, "image_id", [1]),
            r"annotations\[0\] \(id 1\) has \[1\] as 'image_id'",
        ),
        (_drop("categories", 1, "id"), r"categories\[1\] has no 'id'"),
        (_drop("images", 3, "id"), r"images\[3\] has no 'id'"),
        (lambda d: d["annotations"].insert(3, 42), r"annotations\[3\] is 42, expected an object"),
        (lambda d: d.__setitem__("annotations", {"1": ANNS[0]}), "'annotations' must be a list"),
        (_set("categories", 0, "id", "3"), r"categories\[0\] has id '3', expected an integer"),
        # the float conversion of the box would raise a bare ValueError / TypeError
        (_set("annotations", 4, "bbox", ["a", 1, 2, 3]), r"annotation 5 has bbox \['a', 1, 2, 3\]"),
        (
            _set("annotations", 4, "bbox", [1, None, 2, 3]),
            r"annotation 5 has bbox \[1, None, 2, 3\]",
        ),
        (_set("annotations", 1, "bbox", [1, 1, float("nan"), 3]), "annotation 2 has bbox .*finite"),
        # silently wrong before: pycocotools keeps the last of two images with one id
        (
            lambda d: d["images"].append({**d["images"][0], "file_name": "z.png"}),
            r"image id 1 is listed twice in 'images' \(a.png and z.png\)",
        ),
        (_set("images", 1, "width", 0), r"image 2 \(b.png\) has size 0x30 \(w x h\)"),
        # COCOeval would fail on these at the first evaluation, after the training
        (_set("annotations", 3, "area", "12"), r"annotations\[3\] \(id 4\) has '12' as 'area'"),
        (_set("annotations", 0, "iscrowd", "0"), r"annotations\[0\] \(id 1\) has '0' as 'iscrowd'"),
    ],
    ids=[
        "ann-no-id",
        "ann-no-image_id",
        "ann-null-image_id",
        "ann-no-category_id",
        "ann-list-image_id",
        "cat-no-id",
        "image-no-id",
        "ann-is-int",
        "anns-not-list",
        "cat-str-id",
        "bbox-str",
        "bbox-null",
        "bbox-nan",
        "image-id-twice",
        "image-width-0",
        "area-str",
        "iscrowd-str",
    ],
)
def test_malformed_annotation_names_file_entry_and_field(tmp_path, edit, message):
    ann_file, img_dir = _malformed(tmp_path, edit)
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(ann_file=ann_file, img_dir=img_dir, train=True, scale=8, max_size=8)
    assert str(ann_file) in str(err.value)


def test_load_coco_names_the_malformed_entry(tmp_path):
    # The evaluation loads its ground truth with load_coco alone: the same checks apply there.
    ann_file, _ = _malformed(tmp_path, _drop("annotations", 6, "id"))
    with pytest.raises(DatasetError, match=r"ann.json: annotations\[6\] has no 'id'"):
        load_coco(ann_file)


def test_missing_image_files_found_at_construction(tiny):
    ann_file, img_dir = tiny
    for name in ("b.png", "c.png", "d.png"):
        (img_dir / name).unlink()
    # skip_empty leaves images 5 and 9 (c.png, d.png) out: only b.png is missing of the 2 used.
    with pytest.raises(MissingDataError, match=r"images: 1 of 2 image files .* first: b.png$"):
        _ds(tiny, skip_empty=True)
    with pytest.raises(MissingDataError) as err:
        _ds(tiny, skip_empty=False)
    msg = str(err.value)
    assert str(img_dir) in msg and "3 of 4 image files" in msg and str(ann_file) in msg
    assert msg.endswith("first: b.png, c.png, d.png")


def _coco_layout(root, train_cats, val_cats):
    """A COCO-layout root (annotations/instances_*2017.json, train2017/, val2017/)."""
    for split, cats in (("train2017", train_cats), ("val2017", val_cats)):
        anns = [a for a in copy.deepcopy(ANNS) if a["category_id"] in {c["id"] for c in cats}]
        ann_file, img_dir = _write_dataset(root / "written" / split, anns=anns, cats=cats)
        (root / "annotations").mkdir(exist_ok=True)
        ann_file.rename(root / "annotations" / f"instances_{split}.json")
        img_dir.rename(root / split)
    return {
        "kind": "coco",
        "root": str(root),
        "train_split": "train2017",
        "val_split": "val2017",
        "scale": 80,
        "max_size": 1000,
        "num_classes": len(train_cats),
    }


def test_build_datasets_checks_train_and_val_categories(tmp_path):
    data = _coco_layout(tmp_path / "ok", CATS, CATS)
    ds = build_datasets(data, max_level=5)
    assert ds.num_classes == 3 and ds.val.label_to_cat_id == ds.train.label_to_cat_id
    # The existing num_classes message is kept.
    with pytest.raises(ValueError, match="data.num_classes=4 but .*has 3 categories"):
        build_datasets({**data, "num_classes": 4}, max_level=5)
    # val lacks a category: labels past its last class would crash the final evaluation.
    data = _coco_layout(tmp_path / "fewer", CATS, CATS[:2])
    with pytest.raises(DatasetError) as err:
        build_datasets(data, max_level=5)
    msg = str(err.value)
    assert "instances_val2017.json" in msg and "instances_train2017.json" in msg
    assert "only in train [11], only in val []" in msg
    # Same count, other ids: every label would silently mean another category.
    data = _coco_layout(tmp_path / "other", CATS, [*CATS[:2], {"id": 12, "name": "cat12"}])
    with pytest.raises(DatasetError, match=r"only in train \[11\], only in val \[12\]"):
        build_datasets(data, max_level=5)


# ---- collate and loader -------------------------------------------------------------------------


def test_collate_pads_to_multiple_top_left():
    a = torch.ones(3, 50, 70)
    b = torch.full((3, 130, 20), 2.0)
    ta, tb = {"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(1, 4)}
    images, targets, sizes = collate([(a, ta), (b, tb)], size_divisible=64)
    assert images.shape == (2, 3, 192, 128)  # 130 -> 192, 70 -> 128
    assert sizes == [(50, 70), (130, 20)]
    assert targets[0] is ta and targets[1] is tb
    assert torch.equal(images[0, :, :50, :70], a) and images[0].sum() == a.sum()
    assert torch.equal(images[1, :, :130, :20], b) and images[1].sum() == b.sum()


def test_collate_exact_multiple_adds_no_padding():
    images, _, _ = collate([(torch.ones(3, 128, 256), {})], size_divisible=128)
    assert images.shape == (1, 3, 128, 256)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    data = list(range(20))
    s = EpochShuffleSampler(data, seed=3)
    e0 = list(s)
    assert sorted(e0) == data and e0 != data
    assert list(s) == e0  # re-iterating the same epoch gives the same order
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == data and e1 != e0
    other = EpochShuffleSampler(data, seed=3)
    other.set_epoch(1)
    assert list(other) == e1  # recreated without replaying epoch 0
    assert list(EpochShuffleSampler(data, seed=4)) != e0
    # With draws: the same order, each index with its augmentation draw in [0, 1).
    drawn = list(EpochShuffleSampler(data, seed=3, with_draws=True))
    assert [i for i, _ in drawn] == e0
    assert all(0 <= u < 1 for _, u in drawn) and len({u for _, u in drawn}) == len(data)


def test_build_loader_train_and_eval(tiny):
    ds = _ds(tiny, skip_empty=False, train=True, flip_prob=0.0)
    train = build_loader(ds, batch_size=3, train=True, num_workers=0, seed=0, size_divisible=32)
    batches = list(train)
    assert len(batches) == 1  # 4 images, batch 3, drop_last
    images, targets, sizes = batches[0]
    assert images.shape[0] == 3 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert not train.pin_memory or torch.cuda.is_available()
    ev = build_loader(ds, batch_size=3, train=False, num_workers=0)
    ids = [t["image_id"] for _, targets, _ in ev for t in targets]
    assert ids == [1, 2, 5, 9]  # dataset order, the last partial batch kept
    with pytest.raises(ValueError, match="fewer than batch_size") as err:
        build_loader(ds, batch_size=8, train=True, num_workers=0)
    assert "ann.json" in str(err.value) and "skip_empty" not in str(err.value)


def test_distributed_eval_loader_shards_every_image_once(tiny, monkeypatch):
    # 4 images over 3 ranks: DistributedSampler padded the shards to 2 + 2 + 2 by repeating
    # images, which a gathered COCO evaluation would count twice.
    ds = _ds(tiny, skip_empty=False)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, _r=rank, **k: _r)
        loader = build_loader(ds, batch_size=2, train=False, num_workers=0, distributed=True)
        shards.append([t["image_id"] for _, targets, _ in loader for t in targets])
    assert shards == [[1, 9], [2], [5]]


def test_build_loader_too_few_images_names_file_and_skip_empty(tiny):
    # Two of the four images have no usable box; skip_empty leaves 2 < batch_size 3.
    ds = _ds(tiny, skip_empty=True, train=True)
    with pytest.raises(ValueError) as err:
        build_loader(ds, batch_size=3, train=True, num_workers=0)
    msg = str(err.value)
    assert f"training set ({tiny[0]}) has 2 images, fewer than batch_size=3" in msg
    assert "2 of its 4 images were skipped" in msg and "data.skip_empty is true" in msg
    # Any dataset: its type is named instead of a file.
    with pytest.raises(ValueError, match=r"training set \(list\) has 2 images"):
        build_loader([0, 1], batch_size=3, train=True, num_workers=0)


@pytest.mark.slow
def test_loader_flips_reproducible_with_workers(tiny):
    ds = _ds(tiny, skip_empty=False, train=True, flip_prob=0.5)

    def run(seed, workers=2):
        loader = build_loader(ds, batch_size=2, train=True, num_workers=workers, seed=seed)
        out = []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            for _, targets, _ in loader:
                out += [(t["image_id"], tuple(t["boxes"].flatten().tolist())) for t in targets]
        return out

    a, b = run(0), run(0)
    assert a == b
    assert run(1) != a
    # The flips come with the sampler's order, not from the process that loads the image: the
    # same batches with no worker, one, or two (num_workers is not part of a trial's identity).
    assert run(0, workers=0) == a and run(0, workers=1) == a
    # ... and they are flips: the same image appears both ways over the epochs.
    by_id = {}
    for image_id, boxes in a:
        by_id.setdefault(image_id, set()).add(boxes)
    assert any(len(v) == 2 for v in by_id.values())


def _official_coco_root(root):
    """A tiny COCO 2017 in the official layout: JPEGs, COCO's category ids 1 / 44 / 90 (labels
    0..2), a crowd region, a val image without annotations, odd image sizes."""
    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}, {"id": 90, "name": "brush"}]
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train2017", 8), ("val2017", 3)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            h, w = 61 + 7 * i, 97 - 5 * i
            image_id = 139 + 1000 * i
            k = 0 if (split == "val2017" and i == 0) else 2
            for j in range(k):
                bbox = [3.0 + 20 * j, 5.0, 17.0 + 3 * i, 21.0]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": cats[(i + j) % 3]["id"],
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": int(j == 1 and i == 1),
                        "segmentation": [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], 9.0, 9.0]],
                    }
                )
            name = f"{image_id:012d}.jpg"
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_a_run_on_the_official_coco_layout_evaluates_every_val_image(tmp_path, monkeypatch):
    # The whole path of `data=coco`: the official layout, labels back to COCO's category ids,
    # every val image (the one without annotations too) given to COCOeval.
    from helpers import compose_config

    from retina_sweep import evaluation
    from retina_sweep.train import run

    _official_coco_root(tmp_path / "coco")
    seen = {}
    real_coco_evaluate = evaluation.coco_evaluate

    def spy(coco_gt, detections, **kwargs):
        seen.update(detections=list(detections), img_ids=list(kwargs["img_ids"]))
        return real_coco_evaluate(coco_gt, detections, **kwargs)

    monkeypatch.setattr(evaluation, "coco_evaluate", spy)
    cfg = compose_config(
        [
            "scale=smoke",
            "data=coco",
            f"data.root={tmp_path / 'coco'}",
            "data.num_classes=3",
            "data.scale=48",
            "data.max_size=64",
            "model.inference.score_thresh=0.0",
            "tracking=none",
            f"paths.root={tmp_path}/sweeps",
        ]
    )
    ap = run(cfg)
    assert 0.0 <= ap <= 100.0
    assert sorted(seen["img_ids"]) == [139, 1139, 2139]
    dets = seen["detections"]
    assert dets and {d["category_id"] for d in dets} <= {1, 44, 90}
    assert {d["image_id"] for d in dets} <= {139, 1139, 2139}
