"""Config tree: every group composes, validation names the key, the trial hash is an identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config
from hydra.utils import instantiate

from retina_sweep.config import ConfigError, config_hash, validate
from retina_sweep.train import lr_factor

GROUPS = {
    "loss": ["focal", "ce", "ohem", "ohem_1to3", "random_1to3"],
    "data": ["synthetic", "coco"],
    "scale": ["smoke", "proxy", "paper"],
    "tracking": ["mlflow", "none"],
    "launcher": ["local", "parallel", "slurm"],
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    # The proxy's backbone is pretrained on the synthetic set: COCO goes with the paper scale.
    extra = ["data.root=/nonexistent/coco", "scale=paper"] if option == "coco" else []
    cfg = compose_config([f"{group}={option}", *extra], hydra=group == "launcher")
    validate(cfg)


@pytest.mark.parametrize("name", ["focal", "ce", "ohem", "ohem_1to3", "random_1to3"])
def test_loss_group_instantiates_its_strategy(name: str) -> None:
    cfg = compose_config([f"loss={name}"])
    strategy = instantiate(cfg.loss)
    assert callable(strategy)


def test_ce_is_focal_with_gamma_zero() -> None:
    cfg = compose_config(["loss=ce"])
    assert cfg.loss.name == "focal" and cfg.loss.gamma == 0.0


def test_paper_scale_is_the_paper_recipe() -> None:
    cfg = compose_config(["scale=paper", "data=coco", "data.root=/x"])
    assert cfg.model.backbone.depth == 50
    assert cfg.model.fpn.channels == 256 and cfg.model.head.channels == 256
    assert cfg.model.head.num_convs == 4
    assert cfg.data.scale == 600 and cfg.data.max_size == 1000
    assert cfg.train.batch_size == 16 and cfg.train.base_lr == 0.01 and cfg.train.lr is None
    assert cfg.train.iterations == 90000
    # lr / 10 at exactly 60k and 80k, through the schedule the training uses.
    sched = dict(
        iterations=cfg.train.iterations,
        warmup_iters=cfg.train.warmup_iters,
        warmup_factor=cfg.train.warmup_factor,
        lr_steps=list(cfg.train.lr_steps),
        lr_decay=cfg.train.lr_decay,
    )
    factors = {i: lr_factor(i, **sched) for i in (59999, 60000, 79999, 80000, 89999)}
    assert factors == pytest.approx({59999: 1.0, 60000: 0.1, 79999: 0.1, 80000: 0.01, 89999: 0.01})
    assert cfg.model.anchors.scales_per_octave == 3
    assert list(cfg.model.anchors.aspect_ratios) == [0.5, 1.0, 2.0]
    assert cfg.loss.alpha == 0.25 and cfg.loss.gamma == 2.0
    assert cfg.model.inference.detections_per_img == 100


BAD = [
    ("loss.gamma=-0.5", "loss.gamma"),
    ("loss.alpha=1.5", "loss.alpha"),
    ("loss.name=hinge", "loss.name"),
    ("model.anchors.aspect_ratios=[1.0,0.0]", "model.anchors.aspect_ratios"),
    ("model.anchors.aspect_ratios=[]", "model.anchors.aspect_ratios"),
    ("model.fpn.min_level=1", "model.fpn.min_level"),
    ("model.fpn.max_level=8", "model.fpn.max_level"),
    ("model.fpn.min_level=6", "model.fpn.min_level"),  # > max_level 7? no: 6 <= 7 but see below
    ("data.scale=0", "data.scale"),
    ("data.scale=-128", "data.scale"),
    ("model.backbone.depth=152", "model.backbone.depth"),
    ("train.iterations=0", "train.iterations"),
    ("model.matcher.bg_iou=0.6", "model.matcher.bg_iou"),
    ("train.cpu_amp=bf16", "train.cpu_amp"),
    ("train.amp=1", "train.amp"),
    # Strings are true in an `if`: `off` would have switched to torchvision's truncated anchors.
    ("model.anchors.truncate=off", "model.anchors.truncate"),
    ("model.matcher.allow_low_quality=maybe", "model.matcher.allow_low_quality"),
    ("data.skip_empty=no", "data.skip_empty"),
    ("train.progress=maybe", "train.progress"),
    # Keys that used to fail only once training was under way, without their name.
    ("train.threads=-1", "train.threads"),
    ("train.eval_max_images=0", "train.eval_max_images"),
    ("train.max_nonfinite=-1", "train.max_nonfinite"),
    # The generator's checks, run by validate() with the key as the command line spells it.
    ("data.synthetic.num_train=0", "data.synthetic.num_train"),
    ("data.synthetic.max_object_size=-5", "data.synthetic.max_object_size"),
    ("+data.synthetic.box_noise=0.5", "data.synthetic.box_noise"),
    ("+data.synthetic.nosuchkey=1", "data.synthetic"),
]


@pytest.mark.parametrize(("override", "key"), [b for b in BAD if b[0] != "model.fpn.min_level=6"])
def test_bad_values_name_their_key(override: str, key: str) -> None:
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_min_level_above_max_level_is_an_error() -> None:
    cfg = compose_config(["model.fpn.min_level=6", "model.fpn.max_level=5"])
    with pytest.raises(ConfigError, match=r"model\.fpn\.min_level=6.*max_level=5"):
        validate(cfg)


def test_batch_must_divide_among_devices() -> None:
    cfg = compose_config(["train.batch_size=6", "train.devices=4"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=6.*train\.devices=4"):
        validate(cfg)


def test_unbalanced_alpha_sentinel_is_allowed() -> None:
    validate(compose_config(["loss.alpha=-1"]))


def test_ohem_batch_size_must_be_positive() -> None:
    cfg = compose_config(["loss=ohem", "loss.batch_size=0"])
    with pytest.raises(ConfigError, match=r"loss\.batch_size"):
        validate(cfg)


def test_coco_needs_a_root() -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate(compose_config(["data=coco", "scale=paper"]))


def test_hash_ignores_runtime_keys_but_not_the_experiment() -> None:
    base = config_hash(compose_config())
    assert config_hash(compose_config(["train.num_workers=7", "train.progress=false"])) == base
    assert config_hash(compose_config(["tracking=none", "sweep.cell=x"])) == base
    assert config_hash(compose_config(["loss.gamma=1.0"])) != base
    assert config_hash(compose_config(["seed=1"])) != base
    # 3 and 3.0 are the same experiment
    assert config_hash(compose_config(["model.anchors.base_size=32.0"])) == base


def _coco_root(root: Path, categories: int) -> Path:
    (root / "annotations").mkdir(parents=True)
    for name in ("instances_train2017.json", "instances_val2017.json"):
        cats = [{"id": i + 1, "name": f"c{i}"} for i in range(categories)]
        text = json.dumps({"images": [], "annotations": [], "categories": cats})
        (root / "annotations" / name).write_text(text)
    return root


def test_a_coco_dataset_is_identified_by_its_annotations_not_by_its_root(tmp_path: Path) -> None:
    """data.root stays out of the hash (the same COCO on another mount is the same experiment),
    so the annotation files' content stands in for it: another dataset under the same keys used
    to resume the first one's checkpoint and skip as finished against its runs."""

    def hash_of(root: Path) -> str:
        cfg = compose_config(["data=coco", "scale=paper", f"data.root={root}"])
        return config_hash(cfg)

    a = hash_of(_coco_root(tmp_path / "a", 3))
    assert hash_of(_coco_root(tmp_path / "copy_of_a" / "elsewhere", 3)) == a  # moved: same
    assert hash_of(_coco_root(tmp_path / "b", 4)) != a  # another dataset: another experiment
    assert hash_of(tmp_path / "absent") != a
    # Rewriting a file in place (new size, new mtime) is seen too.
    ann = tmp_path / "a" / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text().replace('"c0"', '"renamed"'))
    assert hash_of(tmp_path / "a") != a
