"""The synthetic proxy: deterministic, cached, atomic, COCO-valid, and annotated exactly."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retina_sweep.data import synthetic
from retina_sweep.data.coco import CocoDetection
from retina_sweep.data.synthetic import (
    SHAPES,
    SyntheticParams,
    class_table,
    default_cache_dir,
    generate,
)

# A tiny proxy: a few images, but with every feature switched on.
TINY = dict(
    image_size=(64, 96),
    num_train=5,
    num_val=3,
    objects_per_image=(2, 5),
    distractors_per_image=(1, 2),
    crowd_prob=0.5,
    min_object_size=8.0,
)


def _digest(root):
    """sha256 over every file (name and bytes) under root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate(tmp_path / "a", workers=1, **TINY)
    b = generate(tmp_path / "b", workers=1, **TINY)
    assert a.generated and b.generated and a.key == b.key
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert _digest(a.root) == _digest(b.root)
    c = generate(tmp_path / "c", workers=1, **{**TINY, "seed": 1})
    assert c.key != a.key
    assert c.train_json.read_bytes() != a.train_json.read_bytes()
    assert (c.train_images / "000001.png").read_bytes() != (
        a.train_images / "000001.png"
    ).read_bytes()


def test_json_is_valid_coco(tmp_path):
    s = generate(tmp_path, workers=1, **TINY)
    for json_file, img_dir, n in ((s.train_json, s.train_images, 5), (s.val_json, s.val_images, 3)):
        coco = COCO(str(json_file))  # pycocotools' own loader accepts it
        assert len(coco.imgs) == n and len(coco.cats) == s.num_classes == 8
        assert sorted(coco.cats) == list(range(1, 9))
        assert len(list(img_dir.glob("*.png"))) == n
        for img in coco.imgs.values():
            with Image.open(img_dir / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (96, 64)
                assert im.mode == "RGB"
        assert len(coco.anns) > 0
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 64
            assert 0 < ann["area"] <= w * h  # visible mask area inside the box
            assert ann["iscrowd"] in (0, 1)
    assert json.loads(s.train_json.read_text())["info"]["key"] == s.key


def test_annotations_match_pixels_exactly():
    # Grey background (no saturation, no clutter, no noise), one object, no occluder: the
    # saturated object pixels are exactly the annotated mask.
    p = SyntheticParams(
        image_size=(64, 96),
        objects_per_image=(1, 1),
        distractors_per_image=(0, 0),
        crowd_prob=0.0,
        clutter=(0, 0),
        background_saturation=0.0,
        texture_strength=0.0,
        truncation=0.0,
        min_object_size=8.0,
    )
    checked = 0
    for i in range(12):
        image, anns = synthetic._render_image(np.random.default_rng([0, 1, i]), p)
        rgb = image.astype(int)
        colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
        ys, xs = np.nonzero(colourful)
        if not anns:
            assert not colourful.any()
            continue
        (ann,) = anns
        assert ann["iscrowd"] == 0
        assert ann["area"] == colourful.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        checked += 1
    assert checked >= 10


def test_occluded_objects_become_crowd_or_are_dropped():
    base = dict(
        image_size=(64, 64),
        objects_per_image=(8, 8),
        distractors_per_image=(0, 0),
        crowd_prob=0.0,
        max_overlap=1.0,
        truncation=0.0,
    )
    crowd = keep = 0
    for i in range(10):
        rng = np.random.default_rng([0, 1, i])
        _, anns = synthetic._render_image(rng, SyntheticParams(**base))
        crowd += sum(a["iscrowd"] for a in anns)
        rng = np.random.default_rng([0, 1, i])
        _, anns2 = synthetic._render_image(rng, SyntheticParams(**base, occluded_as_crowd=False))
        assert all(a["iscrowd"] == 0 for a in anns2)
        # Same drawing: the only difference is that the hidden objects are left out.
        assert [a for a in anns if not a["iscrowd"]] == anns2
        keep += len(anns2)
    assert crowd > 0 and keep > 0


def test_box_noise_moves_each_edge_by_its_std_and_leaves_the_pixels_alone():
    base = dict(image_size=(96, 128), objects_per_image=(3, 6), crowd_prob=0.3, truncation=0.0)
    exact, noisy = SyntheticParams(**base), SyntheticParams(**base, box_noise=0.05)
    rel = []  # (edge displacement) / (the side along its axis), unclipped edges only
    crowds = 0
    for i in range(60):
        img0, anns0 = synthetic._render_image(np.random.default_rng([0, 1, i]), exact)
        img1, anns1 = synthetic._render_image(np.random.default_rng([0, 1, i]), noisy)
        # The noise is drawn after the image: the same pixels, the same objects.
        np.testing.assert_array_equal(img0, img1)
        assert [(a["category_id"], a["area"], a["iscrowd"]) for a in anns0] == [
            (a["category_id"], a["area"], a["iscrowd"]) for a in anns1
        ]
        for a0, a1 in zip(anns0, anns1, strict=True):
            if a0["iscrowd"]:  # an ignore region is not a box anyone aims at
                assert a1["bbox"] == a0["bbox"]
                crowds += 1
                continue
            x, y, w, h = a0["bbox"]
            u, v, uw, vh = a1["bbox"]
            assert uw >= 1 and vh >= 1 and u >= 0 and v >= 0 and u + uw <= 128 + 1e-6
            for moved, side, edge, limit in (
                (u - x, w, u, 127),
                (v - y, h, v, 95),
                (u + uw - (x + w), w, u + uw, 128),
                (v + vh - (y + h), h, v + vh, 96),
            ):
                if 0 < edge < limit:  # not clipped by the image border
                    rel.append(moved / side)
    rel = np.asarray(rel)
    assert crowds > 0 and len(rel) > 500
    # n > 500 draws: the std's standard error is under 0.0016, the mean's under 0.0023.
    assert abs(rel.std() - 0.05) < 0.006
    assert abs(rel.mean()) < 0.008  # zero-mean: the boxes are not biased bigger or smaller


def test_box_noise_zero_keeps_the_cache_key_of_the_datasets_made_before_it():
    p = SyntheticParams(**TINY)
    params = p.as_dict()
    assert params["box_noise"] == 0.0
    del params["box_noise"]
    blob = json.dumps({"version": synthetic.GENERATOR_VERSION, "params": params}, sort_keys=True)
    assert p.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert SyntheticParams(**TINY, box_noise=0.03).key() != p.key()
    with pytest.raises(ValueError, match="synthetic.box_noise=0.5"):
        SyntheticParams(**TINY, box_noise=0.5)


def test_class_grid_needs_shape_and_colour():
    table = class_table(8, 2)
    assert len(set(table)) == 8
    shapes = {s for s, _, _ in table}
    colours = {c for _, c, _ in table}
    assert len(shapes) == 4 and len(colours) == 2
    for s in shapes:  # every shape in every class colour: shape alone is not enough
        assert {c for s2, c, _ in table if s2 == s} == colours
    for c in colours:  # every colour on several shapes: colour alone is not enough
        assert len({s2 for s2, c2, _ in table if c2 == c}) == 4
    # Distractors are never a class, and include class shapes in class colours' complement
    # and non-class shapes in class colours.
    p = SyntheticParams()
    distractors = synthetic._distractor_table(p)
    class_pairs = {(s, rgb) for s, _, rgb in table}
    assert not class_pairs & set(distractors)
    class_rgbs = {rgb for _, _, rgb in table}
    assert any(s in shapes and rgb not in class_rgbs for s, rgb in distractors)
    assert any(s not in shapes and rgb in class_rgbs for s, rgb in distractors)
    assert set(SHAPES) >= {s for s, _ in distractors}


def test_cache_hit_does_not_regenerate(tmp_path, monkeypatch):
    first = generate(tmp_path, workers=1, **TINY)
    mtime = first.train_json.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("drawing on a cache hit")

    monkeypatch.setattr(synthetic, "_render_image", boom)
    # The same values spelled differently (YAML lists, ints for floats) are the same dataset.
    again = generate(tmp_path, workers=1, **{**TINY, "image_size": [64, 96], "min_object_size": 8})
    assert not again.generated and again.root == first.root
    assert again.train_json.stat().st_mtime_ns == mtime
    # Any other parameter is another dataset.
    with pytest.raises(AssertionError, match="drawing"):
        generate(tmp_path, workers=1, **{**TINY, "max_aspect": 2.0})


def test_interrupted_generation_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    real = synthetic._render_image
    calls = {"n": 0}

    def dies_on_fourth(rng, p):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(rng, p)

    monkeypatch.setattr(synthetic, "_render_image", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, workers=1, **TINY)
    assert list(tmp_path.iterdir()) == []  # no final folder, temp folder removed
    monkeypatch.setattr(synthetic, "_render_image", real)
    # A temp folder left by a killed process is neither reused nor in the way.
    key = SyntheticParams(**TINY).key()
    stale = tmp_path / f".{key}.tmp-killed"
    (stale / "train").mkdir(parents=True)
    s = generate(tmp_path, workers=1, **TINY)
    assert s.generated and s.root == tmp_path / key
    assert len(list(s.train_images.glob("*.png"))) == 5


def test_concurrent_generation_loser_uses_winner(tmp_path, monkeypatch):
    # Simulate a race: while this call is still drawing, another process completes the same
    # parameters. This call's rename must fail, and it must fall back to the winner's folder.
    real_write = synthetic._write_split
    state = {"raced": False}

    def racing_write(p, split, n, tmp, workers, pool):
        if not state["raced"]:
            state["raced"] = True
            winner = generate(tmp_path, workers=1, **TINY)
            (winner.root / "winner").write_text("1")
        return real_write(p, split, n, tmp, workers, pool)

    monkeypatch.setattr(synthetic, "_write_split", racing_write)
    s = generate(tmp_path, workers=1, **TINY)
    assert not s.generated
    assert (s.root / "winner").exists()  # the winner's copy, untouched
    assert [d.name for d in tmp_path.iterdir()] == [s.key]  # the loser's temp folder is gone


def test_unknown_or_bad_parameters(tmp_path):
    with pytest.raises(TypeError, match="num_clases"):
        generate(tmp_path, num_clases=8)
    with pytest.raises(ValueError, match="synthetic.num_classes=17"):
        generate(tmp_path, num_classes=17, num_colors=2)
    with pytest.raises(ValueError, match="synthetic.objects_per_image"):
        generate(tmp_path, objects_per_image=(3, 1))
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINA_SWEEP_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "synthetic"
    s = generate(None, workers=1, **{**TINY, "num_train": 1, "num_val": 1})
    assert s.root.parent == tmp_path / "cache" / "synthetic"
    monkeypatch.delenv("RETINA_SWEEP_CACHE")
    assert default_cache_dir() == synthetic.Path.home() / ".cache" / "retina_sweep" / "synthetic"


def test_reads_as_coco_detection(tmp_path):
    s = generate(tmp_path, workers=1, **TINY)
    ds = CocoDetection(
        ann_file=s.train_json, img_dir=s.train_images, train=True, scale=64, max_size=96
    )
    assert ds.num_classes == 8
    image, target = ds[0]
    assert image.shape == (3, 64, 96) and target["scale_factor"] == 1.0
    assert target["labels"].min() >= 0 and target["labels"].max() < 8


@pytest.mark.slow
def test_worker_processes_do_not_change_the_bytes(tmp_path):
    params = {**TINY, "num_train": 12, "num_val": 4}
    one = generate(tmp_path / "one", workers=1, **params)
    two = generate(tmp_path / "two", workers=2, **params)
    assert _digest(one.root) == _digest(two.root)
    assert os.listdir(tmp_path / "two") == [two.key]
