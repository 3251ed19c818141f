"""Oracle: our RetinaNet configured the torchvision way equals torchvision's RetinaNet.

Both models get the same weights: anchors, head outputs, training losses (and their gradients)
and detections must agree. Two geometries: torchvision's (a ResNet-10 body, FPN P3-P5 + P6/P7
from C5, a 4-conv head, square inputs) and the CPU proxy's (P2-P5 + P6 from C5 with anchors 4x
their stride, 2-conv GroupNorm heads with 16 groups, stem and res2 frozen, 1:2 inputs).
torchvision's input transform is made a no-op (images already at the target size, mean 0 and
std 1), and it runs with the settings that differ from the paper (see docs/model.md): truncated
and rounded anchors, L1 box loss, per-image loss normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from retina_sweep.model import build_retinanet
from retina_sweep.sampling import FocalStrategy
from retina_sweep.torchvision_twin import (
    PROXY_TWIN,
    TWIN_SETTINGS,
    build_torchvision_twin,
    copy_weights_to_torchvision,
)

K, N = 5, 2


@dataclass(frozen=True)
class Geometry:
    settings: dict
    hw: tuple[int, int]
    channels: int
    anchors: int  # anchors per image, counted by hand from the levels' grids


GEOMETRIES = {
    # P3..P7 of 128 x 128: 16^2 + 8^2 + 4^2 + 2^2 + 1 cells, 9 anchors each
    "torchvision": Geometry(TWIN_SETTINGS, (128, 128), 32, 9 * (256 + 64 + 16 + 4 + 1)),
    # P2..P6 of 64 x 128: 16x32 + 8x16 + 4x8 + 2x4 + 1x2 cells
    "proxy": Geometry(PROXY_TWIN, (64, 128), 48, 9 * (512 + 128 + 32 + 8 + 2)),
}


def _twin_keys(settings: dict) -> dict:
    keys = ("min_level", "max_level", "base_size", "head_convs", "head_norm", "freeze_at")
    return {k: settings[k] for k in keys if k in settings}


def _ours(geo: Geometry, **overrides):
    cfg = dict(
        geo.settings,
        num_classes=K,
        depth=10,
        fpn_channels=geo.channels,
        head_channels=geo.channels,
        strategy=FocalStrategy(alpha=0.25, gamma=2.0),
        detections_per_img=100,
        # Same memory layout as torchvision, so that the comparison is exact to float32 rounding
        # (our channels_last default only reorders float sums; see test_channels_last_...).
        channels_last=False,
    )
    cfg.update(overrides)
    return build_retinanet(**cfg)


def _theirs(geo: Geometry):
    return build_torchvision_twin(
        depth=10,
        num_classes=K,
        channels=geo.channels,
        image_size=geo.hw,
        **_twin_keys(geo.settings),
    )


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def models(request):
    geo = GEOMETRIES[request.param]
    torch.manual_seed(0)
    ours = _ours(geo)
    with torch.no_grad():
        # Bigger head weights than the 0.01 init, and a class bias near 0, so that outputs are
        # far from constant and many scores pass the 0.05 threshold.
        for p in ours.head.parameters():
            if p.dim() == 4:
                torch.nn.init.kaiming_normal_(p)
            elif p.dim() == 1 and p.shape[0] == geo.channels and geo.settings.get("head_norm"):
                p.uniform_(0.5, 1.5)  # GroupNorm affine: copied and checked too
            else:
                p.normal_(0.0, 0.1)
        # Random frozen-BN statistics, so that copying them is checked too.
        for name, buf in ours.backbone.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                buf.normal_(0.0, 0.1)
    theirs = _theirs(geo)
    copy_weights_to_torchvision(ours, theirs)
    return ours, theirs, geo


def _inputs(seed: int, geo: Geometry):
    g = torch.Generator().manual_seed(seed)
    h, w = geo.hw
    images = torch.rand(N, 3, h, w, generator=g)
    targets = []
    for count in (3, 1):
        xy = torch.rand(count, 2, generator=g) * (torch.tensor([w, h]) - 40)
        wh = 8 + torch.rand(count, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, K, (count,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def test_anchors_equal(models):
    ours, theirs, geo = models
    images, _ = _inputs(1, geo)
    feats = list(theirs.backbone(images).values())
    tv_anchors = theirs.anchor_generator(ImageList(images, [geo.hw] * N), feats)
    our_anchors = ours.anchor_generator([tuple(f.shape[-2:]) for f in feats])
    assert our_anchors.shape == (geo.anchors, 4)
    torch.testing.assert_close(our_anchors, tv_anchors[0], rtol=0, atol=0)


def test_features_and_head_outputs_equal(models):
    ours, theirs, geo = models
    ours.eval(), theirs.eval()
    images, _ = _inputs(2, geo)
    with torch.no_grad():
        tv_feats = list(theirs.backbone(images).values())
        our_feats = ours.fpn(ours.backbone(images))
        assert len(our_feats) == len(tv_feats) == 5
        for a, b in zip(our_feats, tv_feats, strict=True):
            torch.testing.assert_close(a, b)
        tv_out = theirs.head(tv_feats)
        cls, box = ours.head(our_feats)
    torch.testing.assert_close(cls, tv_out["cls_logits"])
    torch.testing.assert_close(box, tv_out["bbox_regression"])
    assert cls.std() > 0.3  # not a degenerate constant output


def test_losses_and_gradients_equal(models):
    ours, theirs, geo = models
    ours.train(), theirs.train()
    images, targets = _inputs(3, geo)
    for model in (ours, theirs):
        model.zero_grad()
    our_losses = ours(images, targets)
    tv_losses = theirs(list(images), [{k: v.clone() for k, v in t.items()} for t in targets])
    torch.testing.assert_close(our_losses["loss_cls"], tv_losses["classification"])
    torch.testing.assert_close(our_losses["loss_box"], tv_losses["bbox_regression"])
    assert our_losses["loss_box"] > 0
    (our_losses["loss_cls"] + our_losses["loss_box"]).backward()
    (tv_losses["classification"] + tv_losses["bbox_regression"]).backward()
    pairs = [
        (ours.head.cls_score.weight, theirs.head.classification_head.cls_logits.weight),
        (ours.head.bbox_pred.weight, theirs.head.regression_head.bbox_reg.weight),
        (ours.backbone.layer2[0].conv1.weight, theirs.backbone.body.layer2[0].conv1.weight),
    ]
    if geo.settings["freeze_at"] == 0:
        pairs.append((ours.backbone.conv1.weight, theirs.backbone.body.conv1.weight))
    else:  # frozen alike: the stem and res2 get no gradient in either
        for model in (ours.backbone, theirs.backbone.body):
            assert model.conv1.weight.grad is None and model.layer1[0].conv1.weight.grad is None
    for mine, tv in pairs:
        # Deep in the network float32 summation order matters: compare relative to the norm.
        assert tv.grad.norm() > 0
        assert (mine.grad - tv.grad).norm() <= 1e-4 * tv.grad.norm()


def test_detections_equal(models):
    ours, theirs, geo = models
    ours.eval(), theirs.eval()
    images, _ = _inputs(4, geo)
    with torch.no_grad():
        our_dets = ours(images)
        tv_dets = theirs(list(images))
    assert len(our_dets) == len(tv_dets) == N
    for mine, tv in zip(our_dets, tv_dets, strict=True):
        assert len(mine["scores"]) > 10  # the comparison is not vacuous
        torch.testing.assert_close(mine["scores"], tv["scores"])
        torch.testing.assert_close(mine["labels"], tv["labels"])
        torch.testing.assert_close(mine["boxes"], tv["boxes"])


def test_channels_last_default_computes_the_same_detector(models):
    ours, _, geo = models
    fast = _ours(geo, channels_last=True)
    fast.load_state_dict(ours.state_dict())
    images, targets = _inputs(5, geo)
    ours.train(), fast.train()
    a, b = ours(images, targets), fast(images, targets)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    ours.eval(), fast.eval()
    with torch.no_grad():
        for da, db in zip(ours(images), fast(images), strict=True):
            assert len(da["scores"]) > 10
            torch.testing.assert_close(db["scores"], da["scores"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(db["boxes"], da["boxes"], rtol=1e-4, atol=1e-3)
