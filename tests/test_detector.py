"""RetinaNet detector: batched losses vs a per-image reference, normalisers, strategy inputs,
crowd handling, empty images, inference post-processing, c5_only, builder checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import batched_nms, box_iou
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from retina_sweep.model import build_retinanet
from retina_sweep.model.detector import grouped_nms
from retina_sweep.model.matcher import Matcher, anchor_state
from retina_sweep.sampling import FocalStrategy, LossStrategy

K, SIZE = 3, 64


class Recorder(LossStrategy):
    """Keeps the strategy inputs; returns simple differentiable losses."""

    def __init__(self, needs_boxes: bool = True) -> None:
        super().__init__()
        self.needs_boxes = needs_boxes
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return {"loss_cls": kwargs["cls_logits"].sum() * 0, "loss_box": kwargs["box_loss"].sum()}


def _model(**overrides):
    torch.manual_seed(0)
    cfg = dict(
        num_classes=K,
        depth=10,
        freeze_at=0,
        backbone_norm="frozen_bn",
        fpn_channels=8,
        head_convs=1,
        head_channels=8,
    )
    cfg.update(overrides)
    return build_retinanet(**cfg)


def _targets():
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 60.0, 50.0]]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[10.0, 10.0, 26.0, 22.0]]), "labels": torch.tensor([1])},
    ]


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _head_outputs(model, images):
    pyramid = model.fpn(model.backbone(images))
    cls, box = model.head(pyramid)
    anchors = model.anchor_generator([tuple(p.shape[-2:]) for p in pyramid])
    return cls, box, anchors


def test_losses_match_per_image_reference():
    model = _model(normalizer="num_fg", box_loss="smooth_l1", smooth_l1_beta=0.11).train()
    images, targets = _images(), _targets()
    losses = model(images, targets)
    with torch.no_grad():
        cls, box, anchors = _head_outputs(model, images)
    # Reference: a per-image loop with torchvision's matcher, box coder and focal loss.
    matcher, coder = TVMatcher(0.5, 0.4, allow_low_quality_matches=True), TVBoxCoder((1.0,) * 4)
    cls_sum, box_sum, num_fg = 0.0, 0.0, 0
    for i, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            matched = torch.full((len(anchors),), -1)
        else:
            matched = matcher(box_iou(t["boxes"], anchors))
        fg = matched >= 0
        num_fg += int(fg.sum())
        onehot = torch.zeros_like(cls[i])
        onehot[fg, t["labels"][matched[fg]]] = 1.0
        valid = matched != -2
        cls_sum += tv_focal_loss(cls[i][valid], onehot[valid], reduction="sum")
        target_deltas = coder.encode_single(t["boxes"][matched[fg]], anchors[fg])
        box_sum += F.smooth_l1_loss(box[i][fg], target_deltas, beta=0.11, reduction="sum")
    assert num_fg > 3
    torch.testing.assert_close(losses["loss_cls"], cls_sum / num_fg)
    torch.testing.assert_close(losses["loss_box"], box_sum / num_fg)


def test_images_without_boxes():
    model = _model().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(_images(2), empty)
    assert losses["loss_box"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    (losses["loss_cls"] + losses["loss_box"]).backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Mixed batch: finite, and the box loss comes from the image that has boxes.
    mixed = model(_images(3), _targets())
    assert torch.isfinite(mixed["loss_cls"]) and mixed["loss_box"] > 0


def test_strategy_inputs():
    rec = Recorder()
    model = _model(strategy=rec).train()
    images, targets = _images(), _targets()
    model(images, targets)
    kw = rec.calls[-1]
    with torch.no_grad():
        cls, box, anchors = _head_outputs(model, images)
    n, a = cls.shape[:2]
    assert kw["cls_logits"].shape == (n, a, K) and kw["cls_targets"].shape == (n, a, K)
    state = kw["anchor_state"]
    for i, t in enumerate(targets):
        iou = box_iou(t["boxes"], anchors)[None]
        matched = Matcher()(iou, torch.ones(1, len(t["boxes"]), dtype=torch.bool))[0]
        assert state[i].tolist() == anchor_state(matched).tolist()
        fg = matched >= 0
        expected = torch.zeros(a, K)
        expected[fg, t["labels"][matched[fg]]] = 1.0
        assert torch.equal(kw["cls_targets"][i], expected)
    assert (state[1] == 0).all()  # no gt: all background
    assert (kw["box_loss"][state != 1] == 0).all() and (kw["box_loss"][state == 1] > 0).all()
    torch.testing.assert_close(kw["boxes"], model.box_coder.decode(box, anchors))
    assert kw["boxes"].requires_grad is False and kw["box_loss"].requires_grad

    focal = _model(strategy=Recorder(needs_boxes=False)).train()
    focal(images, targets)
    assert focal.strategy.calls[-1]["boxes"] is None
    assert FocalStrategy.needs_boxes is False


def test_normalizers():
    images, targets = _images(), _targets()
    rec = Recorder()
    model = _model(strategy=rec, normalizer="num_fg").train()
    model(images, targets)
    fg = (rec.calls[-1]["anchor_state"] == 1).sum(dim=1).float()
    assert fg[1] == 0 and fg.sum() > 0
    torch.testing.assert_close(rec.calls[-1]["normalizer"], fg.sum())

    model = _model(strategy=rec, normalizer="per_image").train()
    model(images, targets)
    # torchvision: per image / max(1, fg_i), then the mean over the 3 images.
    torch.testing.assert_close(rec.calls[-1]["normalizer"], 3 * fg.clamp(min=1))

    model = _model(strategy=rec, normalizer="ema").train()
    assert model.loss_normalizer.item() == 100.0 and "loss_normalizer" in model.state_dict()
    model(images, targets)
    first = 0.9 * 100 + 0.1 * fg.sum()
    torch.testing.assert_close(rec.calls[-1]["normalizer"], first)
    model(images, targets)
    torch.testing.assert_close(rec.calls[-1]["normalizer"], 0.9 * first + 0.1 * fg.sum())
    model.eval()(images)  # inference does not move the average
    torch.testing.assert_close(model.loss_normalizer, 0.9 * first + 0.1 * fg.sum())

    # A batch without a single foreground anchor divides by 1, never by 0 or by a fraction
    # (the clamp at 1 of the count, and of the count fed into the average).
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 3
    for name, want in [("num_fg", 1.0), ("per_image", 3.0), ("ema", 0.9 * 100 + 0.1 * 1)]:
        model = _model(strategy=rec, normalizer=name).train()
        model(images, empty)
        assert (rec.calls[-1]["anchor_state"] == 1).sum() == 0
        got = rec.calls[-1]["normalizer"]
        assert got.shape == ((3,) if name == "per_image" else ())
        torch.testing.assert_close(got, torch.full_like(got, want))


def test_focal_strategy_normalisation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=g)
    targets = torch.zeros(2, 5, 3)
    targets[0, 1, 2] = 1.0
    state = torch.tensor([[0, 1, -1, 0, 0], [0, 0, 0, -1, 0]])
    box_loss = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0], [0.0] * 5])
    per_anchor = tv_focal_loss(logits, targets).sum(-1) * (state >= 0)
    out = FocalStrategy()(
        cls_logits=logits, cls_targets=targets, anchor_state=state, box_loss=box_loss,
        boxes=None, normalizer=torch.tensor(4.0),
    )  # fmt: skip
    torch.testing.assert_close(out["loss_cls"], per_anchor.sum() / 4)
    torch.testing.assert_close(out["loss_box"], torch.tensor(0.5))
    per_image = FocalStrategy()(
        cls_logits=logits, cls_targets=targets, anchor_state=state, box_loss=box_loss,
        boxes=None, normalizer=torch.tensor([2.0, 4.0]),
    )  # fmt: skip
    torch.testing.assert_close(
        per_image["loss_cls"], per_anchor[0].sum() / 2 + per_anchor[1].sum() / 4
    )


def test_crowd_boxes_make_covered_background_anchors_ignored():
    rec = Recorder()
    model = _model(strategy=rec).train()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0])}]
    model(_images(1), targets)
    plain = rec.calls[-1]["anchor_state"][0]
    crowd = [dict(targets[0], crowd_boxes=torch.tensor([[24.0, 0.0, 64.0, 64.0]]))]
    model(_images(1), crowd)
    with_crowd = rec.calls[-1]["anchor_state"][0]
    anchors = model.anchor_generator([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)])
    inside = (
        (anchors[:, 0] >= 24) & (anchors[:, 2] <= 64) & (anchors[:, 1] >= 0) & (anchors[:, 3] <= 64)
    )
    assert inside.sum() > 0
    assert (with_crowd[inside & (plain == 0)] == -1).all()
    assert torch.equal(with_crowd[plain == 1], plain[plain == 1])  # foreground stays
    changed = with_crowd != plain
    assert changed.any() and (plain[changed] == 0).all()


def test_frozen_parameters_get_no_gradient():
    model = _model(freeze_at=2).train()
    losses = model(_images(), _targets())
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert (
        not model.backbone.conv1.weight.requires_grad and model.backbone.conv1.weight.grad is None
    )
    assert model.backbone.layer1[0].conv1.weight.grad is None
    assert model.backbone.layer2[0].conv1.weight.grad is not None
    assert model.head.cls_score.weight.grad is not None


@pytest.mark.parametrize("name", ["loss_cls", "loss_box"])
def test_gradient_step_decreases_loss_as_first_order_predicts(name):
    # One plain SGD step of size lr changes the loss by -lr |g|^2 to first order: checks the
    # whole backward pass (custom focal-loss gradient included) against the forward.
    model = _model().train()
    images, targets = _images(), _targets()
    params = [p for p in model.parameters() if p.requires_grad]

    def total() -> torch.Tensor:
        return model(images, targets)[name]

    loss0 = total()
    grads = [
        g if g is not None else torch.zeros_like(p)
        for p, g in zip(params, torch.autograd.grad(loss0, params, allow_unused=True), strict=True)
    ]
    sq_norm = sum((g * g).sum() for g in grads)
    lr = 1e-3 / sq_norm.item() * loss0.item()  # a step that should remove ~0.1% of the loss
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= lr * g
        loss1 = total()
    predicted = lr * sq_norm
    assert loss1 < loss0
    torch.testing.assert_close(loss0 - loss1, predicted, rtol=0.1, atol=0)


def _eval_model(**overrides):
    model = _model(**overrides).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_score.weight, std=0.3)
        model.head.cls_score.bias.fill_(-1.0)
        torch.nn.init.normal_(model.head.bbox_pred.weight, std=0.3)
    return model


def test_inference_outputs():
    model = _eval_model(detections_per_img=7, score_thresh=0.2)
    sizes = [(40, 50), (64, 64), (64, 30)]
    with torch.no_grad():
        dets = model(_images(), image_sizes=sizes)
    assert len(dets) == 3
    for det, (h, w) in zip(dets, sizes, strict=True):
        assert set(det) == {"boxes", "scores", "labels"}
        assert 0 < len(det["scores"]) <= 7
        assert det["boxes"].shape == (len(det["scores"]), 4) and det["labels"].dtype == torch.long
        assert (det["scores"] > 0.2).all()
        assert (det["scores"][1:] <= det["scores"][:-1]).all()  # sorted
        assert det["labels"].min() >= 0 and det["labels"].max() < K
        boxes = det["boxes"]
        assert (
            (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        )
        # Class-wise NMS: no two same-class detections overlap more than 0.5.
        for label in det["labels"].unique():
            b = boxes[det["labels"] == label]
            iou = box_iou(b, b).fill_diagonal_(0)
            assert (iou <= 0.5).all()


def test_inference_is_batch_invariant():
    # Batched top-k / NMS / per-image limit give what each image gets on its own.
    model = _eval_model(detections_per_img=20)
    images = _images()
    with torch.no_grad():
        batched = model(images)
        for i in range(3):
            (single,) = model(images[i : i + 1])
            for key in ("boxes", "scores", "labels"):
                # Convolution algorithms may differ with the batch size: float noise only.
                torch.testing.assert_close(batched[i][key], single[key], rtol=1e-4, atol=1e-4)
    assert all(len(d["scores"]) == 20 for d in batched)


def test_inference_topk_and_threshold():
    model = _eval_model(topk_candidates=1, score_thresh=0.0, nms_thresh=1.0)
    with torch.no_grad():
        dets = model(_images(2))
        cls, _, _ = _head_outputs(model, _images(2))
    # One candidate per level: the level's best (anchor, class) score.
    levels = [8 * 8, 4 * 4, 2 * 2, 1, 1]
    best = torch.stack(
        [s.amax(dim=(1, 2)) for s in torch.sigmoid(cls).split([9 * c for c in levels], dim=1)], 1
    )
    for i, det in enumerate(dets):
        assert len(det["scores"]) == 5
        torch.testing.assert_close(det["scores"], best[i].sort(descending=True).values)
    nothing = _model(score_thresh=0.5).eval()  # prior 0.01 everywhere: no score passes 0.5
    with torch.no_grad():
        empty = nothing(_images(2))
    assert [len(d["scores"]) for d in empty] == [0, 0] and empty[0]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("max_chunk", [5, 37, 1000])
def test_grouped_nms_equals_batched_nms(max_chunk):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(400, 2, generator=g) * 20], dim=1)
    scores = torch.rand(400, generator=g)
    groups = torch.randint(0, 23, (400,), generator=g)
    expected = batched_nms(boxes, scores, groups, 0.5)
    got = grouped_nms(boxes, scores, groups, 0.5, max_chunk=max_chunk)
    assert got.tolist() == expected.tolist()
    assert 50 < len(got) < 400


def test_c5_only_detector():
    rec = Recorder()
    model = _model(fpn_variant="c5_only", strategy=rec).train()
    assert model.fpn.levels == [5] and model.anchor_generator.strides == [32]
    assert model.anchor_generator.num_anchors_per_location == 5 * 3 * 3
    assert model.anchor_generator.sizes[0][0] == 32 and model.anchor_generator.sizes[0][-1] > 800
    model(_images(), _targets())
    assert rec.calls[-1]["cls_logits"].shape == (3, 2 * 2 * 45, K)
    assert (rec.calls[-1]["anchor_state"] == 1).any()
    model.eval()
    with torch.no_grad():
        assert len(model(_images(1))) == 1


@pytest.mark.parametrize(("variant", "levels"), [("fpn", 5), ("c5_only", 1)])
def test_builder_gives_a_bn_head_one_norm_per_level_it_is_called_on(variant, levels):
    model = _model(head_norm="BN", fpn_variant=variant)
    assert model.head.num_levels == levels == len(model.fpn.levels)
    assert len(model.head.cls_subnet[1].norms) == levels
    model.train()
    losses = model(torch.randn(3, 3, 64, 64), _targets())
    assert torch.isfinite(losses["loss_cls"]) and torch.isfinite(losses["loss_box"])
    bns = model.head.bbox_subnet[1].norms
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)  # every level's BN trained once


def test_builder_attributes():
    model = _model(score_thresh=0.1, topk_candidates=50, nms_thresh=0.6, detections_per_img=9)
    assert model.num_classes == K and model.head.num_classes == K
    assert (
        model.score_thresh,
        model.topk_candidates,
        model.nms_thresh,
        model.detections_per_img,
    ) == (
        0.1,
        50,
        0.6,
        9,
    )
    assert (model.min_level, model.max_level, model.depth) == (3, 7, 10)
    assert isinstance(model.strategy, FocalStrategy)


def test_training_requires_targets():
    model = _model().train()
    with pytest.raises(ValueError, match="targets"):
        model(_images(1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"aspect_ratios": [1.0, -0.5]}, "aspect_ratios"),
        ({"min_level": 1}, "min_level"),
        ({"max_level": 8}, "max_level"),
        ({"min_level": 6, "max_level": 4}, "min_level"),
        ({"scales_per_octave": 0}, "scales_per_octave"),
        ({"fg_iou": 0.3, "bg_iou": 0.4}, "bg_iou"),
        ({"box_loss": "giou"}, "box_loss"),
        ({"normalizer": "fg_plus_one"}, "normalizer"),
        ({"score_thresh": 1.5}, "score_thresh"),
        ({"topk_candidates": 0}, "topk_candidates"),
        ({"detections_per_img": 0}, "detections_per_img"),
        ({"smooth_l1_beta": -1.0}, "smooth_l1_beta"),
        ({"depth": 12}, "depth"),
        ({"fpn_variant": "panet"}, "variant"),
        ({"prior_prob": 1.0}, "prior_prob"),
    ],
)
def test_builder_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _model(**kwargs)


def test_bf16_autocast_keeps_losses_and_boxes_in_float32_and_close_to_fp32():
    """Under CPU bf16 autocast the convolutions run in bf16, the losses and decoding in fp32."""
    model, images = _model(), _images()
    with torch.no_grad():
        ref = model(images, _targets())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images, _targets())
    for key in ("loss_cls", "loss_box"):
        assert low[key].dtype == torch.float32
        # bf16 keeps 8 mantissa bits: a few tenths of a percent per conv, not a different loss.
        torch.testing.assert_close(low[key], ref[key], rtol=0.05, atol=1e-3)
    # What a strategy receives is float32 too (the detector casts the head outputs once), so a
    # strategy that forgets to upcast still computes its loss in float32.
    rec = Recorder()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _model(strategy=rec).train()(images, _targets())
    assert rec.calls[-1]["cls_logits"].dtype == torch.float32
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model(images)
    assert all(
        d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32 for d in dets
    )
