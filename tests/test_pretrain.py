"""The proxy's pretrained backbone: trained once, cached by content, loadable by the detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config

from retina_sweep import pretrain
from retina_sweep.config import ConfigError, validate
from retina_sweep.model.backbone import ResNetBackbone
from retina_sweep.pretrain import PretrainRecipe, synthetic_pretrained_backbone

TINY = dict(num_train=12, num_val=4, image_size=[64, 128], seed=3)
RECIPE = PretrainRecipe(steps=3, batch_size=8, crop=32)


def test_pretrained_backbone_is_cached_and_loads(tmp_path: Path, monkeypatch, caplog) -> None:
    with caplog.at_level("INFO", logger="retina_sweep.pretrain"):
        path = synthetic_pretrained_backbone(
            depth=10, norm="bn", synthetic=TINY, cache_dir=tmp_path, recipe=RECIPE
        )
    # Progress on the way (a long recipe takes minutes), then the summary line.
    assert "step 1/3" in caplog.text and "step 2/3" in caplog.text
    assert "pretrained ResNet-10 on 24 synthetic crops" in caplog.text
    assert path.exists() and path.parent == tmp_path / "pretrained"
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)

    # A second call with the same dataset and recipe reuses the file without training.
    def boom(*a, **k):
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(pretrain, "_load_split", boom)
    assert (
        synthetic_pretrained_backbone(
            depth=10, norm="bn", synthetic=TINY, cache_dir=tmp_path, recipe=RECIPE
        )
        == path
    )
    # frozen_bn is pretrained with real BN: it shares the bn weights instead of retraining.
    assert (
        synthetic_pretrained_backbone(
            depth=10, norm="frozen_bn", synthetic=TINY, cache_dir=tmp_path, recipe=RECIPE
        )
        == path
    )
    # Another dataset is another key.
    with pytest.raises(AssertionError, match="retrained"):
        synthetic_pretrained_backbone(
            depth=10, norm="bn", synthetic={**TINY, "seed": 4}, cache_dir=tmp_path, recipe=RECIPE
        )

    backbone = ResNetBackbone(depth=10, pretrained=path, norm="bn")
    for key, value in state.items():
        torch.testing.assert_close(backbone.state_dict()[key], value, msg=key)
    # It learned something: the first conv moved away from a fresh init with the same seed.
    torch.manual_seed(RECIPE.seed)
    fresh = ResNetBackbone(depth=10, norm="bn")
    assert not torch.allclose(fresh.conv1.weight, backbone.conv1.weight)


def test_synthetic_pretraining_needs_the_synthetic_dataset() -> None:
    cfg = compose_config(["data=coco", "data.root=/x", "model.backbone.pretrained=synthetic"])
    with pytest.raises(ConfigError, match=r"model\.backbone\.pretrained"):
        validate(cfg)


def test_parallel_trials_on_a_cold_cache_pretrain_once(tmp_path: Path) -> None:
    """Two processes asking at once: one trains, the other waits and reuses its file."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from retina_sweep import pretrain\n"
        "calls = []\n"
        "real = pretrain._pretrain\n"
        "pretrain._pretrain = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "path = pretrain.synthetic_pretrained_backbone(depth=10, norm='bn', synthetic="
        f"{TINY!r}, cache_dir=sys.argv[1], recipe=pretrain.PretrainRecipe(steps=40, "
        "batch_size=8, crop=32))\n"
        "print(json.dumps([str(path), len(calls)]))\n"
    )
    # Generate the dataset first so that both processes reach the pretraining together.
    from retina_sweep.data.synthetic import generate

    generate(tmp_path, **TINY)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0][0] == results[1][0]
    assert sorted(n for _, n in results) == [0, 1]


def test_recipe_comes_from_the_config_and_is_part_of_the_identity(monkeypatch) -> None:
    from retina_sweep import train
    from retina_sweep.config import config_hash

    # The proxy default composes the recipe node; the trial asks for exactly that recipe.
    cfg = compose_config(["model.backbone.synthetic_pretrain.steps=800"])
    validate(cfg)
    seen = {}
    monkeypatch.setattr(
        pretrain,
        "synthetic_pretrained_backbone",
        lambda **kw: seen.update(kw) or Path("/nowhere.pt"),
    )
    train.synthetic_backbone(cfg)
    assert seen["recipe"] == PretrainRecipe(steps=800)
    assert seen["depth"] == 10 and seen["norm"] == "frozen_bn"  # the bn weights, frozen

    # Another recipe is another experiment for a synthetic-pretrained trial ...
    base = config_hash(compose_config())
    assert config_hash(cfg) != base
    assert config_hash(compose_config(["model.backbone.synthetic_pretrain.lr=0.05"])) != base
    # ... spelling out a default is not (the YAML node and the dataclass agree) ...
    assert pretrain.recipe_from(compose_config().model.backbone.synthetic_pretrain) == (
        PretrainRecipe()
    )
    assert config_hash(compose_config(["model.backbone.synthetic_pretrain.steps=1600"])) == base
    # ... and the recipe is no part of a trial that does not use it (paper scale, smoke).
    for scale in ("paper", "smoke"):
        plain = config_hash(compose_config([f"scale={scale}"]))
        changed = compose_config([f"scale={scale}", "model.backbone.synthetic_pretrain.steps=9"])
        assert config_hash(changed) == plain, scale


def test_a_bad_recipe_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.backbone\.synthetic_pretrain\.steps=0"):
        validate(compose_config(["model.backbone.synthetic_pretrain.steps=0"]))
    with pytest.raises(ConfigError, match=r"unknown key model\.backbone\.synthetic_pretrain\.step"):
        validate(compose_config(["+model.backbone.synthetic_pretrain.step=1600"]))
    with pytest.raises(ValueError, match=r"synthetic_pretrain\.crops: expected one of .*crop"):
        pretrain.recipe_from({"crops": 32})
    assert pretrain.recipe_from(None) == PretrainRecipe()


def _scene():
    """Three 96 x 160 images: two objects, one object, none (boxes xyxy, labels 0..K-1)."""
    boxes = [
        torch.tensor([[10.0, 10.0, 30.0, 40.0], [100.0, 50.0, 140.0, 70.0]]),
        torch.tensor([[60.0, 20.0, 76.0, 36.0]]),
        torch.zeros((0, 4)),
    ]
    labels = [torch.tensor([2, 0]), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    return pretrain._pad_boxes(boxes, labels), boxes, labels


def test_crop_draws_follow_the_recipe() -> None:
    """Background slots first, objects grown by 1.1-1.6x around a jittered centre, background
    squares that avoid every object of their image; an image without objects gives only
    background; the same generator seed gives the same batch."""
    from torchvision.ops import box_iou

    (padded, plabels, counts), boxes, labels = _scene()
    recipe = PretrainRecipe(batch_size=256, background_fraction=0.25)
    k = 3
    idx, rois, targets, _ = pretrain._draw_rois(
        padded, plabels, counts, k, recipe, torch.Generator().manual_seed(0), (96, 160)
    )
    assert idx.shape == (256,) and rois.shape == (256, 4) and targets.shape == (256,)
    side_w, side_h = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    torch.testing.assert_close(side_w, side_h)  # squares
    assert (targets[:64] == k).all()  # the first B * background_fraction slots
    assert (targets[idx == 2] == k).all()  # no object in image 2: background only
    fg = targets < k
    # Exactly the object slots drawn on images 0 and 1, which have objects.
    assert torch.equal(fg, (torch.arange(256) >= 64) & (idx < 2))

    for j in torch.nonzero(fg).flatten().tolist():
        i, t = int(idx[j]), int(targets[j])
        b = boxes[i][labels[i] == t][0]  # the object this crop was cut around
        size = torch.maximum(b[2] - b[0], b[3] - b[1])
        assert 1.1 * size - 1e-4 <= side_w[j] <= 1.6 * size + 1e-4
        centre = (b[:2] + b[2:]) / 2
        # N(0, 0.1) of the box size: 6 sigma is never reached with this seed and batch.
        assert ((rois[j, :2] + rois[j, 2:]) / 2 - centre).abs().max() < 0.6 * size

    bg = ~fg
    assert (side_w[bg] >= 12).all() and (side_w[bg] <= 12 + 0.6 * 96 + 1e-4).all()
    assert (rois[bg, :2] >= 0).all() and (rois[bg, 2] <= 160).all() and (rois[bg, 3] <= 96).all()
    for j in torch.nonzero(bg & (idx < 2)).flatten().tolist():
        assert float(box_iou(rois[j : j + 1], boxes[int(idx[j])]).max()) < 0.2

    again = pretrain._draw_rois(
        padded, plabels, counts, k, recipe, torch.Generator().manual_seed(0), (96, 160)
    )
    assert torch.equal(again[1], rois) and torch.equal(again[2], targets)


def test_sampled_crops_are_the_normalised_image_content() -> None:
    """A crop equals roi_align of the image scaled to [0, 1], minus the ImageNet mean, over the
    std (the scaling is applied after cropping, which is the same since roi_align is linear)."""
    from torchvision.ops import roi_align

    (padded, plabels, counts), _, _ = _scene()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 96, 160), dtype=torch.uint8, generator=g)
    recipe = PretrainRecipe(batch_size=16, crop=24)
    x, y = pretrain._sample_batch(
        images, padded, plabels, counts, 3, recipe, torch.Generator().manual_seed(5)
    )
    idx, rois, targets, flip = pretrain._draw_rois(
        padded, plabels, counts, 3, recipe, torch.Generator().manual_seed(5), (96, 160)
    )
    assert torch.equal(y, targets)
    ref = roi_align(
        images.float() / 255.0,
        torch.cat([idx[:, None].float(), rois], dim=1),
        output_size=24,
        sampling_ratio=2,
        aligned=True,
    )
    if flip:
        ref = ref.flip(-1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ref - mean) / std, atol=1e-4, rtol=1e-4)


def test_weights_trained_on_a_gpu_are_cached_apart(tmp_path: Path, monkeypatch) -> None:
    """CPU weights are the reproducible reference: a CPU trial never takes `_cuda` weights, a
    GPU trial takes the CPU file when there is one and otherwise trains its own on the GPU."""
    calls = []

    def fake(out, depth, norm, splits, recipe, device):
        calls.append((out.name, torch.device(device).type))
        out.write_bytes(b"w")
        return out

    monkeypatch.setattr(pretrain, "_pretrain", fake)
    kw = dict(depth=10, norm="bn", synthetic=TINY, cache_dir=tmp_path, recipe=RECIPE)
    gpu = synthetic_pretrained_backbone(**kw, device="cuda")
    assert gpu.name.endswith("_cuda.pt") and calls == [(gpu.name, "cuda")]
    cpu = synthetic_pretrained_backbone(**kw, device="cpu")
    assert cpu.name == gpu.name.replace("_cuda.pt", ".pt") and calls[-1] == (cpu.name, "cpu")
    # Now that the CPU reference exists, a GPU trial uses it rather than its own.
    assert synthetic_pretrained_backbone(**kw, device="cuda") == cpu
    assert len(calls) == 2
