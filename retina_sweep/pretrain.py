"""A backbone pretrained once on the synthetic proxy's classification task, then cached.

The paper fine-tunes from ImageNet weights; the CPU proxy cannot download them, and training the
backbone from scratch inside every two-minute trial leaves the detector far from converged (every
ablation is then noise). So the proxy does what the paper does at small scale: a ResNet is first
trained to classify crops of the proxy's objects (its K classes, plus a background class made of
random crops that avoid the objects, which includes the distractors) and every trial starts
from those weights (`model.backbone.pretrained: synthetic`).

The weights are content-addressed by the backbone depth and norm, the pretraining recipe and
every parameter of the synthetic dataset (its cache key), written atomically, and reused by all
trials and sweeps: the pretraining cost (tens of seconds) is paid once per dataset.
Only the *train* split is used, so the val split stays unseen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

__all__ = ["PretrainRecipe", "recipe_from", "synthetic_pretrained_backbone", "PRETRAIN_VERSION"]

PRETRAIN_VERSION = "2"


@dataclass(frozen=True)
class PretrainRecipe:
    """How the proxy's backbone is pretrained: `steps` SGD steps (one-cycle schedule peaking at
    `lr`) on batches of `batch_size` crops of `crop` x `crop` px, `background_fraction` of them
    background. Set from the config as `model.backbone.synthetic_pretrain` (see `recipe_from`).
    """

    steps: int = 1600
    batch_size: int = 128
    crop: int = 48
    lr: float = 0.1
    weight_decay: float = 1e-4
    background_fraction: float = 0.25
    seed: int = 0


def recipe_from(values: Mapping[str, Any] | None) -> PretrainRecipe:
    """The recipe of `model.backbone.synthetic_pretrain`; missing keys take the defaults.

    Raises ValueError naming an unknown key (a typo would otherwise silently pretrain with the
    default and cache the result under the default's key).
    """
    values = dict(values or {})
    known = {f.name for f in fields(PretrainRecipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown key model.backbone.synthetic_pretrain.{unknown[0]}: expected one of "
            + ", ".join(sorted(known))
        )
    return PretrainRecipe(**values)


def _key(depth: int, norm: str, dataset_key: str, recipe: PretrainRecipe) -> str:
    blob = json.dumps(
        {
            "version": PRETRAIN_VERSION,
            "depth": depth,
            "norm": norm,
            "dataset": dataset_key,
            "recipe": asdict(recipe),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_split(json_path: Path, img_dir: Path):
    """All train images as one uint8 tensor (N, 3, H, W) + per-image boxes/labels (contiguous)."""
    from PIL import Image

    data = json.loads(json_path.read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    label_of = {c: i for i, c in enumerate(cat_ids)}
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if a.get("iscrowd", 0) or a["bbox"][2] <= 1 or a["bbox"][3] <= 1:
            continue
        anns.setdefault(a["image_id"], []).append(a)
    images, boxes, labels = [], [], []
    for info in data["images"]:
        with Image.open(img_dir / info["file_name"]) as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        items = anns.get(info["id"], [])
        b = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in items)],
            dtype=torch.float32,
        ).reshape(-1, 4)
        boxes.append(b)
        labels.append(torch.tensor([label_of[a["category_id"]] for a in items], dtype=torch.long))
    return torch.stack(images), boxes, labels, len(cat_ids)


def _sample_batch(images, boxes, labels, num_classes, recipe, g: torch.Generator):
    """(B, 3, crop, crop) normalised crops with labels 0..K-1, and K for background."""
    from torchvision.ops import box_iou, roi_align

    n, _, h, w = images.shape
    rois, targets = [], []
    num_bg = int(recipe.batch_size * recipe.background_fraction)
    idx = torch.randint(0, n, (recipe.batch_size,), generator=g)
    for j, i in enumerate(idx.tolist()):
        b, lab = boxes[i], labels[i]
        if j >= num_bg and len(b):
            k = int(torch.randint(0, len(b), (1,), generator=g))
            x1, y1, x2, y2 = b[k].tolist()
            # Context and jitter: the box grown by 1.1-1.6x, its centre moved by up to 10%.
            s = 1.1 + 0.5 * float(torch.rand(1, generator=g))
            cx = (x1 + x2) / 2 + (x2 - x1) * 0.1 * float(torch.randn(1, generator=g))
            cy = (y1 + y2) / 2 + (y2 - y1) * 0.1 * float(torch.randn(1, generator=g))
            side = max(x2 - x1, y2 - y1) * s
            rois.append([i, cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            targets.append(int(lab[k]))
        else:
            # A background square that overlaps no object much (distractors land here too).
            for _ in range(10):
                side = 12 + float(torch.rand(1, generator=g)) * min(h, w) * 0.6
                x = float(torch.rand(1, generator=g)) * (w - side)
                y = float(torch.rand(1, generator=g)) * (h - side)
                cand = torch.tensor([[x, y, x + side, y + side]])
                if not len(b) or float(box_iou(cand, b).max()) < 0.2:
                    break
            rois.append([i, x, y, x + side, y + side])
            targets.append(num_classes)
    rois_t = torch.tensor(rois, dtype=torch.float32)
    used = torch.unique(rois_t[:, 0].long())
    remap = torch.full((n,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    rois_t[:, 0] = remap[rois_t[:, 0].long()].float()
    batch_imgs = images[used].float() / 255.0
    crops = roi_align(batch_imgs, rois_t, output_size=recipe.crop, aligned=True)
    if float(torch.rand(1, generator=g)) < 0.5:
        crops = crops.flip(-1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (crops - mean) / std, torch.tensor(targets)


def synthetic_pretrained_backbone(
    *,
    depth: int,
    norm: str,
    synthetic: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    recipe: PretrainRecipe | None = None,
) -> Path:
    """Path of the cached backbone weights for this dataset; trains them first if absent."""

    from .data.synthetic import default_cache_dir, generate

    recipe = recipe or PretrainRecipe()
    splits = generate(cache_dir, **dict(synthetic))
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # "frozen_bn" in the detector loads BN statistics: it is pretrained with real BN, so "bn" and
    # "frozen_bn" share one set of weights (and one cache entry).
    train_norm = "gn" if norm == "gn" else "bn"
    key = _key(depth, train_norm, splits.key, recipe)
    out = root / "pretrained" / f"resnet{depth}_{train_norm}_{key}.pt"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Parallel trials of a sweep on a cold cache: one trains, the others wait for its file.
    with _exclusive(out.with_name(f".{out.name}.lock")):
        if out.exists():
            return out
        return _pretrain(out, depth, train_norm, splits, recipe)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock (POSIX flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent trials may both pretrain; the write is atomic
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pretrain(out: Path, depth: int, norm: str, splits: Any, recipe: PretrainRecipe) -> Path:
    """Train the backbone on crops of ``splits`` and write its weights (less ``fc``) to out."""
    from torchvision.models.resnet import ResNet

    from .model.backbone import DEPTHS, _norm_layer

    tic = time.perf_counter()
    images, boxes, labels, num_classes = _load_split(splits.train_json, splits.train_images)
    block, layers = DEPTHS[depth]
    torch.manual_seed(recipe.seed)  # the pretraining is deterministic on CPU
    net = ResNet(block, layers, num_classes=num_classes + 1, norm_layer=_norm_layer(norm))
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.SGD(
        net.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15
    )
    net.train()
    correct = seen = 0
    # A long recipe takes minutes on a laptop CPU: say where it is about ten times on the way.
    report_every = max(1, recipe.steps // 10)
    t_loop = time.perf_counter()
    for step in range(recipe.steps):
        x, y = _sample_batch(images, boxes, labels, num_classes, recipe, g)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= recipe.steps - 50:
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if (step + 1) % report_every == 0 and step + 1 < recipe.steps:
            elapsed = time.perf_counter() - t_loop
            log.info(
                "pretraining the proxy backbone (once per dataset and recipe): step %d/%d, "
                "loss %.3f, %.0f s elapsed, about %.0f s left",
                step + 1,
                recipe.steps,
                float(loss.detach()),
                elapsed,
                elapsed / (step + 1) * (recipe.steps - step - 1),
            )
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    log.info(
        "pretrained ResNet-%d on %d synthetic crops in %.0f s (train accuracy of the last 50 "
        "steps %.1f%%): %s",
        depth,
        recipe.steps * recipe.batch_size,
        time.perf_counter() - tic,
        100 * correct / max(seen, 1),
        out,
    )
    return out
