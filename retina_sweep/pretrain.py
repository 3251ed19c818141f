"""A backbone pretrained once on the synthetic proxy's classification task, then cached.

The paper fine-tunes from ImageNet weights; the CPU proxy cannot download them, and training the
backbone from scratch inside every two-minute trial leaves the detector far from converged (every
ablation is then noise). So the proxy does what the paper does at small scale: a ResNet is first
trained to classify crops of the proxy's objects (its K classes, plus a background class made of
random crops that avoid the objects, which includes the distractors) and every trial starts
from those weights (`model.backbone.pretrained: synthetic`).

The weights are content-addressed by the backbone depth and norm, the pretraining recipe and
every parameter of the synthetic dataset (its cache key), written atomically, and reused by all
trials and sweeps: the pretraining cost (about 12 minutes on a 2-core CPU, 17 s on an H200) is
paid once per dataset. It runs on the trial's device; GPU-trained weights are cached apart.
Only the *train* split is used, so the val split stays unseen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .locks import exclusive

log = logging.getLogger(__name__)

__all__ = ["PretrainRecipe", "recipe_from", "synthetic_pretrained_backbone", "PRETRAIN_VERSION"]

PRETRAIN_VERSION = "3"  # 3: crops drawn in one vectorised pass (another random stream)


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


def _pad_boxes(boxes: list[torch.Tensor], labels: list[torch.Tensor]):
    """Per-image boxes as one padded tensor: (N, M, 4) boxes, (N, M) labels, (N,) counts."""
    m = max(1, max(len(b) for b in boxes))
    padded = torch.zeros((len(boxes), m, 4))
    lab = torch.zeros((len(boxes), m), dtype=torch.long)
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    for i, (b, la) in enumerate(zip(boxes, labels, strict=True)):
        padded[i, : len(b)] = b
        lab[i, : len(b)] = la
    return padded, lab, counts


def _draw_rois(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    num_classes: int,
    recipe: PretrainRecipe,
    g: torch.Generator,
    image_hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Where one batch's crops come from, drawn without a Python loop per crop.

    Args:
        boxes: (N, M, 4) xyxy, padded; labels: (N, M) in 0..K-1; counts: (N,) valid boxes per
            image (all on the CPU).
        g: CPU generator; every random number comes from it, so the batch sequence is the same
            whatever device the crops are then cut on.
        image_hw: (H, W) of the images.

    Returns:
        idx (B,) image of each crop, rois (B, 4) xyxy squares, targets (B,) in 0..K where K is
        background, and whether the batch is flipped. The first ``B * background_fraction``
        slots, and object slots drawn on an image without objects, are background squares
        (side 12 px to 0.6 of the shorter image side) that overlap no object by IoU >= 0.2: the
        first of 10 candidates that does not, else the 10th. The others are an object of the
        image, its box grown by 1.1-1.6x with its centre moved by N(0, 0.1) of its size.
    """
    h, w = image_hw
    n = boxes.shape[0]
    bsz = recipe.batch_size
    num_bg = int(bsz * recipe.background_fraction)
    idx = torch.randint(0, n, (bsz,), generator=g)
    u = torch.rand((bsz, 4), generator=g)
    jitter = torch.randn((bsz, 2), generator=g)
    cand = torch.rand((bsz, 10, 3), generator=g)
    flip = bool(torch.rand(1, generator=g) < 0.5)
    cnt = counts[idx]
    is_fg = (torch.arange(bsz) >= num_bg) & (cnt > 0)
    k = (u[:, 0] * cnt.clamp(min=1)).long().clamp(max=(cnt - 1).clamp(min=0))
    obj = boxes[idx, k]  # (B, 4)
    scale = 1.1 + 0.5 * u[:, 1]
    cx = (obj[:, 0] + obj[:, 2]) / 2 + (obj[:, 2] - obj[:, 0]) * 0.1 * jitter[:, 0]
    cy = (obj[:, 1] + obj[:, 3]) / 2 + (obj[:, 3] - obj[:, 1]) * 0.1 * jitter[:, 1]
    half = torch.maximum(obj[:, 2] - obj[:, 0], obj[:, 3] - obj[:, 1]) * scale / 2
    fg_roi = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)

    # Background: 10 candidate squares per slot; keep the first that overlaps no object much.
    side = 12 + cand[..., 0] * min(h, w) * 0.6  # (B, 10)
    x = cand[..., 1] * (w - side)
    y = cand[..., 2] * (h - side)
    squares = torch.stack([x, y, x + side, y + side], dim=-1)  # (B, 10, 4)
    own = boxes[idx][:, None]  # (B, 1, M, 4): each slot's own image's boxes
    sq = squares[:, :, None]  # (B, 10, 1, 4)
    wh = (
        torch.minimum(sq[..., 2:], own[..., 2:]) - torch.maximum(sq[..., :2], own[..., :2])
    ).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(sq) + area(own) - inter)  # (B, 10, M)
    valid = torch.arange(boxes.shape[1])[None, None, :] < cnt[:, None, None]
    max_iou = torch.where(valid, iou, torch.zeros(())).amax(dim=-1)  # (B, 10)
    ok = max_iou < 0.2
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((bsz,), 9))
    bg_roi = squares[torch.arange(bsz), first]

    rois = torch.where(is_fg[:, None], fg_roi, bg_roi)
    targets = torch.where(is_fg, labels[idx, k], torch.full((bsz,), num_classes))
    return idx, rois, targets, flip


def _sample_batch(
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    num_classes: int,
    recipe: PretrainRecipe,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: (B, 3, crop, crop) normalised crops and (B,) labels (K = background), on the
    device of `images` ((N, 3, H, W) uint8); see `_draw_rois` for what is drawn."""
    from torchvision.ops import roi_align

    idx, rois, targets, flip = _draw_rois(
        boxes, labels, counts, num_classes, recipe, g, (images.shape[2], images.shape[3])
    )
    # Crop only from the images drawn (as floats): converting all N each step would dominate.
    used, slot = torch.unique(idx, return_inverse=True)
    dev = images.device
    batch_imgs = images[used.to(dev)].float()
    rois_t = torch.cat([slot[:, None].float(), rois], dim=1).to(dev)
    crops = roi_align(batch_imgs, rois_t, output_size=recipe.crop, sampling_ratio=2, aligned=True)
    if flip:
        crops = crops.flip(-1)
    # Scaled to [0, 1] and normalised after cropping (roi_align is linear): 50x fewer values.
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255.0
    return (crops - mean) / std, targets.to(dev)


def synthetic_pretrained_backbone(
    *,
    depth: int,
    norm: str,
    synthetic: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    recipe: PretrainRecipe | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Path of the cached backbone weights for this dataset; trains them first if absent.

    `device` is where to pretrain when the cache has no weights yet. Weights trained on the CPU
    are bit-for-bit reproducible and are cached as ``resnet{depth}_{norm}_{key}.pt``; weights
    trained on a GPU (cuDNN is not bit-exact) are cached beside them with a ``_cuda`` suffix,
    so a CPU trial never picks up GPU-trained weights. A GPU trial uses the CPU file when it
    exists, else the ``_cuda`` one, training it (in seconds rather than minutes) if absent.
    """

    from .data.synthetic import default_cache_dir, generate

    recipe = recipe or PretrainRecipe()
    splits = generate(cache_dir, **dict(synthetic))
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # "frozen_bn" in the detector loads BN statistics: it is pretrained with real BN, so "bn" and
    # "frozen_bn" share one set of weights (and one cache entry).
    train_norm = "gn" if norm == "gn" else "bn"
    key = _key(depth, train_norm, splits.key, recipe)
    cpu_out = root / "pretrained" / f"resnet{depth}_{train_norm}_{key}.pt"
    device = torch.device(device)
    if cpu_out.exists():
        return cpu_out
    out = cpu_out if device.type == "cpu" else cpu_out.with_name(f"{cpu_out.stem}_{device.type}.pt")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Parallel trials of a sweep on a cold cache: one trains, the others wait for its file.
    with exclusive(out.with_name(f".{out.name}.lock")):
        if out.exists():
            return out
        return _pretrain(out, depth, train_norm, splits, recipe, device)


def _pretrain(
    out: Path,
    depth: int,
    norm: str,
    splits: Any,
    recipe: PretrainRecipe,
    device: torch.device = torch.device("cpu"),
) -> Path:
    """Train the backbone on crops of ``splits`` and write its weights (less ``fc``) to out."""
    from torchvision.models.resnet import ResNet

    from .model.backbone import DEPTHS, _norm_layer

    tic = time.perf_counter()
    images, boxes, labels, num_classes = _load_split(splits.train_json, splits.train_images)
    boxes, labels, counts = _pad_boxes(boxes, labels)
    images = images.to(device)  # uint8: the proxy's train split is a few hundred MB at most
    block, layers = DEPTHS[depth]
    torch.manual_seed(recipe.seed)  # the pretraining is deterministic on CPU
    net = ResNet(block, layers, num_classes=num_classes + 1, norm_layer=_norm_layer(norm))
    net.to(device)
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
        x, y = _sample_batch(images, boxes, labels, counts, num_classes, recipe, g)
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
    state = {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    if device.type == "cuda":
        # The sweeper pretrains in its own process, which then only waits on its trials: hand
        # the images and the network back to the GPU for them.
        del net, images, opt, sched, x, y, logits, loss
        torch.cuda.empty_cache()
    log.info(
        "pretrained ResNet-%d on %d synthetic crops in %.0f s on %s (train accuracy of the last "
        "50 steps %.1f%%): %s",
        depth,
        recipe.steps * recipe.batch_size,
        time.perf_counter() - tic,
        device,
        100 * correct / max(seen, 1),
        out,
    )
    return out
