"""RetinaNet: backbone -> FPN -> shared head over anchors; batched training losses and inference.

Training matches the anchors of the whole padded batch at once: the gt boxes are padded to
(N, Gmax, 4), one `box_iou` call gives the (N, Gmax, A) IoU matrix, one `Matcher` call labels
every anchor, and the per-anchor losses go to the training strategy (focal loss, OHEM, ...) as
(N, A, ...) tensors, with no per-image Python loop. Inference keeps, per level, the top
``topk_candidates`` scores above ``score_thresh`` for all images at once, decodes and clips
those boxes, runs one class- and image-wise NMS and keeps ``detections_per_img`` per image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import batched_nms, box_iou

from ..losses import l1_loss, smooth_l1_loss
from ..sampling import FocalStrategy, LossStrategy
from .anchors import AnchorGenerator, paper_anchor_sizes
from .backbone import ResNetBackbone
from .box_coder import BoxCoder
from .fpn import RetinaFPN
from .head import RetinaHead
from .matcher import Matcher, anchor_state, box_ioa

__all__ = [
    "RetinaNet",
    "build_retinanet",
    "build_anchor_generator",
    "grouped_nms",
    "BOX_LOSSES",
    "NORMALIZERS",
]

BOX_LOSSES = ("smooth_l1", "l1")
NORMALIZERS = ("num_fg", "per_image", "ema")


def _check_unit(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _pad(tensors: list[Tensor], width: int | None, dtype: torch.dtype, device: torch.device):
    """Pad per-image (G_i, ...) tensors to (N, Gmax, ...); returns (padded, valid (N, Gmax))."""
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    if width is not None:
        tensors = [t.reshape(-1, width) for t in tensors]
    counts = torch.tensor([len(t) for t in tensors], device=device)
    padded = pad_sequence(tensors, batch_first=True)
    valid = torch.arange(padded.shape[1], device=device)[None, :] < counts[:, None]
    return padded, valid


def grouped_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float, max_chunk: int | None = None
) -> Tensor:
    """NMS within each group (e.g. each (image, class)), by `torchvision.ops.batched_nms`.

    Same result as ``batched_nms(boxes, scores, groups, iou_thresh)``, faster for many boxes in
    many groups: batched_nms then loops over the groups, scanning all boxes for each. Here the
    boxes are sorted by group and cut into chunks of whole groups of at most ``max_chunk`` boxes
    (1000 on CPU, 25000 on GPU: below those batched_nms uses its one-call coordinate trick,
    whose cost grows with the square of the chunk). The coordinates go to float64 so that the
    trick's offsets (group index * max coordinate) cost no precision.

    Args:
        boxes: (M, 4) xyxy; scores: (M,); groups: (M,) long group ids.

    Returns:
        Indices of the kept boxes, by decreasing score.
    """
    if max_chunk is None:
        max_chunk = 1000 if boxes.device.type == "cpu" else 25000
    boxes, scores = boxes.double(), scores.double()
    if len(boxes) <= max_chunk:
        return batched_nms(boxes, scores, groups, iou_thresh)
    order = torch.sort(groups, stable=True).indices
    sizes = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    keeps, begin, end = [], 0, 0
    for size in sizes + [max_chunk + 1]:  # the sentinel flushes the last chunk
        if end > begin and end - begin + size > max_chunk:
            chunk = order[begin:end]
            keeps.append(chunk[batched_nms(boxes[chunk], scores[chunk], groups[chunk], iou_thresh)])
            begin = end
        end += size
    keep = torch.cat(keeps)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


class RetinaNet(nn.Module):
    """One-stage detector of "Focal Loss for Dense Object Detection".

    Args:
        backbone: images (N, 3, H, W) -> {"C2".."C5"} (`ResNetBackbone`).
        fpn: backbone maps -> list of pyramid maps (`RetinaFPN`).
        anchor_generator: one anchor set per pyramid map (`AnchorGenerator`), same order.
        head: pyramid maps -> (cls_logits (N, A, K), bbox_deltas (N, A, 4)) (`RetinaHead`).
        matcher: (N, G, A) IoU -> (N, A) matched gt index / -1 background / -2 ignore.
        box_coder: anchors <-> (dx, dy, dw, dh).
        strategy: the training loss (`retina_sweep.sampling.LossStrategy`).
        num_classes: K >= 1, labels 0..K-1 (no background class).
        box_loss: ``"smooth_l1"`` (Detectron) or ``"l1"`` (torchvision, mmdetection).
        smooth_l1_beta: beta of the smooth L1 (0.11 as Detectron; 0 = L1).
        normalizer: what the summed losses are divided by:
            ``"num_fg"``: max(1, foreground anchors in the batch) (paper);
            ``"per_image"``: per image max(1, fg_i), then the mean over images (torchvision);
            ``"ema"``: an exponential moving average of the batch's foreground count, start
            100, momentum 0.9 (detectron2); stored in the ``loss_normalizer`` buffer.
        score_thresh: inference keeps scores > this (0.05).
        topk_candidates: inference keeps at most this many (anchor, class) candidates per level
            and image before NMS (1000).
        nms_thresh: IoU threshold of the per-class NMS (0.5).
        detections_per_img: detections kept per image after NMS (100).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        fpn: nn.Module,
        anchor_generator: AnchorGenerator,
        head: RetinaHead,
        matcher: Matcher,
        box_coder: BoxCoder,
        strategy: LossStrategy,
        num_classes: int,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        normalizer: str = "num_fg",
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = _check_positive_int("num_classes", num_classes)
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if not smooth_l1_beta >= 0:
            raise ValueError(f"smooth_l1_beta must be >= 0, got {smooth_l1_beta}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if getattr(head, "num_classes", num_classes) != num_classes:
            raise ValueError(f"num_classes={num_classes} but the head predicts {head.num_classes}")
        if getattr(head, "num_anchors", None) not in (
            None,
            anchor_generator.num_anchors_per_location,
        ):
            raise ValueError(
                f"head.num_anchors={head.num_anchors} but the anchor generator has "
                f"{anchor_generator.num_anchors_per_location} anchors per location"
            )
        fpn_strides = getattr(fpn, "strides", None)
        if fpn_strides is not None and list(fpn_strides) != list(anchor_generator.strides):
            raise ValueError(
                f"anchor_generator.strides={anchor_generator.strides} must equal the FPN "
                f"strides {list(fpn_strides)}"
            )
        self.backbone = backbone
        self.fpn = fpn
        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = matcher
        self.box_coder = box_coder
        self.strategy = strategy
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.normalizer = normalizer
        self.score_thresh = _check_unit("score_thresh", score_thresh)
        self.topk_candidates = _check_positive_int("topk_candidates", topk_candidates)
        self.nms_thresh = _check_unit("nms_thresh", nms_thresh)
        self.detections_per_img = _check_positive_int("detections_per_img", detections_per_img)
        self.ema_momentum = 0.9
        # detectron2's EMA of the foreground count; a buffer so that a resumed run continues it.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        # NHWC convolutions are faster on CPU (oneDNN) and on tensor cores, and make the head's
        # (N, C, H, W) -> (N, HWA, K) permute a view. Same math; float summation order differs.
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"loss_cls", "loss_box"}``; eval: one dict per image.

        Args:
            images: (N, 3, H, W) normalised, padded batch (H, W divisible by the largest stride).
            targets: training only, per image ``{"boxes": (G, 4) xyxy px, "labels": (G,) long in
                0..K-1, "crowd_boxes": (Gc, 4) optional}``; G may be 0.
            image_sizes: per image the (h, w) of the real image inside the padding (boxes are
                clipped to it at inference); defaults to (H, W).

        Returns:
            eval: ``[{"boxes": (D, 4), "scores": (D,), "labels": (D,) long in 0..K-1}]``, D <=
            ``detections_per_img``, sorted by decreasing score.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        pyramid = self.fpn(self.backbone(images))
        cls_logits, bbox_deltas = self.head(pyramid)
        # Under autocast the head's convolutions give float16 or bfloat16. The losses upcast on
        # their own; casting once here makes every consumer (strategies, decoding, thresholds)
        # see float32, whatever a future strategy forgets to cast.
        cls_logits, bbox_deltas = cls_logits.float(), bbox_deltas.float()
        shapes = [tuple(p.shape[-2:]) for p in pyramid]
        anchors = self.anchor_generator(shapes, device=images.device)
        if cls_logits.shape[1] != anchors.shape[0]:
            raise RuntimeError(
                f"the head predicts {cls_logits.shape[1]} anchors but the generator made "
                f"{anchors.shape[0]}: check head.num_anchors and the FPN levels"
            )
        if self.training:
            if targets is None or len(targets) != images.shape[0]:
                raise ValueError("targets must be given in training mode, one dict per image")
            return self.losses(cls_logits, bbox_deltas, anchors, targets)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.inference(cls_logits, bbox_deltas, anchors, shapes, image_sizes)

    # ------------------------------------------------------------------------------------------
    def match(
        self, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Match the anchors of a whole batch.

        Returns:
            matched_idxs (N, A) long (gt index / -1 background / -2 ignore), gt_boxes
            (N, Gmax, 4) and gt_labels (N, Gmax), padded.
        """
        device = anchors.device
        n, a = len(targets), anchors.shape[0]
        gt_boxes, gt_valid = _pad([t["boxes"] for t in targets], 4, torch.float32, device)
        gt_labels, _ = _pad([t["labels"] for t in targets], None, torch.long, device)
        g = gt_boxes.shape[1]
        # One IoU call for the batch: the anchors are the same for every image.
        iou = box_iou(gt_boxes.reshape(-1, 4), anchors).view(n, g, a)
        crowd_ioa = crowd_valid = None
        if any("crowd_boxes" in t and len(t["crowd_boxes"]) > 0 for t in targets):
            crowd = [t.get("crowd_boxes", anchors.new_zeros(0, 4)) for t in targets]
            crowd_boxes, crowd_valid = _pad(crowd, 4, torch.float32, device)
            crowd_ioa = box_ioa(crowd_boxes.reshape(-1, 4), anchors).view(n, -1, a)
        matched = self.matcher(iou, gt_valid, crowd_ioa, crowd_valid)
        return matched, gt_boxes, gt_labels

    def _normalizer(self, fg: Tensor) -> Tensor:
        # Counts are integers: no gradient flows into the normaliser.
        if self.normalizer == "per_image":
            return fg.sum(dim=1).clamp(min=1).float() * fg.shape[0]
        num_fg = fg.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP averages gradients over ranks: normalise by the mean count over ranks so the
            # step equals that of one process over the global batch (as mmdetection's
            # reduce_mean(num_pos); the paper divides by the foreground count of the batch).
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(num_fg)
            num_fg = num_fg / world
        num_fg = num_fg.clamp(min=1)
        if self.normalizer == "num_fg":
            return num_fg
        m = self.ema_momentum
        self.loss_normalizer.mul_(m).add_((1 - m) * num_fg)
        # A copy: autograd saves the divisor, and the buffer changes in the next forward.
        return self.loss_normalizer.clone()

    def losses(
        self,
        cls_logits: Tensor,
        bbox_deltas: Tensor,
        anchors: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Training losses from the head outputs (N, A, K), (N, A, 4) and anchors (A, 4)."""
        n, a, k = cls_logits.shape
        matched, gt_boxes, gt_labels = self.match(anchors, targets)
        state = anchor_state(matched)
        fg = state == 1
        fg_img, fg_anchor = fg.nonzero(as_tuple=True)
        fg_gt = matched[fg_img, fg_anchor]

        cls_targets = torch.zeros((n, a, k), dtype=torch.float32, device=cls_logits.device)
        cls_targets[fg_img, fg_anchor, gt_labels[fg_img, fg_gt]] = 1.0

        # Box loss only where it counts: the foreground anchors, scattered back to (N, A).
        target_deltas = self.box_coder.encode(gt_boxes[fg_img, fg_gt], anchors[fg_anchor])
        pred_deltas = bbox_deltas[fg_img, fg_anchor].float()
        if self.box_loss == "l1":
            per_fg = l1_loss(pred_deltas, target_deltas).sum(dim=-1)
        else:
            per_fg = smooth_l1_loss(pred_deltas, target_deltas, self.smooth_l1_beta).sum(dim=-1)
        box_loss = per_fg.new_zeros(n, a).index_put((fg_img, fg_anchor), per_fg)

        boxes = None
        if getattr(self.strategy, "needs_boxes", True):
            with torch.no_grad():
                boxes = self.box_coder.decode(bbox_deltas.detach().float(), anchors)
        return self.strategy(
            cls_logits=cls_logits,
            cls_targets=cls_targets,
            anchor_state=state,
            box_loss=box_loss,
            boxes=boxes,
            normalizer=self._normalizer(fg),
        )

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(
        self,
        cls_logits: Tensor,
        bbox_deltas: Tensor,
        anchors: Tensor,
        shapes: Sequence[tuple[int, int]],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections from head outputs (N, A, K), (N, A, 4), anchors (A, 4) and the (H, W) of
        each pyramid map (to split A into levels)."""
        n, _, k = cls_logits.shape
        a_loc = self.anchor_generator.num_anchors_per_location
        img_l, flat_l, score_l = [], [], []
        start = 0
        for h, w in shapes:
            count = h * w * a_loc
            # Candidates of the level: (anchor, class) pairs of all images at once, flattened
            # to (N, count * K) in (anchor, class) order as torchvision.
            scores = torch.sigmoid(cls_logits[:, start : start + count].reshape(n, -1).float())
            above = scores > self.score_thresh
            if int(above.sum(dim=1).max()) > self.topk_candidates:
                # Only then a top-k: it costs more than everything else here.
                top_scores, top_idx = scores.masked_fill(~above, -1.0).topk(
                    self.topk_candidates, dim=1, sorted=False
                )
                img, slot = (top_scores > self.score_thresh).nonzero(as_tuple=True)
                flat = top_idx[img, slot]
            else:
                img, flat = above.nonzero(as_tuple=True)
            img_l.append(img)
            flat_l.append(flat + start * k)
            score_l.append(scores[img, flat])
            start += count
        img_idx, flat_idx, scores = (torch.cat(x) for x in (img_l, flat_l, score_l))
        anchor_idx = torch.div(flat_idx, k, rounding_mode="floor")
        labels = flat_idx % k
        boxes = self.box_coder.decode(bbox_deltas[img_idx, anchor_idx].float(), anchors[anchor_idx])
        sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[img_idx]
        hw = sizes.flip(-1).repeat(1, 2)  # (w, h, w, h) of each candidate's image
        boxes = torch.minimum(boxes.clamp(min=0), hw)

        keep = grouped_nms(boxes, scores, img_idx * k + labels, self.nms_thresh)
        # keep is sorted by decreasing score; a stable sort by image keeps that order within
        # each image, then the first detections_per_img of every image survive.
        keep = keep[torch.sort(img_idx[keep], stable=True).indices]
        kept_img = img_idx[keep]
        counts = torch.bincount(kept_img, minlength=n)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(keep), device=keep.device) - first[kept_img]
        keep = keep[rank < self.detections_per_img]
        per_image = counts.clamp(max=self.detections_per_img).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                boxes[keep].split(per_image),
                scores[keep].split(per_image),
                labels[keep].split(per_image),
                strict=True,
            )
        ]


# ----------------------------------------------------------------------------------------------
def build_anchor_generator(
    *,
    fpn: RetinaFPN,
    min_level: int,
    max_level: int,
    base_size: float = 32,
    scales_per_octave: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    truncate: bool = False,
    round_cell_anchors: bool = False,
    offset: float = 0.0,
) -> AnchorGenerator:
    """The paper's anchors for levels ``min_level..max_level`` on the maps of ``fpn``.

    For ``fpn.variant == "c5_only"`` (one map, stride 32) the single level gets the sizes of
    all levels concatenated (A_loc = (max - min + 1) * scales * ratios): the same anchor boxes
    as the full pyramid, but all tiled at stride 32, which is what "features from only the final
    ResNet layer" can do.
    """
    sizes = paper_anchor_sizes(min_level, max_level, base_size, scales_per_octave, truncate)
    if getattr(fpn, "variant", "fpn") == "c5_only":
        sizes = [[s for level in sizes for s in level]]
    return AnchorGenerator(
        sizes=sizes,
        aspect_ratios=list(aspect_ratios),
        strides=list(fpn.strides),
        offset=offset,
        round_cell_anchors=round_cell_anchors,
    )


def build_retinanet(
    *,
    num_classes: int,
    depth: int = 50,
    pretrained: str | os.PathLike | None = None,
    freeze_at: int = 2,
    backbone_norm: str = "frozen_bn",
    fpn_channels: int = 256,
    min_level: int = 3,
    max_level: int = 7,
    fpn_variant: str = "fpn",
    base_size: float = 32,
    scales_per_octave: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    truncate_anchor_sizes: bool = False,
    round_cell_anchors: bool = False,
    anchor_offset: float = 0.0,
    head_convs: int = 4,
    head_channels: int = 256,
    head_norm: str | None = None,
    prior_prob: float = 0.01,
    strategy: LossStrategy | None = None,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality: bool = True,
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 0.11,
    normalizer: str = "num_fg",
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    channels_last: bool = True,
) -> RetinaNet:
    """A `RetinaNet` from plain config values (defaults: the paper's ResNet-50-FPN recipe).

    ``strategy`` defaults to the focal loss (alpha 0.25, gamma 2). ``round_cell_anchors`` and
    ``truncate_anchor_sizes`` reproduce torchvision's anchors; ``anchor_offset`` is the anchor
    centre offset in cells (0 = torchvision / detectron2).
    """
    # The cheap, config-only parts first: a bad threshold fails before any weight is built.
    matcher = Matcher(
        fg_iou_thresh=fg_iou, bg_iou_thresh=bg_iou, allow_low_quality_matches=allow_low_quality
    )
    _check_positive_int("num_classes", num_classes)
    paper_anchor_sizes(min_level, max_level, base_size, scales_per_octave)  # checks the values
    if len(aspect_ratios) == 0 or any(not r > 0 for r in aspect_ratios):
        raise ValueError(
            f"aspect_ratios must be a non-empty list of numbers > 0, got {aspect_ratios}"
        )
    backbone = ResNetBackbone(
        depth=depth, pretrained=pretrained, freeze_at=freeze_at, norm=backbone_norm
    )
    fpn = RetinaFPN(
        in_channels=backbone.out_channels,
        out_channels=fpn_channels,
        min_level=min_level,
        max_level=max_level,
        variant=fpn_variant,
    )
    anchor_generator = build_anchor_generator(
        fpn=fpn,
        min_level=min_level,
        max_level=max_level,
        base_size=base_size,
        scales_per_octave=scales_per_octave,
        aspect_ratios=aspect_ratios,
        truncate=truncate_anchor_sizes,
        round_cell_anchors=round_cell_anchors,
        offset=anchor_offset,
    )
    head = RetinaHead(
        in_channels=fpn_channels,
        num_anchors=anchor_generator.num_anchors_per_location,
        num_classes=num_classes,
        num_convs=head_convs,
        channels=head_channels,
        prior_prob=prior_prob,
        norm=head_norm,
        num_levels=len(fpn.levels),
    )
    model = RetinaNet(
        backbone=backbone,
        fpn=fpn,
        anchor_generator=anchor_generator,
        head=head,
        matcher=matcher,
        box_coder=BoxCoder(),
        strategy=strategy if strategy is not None else FocalStrategy(),
        num_classes=num_classes,
        box_loss=box_loss,
        smooth_l1_beta=smooth_l1_beta,
        normalizer=normalizer,
        score_thresh=score_thresh,
        topk_candidates=topk_candidates,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        channels_last=channels_last,
    )
    # The config values that define the architecture, for logging and checkpoints.
    model.depth, model.min_level, model.max_level = depth, min_level, max_level
    model.fpn_variant = fpn_variant
    return model
