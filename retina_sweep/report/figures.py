"""Figures of the report (matplotlib, PNG + PDF), each computed, never drawn from fixed numbers.

- `focal_loss_curves`: the paper's Figure 1, FL(p_t) = -(1 - p_t)^gamma log(p_t).
- `ap_vs_param`: AP against alpha (CE, Table 1(a)) or gamma (FL, Table 1(b)) from the runs.
- `speed_accuracy`: AP against inference ms per image (Table 1(e)), like the paper's Figure 2.
- `per_category_heatmap`: per-category AP of a table's rows (rows x categories), any table.
- `loss_cdf` / `plot_loss_cdf`: the paper's Figure 4, the cumulative distribution of the
  normalised focal loss over positive and over negative anchors, for several gamma.
- `loss_shares`: the same predictions as numbers: how much of the loss each gamma puts on the
  positives, on the easy negatives and on the rest, and how few negatives carry most of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..losses import sigmoid_focal_loss  # noqa: E402

__all__ = [
    "focal_loss_curves",
    "ap_vs_param",
    "speed_accuracy",
    "per_category_heatmap",
    "loss_cdf",
    "loss_shares",
    "loss_shares_markdown",
    "plot_loss_cdf",
]


def _save(fig, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return [path.with_suffix(".png"), path.with_suffix(".pdf")]


def focal_loss_curves(path: Path, gammas: Sequence[float] = (0, 0.5, 1, 2, 5)) -> list[Path]:
    """Figure 1 of the paper: loss against the probability of the ground-truth class."""
    p = torch.linspace(0.001, 1.0, 500)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g in gammas:
        # FL on a positive (target 1) with logit log(p / (1 - p)), alpha disabled: -(1-p)^g log p
        logits = torch.logit(p.clamp(max=1 - 1e-6))
        loss = sigmoid_focal_loss(logits, torch.ones_like(p), alpha=-1, gamma=float(g))
        ax.plot(p.numpy(), loss.numpy(), label=f"γ = {g:g}")
    ax.set_xlabel("probability of ground truth class")
    ax.set_ylabel("loss")
    ax.set_ylim(0, 5)
    ax.set_xlim(0, 1)
    ax.legend(title="focal loss")
    ax.set_title("Focal loss (Fig. 1 of the paper, computed)")
    return _save(fig, path)


def ap_vs_param(
    path: Path,
    rows: pd.DataFrame,
    *,
    x: str,
    series: str | None = None,
    paper: pd.DataFrame | None = None,
    paper_x: str | None = None,
    title: str = "",
) -> list[Path]:
    """AP (mean ± std over seeds) against `x`, one line per `series` value; the paper dashed."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups = [(None, rows)] if series is None else list(rows.groupby(series))
    for label, df in groups:
        df = df.sort_values(x)
        ax.errorbar(
            df[x].astype(float),
            df["AP"],
            yerr=df.get("AP std", pd.Series(np.nan, index=df.index)).fillna(0),
            marker="o",
            capsize=3,
            label=("ours" if label is None else f"ours, {series} = {label:g}"),
        )
    if paper is not None and paper_x is not None:
        ps = paper.sort_values(paper_x)
        ax.plot(ps[paper_x].astype(float), ps["AP"], "k--", marker="s", label="paper (COCO)")
    ax.set_xlabel(x)
    ax.set_ylabel("AP")
    ax.set_title(title)
    if x in ("alpha",):
        ax.set_xscale("logit")
    ax.legend(fontsize=8)
    return _save(fig, path)


def speed_accuracy(path: Path, rows: pd.DataFrame, paper: pd.DataFrame | None) -> list[Path]:
    """AP against inference time per image (ours, measured here; the paper's on an M40)."""
    ncols = 2 if paper is not None and len(paper) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    for depth, df in rows.groupby("depth"):
        df = df.sort_values("ms_per_image")
        ax.plot(df["ms_per_image"], df["AP"], marker="o", label=f"R{depth}")
        for _, r in df.iterrows():
            ax.annotate(f"{r['scale']:g}", (r["ms_per_image"], r["AP"]), fontsize=7)
    ax.set_xlabel("inference time (ms / image, this machine)")
    ax.set_ylabel("AP")
    ax.set_title("ours")
    ax.legend()
    if ncols == 2:
        ax2 = axes[0, 1]
        for depth, df in paper.groupby("depth"):
            df = df.sort_values("time_ms")
            ax2.plot(df["time_ms"], df["AP"], marker="s", linestyle="--", label=f"R{depth}-FPN")
        ax2.set_xlabel("inference time (ms, paper's M40 GPU)")
        ax2.set_title("paper (another machine)")
        ax2.legend()
    fig.suptitle("Speed / accuracy (cf. Fig. 2 of the paper)")
    return _save(fig, path)


def per_category_heatmap(
    path: Path,
    frame: pd.DataFrame,
    *,
    row_columns: Sequence[str],
    categories: Sequence[str],
    title: str = "",
) -> list[Path]:
    """Per-category AP as a heatmap, one row per row of `frame` that has a value, one column per
    category; each cell annotated with its AP when the grid is small enough to read.

    Args:
        frame: R rows, a table's `per_category` frame (`core.Table.per_category`): the
            `row_columns` name each row (e.g. ``gamma 2, best alpha 0.25``), the `categories`
            columns hold AP in points, NaN where no run has a value (drawn blank, never filled).
        row_columns: the columns that label a row.
        categories: the category columns, drawn left to right in this order.

    Returns the PNG and PDF paths; none when no cell has a value.
    """
    values = frame[list(categories)].apply(pd.to_numeric, errors="coerce")
    keep = values.notna().any(axis=1)
    if not len(categories) or not keep.any():
        return []
    values, rows = values[keep], frame[keep]
    labels = [
        ", ".join(f"{c} {_label_value(r[c])}" for c in row_columns) for _, r in rows.iterrows()
    ]
    n_rows, n_cats = values.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.45 * n_cats), max(2.5, 1.2 + 0.4 * n_rows)))
    grid = np.ma.masked_invalid(values.to_numpy(dtype=float))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(grid.max()), 1))
    ax.set_xticks(range(n_cats), labels=[str(c) for c in categories], rotation=60, ha="right")
    ax.set_yticks(range(n_rows), labels=labels)
    if n_rows * n_cats <= 400:
        mid = (float(grid.max()) + float(grid.min())) / 2
        for (i, j), v in np.ndenumerate(values.to_numpy(dtype=float)):
            if not math.isnan(v):
                color = "black" if v > mid else "white"
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="AP")
    ax.set_title(title)
    return _save(fig, path)


def _label_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:g}" if isinstance(v, float) else str(v)


# loss_shares' defaults: "easy" = every class probability below this; the share of the
# negatives' loss whose carriers are counted.
EASY_PROB = 0.01
CARRY = 0.9


def _per_anchor_losses(
    cls_logits: torch.Tensor,
    cls_targets: torch.Tensor,
    anchor_state: torch.Tensor,
    gammas: Sequence[float],
    alpha: float,
) -> dict[float, torch.Tensor]:
    """{gamma: (M,) float64 focal loss per anchor, summed over classes}, after the shape checks
    `loss_cdf` and `loss_shares` share."""
    if cls_logits.shape != cls_targets.shape or cls_logits.dim() != 2:
        raise ValueError("cls_logits and cls_targets must both be (M, K)")
    if anchor_state.shape != cls_logits.shape[:1]:
        raise ValueError("anchor_state must be (M,)")
    logits, targets = cls_logits.detach().float(), cls_targets.float()
    return {
        float(g): sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=g).sum(dim=1).double()
        for g in gammas
    }


def loss_cdf(
    cls_logits: torch.Tensor,
    cls_targets: torch.Tensor,
    anchor_state: torch.Tensor,
    gammas: Sequence[float] = (0, 0.5, 1, 2),
    *,
    alpha: float = -1.0,
) -> dict[float, dict[str, np.ndarray]]:
    """The paper's Figure 4: normalised loss CDFs over positive and negative anchors.

    Args:
        cls_logits: (M, K) logits of M anchors.
        cls_targets: (M, K) one-hot targets (all zero for background).
        anchor_state: (M,) 1 foreground, 0 background, -1 ignore (dropped).
        gammas: the focal loss gammas to evaluate on the same predictions.

    Returns:
        {gamma: {"pos": y, "neg": y, "pos_x": x, "neg_x": x}}: for each group, the per-anchor
        loss (summed over classes) normalised to sum to 1, sorted ascending, and its cumulative
        sum `y` against the fraction of anchors `x` in (0, 1].
    """
    losses = _per_anchor_losses(cls_logits, cls_targets, anchor_state, gammas, alpha)
    return _cdf_of(losses, anchor_state)


def _cdf_of(
    losses: dict[float, torch.Tensor], anchor_state: torch.Tensor
) -> dict[float, dict[str, np.ndarray]]:
    out: dict[float, dict[str, np.ndarray]] = {}
    for g, per in losses.items():
        curves: dict[str, np.ndarray] = {}
        for name, mask in (("pos", anchor_state == 1), ("neg", anchor_state == 0)):
            values = per[mask]
            if values.numel() == 0 or float(values.sum()) == 0.0:
                curves[name], curves[f"{name}_x"] = np.zeros(0), np.zeros(0)
                continue
            values = torch.sort(values / values.sum()).values
            curves[name] = torch.cumsum(values, 0).numpy()
            n = values.numel()
            curves[f"{name}_x"] = np.arange(1, n + 1) / n
        out[g] = curves
    return out


def loss_shares(
    cls_logits: torch.Tensor,
    cls_targets: torch.Tensor,
    anchor_state: torch.Tensor,
    gammas: Sequence[float] = (0, 0.5, 1, 2),
    *,
    alpha: float = -1.0,
    easy_prob: float = EASY_PROB,
    carry: float = CARRY,
) -> pd.DataFrame:
    """Where the focal loss of a set of predictions comes from, for several gamma.

    The numbers behind the paper's Figure 4 and its argument that easy negatives swamp CE: on the
    same predictions, each gamma's loss (summed over classes per anchor) split into positives,
    easy negatives (background anchors whose highest class probability is below `easy_prob`) and
    the other negatives.

    Args:
        cls_logits, cls_targets, anchor_state: as for `loss_cdf` ((M, K), (M, K), (M,) with
            1 foreground, 0 background, -1 ignore).
        alpha: the focal loss alpha (-1: none, as in the paper's Figure 4).
        easy_prob: a background anchor is "easy" when every class probability is below this.
        carry: `neg_fraction_carrying` is the smallest fraction of the negatives, hardest first,
            whose loss adds up to this share of the negatives' loss.

    Returns:
        One row per gamma: `pos_share`, `easy_neg_share`, `other_neg_share` (summing to 1),
        `neg_to_pos` (negatives' loss over positives'), `easy_neg_to_pos` and
        `neg_fraction_carrying`; `df.attrs` holds the anchor counts (`positives`, `negatives`,
        `easy_negatives`).
    """
    if not 0.0 < easy_prob < 1.0:
        raise ValueError(f"easy_prob must be in (0, 1), got {easy_prob}")
    if not 0.0 < carry <= 1.0:
        raise ValueError(f"carry must be in (0, 1], got {carry}")
    losses = _per_anchor_losses(cls_logits, cls_targets, anchor_state, gammas, alpha)
    max_prob = torch.sigmoid(cls_logits.detach().float()).amax(dim=1)
    return _shares_of(losses, anchor_state, max_prob, easy_prob=easy_prob, carry=carry, alpha=alpha)


def _shares_of(
    losses: dict[float, torch.Tensor],
    anchor_state: torch.Tensor,
    max_prob: torch.Tensor,
    *,
    easy_prob: float,
    carry: float,
    alpha: float,
) -> pd.DataFrame:
    pos, neg = anchor_state == 1, anchor_state == 0
    easy = neg & (max_prob < easy_prob)
    rows = []
    for g, per in losses.items():
        lp, le, ln = float(per[pos].sum()), float(per[easy].sum()), float(per[neg].sum())
        total = lp + ln
        hardest_first = torch.sort(per[neg], descending=True).values
        n_carry = float("nan")
        if hardest_first.numel() and ln > 0:
            reached = torch.cumsum(hardest_first, 0) >= carry * ln * (1 - 1e-12)
            n_carry = (int(reached.nonzero()[0]) + 1) / hardest_first.numel()
        rows.append(
            {
                "gamma": g,
                "pos_share": lp / total if total else float("nan"),
                "easy_neg_share": le / total if total else float("nan"),
                "other_neg_share": (ln - le) / total if total else float("nan"),
                "neg_to_pos": ln / lp if lp else float("inf"),
                "easy_neg_to_pos": le / lp if lp else float("inf"),
                "neg_fraction_carrying": n_carry,
            }
        )
    df = pd.DataFrame(rows)
    df.attrs.update(
        positives=int(pos.sum()),
        negatives=int(neg.sum()),
        easy_negatives=int(easy.sum()),
        easy_prob=easy_prob,
        carry=carry,
        alpha=alpha,
    )
    return df


def loss_shares_markdown(df: pd.DataFrame, title: str) -> str:
    """`loss_shares` as a Markdown table with its counts."""
    a = df.attrs
    alpha = a.get("alpha", -1.0)
    weighting = "no alpha" if alpha < 0 else f"alpha {alpha:g}"
    lines = [
        f"### {title}",
        "",
        f"{a.get('positives', '?'):,} positive and {a.get('negatives', '?'):,} negative anchors "
        f"({a.get('easy_negatives', '?'):,} easy: every class probability below "
        f"{a.get('easy_prob', '?')}); loss summed over classes, {weighting}.",
        "",
        "| gamma | positives | easy negatives | other negatives | negatives / positives "
        f"| easy negatives / positives | negatives carrying {a.get('carry', CARRY):.0%} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.gamma:g} | {r.pos_share:.1%} | {r.easy_neg_share:.1%} | "
            f"{r.other_neg_share:.1%} | {r.neg_to_pos:.3g} | {r.easy_neg_to_pos:.3g} | "
            f"{r.neg_fraction_carrying:.2%} |"
        )
    return "\n".join(lines) + "\n"


def plot_loss_cdf(path: Path, cdf: dict[float, dict[str, np.ndarray]]) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g, c in cdf.items():
        for ax, name in zip(axes, ("pos", "neg"), strict=True):
            if len(c[name]):
                ax.plot(c[f"{name}_x"], c[name], label=f"γ = {g:g}")
    for ax, name in zip(axes, ("positive", "negative"), strict=True):
        ax.set_xlabel(f"fraction of {name} samples")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_title(f"{name} samples")
        ax.legend()
    fig.suptitle("Cumulative distribution of the normalised loss (cf. Fig. 4 of the paper)")
    return _save(fig, path)


def is_number(v) -> bool:
    return isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))


@torch.no_grad()
def collect_anchor_predictions(model, loader, *, max_images: int = 200):
    """Run a trained RetinaNet over a val loader: (cls_logits (M, K), cls_targets, state (M,)).

    The anchors are matched to the ground truth with the model's own matcher, exactly as in
    training, so positives/negatives/ignored are the ones the loss sees.
    """
    from ..model.matcher import anchor_state

    model.eval()
    logits_all, targets_all, state_all = [], [], []
    seen = 0
    for images, targets, _ in loader:
        pyramid = model.fpn(model.backbone(images))
        cls_logits, _ = model.head(pyramid)
        anchors = model.anchor_generator([tuple(p.shape[-2:]) for p in pyramid])
        matched, _, gt_labels = model.match(anchors, targets)
        state = anchor_state(matched)
        n, a, k = cls_logits.shape
        onehot = torch.zeros(n, a, k)
        img, anc = (state == 1).nonzero(as_tuple=True)
        onehot[img, anc, gt_labels[img, matched[img, anc]]] = 1.0
        keep = state >= 0
        logits_all.append(cls_logits[keep])
        targets_all.append(onehot[keep])
        state_all.append(state[keep])
        seen += n
        if seen >= max_images:
            break
    return torch.cat(logits_all), torch.cat(targets_all), torch.cat(state_all)


def figure4_from_checkpoint(
    path: Path,
    *,
    config_yaml: str,
    checkpoint: Path,
    gammas=(0, 0.5, 1, 2),
    share_gammas=(0, 0.5, 1, 2, 5),
    max_images=200,
) -> tuple[list[Path], pd.DataFrame]:
    """The paper's Figure 4 from a trained run: its resolved config and its checkpoint.

    Returns the figure's files and `loss_shares` of the same predictions (val images, no
    augmentation, the model's own matcher).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..builders import build_datasets
    from ..data.loader import build_loader

    cfg = OmegaConf.create(config_yaml)
    backbone = {**OmegaConf.to_container(cfg.model.backbone, resolve=True), "pretrained": None}
    model = instantiate(
        cfg.model, strategy=instantiate(cfg.loss), backbone=backbone, _convert_="all"
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    loader = build_loader(
        data.val, batch_size=8, train=False, num_workers=0, size_divisible=data.size_divisible
    )
    logits, targets, states = collect_anchor_predictions(model, loader, max_images=max_images)
    # One focal-loss pass per gamma serves both the curves and the shares.
    every = list(dict.fromkeys(float(g) for g in (*gammas, *share_gammas)))
    losses = _per_anchor_losses(logits, targets, states, every, alpha=-1.0)
    shares = _shares_of(
        {float(g): losses[float(g)] for g in share_gammas},
        states,
        torch.sigmoid(logits.float()).amax(dim=1),
        easy_prob=EASY_PROB,
        carry=CARRY,
        alpha=-1.0,
    )
    curves = _cdf_of({float(g): losses[float(g)] for g in gammas}, states)
    return plot_loss_cdf(path, curves), shares
