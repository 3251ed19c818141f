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
    assert seen["depth"] == 10 and seen["norm"] == "bn"

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
