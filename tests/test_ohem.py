"""OHEM, OHEM 1:3 and random 1:3 sampling strategies (retina_sweep/ohem.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import retina_sweep.ohem as ohem_mod
from retina_sweep.ohem import (
    OHEM_STRATEGIES,
    OHEM1to3Strategy,
    OHEMStrategy,
    RandomSamplingStrategy,
    ohem_select,
    per_anchor_ce,
    random_select,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "retina_sweep" / "conf" / "loss"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def disjoint_boxes(n: int, a: int) -> torch.Tensor:
    """(n, a, 4) boxes that never overlap each other (NMS keeps all of them)."""
    x1 = torch.arange(a, dtype=torch.float32) * 10.0
    b = torch.stack([x1, torch.zeros(a), x1 + 5.0, torch.full((a,), 5.0)], dim=1)
    return b.expand(n, a, 4).clone()


def one_hot_targets(state: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """One-hot float targets with a random class for foreground, all-zero rows otherwise."""
    labels = torch.randint(0, k, state.shape, generator=gen)
    t = F.one_hot(labels, k).float()
    return t * (state == 1).unsqueeze(-1).float()


def make_batch(
    n: int = 2,
    a: int = 200,
    k: int = 3,
    *,
    p_fg: float = 0.1,
    p_ignore: float = 0.1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, a, generator=gen)
    state = torch.zeros(n, a, dtype=torch.long)
    state[u < p_fg] = 1
    state[(u >= p_fg) & (u < p_fg + p_ignore)] = -1
    logits = torch.randn(n, a, k, generator=gen) * 2.0
    targets = one_hot_targets(state, k, gen)
    box_loss = torch.rand(n, a, generator=gen) * 3.0 * (state == 1).float()
    return {
        "cls_logits": logits,
        "cls_targets": targets,
        "anchor_state": state,
        "box_loss": box_loss,
        "boxes": disjoint_boxes(n, a),
        "normalizer": (state == 1).sum().clamp(min=1).float(),
    }


def reference_scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-anchor CE summed over K plus fg box loss, written out independently of the module."""
    x, t = batch["cls_logits"].double(), batch["cls_targets"].double()
    ce = (t * F.softplus(-x) + (1 - t) * F.softplus(x)).sum(-1)
    fg = batch["anchor_state"] == 1
    return ce + batch["box_loss"].double() * fg.double()


def selected_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(row.nonzero().flatten().tolist()) for row in mask]


def ohem(batch_size: int, nms_thresh: float, **kw) -> OHEMStrategy:
    return OHEMStrategy(batch_size=batch_size, nms_thresh=nms_thresh, **kw)


def select(strategy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return strategy.select(
        batch["cls_logits"],
        batch["cls_targets"],
        batch["anchor_state"],
        batch["box_loss"],
        batch["boxes"],
    )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def test_per_anchor_ce_is_unweighted_bce_summed_over_classes() -> None:
    b = make_batch(n=2, a=30, k=4)
    got = per_anchor_ce(b["cls_logits"], b["cls_targets"])
    x, t = b["cls_logits"].double(), b["cls_targets"].double()
    expected = -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))
    assert got.shape == (2, 30)
    torch.testing.assert_close(got.double(), expected.sum(-1), rtol=1e-5, atol=1e-6)


def test_per_anchor_ce_matches_focal_loss_with_gamma_0_and_no_alpha() -> None:
    from retina_sweep import losses

    b = make_batch(n=1, a=20, k=3)
    fl = losses.sigmoid_focal_loss(b["cls_logits"], b["cls_targets"], alpha=-1, gamma=0.0)
    torch.testing.assert_close(per_anchor_ce(b["cls_logits"], b["cls_targets"]), fl.sum(-1))


# --------------------------------------------------------------------------------------------
# OHEM selection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_ohem_without_nms_selects_top_k_by_loss(batch_size: int) -> None:
    b = make_batch(n=3, a=150, k=3, seed=batch_size)
    # Identical boxes everywhere: any NMS below 1.0 would keep one anchor per image.
    b["boxes"] = torch.tensor([0.0, 0.0, 10.0, 10.0]).expand(3, 150, 4).clone()
    mask = select(ohem(batch_size, 1.0), b)

    scores = reference_scores(b)
    for i in range(3):
        valid = (b["anchor_state"][i] >= 0).nonzero().flatten()
        order = torch.argsort(scores[i, valid], descending=True)
        expected = set(valid[order[:batch_size]].tolist())
        assert selected_sets(mask)[i] == expected
        assert len(expected) == batch_size


def test_nms_suppresses_the_lower_loss_duplicate() -> None:
    a = 10
    state = torch.zeros(1, a, dtype=torch.long)
    boxes = disjoint_boxes(1, a)
    boxes[0, 1] = boxes[0, 0]  # exact duplicate of anchor 0
    scores = torch.linspace(1.0, 0.1, a).unsqueeze(0)  # anchor 0 highest, anchor 1 slightly lower
    scores[0, 1] = 0.99

    kept = ohem_select(scores, boxes, state, batch_size=a, nms_thresh=0.7)
    assert selected_sets(kept)[0] == set(range(a)) - {1}

    # Swap the losses: the duplicate now wins, anchor 0 is the one suppressed.
    scores[0, 0], scores[0, 1] = 0.99, 1.0
    kept = ohem_select(scores, boxes, state, batch_size=a, nms_thresh=0.7)
    assert selected_sets(kept)[0] == set(range(a)) - {0}

    # Control: with the NMS disabled both duplicates are kept.
    kept = ohem_select(scores, boxes, state, batch_size=a, nms_thresh=1.0)
    assert selected_sets(kept)[0] == set(range(a))


def test_nms_threshold_semantics_iou_must_exceed_threshold() -> None:
    state = torch.zeros(1, 3, dtype=torch.long)
    # Box 1 overlaps box 0 with IoU exactly 0.5 (same height, half-width overlap of 2 / 4 units).
    boxes = torch.tensor([[[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0], [50.0, 50.0, 60.0, 60.0]]])
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    keep_07 = ohem_select(scores, boxes, state, batch_size=3, nms_thresh=0.7)
    keep_03 = ohem_select(scores, boxes, state, batch_size=3, nms_thresh=0.3)
    assert selected_sets(keep_07)[0] == {0, 1, 2}
    assert selected_sets(keep_03)[0] == {0, 2}


def test_nms_never_suppresses_across_images() -> None:
    boxes = torch.tensor([0.0, 0.0, 10.0, 10.0]).expand(2, 1, 4).clone()
    state = torch.zeros(2, 1, dtype=torch.long)
    kept = ohem_select(torch.tensor([[2.0], [1.0]]), boxes, state, batch_size=1, nms_thresh=0.5)
    assert kept.all()


def test_nms_never_suppresses_across_images_with_negative_coordinates() -> None:
    # Predicted boxes may leave the image. torchvision's batched_nms separates the groups by
    # offsetting boxes by idx * (max coordinate + 1), which assumes coordinates >= 0: here the
    # offset would move image 1's box exactly onto image 0's box.
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[-11.0, -11.0, -1.0, -1.0]]])
    state = torch.zeros(2, 1, dtype=torch.long)
    kept = ohem_select(torch.tensor([[2.0], [1.0]]), boxes, state, batch_size=1, nms_thresh=0.5)
    assert kept.all()


def test_ohem_runs_batched_nms_calls_over_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.Tensor] = []
    real = ohem_mod.batched_nms

    def spy(boxes, scores, idxs, thresh):
        calls.append(idxs.clone())
        return real(boxes, scores, idxs, thresh)

    monkeypatch.setattr(ohem_mod, "batched_nms", spy)
    b = make_batch(n=4, a=100)
    select(ohem(8, 0.5), b)
    # The small first pool, and the full pool only where the first is not provably exact.
    assert 1 <= len(calls) <= 2
    assert all(set(c.tolist()) == {0, 1, 2, 3} for c in calls)  # group id = image index
    n = len(calls)
    select(ohem(8, 1.0), b)
    assert len(calls) == n  # threshold 1.0 skips the NMS entirely


def dense_boxes(n: int, gen: torch.Generator, stride: float = 8.0) -> torch.Tensor:
    """(n, 192, 4) overlapping boxes: 8 x 8 centres at ``stride``, sizes 16 / 24 / 32, jittered."""
    grid = torch.arange(8) * stride + 4
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    c = torch.stack([xs.flatten(), ys.flatten()], dim=1).repeat_interleave(3, dim=0)
    half = torch.tensor([8.0, 12.0, 16.0]).repeat(64)[:, None]
    base = torch.cat([c - half, c + half], dim=1)
    return base + torch.randn(n, *base.shape, generator=gen) * 2.0


def naive_ohem(scores, boxes, state, batch_size, nms_thresh, pos_fraction):
    """Per image: greedy NMS in loss order over every valid anchor, then the top survivors."""
    from torchvision.ops import box_iou

    out = torch.zeros_like(state, dtype=torch.bool)
    for i in range(state.shape[0]):
        order = [j for j in torch.argsort(scores[i], descending=True).tolist() if state[i, j] >= 0]
        kept: list[int] = []
        for j in order:
            if not kept or box_iou(boxes[i, [j]], boxes[i, kept]).max() <= nms_thresh:
                kept.append(j)
        if pos_fraction is None:
            chosen = kept[:batch_size]
        else:
            pos = [j for j in kept if state[i, j] == 1][: int(batch_size * pos_fraction)]
            chosen = pos + [j for j in kept if state[i, j] == 0][: batch_size - len(pos)]
        out[i, chosen] = True
    return out


@pytest.mark.parametrize("pos_fraction", [None, 0.25])
@pytest.mark.parametrize("batch_size", [4, 16, 40])
def test_ohem_equals_a_naive_nms_over_every_anchor(
    monkeypatch: pytest.MonkeyPatch, batch_size: int, pos_fraction: float | None
) -> None:
    """The small-pool shortcut never changes the answer: it matches greedy NMS over all anchors."""
    pools: list[int] = []
    real = ohem_mod._select_from_pool

    def spy(*args):
        pools.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ohem_mod, "_select_from_pool", spy)
    gen = torch.Generator().manual_seed(batch_size)
    for trial in range(6):
        n, a = 3, 192
        state = torch.zeros(n, a, dtype=torch.long)
        u = torch.rand(n, a, generator=gen)
        state[u < 0.08] = 1
        state[(u >= 0.08) & (u < 0.15)] = -1
        scores = torch.rand(n, a, generator=gen) ** (1 + trial)  # from flat to peaked losses
        boxes = dense_boxes(n, gen, stride=[8.0, 2.0][trial % 2])  # stride 2: heavy NMS
        got = ohem_select(
            scores,
            boxes,
            state,
            batch_size=batch_size,
            nms_thresh=0.5,
            pos_fraction=pos_fraction,
            pre_nms_topk=a,  # the full pool is every anchor, as in the naive version
        )
        want = naive_ohem(scores, boxes, state, batch_size, 0.5, pos_fraction)
        assert torch.equal(got, want), (trial, selected_sets(got), selected_sets(want))
    if 8 * batch_size <= 192:
        assert pools.count(4 * batch_size) == 6  # the shortcut was tried every time


def test_pre_nms_topk_limits_the_candidate_pool() -> None:
    boxes = disjoint_boxes(1, 3)
    boxes[0, 1] = boxes[0, 0]
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    state = torch.zeros(1, 3, dtype=torch.long)
    small = ohem_select(scores, boxes, state, batch_size=2, nms_thresh=0.5, pre_nms_topk=2)
    large = ohem_select(scores, boxes, state, batch_size=2, nms_thresh=0.5, pre_nms_topk=3)
    assert selected_sets(small)[0] == {0}  # anchor 2 was outside the pool of 2 candidates
    assert selected_sets(large)[0] == {0, 2}
    assert ohem_mod.default_pre_nms_topk(128) == 2000
    assert ohem_mod.default_pre_nms_topk(512) == 4096


@pytest.mark.parametrize("nms_thresh", [0.5, 1.0])
def test_ignored_anchors_are_never_selected(nms_thresh: float) -> None:
    b = make_batch(n=2, a=60, p_fg=0.2, p_ignore=0.3)
    ignore = b["anchor_state"] == -1
    # Make ignored anchors by far the hardest examples.
    b["cls_logits"][ignore] = 20.0
    num_valid = (~ignore).sum(dim=1)
    strategies = [
        ohem(60, nms_thresh),
        OHEM1to3Strategy(batch_size=60, nms_thresh=nms_thresh),
        RandomSamplingStrategy(batch_size=60, pos_fraction=0.25, seed=0),
    ]
    for strategy in strategies:
        if isinstance(strategy, RandomSamplingStrategy):
            mask = strategy.select(b["anchor_state"])
        else:
            mask = select(strategy, b)
        assert not (mask & ignore).any()
    # Plain OHEM with a batch larger than the valid count and disjoint boxes takes every
    # valid anchor and nothing else.
    assert torch.equal(select(ohem(60, nms_thresh), b).sum(dim=1), num_valid)


# --------------------------------------------------------------------------------------------
# OHEM 1:3
# --------------------------------------------------------------------------------------------
def _ratio_batch(num_fg: int, a: int = 80) -> dict[str, torch.Tensor]:
    """Negatives all harder than positives, so plain OHEM would pick no positive."""
    state = torch.zeros(1, a, dtype=torch.long)
    state[0, :num_fg] = 1
    gen = torch.Generator().manual_seed(num_fg)
    logits = torch.zeros(1, a, 2)
    logits[0, :num_fg, 0] = torch.rand(num_fg, generator=gen) + 1.0  # fg class 0, easy-ish
    logits[0, num_fg:, 1] = torch.rand(a - num_fg, generator=gen) + 3.0  # bg, hard
    targets = torch.zeros(1, a, 2)
    targets[0, :num_fg, 0] = 1.0
    return {
        "cls_logits": logits,
        "cls_targets": targets,
        "anchor_state": state,
        "box_loss": torch.zeros(1, a),
        "boxes": disjoint_boxes(1, a),
        "normalizer": torch.tensor(float(max(num_fg, 1))),
    }


def test_ohem_1to3_takes_the_hardest_quarter_of_positives() -> None:
    b = _ratio_batch(num_fg=30)
    fg = b["anchor_state"][0] == 1
    mask = select(OHEM1to3Strategy(batch_size=16, nms_thresh=0.7), b)[0]
    assert int((mask & fg).sum()) == 4
    assert int((mask & ~fg).sum()) == 12

    scores = reference_scores(b)[0]
    fg_idx, bg_idx = fg.nonzero().flatten(), (~fg).nonzero().flatten()
    hardest_fg = set(fg_idx[torch.argsort(scores[fg_idx], descending=True)[:4]].tolist())
    hardest_bg = set(bg_idx[torch.argsort(scores[bg_idx], descending=True)[:12]].tolist())
    assert set(mask.nonzero().flatten().tolist()) == hardest_fg | hardest_bg

    # Plain OHEM on the same batch picks only (harder) negatives.
    assert not (select(ohem(16, 0.7), b)[0] & fg).any()


def test_ohem_1to3_keeps_positives_outside_the_loss_ranked_pool() -> None:
    # The 40 negatives fill a pool of 16 by loss; positives are still candidates.
    b = _ratio_batch(num_fg=30)
    s = OHEM1to3Strategy(batch_size=16, nms_thresh=0.7, pre_nms_topk=16)
    mask = select(s, b)[0]
    assert int(mask[:30].sum()) == 4 and int(mask.sum()) == 16


@pytest.mark.parametrize("num_fg", [0, 1, 3])
def test_ohem_1to3_fills_with_negatives_when_positives_are_few(num_fg: int) -> None:
    b = _ratio_batch(num_fg=num_fg)
    mask = select(OHEM1to3Strategy(batch_size=16, nms_thresh=0.7), b)[0]
    assert int(mask[:num_fg].sum()) == num_fg
    assert int(mask[num_fg:].sum()) == 16 - num_fg


def test_ohem_1to3_ratio_per_image_in_a_batch() -> None:
    b = make_batch(n=3, a=400, p_fg=0.3, p_ignore=0.1, seed=7)
    mask = select(OHEM1to3Strategy(batch_size=32, nms_thresh=0.5), b)
    fg = b["anchor_state"] == 1
    assert torch.equal((mask & fg).sum(dim=1), torch.full((3,), 8))
    assert torch.equal(mask.sum(dim=1), torch.full((3,), 32))


# --------------------------------------------------------------------------------------------
# Random 1:3
# --------------------------------------------------------------------------------------------
def test_random_sampling_is_reproducible_under_a_seed() -> None:
    b = make_batch(n=2, a=300, p_fg=0.2)
    state = b["anchor_state"]
    rng_before = torch.get_rng_state()
    s1 = RandomSamplingStrategy(batch_size=32, pos_fraction=0.25, seed=3)
    s2 = RandomSamplingStrategy(batch_size=32, pos_fraction=0.25, seed=3)
    seq1 = [s1.select(state) for _ in range(3)]
    seq2 = [s2.select(state) for _ in range(3)]
    for m1, m2 in zip(seq1, seq2, strict=True):
        assert torch.equal(m1, m2)
    assert not torch.equal(seq1[0], seq1[1])  # the generator advances between calls
    other = RandomSamplingStrategy(batch_size=32, pos_fraction=0.25, seed=4).select(state)
    assert not torch.equal(other, seq1[0])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched


@pytest.mark.parametrize(
    ("pos_fraction", "num_fg", "expected_fg"),
    [(0.25, 40, 8), (0.5, 40, 16), (0.25, 3, 3), (0.25, 0, 0)],
)
def test_random_sampling_respects_the_fraction(
    pos_fraction: float, num_fg: int, expected_fg: int
) -> None:
    a = 200
    state = torch.zeros(2, a, dtype=torch.long)
    state[:, :num_fg] = 1
    state[:, num_fg : num_fg + 20] = -1
    gen = torch.Generator().manual_seed(0)
    seen_fg: set[int] = set()
    for _ in range(10):
        mask = random_select(state, batch_size=32, pos_fraction=pos_fraction, generator=gen)
        assert torch.equal((mask & (state == 1)).sum(1), torch.full((2,), expected_fg))
        assert torch.equal(mask.sum(1), torch.full((2,), 32))
        assert not (mask & (state == -1)).any()
        seen_fg |= set(mask[0, :num_fg].nonzero().flatten().tolist())
    if num_fg > expected_fg:
        # Uniform draws reach far more positives than any single minibatch holds.
        assert len(seen_fg) > 2 * expected_fg


# --------------------------------------------------------------------------------------------
# Loss value and gradients
# --------------------------------------------------------------------------------------------
def _bce(x: float, t: float) -> float:
    return math.log1p(math.exp(-x)) if t == 1.0 else math.log1p(math.exp(x))


def test_loss_equals_hand_computed_mean_over_selected_anchors() -> None:
    # One image, 5 anchors, K = 2; anchor 4 is ignored (and would be the hardest).
    logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5], [0.0, 0.0], [1.5, -2.0], [9.0, 9.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    state = torch.tensor([[1, 1, 0, 0, -1]])
    box_loss = torch.tensor([[1.5, 1.2, 0.0, 0.0, 0.0]])
    ce = [
        sum(_bce(logits[0, i, c].item(), targets[0, i, c].item()) for c in range(2))
        for i in range(5)
    ]
    score = [ce[0] + 1.5, ce[1] + 1.2, ce[2], ce[3]]  # ~ [1.94, 1.72, 1.39, 1.83]
    assert sorted(range(4), key=lambda i: -score[i]) == [0, 3, 1, 2]
    kwargs = {
        "cls_logits": logits,
        "cls_targets": targets,
        "anchor_state": state,
        "box_loss": box_loss,
        "boxes": disjoint_boxes(1, 5),
        "normalizer": torch.tensor(2.0),
    }

    # Plain OHEM, batch 3: anchors 0, 3, 1 (two positives).
    out = ohem(3, 1.0)(**kwargs)
    assert out["loss_cls"].item() == pytest.approx((ce[0] + ce[3] + ce[1]) / 3, rel=1e-6)
    assert out["loss_box"].item() == pytest.approx((1.5 + 1.2) / 3, rel=1e-6)

    # OHEM 1:3, batch 4: at most 1 positive (anchor 0, the harder), then negatives 3 and 2;
    # only 3 anchors are available, so the mean is over 3.
    out = OHEM1to3Strategy(batch_size=4, nms_thresh=1.0)(**kwargs)
    assert out["loss_cls"].item() == pytest.approx((ce[0] + ce[3] + ce[2]) / 3, rel=1e-6)
    assert out["loss_box"].item() == pytest.approx(1.5 / 3, rel=1e-6)


def test_loss_is_normalised_by_the_selected_count_of_the_whole_batch() -> None:
    b = make_batch(n=2, a=50, p_fg=0.2, p_ignore=0.0)
    b["anchor_state"][1] = -1  # second image: nothing to select
    b["box_loss"][1] = 0.0
    s = ohem(8, 1.0)
    out = s(**b)
    mask = select(s, b)
    assert int(mask.sum()) == 8
    scores = reference_scores(b)
    ce = scores - b["box_loss"].double() * (b["anchor_state"] == 1).double()
    assert out["loss_cls"].item() == pytest.approx(ce[mask].sum().item() / 8, rel=1e-5)


def _strategies() -> list:
    return [
        ohem(16, 0.5),
        OHEM1to3Strategy(batch_size=16, nms_thresh=0.5),
        RandomSamplingStrategy(batch_size=16, pos_fraction=0.25, seed=1),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_unselected_anchors_receive_zero_gradient(index: int) -> None:
    b = make_batch(n=2, a=120, p_fg=0.2, seed=11)
    strategy = _strategies()[index]
    fg = (b["anchor_state"] == 1).float()
    logits = b["cls_logits"].clone().requires_grad_(True)
    box_leaf = (
        torch.rand(2, 120, generator=torch.Generator().manual_seed(5)) + 0.1
    ).requires_grad_(True)
    box_loss = box_leaf * fg

    # Selection of the same call, replayed: OHEM is deterministic, random uses a twin seed.
    twin = _strategies()[index]
    if isinstance(twin, RandomSamplingStrategy):
        mask = twin.select(b["anchor_state"])
    else:
        mask = twin.select(
            logits.detach(), b["cls_targets"], b["anchor_state"], box_loss.detach(), b["boxes"]
        )

    out = strategy(
        cls_logits=logits,
        cls_targets=b["cls_targets"],
        anchor_state=b["anchor_state"],
        box_loss=box_loss,
        boxes=b["boxes"],
        normalizer=b["normalizer"],
    )
    (out["loss_cls"] + out["loss_box"]).backward()

    assert mask.sum() > 0
    g = logits.grad.abs().sum(-1)
    assert (g[~mask] == 0).all()
    assert (g[mask] > 0).all()  # sigmoid(x) - t is never 0 for finite logits
    expected_box_grad = (mask & (fg > 0)).float() / mask.sum()
    torch.testing.assert_close(box_leaf.grad, expected_box_grad)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_images_without_positives(index: int) -> None:
    b = make_batch(n=2, a=80, p_fg=0.0, p_ignore=0.2)
    assert not (b["anchor_state"] == 1).any()
    logits = b["cls_logits"].requires_grad_(True)
    out = _strategies()[index](**{**b, "cls_logits": logits, "normalizer": torch.tensor(1.0)})
    assert torch.isfinite(out["loss_cls"]) and out["loss_cls"] > 0
    assert out["loss_box"].item() == 0.0
    out["loss_cls"].backward()
    assert int((logits.grad.abs().sum(-1) > 0).sum()) == 2 * 16  # full batch of negatives


@pytest.mark.parametrize("index", [0, 1, 2])
def test_all_ignored_gives_zero_loss_with_a_graph(index: int) -> None:
    b = make_batch(n=1, a=20)
    b["anchor_state"].fill_(-1)
    b["box_loss"].zero_()
    logits = b["cls_logits"].requires_grad_(True)
    out = _strategies()[index](**{**b, "cls_logits": logits})
    assert out["loss_cls"].item() == 0.0 and out["loss_box"].item() == 0.0
    out["loss_cls"].backward()
    assert (logits.grad == 0).all()


# --------------------------------------------------------------------------------------------
# Validation and registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -4, 2.5, True, None])
def test_bad_batch_size(bad) -> None:
    with pytest.raises(ValueError, match=r"batch_size .*\[1, inf\)"):
        OHEMStrategy(batch_size=bad, nms_thresh=0.5)
    with pytest.raises(ValueError, match=r"batch_size .*\[1, inf\)"):
        OHEM1to3Strategy(batch_size=bad, nms_thresh=0.5)
    with pytest.raises(ValueError, match=r"batch_size .*\[1, inf\)"):
        RandomSamplingStrategy(batch_size=bad)


@pytest.mark.parametrize("bad", [0.0, -0.3, 1.01, "0.5"])
def test_bad_nms_thresh(bad) -> None:
    with pytest.raises(ValueError, match=r"nms_thresh .*\(0, 1\]"):
        OHEMStrategy(batch_size=8, nms_thresh=bad)
    with pytest.raises(ValueError, match=r"nms_thresh .*\(0, 1\]"):
        OHEM1to3Strategy(batch_size=8, nms_thresh=bad)


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.5])
def test_bad_pos_fraction(bad) -> None:
    with pytest.raises(ValueError, match=r"pos_fraction .*\(0, 1\]"):
        OHEMStrategy(batch_size=8, nms_thresh=0.5, pos_fraction=bad)
    with pytest.raises(ValueError, match=r"pos_fraction .*\(0, 1\]"):
        OHEM1to3Strategy(batch_size=8, nms_thresh=0.5, pos_fraction=bad)
    with pytest.raises(ValueError, match=r"pos_fraction .*\(0, 1\]"):
        RandomSamplingStrategy(batch_size=8, pos_fraction=bad)


def test_bad_pre_nms_topk_and_seed() -> None:
    with pytest.raises(ValueError, match=r"pre_nms_topk .*\[batch_size=64, inf\)"):
        OHEMStrategy(batch_size=64, nms_thresh=0.5, pre_nms_topk=32)
    with pytest.raises(ValueError, match="seed"):
        RandomSamplingStrategy(batch_size=8, seed=1.5)


def test_bad_input_shapes() -> None:
    b = make_batch(n=1, a=10)
    with pytest.raises(ValueError, match="boxes"):
        ohem(4, 0.5)(**{**b, "boxes": b["boxes"][:, :5]})
    with pytest.raises(ValueError, match="anchor_state"):
        ohem(4, 0.5)(**{**b, "anchor_state": b["anchor_state"][0]})


@pytest.mark.parametrize("name", ["ohem", "ohem_1to3", "random_1to3"])
def test_registry_builds_from_the_loss_config(name: str) -> None:
    cfg = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    params = {k: v for k, v in cfg.items() if k not in ("_target_", "name")}
    if params.get("seed") == "${seed}":
        params["seed"] = 0
    strategy = OHEM_STRATEGIES[name](**params)
    assert isinstance(strategy, torch.nn.Module)
    out = strategy(**make_batch(n=1, a=50))
    assert set(out) == {"loss_cls", "loss_box"}
    assert isinstance(
        OHEM_STRATEGIES["ohem_1to3"](batch_size=8, nms_thresh=0.5).pos_fraction, float
    )
    assert OHEM_STRATEGIES["ohem"](batch_size=8, nms_thresh=0.5).pos_fraction is None


def test_ohem_1to3_shortcut_never_drops_positives_left_out_of_the_small_pool() -> None:
    """More positives than the small pool holds, and those inside suppress each other: the full
    pool's minibatch takes the lower-loss positives the small pool left out (a positive is taken
    before any negative up to the cap, whatever its loss)."""
    n_pos, n_neg = 40, 40
    state = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).long()[None]
    scores = torch.cat(
        [
            torch.linspace(6.0, 5.0, 32),  # the small pool's positives (pool = 4 x batch 8)
            torch.linspace(2.0, 1.0, 8),  # positives left out of it
            torch.linspace(50.0, 10.0, 32),  # negatives: everything chosen outranks ...
            torch.linspace(0.5, 0.1, 8),  # ... every anchor left out, positives aside
        ]
    )[None]
    boxes = disjoint_boxes(1, n_pos + n_neg)
    boxes[0, :32] = boxes[0, 0]  # one survivor among the pooled positives
    got = ohem_select(
        scores, boxes, state, batch_size=8, nms_thresh=0.5, pos_fraction=0.5, pre_nms_topk=80
    )
    want = naive_ohem(scores, boxes, state, 8, 0.5, 0.5)
    assert torch.equal(got, want)
    assert int(got[0, :n_pos].sum()) == 4  # the cap of 8 x 0.5, three of them from outside
