"""Config validation and trial identity.

`validate(cfg)` checks a composed config against the rules below and raises one `ConfigError`
naming the key, the offending value and the allowed values, *before* any data is generated or any
weight is built. The rules are data (`RULES`), so a new key needs one line, not a new function.

`config_hash(cfg)` is the identity of a trial: the hash of everything that changes what is
trained and how it is evaluated (model, loss, data, train, seed). Runtime knobs that do not change
the result (worker counts, progress bars, tracking, sweep bookkeeping) are left out, so the same
experiment launched from a sweep, by hand or on another machine has the same hash. For that
reason a COCO dataset enters the identity by the content of its annotation files (their
SHA-256), not by `data.root`: the same COCO mounted elsewhere is the same experiment, and another
dataset under the same keys is not (it would otherwise resume another dataset's checkpoint and
skip as "finished" against another dataset's run). Local pretrained backbone weights
(`model.backbone.pretrained=/path/to/file.pth`) enter it by their content the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ConfigError",
    "RULES",
    "validate",
    "config_hash",
    "identity_dict",
    "HASH_EXCLUDE",
    "HASH_SAME_AS",
    "exit_on_bad_input",
]


class ConfigError(ValueError):
    """A config value is outside what retina_sweep accepts. The message names the key."""


@contextlib.contextmanager
def exit_on_bad_input(prefix: str, *more: type[Exception]) -> Iterator[None]:
    """A `ConfigError` or a `DatasetError` (or one of `more`) raised inside becomes one line on
    stderr, `{prefix}: {message}`, and exit status 2, as for a bad command line: the user's to
    fix, named by key or file, not a traceback. Used where nothing has started yet (a run, or a
    sweeper before its first trial)."""
    from .data.coco import DatasetError

    try:
        yield
    except (ConfigError, DatasetError, *more) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_MISSING = object()


@dataclass(frozen=True)
class Rule:
    key: str
    check: Callable[[Any], bool]
    allowed: str
    optional: bool = False  # a missing key or null value is accepted


def _num(lo: float = -math.inf, hi: float = math.inf, lo_open=False, hi_open=False):
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        if math.isnan(v):
            return False
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        return ok_lo and ok_hi

    return check


def _int(lo: int = -(2**62), hi: int = 2**62):
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    return check


def _bool(v: Any) -> bool:
    # YAML and Hydra give real booleans for true/false; a string such as `off` or `no` from the
    # command line would otherwise count as true in an `if`.
    return isinstance(v, bool)


def _one_of(*values: Any):
    def check(v: Any) -> bool:
        return v in values

    return check


def _alpha(v: Any) -> bool:
    # alpha in [0, 1]; any negative value is the "no balancing" sentinel of sigmoid_focal_loss.
    return _num()(v) and (v < 0 or 0 <= v <= 1)


def _ratios(v: Any) -> bool:
    return (
        isinstance(v, list | tuple | ListConfig)
        and len(v) > 0
        and all(_num(0, lo_open=True)(r) for r in v)
    )


def _fractions(v: Any) -> bool:
    return isinstance(v, list | tuple | ListConfig) and all(_num(0, 1, True, True)(r) for r in v)


STRATEGY_NAMES = ("focal", "ohem", "ohem_1to3", "random_1to3")
# The final metrics of a run (train.FINAL_KEYS), any of which it can return as its objective.
OBJECTIVES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ms_per_image")

RULES: list[Rule] = [
    Rule("seed", _int(0), "an integer >= 0"),
    Rule("device", _one_of("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    Rule("objective", _one_of(*OBJECTIVES), "one of " + ", ".join(OBJECTIVES), True),
    Rule("eval.visualize", _int(0), "an integer >= 0 (val images to draw)", True),
    Rule("eval.visualize_score", _num(0, 1), "a number in [0, 1]", True),
    Rule("loss.name", _one_of(*STRATEGY_NAMES), "one of " + ", ".join(STRATEGY_NAMES)),
    Rule("loss.alpha", _alpha, "a number in [0, 1], or < 0 for no balancing", optional=True),
    Rule("loss.gamma", _num(0), "a number >= 0", optional=True),
    Rule("loss.batch_size", _int(1), "an integer >= 1 (anchors per image)", optional=True),
    Rule("loss.nms_thresh", _num(0, 1, lo_open=True), "a number in (0, 1]", optional=True),
    Rule("loss.pos_fraction", _num(0, 1, lo_open=True), "a number in (0, 1]", optional=True),
    Rule("model.num_classes", _int(1), "an integer >= 1"),
    Rule("model.backbone.depth", _one_of(10, 18, 34, 50, 101), "one of 10, 18, 34, 50, 101"),
    Rule("model.backbone.freeze_at", _int(0, 5), "an integer in 0..5"),
    Rule("model.backbone.norm", _one_of("frozen_bn", "bn", "gn"), "one of frozen_bn, bn, gn"),
    Rule("model.backbone.synthetic_pretrain.steps", _int(1), "an integer >= 1", True),
    Rule("model.backbone.synthetic_pretrain.batch_size", _int(2), "an integer >= 2", True),
    Rule("model.backbone.synthetic_pretrain.crop", _int(16), "an integer >= 16 (px)", True),
    Rule("model.backbone.synthetic_pretrain.lr", _num(0, lo_open=True), "a number > 0", True),
    Rule("model.backbone.synthetic_pretrain.weight_decay", _num(0), "a number >= 0", True),
    Rule(
        "model.backbone.synthetic_pretrain.background_fraction",
        _num(0, 1, hi_open=True),
        "a number in [0, 1)",
        True,
    ),
    Rule("model.backbone.synthetic_pretrain.seed", _int(0), "an integer >= 0", True),
    Rule("model.fpn.channels", _int(1), "an integer >= 1"),
    Rule("model.fpn.min_level", _int(2, 7), "an integer in 2..7"),
    Rule("model.fpn.max_level", _int(2, 7), "an integer in 2..7"),
    Rule("model.fpn.variant", _one_of("fpn", "c5_only"), "one of fpn, c5_only"),
    Rule("model.anchors.base_size", _num(0, lo_open=True), "a number > 0"),
    Rule("model.anchors.scales_per_octave", _int(1), "an integer >= 1"),
    Rule("model.anchors.aspect_ratios", _ratios, "a non-empty list of numbers > 0 (h / w)"),
    Rule("model.head.num_convs", _int(0), "an integer >= 0"),
    Rule("model.head.channels", _int(1), "an integer >= 1"),
    Rule("model.head.norm", _one_of(None, "GN", "BN"), "one of null, GN, BN"),
    Rule("model.head.prior_prob", _num(0, 1, True, True), "a number in (0, 1)"),
    Rule("model.matcher.fg_iou", _num(0, 1), "a number in [0, 1]"),
    Rule("model.matcher.bg_iou", _num(0, 1), "a number in [0, 1]"),
    Rule("model.box_loss", _one_of("smooth_l1", "l1"), "one of smooth_l1, l1"),
    Rule("model.smooth_l1_beta", _num(0), "a number >= 0"),
    Rule(
        "model.normalizer", _one_of("num_fg", "per_image", "ema"), "one of num_fg, per_image, ema"
    ),
    Rule("model.inference.score_thresh", _num(0, 1), "a number in [0, 1]"),
    Rule("model.inference.topk_candidates", _int(1), "an integer >= 1"),
    Rule("model.inference.nms_thresh", _num(0, 1), "a number in [0, 1]"),
    Rule("model.inference.detections_per_img", _int(1), "an integer >= 1"),
    Rule("data.kind", _one_of("synthetic", "coco"), "one of synthetic, coco"),
    Rule("data.scale", _int(1), "an integer > 0 (shorter image side, px)"),
    Rule("data.max_size", _int(1), "an integer > 0 (longer image side cap, px)"),
    Rule("data.flip_prob", _num(0, 1), "a number in [0, 1]"),
    Rule("train.batch_size", _int(1), "an integer >= 1"),
    Rule("train.base_lr", _num(0, lo_open=True), "a number > 0"),
    Rule("train.lr", _num(0, lo_open=True), "a number > 0, or null for linear scaling", True),
    Rule("train.momentum", _num(0, 1), "a number in [0, 1]"),
    Rule("train.weight_decay", _num(0), "a number >= 0"),
    Rule(
        "train.weight_decay_norm",
        _num(0),
        "a number >= 0, or null for train.weight_decay",
        True,
    ),
    Rule("train.iterations", _int(1), "an integer >= 1"),
    Rule("train.warmup_iters", _int(0), "an integer >= 0"),
    Rule("train.warmup_factor", _num(0, 1, lo_open=True), "a number in (0, 1]"),
    Rule("train.lr_steps", _fractions, "a list of fractions of the iterations, each in (0, 1)"),
    Rule("train.lr_decay", _num(0, 1, True), "a number in (0, 1]"),
    Rule("train.clip_grad_norm", _num(0, lo_open=True), "a number > 0, or null", True),
    Rule("train.devices", _int(1), "an integer >= 1"),
    Rule("train.num_workers", _int(0), "an integer >= 0"),
    Rule("train.amp", _bool, "true or false", True),
    Rule(
        "train.cpu_amp", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto", True
    ),
    Rule("train.eval_every", _int(0), "an integer >= 0 (0 = final evaluation only)"),
    Rule("train.eval_max_images", _int(1), "an integer >= 1, or null for every image", True),
    Rule("train.threads", _int(1), "an integer >= 1, or null for torch's default", True),
    Rule("train.max_nonfinite", _int(0), "an integer >= 0", True),
    Rule("train.progress", _bool, "true or false", True),
    Rule("model.anchors.truncate", _bool, "true or false", True),
    Rule("model.matcher.allow_low_quality", _bool, "true or false", True),
    Rule("data.skip_empty", _bool, "true or false", True),
    Rule("train.checkpoint_every", _int(0), "an integer >= 0 (0 = only at the end)"),
    Rule("sweep.seeds", _int(1), "an integer >= 1"),
]


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid config value {key}={value!r}: expected {allowed}")


def validate(cfg: DictConfig, rules: Iterable[Rule] = RULES) -> None:
    """Raise `ConfigError` on the first config value outside its allowed range.

    Also checks the relations between keys: level order, IoU threshold order, the batch being
    divisible by the number of devices, and that a `coco` dataset has a root.
    """
    for rule in rules:
        value = _get(cfg, rule.key)
        if value is _MISSING or value is None:
            if rule.optional:
                continue
            if value is _MISSING:
                raise ConfigError(f"missing config key {rule.key}: expected {rule.allowed}")
        if not rule.check(value):
            _fail(rule.key, value, rule.allowed)

    lo, hi = _get(cfg, "model.fpn.min_level"), _get(cfg, "model.fpn.max_level")
    if lo > hi:
        raise ConfigError(
            f"invalid config value model.fpn.min_level={lo}: must be <= model.fpn.max_level={hi}"
        )
    if _get(cfg, "model.fpn.variant") == "c5_only" and lo > 5:
        raise ConfigError(
            f"invalid config value model.fpn.min_level={lo}: the c5_only variant puts every "
            "level's anchors on C5 and needs min_level <= 5"
        )
    fg, bg = _get(cfg, "model.matcher.fg_iou"), _get(cfg, "model.matcher.bg_iou")
    if bg > fg:
        raise ConfigError(
            f"invalid config value model.matcher.bg_iou={bg}: must be <= model.matcher.fg_iou={fg}"
        )
    batch, devices = _get(cfg, "train.batch_size"), _get(cfg, "train.devices")
    if batch % devices != 0:
        raise ConfigError(
            f"invalid config value train.batch_size={batch}: must be divisible by "
            f"train.devices={devices} (the global batch is split evenly among the processes)"
        )
    name = _get(cfg, "loss.name")
    if name == "focal":
        for key in ("loss.alpha", "loss.gamma"):
            if _get(cfg, key) in (None, _MISSING):
                raise ConfigError(f"missing config key {key}: the focal loss needs it")
    elif _get(cfg, "loss.batch_size") in (None, _MISSING):
        raise ConfigError(f"missing config key loss.batch_size: the {name} strategy needs it")
    recipe = _get(cfg, "model.backbone.synthetic_pretrain")
    if isinstance(recipe, dict):
        from .pretrain import recipe_from

        try:
            recipe_from(recipe)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if (
        _get(cfg, "model.backbone.pretrained") == "synthetic"
        and _get(cfg, "data.kind") != "synthetic"
    ):
        raise ConfigError(
            "invalid config value model.backbone.pretrained='synthetic': the proxy-pretrained "
            "backbone exists only for data=synthetic; use a checkpoint path or a torchvision "
            "weights name (IMAGENET1K_V1)"
        )
    synthetic = _get(cfg, "data.synthetic")
    if _get(cfg, "data.kind") == "synthetic" and isinstance(synthetic, dict):
        # The generator's own checks, before the run opens or anything is drawn, with the keys
        # spelled as on the command line.
        from .data.synthetic import SyntheticParams

        try:
            SyntheticParams(**synthetic)
        except TypeError as exc:
            raise ConfigError(f"invalid config key under data.synthetic: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"invalid config value data.{exc}") from None
    if _get(cfg, "data.kind") == "coco" and not _get(cfg, "data.root"):
        raise ConfigError(
            "missing config key data.root: data=coco needs the COCO root folder "
            "(with annotations/ and train2017/ val2017/), e.g. data.root=/datasets/coco"
        )


# Keys that do not change what is trained or measured: not part of a trial's identity.
HASH_EXCLUDE = (
    "train.devices",
    "train.threads",
    "train.num_workers",
    "train.progress",
    "train.amp",
    "train.cpu_amp",
    "train.checkpoint_every",
    "data.cache_dir",
    "data.root",
)
HASH_SECTIONS = ("model", "loss", "data", "train", "seed")
# Keys added after finished trials existed, whose null means "as the other key": at null, or at
# the other key's value, they train what the trial trained before the key existed, so they leave
# the identity and every store's finished cells keep their hashes.
HASH_SAME_AS = {"train.weight_decay_norm": "train.weight_decay"}


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a rewritten file is hashed again; COCO's train annotations
    # (~450 MB) take about a second, once per process.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def annotation_fingerprint(path: str | Path) -> str:
    """16 hex digits of the SHA-256 of an annotation file, or `missing` if it is not there (a
    missing dataset has no finished run to match; the trial stops on it with its own message)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _coco_fingerprint(data: dict[str, Any]) -> dict[str, str]:
    from .data.coco import COCO_SPLITS

    out = {}
    for split_key in ("train_split", "val_split"):
        split = data.get(split_key)
        if data.get("root") and split in COCO_SPLITS:
            ann = Path(str(data["root"])).expanduser() / "annotations" / COCO_SPLITS[split][0]
            out[split_key] = annotation_fingerprint(ann)
    return out


def identity_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved part of `cfg` that defines a trial (see module docstring)."""
    out: dict[str, Any] = {}
    for section in HASH_SECTIONS:
        value = OmegaConf.select(cfg, section, default=None)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        out[section] = value
    data = out.get("data")
    if isinstance(data, dict) and data.get("kind") == "coco":
        # The dataset by content, not by where it is mounted (`data.root` is excluded below).
        data["annotations_sha256"] = _coco_fingerprint(data)
    backbone = (out.get("model") or {}).get("backbone")
    if isinstance(backbone, dict):
        if backbone.get("pretrained") == "synthetic":
            # The full recipe, defaults filled in, with the pretraining code's version: the
            # cached weights (and so the trial) change with any of them.
            from .pretrain import PRETRAIN_VERSION, recipe_from

            backbone["synthetic_pretrain"] = {
                **asdict(recipe_from(backbone.get("synthetic_pretrain"))),
                "version": PRETRAIN_VERSION,
            }
        else:
            backbone.pop("synthetic_pretrain", None)
            weights = backbone.get("pretrained")
            if isinstance(weights, str) and Path(weights).expanduser().is_file():
                # Local weights by content, as a COCO dataset: another file at the same path is
                # another experiment, the same file elsewhere the same one. (A torchvision
                # weights name such as IMAGENET1K_V1 names fixed weights and stays as it is.)
                backbone["pretrained"] = "sha256:" + annotation_fingerprint(weights)
    for dotted, other in HASH_SAME_AS.items():
        value = _select(out, dotted)
        if value is None or _normalise(value) == _normalise(_select(out, other)):
            _pop(out, dotted)
    for dotted in HASH_EXCLUDE:
        _pop(out, dotted)
    return out


def _select(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _pop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = _select(tree, ".".join(parents)) if parents else tree
    if isinstance(node, dict):
        node.pop(leaf, None)


def _normalise(value: Any) -> Any:
    # 3 and 3.0 are the same experiment: hash numbers by value, not by their YAML spelling.
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_hash(cfg: DictConfig) -> str:
    """16 hex digits of the SHA-256 of the trial's identity (same hash = same experiment)."""
    blob = json.dumps(_normalise(identity_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
