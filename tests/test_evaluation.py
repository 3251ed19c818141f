"""COCO evaluation: hand-computed APs, empty inputs, and the detector-to-COCO mapping."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from retina_sweep.config import OBJECTIVES
from retina_sweep.data.coco import CocoDetection, load_coco
from retina_sweep.data.loader import build_loader
from retina_sweep.evaluation import (
    coco_evaluate,
    evaluate,
    format_per_category,
    per_category_ap,
    per_category_metrics,
    per_category_table,
    to_coco_results,
)


def _gt(tmp_path, boxes_per_image, cats=(1,), sizes=None, names=None):
    """A COCO ground truth: boxes_per_image[i] = [(cat, [x, y, w, h]), ...] for image i + 1;
    `names` = {cat: name} gives categories a name (else they have none)."""
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        h, w = sizes[i] if sizes else (200, 200)
        images.append({"id": i + 1, "file_name": f"{i + 1}.png", "height": h, "width": w})
        for cat, bbox in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, **({"name": names[c]} if names else {})} for c in cats]
    data = {"images": images, "annotations": anns, "categories": categories}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return load_coco(path)


def _det(image_id, bbox, score, cat=1):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


# Four 50 x 50 boxes (area 2500: "medium") in one image.
FOUR = [(1, [0, 0, 50, 50]), (1, [100, 0, 50, 50]), (1, [0, 100, 50, 50]), (1, [100, 100, 50, 50])]


def test_perfect_detections_give_100(tmp_path):
    gt = _gt(tmp_path, [FOUR, [(1, [10, 10, 20, 20])]])
    dets = [_det(1, b, 0.9) for _, b in FOUR] + [_det(2, [10, 10, 20, 20], 0.8)]
    m = coco_evaluate(gt, dets)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "AR100"):
        assert m[k] == pytest.approx(100.0), k
    assert math.isnan(m["APl"])  # no large object: undefined, not a fake number
    assert m["stats"][5] == -1.0 and len(m["stats"]) == 12
    assert (
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
        in m["summary"]
    )


def test_half_found_exactly(tmp_path):
    # 2 of 4 found, no false positive: precision 1 up to recall 0.5, then 0. The 101-point
    # interpolation counts recall thresholds 0.00..0.50 (51 of 101), at every IoU threshold.
    gt = _gt(tmp_path, [FOUR])
    m = coco_evaluate(gt, [_det(1, FOUR[0][1], 0.9), _det(1, FOUR[1][1], 0.8)])
    assert m["AP"] == pytest.approx(100 * 51 / 101)
    assert m["AP50"] == m["AP75"] == pytest.approx(100 * 51 / 101)
    assert m["AR100"] == pytest.approx(50.0)


def test_half_found_after_a_false_positive(tmp_path):
    # Ranked: FP (0.95), TP (0.9), TP (0.8). Precision after each: 0, 1/2, 2/3 at recall 0,
    # 1/4, 1/2; interpolated (max to the right) 2/3 for every recall threshold <= 0.5.
    # AP = 51 * (2/3) / 101 = 34 / 101.
    gt = _gt(tmp_path, [FOUR])
    dets = [
        _det(1, [60, 60, 30, 30], 0.95),
        _det(1, FOUR[0][1], 0.9),
        _det(1, FOUR[1][1], 0.8),
    ]
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(100 * 34 / 101)


def test_iou_thresholds(tmp_path):
    # One gt, one detection of IoU 0.62: a true positive at IoU 0.50, 0.55, 0.60 (3 of the 10
    # thresholds), a miss above. AP = 3/10, AP50 = 100, AP75 = 0.
    gt = _gt(tmp_path, [[(1, [0, 0, 100, 100])]])
    m = coco_evaluate(gt, [_det(1, [0, 0, 100, 62], 0.9)])
    assert m["AP"] == pytest.approx(30.0)
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["APl"] == pytest.approx(30.0)  # area 10000 >= 96^2


def test_false_positive_on_image_without_ground_truth(tmp_path):
    # Image 2 has no gt: its detection is a false positive ranked above the true positive.
    gt = _gt(tmp_path, [[(1, [0, 0, 50, 50])], []])
    m = coco_evaluate(gt, [_det(2, [0, 0, 50, 50], 0.9), _det(1, [0, 0, 50, 50], 0.5)])
    assert m["AP"] == pytest.approx(50.0)
    # Restricted to image 1, the false positive is out of scope.
    assert coco_evaluate(
        gt, [_det(2, [0, 0, 50, 50], 0.9), _det(1, [0, 0, 50, 50], 0.5)], img_ids=[1]
    )["AP"] == pytest.approx(100.0)


def test_no_detections_give_zero(tmp_path):
    gt = _gt(tmp_path, [FOUR, []])
    m = coco_evaluate(gt, [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
    assert math.isnan(m["APs"])


def test_area_thresholds_are_configurable(tmp_path):
    gt = _gt(tmp_path, [[(1, [0, 0, 50, 50])]])  # area 2500: medium for COCO
    dets = [_det(1, [0, 0, 50, 50], 0.9)]
    assert math.isnan(coco_evaluate(gt, dets)["APs"])
    m = coco_evaluate(gt, dets, area_thresholds=(64, 128))  # now small
    assert m["APs"] == pytest.approx(100.0) and math.isnan(m["APm"])


def test_quiet_and_inputs_untouched(tmp_path):
    gt = _gt(tmp_path, [FOUR])
    dets = [_det(1, FOUR[0][1], 0.9)]
    before = json.dumps(dets)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_evaluate(gt, dets, quiet=True)
    assert out.getvalue() == ""
    assert json.dumps(dets) == before  # loadRes adds keys; it got copies
    with contextlib.redirect_stdout(out):
        coco_evaluate(gt, dets, quiet=False)
    assert "Average Precision" in out.getvalue()


def test_detections_must_match_gt(tmp_path):
    gt = _gt(tmp_path, [FOUR])
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[7\]"):
        coco_evaluate(gt, [_det(7, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match=r"category ids .*\[0\].*label_to_cat_id"):
        coco_evaluate(gt, [_det(1, [0, 0, 5, 5], 0.5, cat=0)])


def test_to_coco_results_maps_back():
    out = {
        "boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [-4.0, 0.0, 300.0, 20.0]]),
        "scores": torch.tensor([0.9, 0.3]),
        "labels": torch.tensor([1, 0]),
    }
    res = to_coco_results(
        out, image_id=4, scale_factor=2.0, orig_size=(40, 100), label_to_cat_id=torch.tensor([5, 9])
    )
    assert res[0] == {
        "image_id": 4,
        "category_id": 9,
        "bbox": [10.0, 5.0, 20.0, 20.0],
        "score": pytest.approx(0.9),
    }
    # Clipped to the original image (w = 100) after dividing by the factor.
    assert res[1]["bbox"] == [0.0, 0.0, 100.0, 10.0] and res[1]["category_id"] == 5


def test_to_coco_results_divides_by_the_whole_pixel_ratios():
    # A 43 x 64 image resized by the rule's factor 60 / 43 to 60 x 89 whole pixels: a detection
    # of the whole resized image is the whole original image (dividing by the factor gave a
    # width of 63.78).
    out = {
        "boxes": torch.tensor([[0.0, 0.0, 89.0, 60.0], [44.5, 30.0, 89.0, 45.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([0, 0]),
    }
    res = to_coco_results(
        out,
        image_id=1,
        scale_factor=60 / 43,
        orig_size=(43, 64),
        label_to_cat_id=torch.tensor([1]),
        image_size=(60, 89),
    )
    assert res[0]["bbox"] == [0.0, 0.0, 64.0, 43.0]
    assert res[1]["bbox"] == pytest.approx([32.0, 21.5, 32.0, 10.75])


def test_evaluate_maps_back_by_the_loader_image_sizes(tmp_path):
    _gt(tmp_path, [[(1, [0, 0, 64, 43])]], sizes=[(43, 64)])
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((43, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / "1.png")
    ds = CocoDetection(
        ann_file=tmp_path / "gt.json", img_dir=tmp_path / "img", train=False, scale=60, max_size=99
    )
    loader = build_loader(ds, batch_size=1, train=False, num_workers=0, size_divisible=32)
    full = {
        "boxes": torch.tensor([[0.0, 0.0, 89.0, 60.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([0]),
    }
    results = tmp_path / "results.json"
    m = evaluate(Oracle([full]), loader, ds, "cpu", results_file=results)
    assert json.loads(results.read_text())[0]["bbox"] == [0.0, 0.0, 64.0, 43.0]
    assert m["AP"] == pytest.approx(100.0)


# ---- evaluate() with a stand-in detector ---------------------------------------------------------


class Oracle(torch.nn.Module):
    """Returns given detections (network-input coordinates) in loader order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.calls = []

    def forward(self, images, targets=None, image_sizes=None):
        assert not self.training
        self.calls.append((tuple(images.shape), list(image_sizes)))
        n = images.shape[0]
        out, self.outputs = self.outputs[:n], self.outputs[n:]
        return out


@pytest.fixture
def val_set(tmp_path):
    # Three images of different sizes, categories 4 and 8 (labels 0 and 1), one image empty.
    sizes = [(40, 60), (30, 30), (50, 20)]
    boxes = [[(8, [10, 8, 20, 12]), (4, [40, 0, 20, 40])], [(4, [5, 5, 20, 10])], []]
    _gt(tmp_path, boxes, cats=(4, 8), sizes=sizes)
    return _val_dataset(tmp_path, sizes)


def _val_dataset(tmp_path, sizes) -> CocoDetection:
    """The val `CocoDetection` of `tmp_path/gt.json`, over black images of `sizes` (h, w)."""
    (tmp_path / "img").mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i + 1}.png")
    return CocoDetection(
        ann_file=tmp_path / "gt.json",
        img_dir=tmp_path / "img",
        train=False,
        scale=80,
        max_size=1000,
        skip_empty=False,
    )


def _oracle_outputs(ds):
    """The ground truth of each image as detections, in the resized input's coordinates."""
    outs = []
    for i in range(len(ds)):
        _, t = ds[i]
        outs.append(
            {
                "boxes": t["boxes"],
                "scores": torch.full((len(t["labels"]),), 0.9),
                "labels": t["labels"],
            }
        )
    return outs


def test_evaluate_oracle_scores_100_and_writes_results(val_set, tmp_path):
    loader = build_loader(val_set, batch_size=2, train=False, num_workers=0, size_divisible=32)
    model = Oracle(_oracle_outputs(val_set))
    model.train()
    results = tmp_path / "out" / "results.json"
    m = evaluate(model, loader, val_set, "cpu", results_file=results)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    assert m["num_images"] == 3 and m["num_detections"] == 3
    assert math.isfinite(m["ms_per_image"]) and m["ms_per_image"] >= 0
    assert model.training  # mode restored
    assert model.calls[0][1] == [(80, 120), (80, 80)]  # image_sizes passed through
    written = json.loads(results.read_text())
    # Boxes back in original coordinates and category ids, e.g. image 1's cat-8 box.
    assert {
        "image_id": 1,
        "category_id": 8,
        "bbox": [10.0, 8.0, 20.0, 12.0],
        "score": pytest.approx(0.9),
    } in written


def test_evaluate_max_images_scores_only_those(val_set):
    loader = build_loader(val_set, batch_size=1, train=False, num_workers=0, size_divisible=32)
    outs = _oracle_outputs(val_set)
    m = evaluate(Oracle(outs), loader, val_set, "cpu", max_images=1)
    assert m["num_images"] == 1 and m["AP"] == pytest.approx(100.0)  # image 2's gt not counted
    # Without the restriction, the missed images' boxes count.
    empty = [{k: v[:0] for k, v in o.items()} for o in outs]
    m_all = evaluate(Oracle([outs[0], *empty[1:]]), loader, val_set, "cpu")
    assert m_all["AR100"] == pytest.approx(100 * 1.5 / 2)  # cat 4: 1 of 2 found, cat 8: 1 of 1


def test_evaluate_without_detections(val_set):
    loader = build_loader(val_set, batch_size=3, train=False, num_workers=0, size_divisible=32)
    outs = [{k: v[:0] for k, v in o.items()} for o in _oracle_outputs(val_set)]
    m = evaluate(Oracle(outs), loader, val_set, "cpu")
    assert m["AP"] == 0.0 and m["num_detections"] == 0


def test_evaluate_annotations_without_area_and_iscrowd(tmp_path, caplog):
    # A COCO-format file from another converter: no "area", no "iscrowd". COCOeval needs both
    # and used to raise a bare KeyError at the first evaluation, after the training.
    sizes = [(40, 60), (30, 30)]
    boxes = [[(8, [10, 8, 20, 12]), (4, [40, 0, 20, 40])], [(4, [5, 5, 20, 10])]]
    _gt(tmp_path, boxes, cats=(4, 8), sizes=sizes)
    data = json.loads((tmp_path / "gt.json").read_text())
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"]
    (tmp_path / "gt.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="retina_sweep.data.coco"):
        ds = _val_dataset(tmp_path, sizes)
    assert "3 annotations lack 'area'" in caplog.text and "3 lack 'iscrowd'" in caplog.text
    assert sorted(a["area"] for a in ds.coco.anns.values()) == [200.0, 240.0, 800.0]
    loader = build_loader(ds, batch_size=2, train=False, num_workers=0, size_divisible=32)
    m = evaluate(Oracle(_oracle_outputs(ds)), loader, ds, "cpu")
    assert m["AP"] == pytest.approx(100.0) and m["APs"] == pytest.approx(100.0)
    assert math.isnan(m["APm"])  # every filled-in area (at most 800) is below 32^2: small


def test_detections_on_a_crowd_region_are_not_false_positives(tmp_path):
    # COCOeval's crowd rule, through load_coco: a detection inside an iscrowd=1 region is ignored
    # (neither a hit nor a false positive) and the crowd region is no ground truth to find.
    data = {
        "images": [{"id": 1, "file_name": "1.png", "height": 200, "width": 200}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 50, 50],
                "area": 2500.0,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [100, 100, 90, 90],
                "area": 8100.0,
                "iscrowd": 1,
                "segmentation": {"counts": [10000, 30000], "size": [200, 200]},
            },
        ],
        "categories": [{"id": 1}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    gt = load_coco(path)
    found = _det(1, [0, 0, 50, 50], 0.5)
    on_crowd = [_det(1, [110 + i, 110, 30, 30], 0.9) for i in range(3)]  # scored higher
    m = coco_evaluate(gt, [found, *on_crowd])
    assert m["AP"] == pytest.approx(100.0) and m["AR100"] == pytest.approx(100.0)
    # The same boxes as ordinary false positives, for contrast.
    data["annotations"][1]["iscrowd"] = 0
    path.write_text(json.dumps(data))
    m = coco_evaluate(load_coco(path), [found, *on_crowd])
    assert m["AP"] < 50.0


# ---- per-category AP ------------------------------------------------------------------------------

HALF = 100 * 51 / 101  # 2 of 4 found, no false positive (test_half_found_exactly)


def _four_classes(tmp_path):
    """cat 1 "person": found exactly; cat 2 "traffic light": its one detection lies elsewhere;
    cat 3 "bird": 2 of 4 found; cat 4 "a/b": no ground truth, one detection."""
    person, light = [0, 0, 50, 50], [100, 100, 50, 50]
    gt = _gt(
        tmp_path,
        [[(1, person), (2, light)], [(3, b) for _, b in FOUR]],
        cats=(1, 2, 3, 4),
        names={1: "person", 2: "traffic light", 3: "bird", 4: "a/b"},
    )
    dets = [
        _det(1, person, 0.9, cat=1),
        _det(1, [0, 100, 50, 50], 0.9, cat=2),  # IoU 0 with the light
        _det(2, FOUR[0][1], 0.9, cat=3),
        _det(2, FOUR[1][1], 0.8, cat=3),
        _det(1, [60, 60, 20, 20], 0.7, cat=4),
    ]
    return gt, dets


def test_per_category_ap_by_hand(tmp_path):
    gt, dets = _four_classes(tmp_path)
    m = coco_evaluate(gt, dets)
    per = m["per_category_AP"]
    assert list(per) == ["person", "traffic light", "bird", "a/b"]  # category id order
    assert per["person"] == pytest.approx(100.0)
    assert per["traffic light"] == pytest.approx(0.0)
    assert per["bird"] == pytest.approx(HALF)
    assert math.isnan(per["a/b"])  # no ground truth: undefined, not 0
    # COCOeval's own AP (stats[0]) is the mean over the classes with ground truth.
    assert m["AP"] == pytest.approx((100.0 + 0.0 + HALF) / 3)
    assert m["stats"][0] == pytest.approx((1.0 + 0.0 + 51 / 101) / 3)
    # The summary metrics mean what they meant before.
    assert m["AP50"] == pytest.approx((100.0 + 0.0 + HALF) / 3)


def test_per_category_ap_equals_pycocotools_for_one_class(tmp_path):
    # The false positive ranked first (test_half_found_after_a_false_positive): 34 / 101.
    gt = _gt(tmp_path, [FOUR], names={1: "bird"})
    dets = [_det(1, [60, 60, 30, 30], 0.95), _det(1, FOUR[0][1], 0.9), _det(1, FOUR[1][1], 0.8)]
    m = coco_evaluate(gt, dets)
    assert m["per_category_AP"] == {"bird": pytest.approx(100 * 34 / 101)}
    assert m["per_category_AP"]["bird"] == pytest.approx(100 * m["stats"][0], abs=1e-12)
    # A category without a name is shown by its id.
    unnamed = coco_evaluate(
        _gt(tmp_path, [[(1, [0, 0, 100, 100])]]), [_det(1, [0, 0, 100, 62], 0.9)]
    )
    assert unnamed["per_category_AP"] == {"1": pytest.approx(30.0)}  # test_iou_thresholds


def test_per_category_ap_of_the_evaluated_images_only(tmp_path):
    # Restricted to image 1, "bird" (image 2 only) has no ground truth: NaN, out of the mean.
    gt, dets = _four_classes(tmp_path)
    m = coco_evaluate(gt, [d for d in dets if d["image_id"] == 1], img_ids=[1])
    per = m["per_category_AP"]
    assert per["person"] == pytest.approx(100.0) and per["traffic light"] == pytest.approx(0.0)
    assert math.isnan(per["bird"]) and math.isnan(per["a/b"])
    assert m["AP"] == pytest.approx(50.0)


def test_per_category_ap_reads_iou_mean_all_areas_100_detections():
    # (T=10, R=101, K=3, A=4, M=3). Category 0: 0.5 in the all-areas / 100-detections slice and
    # 0.9 elsewhere; category 1: half its entries -1 (left out of the mean, not counted as 0),
    # the rest 0.4, and 0.2 at IoU 0.50 only; category 2: no ground truth (-1 throughout).
    p = np.full((10, 101, 3, 4, 3), 0.9)
    p[:, :, 0, 0, -1] = 0.5
    p[:, :, 1, 0, -1] = 0.4
    p[0, :, 1, 0, -1] = 0.2
    p[:, 50:, 1, 0, -1] = -1.0
    p[:, :, 2] = -1.0
    got = per_category_ap(p, ["a", "b", "c"])
    assert got["a"] == pytest.approx(50.0)
    assert got["b"] == pytest.approx(100 * (9 * 0.4 + 0.2) / 10)  # 38: mean over IoUs
    assert math.isnan(got["c"])
    with pytest.raises(ValueError, match="2 names for 3 categories"):
        per_category_ap(p, ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        per_category_ap(p, ["a", "a", "c"])


def test_duplicate_category_names_keep_their_own_ap(tmp_path):
    gt = _gt(
        tmp_path,
        [[(1, [0, 0, 50, 50]), (2, [100, 100, 50, 50])]],
        cats=(1, 2),
        names={1: "x", 2: "x"},
    )
    m = coco_evaluate(gt, [_det(1, [0, 0, 50, 50], 0.9, cat=1)])
    assert m["per_category_AP"] == {"x (id 1)": pytest.approx(100.0), "x (id 2)": 0.0}


def test_per_category_metrics_are_valid_mlflow_keys_apart_from_the_objectives():
    from mlflow.utils.validation import _validate_metric_name

    per = {
        "person": 55.5,
        "traffic light": 0.0,
        "a/b": 3.0,
        "a_b": 4.0,
        "ü:x": 1.0,
        "none": math.nan,
    }
    got = per_category_metrics(per)
    assert got == {
        "AP-person": 55.5,
        "AP-traffic light": 0.0,
        "AP-a_b": 3.0,  # "/" would make a path of the name
        "AP-a_b-2": 4.0,  # the same key after sanitising: numbered, not overwritten
        "AP-__x": 1.0,
    }
    for key in got:
        _validate_metric_name(key)
        assert key not in OBJECTIVES
    long = per_category_metrics({"n" * 300: 1.0})
    assert [len(k) for k in long] == [250]


def test_per_category_table_and_detectron2_style_text(tmp_path):
    gt, dets = _four_classes(tmp_path)
    per = coco_evaluate(gt, dets)["per_category_AP"]
    table = per_category_table(per)
    assert list(table.columns) == ["category", "AP"]
    assert list(table["category"]) == ["person", "traffic light", "bird", "a/b"]
    assert table["AP"].iloc[2] == pytest.approx(HALF) and math.isnan(table["AP"].iloc[3])
    text = format_per_category(per).splitlines()
    # Three category / AP pairs a row, filled row by row; columns padded to a common width.
    assert [c.strip() for c in text[0].split("|")[1:-1]] == ["category", "AP"] * 3
    assert text[1] == "|:---------|:--------|:--------------|:------|:---------|:-------|"
    assert len({len(line) for line in text}) == 1
    assert [c.strip() for c in text[2].split("|")[1:-1]] == [
        "person",
        "100.000",
        "traffic light",
        "0.000",
        "bird",
        f"{HALF:.3f}",
    ]
    assert [c.strip() for c in text[3].split("|")[1:-1]] == ["a/b", "nan", "", "", "", ""]
    assert format_per_category({}) == ""
