"""Cheap guarantees of the CPU proxy: dense anchors, extreme imbalance, determinism.

No test here asserts a trained AP (that is measured and written down in docs/proxy.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retina_sweep.builders import build_datasets
from retina_sweep.config import config_hash, validate
from retina_sweep.imbalance import anchor_statistics


def _proxy(tmp_path: Path, *extra: str):
    # The proxy's own knobs, with a small train split so the test generates it in a second.
    return compose_config(
        [
            "scale=proxy",
            f"data.cache_dir={tmp_path}",
            "data.synthetic.num_train=40",
            "data.synthetic.num_val=8",
            "model.backbone.pretrained=null",
            *extra,
        ]
    )


def test_proxy_keeps_dense_anchors_and_extreme_imbalance(tmp_path: Path) -> None:
    cfg = _proxy(tmp_path)
    validate(cfg)
    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all").eval()
    stats = anchor_statistics(model, data.train, num_images=40)
    h, w = cfg.data.synthetic.image_size
    # 9 anchors per location on P2..P6 of the padded image, computed by hand
    assert (cfg.model.fpn.min_level, cfg.model.fpn.max_level) == (2, 6)
    locations = sum(
        -(-h // 2**lv) * -(-w // 2**lv) for lv in range(2, 7)
    )  # ceil division per level
    assert locations == 32 * 64 + 16 * 32 + 8 * 16 + 4 * 8 + 2 * 4
    assert stats["anchors_per_image"] == 9 * locations == 24552
    assert 2 <= stats["objects_per_image"] <= 6
    assert 40 <= stats["foreground_per_image"] <= 160
    # The paper's problem: background anchors outnumber foreground ones by two orders.
    assert stats["bg_to_fg_ratio"] > 50


@pytest.mark.parametrize("scale", ["proxy", "paper"])
def test_anchors_are_four_times_their_stride_as_in_the_paper(scale: str) -> None:
    # The paper: 32 px anchors on P3 (stride 8) .. 512 px on P7 (stride 128). The proxy halves
    # the images and the anchors, so it must also halve the strides (P2..P6), or the anchor grid
    # becomes twice as coarse relative to the anchors (docs/proxy.md).
    cfg = compose_config([f"scale={scale}", "model.backbone.pretrained=null"])
    model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all")
    gen = model.anchor_generator
    first = {"proxy": 2, "paper": 3}[scale]  # P2..P6 for the half-size proxy, P3..P7 for COCO
    assert gen.strides == [2**lv for lv in range(first, first + 5)]
    for i, stride in enumerate(gen.strides):
        cell = gen.cell_anchors(i)
        side = ((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])).sqrt()
        # the smallest scale of the octave is 4x the stride, the largest 2**(2/3) times that
        assert side.min().item() == pytest.approx(4 * stride, rel=1e-5)
        assert side.max().item() == pytest.approx(4 * stride * 2 ** (2 / 3), rel=1e-5)


def test_proxy_dataset_and_config_are_deterministic(tmp_path: Path) -> None:
    a = build_datasets(_proxy(tmp_path / "a").data, max_level=7)
    b = build_datasets(_proxy(tmp_path / "b").data, max_level=7)
    ia, ta = a.val[3]
    ib, tb = b.val[3]
    assert (ia == ib).all() and (ta["boxes"] == tb["boxes"]).all()
    assert config_hash(_proxy(tmp_path)) == config_hash(_proxy(tmp_path / "other"))


def test_more_aspect_ratios_cover_more_of_the_proxys_objects(tmp_path: Path) -> None:
    # The proxy's objects span 1:3..3:1: with square anchors only, many have no anchor at IoU
    # >= 0.5 (a 3:1 box over a same-area square has IoU 0.41) and rely on low-quality matches.
    stats = {}
    for ratios in ("[1.0]", "[0.5,1.0,2.0]"):
        cfg = _proxy(tmp_path, f"model.anchors.aspect_ratios={ratios}")
        data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
        model = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all").eval()
        stats[ratios] = anchor_statistics(model, data.train, num_images=40)
    one, three = stats["[1.0]"], stats["[0.5,1.0,2.0]"]
    for s in (one, three):
        assert 0 < s["mean_best_iou"] <= 1
        assert s["foreground_per_object"] * s["objects_per_image"] == pytest.approx(
            s["foreground_per_image"]
        )
    assert three["objects_below_fg_iou_fraction"] < one["objects_below_fg_iou_fraction"]
    assert three["mean_best_iou"] > one["mean_best_iou"]


def test_proxy_long_is_the_proxy_with_twice_the_schedule() -> None:
    proxy = OmegaConf.to_container(compose_config(["scale=proxy"]), resolve=True)
    long = OmegaConf.to_container(compose_config(["scale=proxy_long"]), resolve=True)
    assert (long["train"]["iterations"], long["train"]["warmup_iters"]) == (800, 100)
    assert (proxy["train"]["iterations"], proxy["train"]["warmup_iters"]) == (400, 50)
    for cfg in (proxy, long):
        del cfg["train"]["iterations"], cfg["train"]["warmup_iters"]
    assert long == proxy  # nothing else differs: the model, data and lr steps are the proxy's
    # The same trial as `scale=proxy train.iterations=800 train.warmup_iters=100`, so the two
    # spellings share finished runs and checkpoints.
    spelled = compose_config(["train.iterations=800", "train.warmup_iters=100"])
    assert config_hash(compose_config(["scale=proxy_long"])) == config_hash(spelled)


def test_proxy_trains_the_backbone_as_the_paper_does() -> None:
    backbone = compose_config([]).model.backbone
    # Stem and res2 frozen, every batch norm frozen (Detectron's RetinaNet recipe).
    assert (backbone.freeze_at, backbone.norm) == (2, "frozen_bn")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_the_diagnostic_commands_print_their_usage(flag: str, capsys) -> None:
    # Hydra would read "--help" as a malformed override and fail with a parser traceback.
    from retina_sweep import imbalance
    from retina_sweep.report import __main__ as report_cli

    assert imbalance.main([flag]) == 0
    assert "python -m retina_sweep.imbalance [overrides]" in capsys.readouterr().out
    assert report_cli.main([flag]) == 0
    assert "figure4_run=RUN_ID" in capsys.readouterr().out
