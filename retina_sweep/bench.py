"""`python -m retina_sweep.bench`: speed of retina_sweep, as ratios measured in the same run.

Sections (all by default, or name some: `python -m retina_sweep.bench model strategies`):

- `model`: our RetinaNet against torchvision's `RetinaNet` with identical architecture and weights
  (`retina_sweep.torchvision_twin`), on the same inputs, in float32: training steps/s (forward,
  losses, backward, SGD step) and inference images/s (forward + postprocess), at three settings:
  the CPU proxy's model (`PROXY_TWIN`: ResNet-10, 64 channels, P2-P6, 2-conv GN heads, stem and
  res2 frozen, 128 x 256 px, batch 8, 8 classes), a small square one on torchvision's own
  geometry (P3-P7, 4-conv heads, 128 px, 80 classes) and paper width (ResNet-50, 256 channels,
  512 px). Ours runs with the oracle test's settings (torchvision's anchors, L1, per-image
  normaliser) so both compute the same thing. The two are timed alternately, repeat after repeat,
  and the median is kept, so that a noisy neighbour hits both alike. On CPU it also prints a
  ceiling: 1 / the share of torchvision's step spent in convolutions (`conv_share`), the most a
  detector with the same convolutions could gain by making everything else free.
- `strategies`: training-step time of each training strategy (focal, OHEM, OHEM 1:3, random
  1:3) relative to focal loss, on the proxy's model (as above, with the paper's anchors).
- `overhead`: per-run overhead of Hydra + MLflow: a `scale=smoke` run as a subprocess, its wall
  time minus the time spent in training and evaluation steps (logged by the trainer as
  `time_train_s` / `time_eval_s`), and the same per trial inside a 6-trial sweep (3 with
  `--quick`; one process).

`--write` appends the Markdown result, with date and machine, to docs/benchmarks.md.
No test asserts any of these timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SECTIONS = ("model", "strategies", "overhead")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 2):
    """Median seconds per call of each fn, calling them in turn (a, b, a, b, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            tic = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in samples.items()}


def _inputs(
    n: int, hw: int | tuple[int, int], num_classes: int, device: torch.device, seed: int = 0
):
    h, w = (hw, hw) if isinstance(hw, int) else hw
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g)
    wh_max = torch.tensor([w, h], dtype=torch.float32)
    targets = []
    for _ in range(n):
        count = int(torch.randint(2, 8, (1,), generator=g))
        xy = torch.rand(count, 2, generator=g) * wh_max * 0.7
        wh = min(h, w) * (0.05 + torch.rand(count, 2, generator=g) * 0.25)
        boxes = torch.cat([xy, torch.minimum(xy + wh, wh_max - 1)], dim=1)
        labels = torch.randint(0, num_classes, (count,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


def _pair(
    depth: int,
    channels: int,
    hw: int | tuple[int, int],
    num_classes: int,
    device: torch.device,
    settings: dict,
):
    from .model import build_retinanet
    from .sampling import FocalStrategy
    from .torchvision_twin import build_torchvision_twin, copy_weights_to_torchvision

    torch.manual_seed(0)
    ours = build_retinanet(
        **settings,
        num_classes=num_classes,
        depth=depth,
        fpn_channels=channels,
        head_channels=channels,
        strategy=FocalStrategy(alpha=0.25, gamma=2.0),
    ).to(device)
    geometry = ("min_level", "max_level", "base_size", "head_convs", "head_norm", "freeze_at")
    theirs = build_torchvision_twin(
        depth=depth,
        num_classes=num_classes,
        channels=channels,
        image_size=hw,
        **{k: settings[k] for k in geometry if k in settings},
    ).to(device)
    copy_weights_to_torchvision(ours, theirs)
    return ours, theirs


def conv_share(fn: Callable[[], None]) -> float:
    """Fraction of ``fn``'s CPU op time spent in convolutions (forward and backward), by profiler.

    This bounds what any RetinaNet with the same convolutions can gain over ``fn``: with the
    convolutions as fast as ``fn``'s and everything else free, the ratio is ``1 / share``.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    return conv / total if total > 0 else float("nan")


def _bench_pair(
    depth: int,
    channels: int,
    hw: int | tuple[int, int],
    batch: int,
    *,
    repeats: int,
    device: torch.device,
    settings: dict,
    num_classes: int = 80,
) -> dict[str, float]:
    ours, theirs = _pair(depth, channels, hw, num_classes, device, settings)
    images, targets = _inputs(batch, hw, num_classes, device)
    image_list = list(images)
    opt_a = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=1e-4, momentum=0.9)

    def step_ours() -> None:
        losses = ours(images, targets)
        opt_a.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_a.step()

    def step_theirs() -> None:
        losses = theirs(image_list, targets)
        opt_b.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_b.step()

    ours.train(), theirs.train()
    train = time_alternating({"ours": step_ours, "tv": step_theirs}, repeats=repeats)

    @torch.no_grad()
    def infer_ours() -> None:
        ours(images)

    @torch.no_grad()
    def infer_theirs() -> None:
        theirs(image_list)

    ours.eval(), theirs.eval()
    infer = time_alternating({"ours": infer_ours, "tv": infer_theirs}, repeats=repeats)
    ceiling = {}
    if device.type == "cpu":  # the profiler's CPU times say nothing about CUDA kernels
        theirs.train()
        ceiling["train_ceiling"] = 1 / conv_share(step_theirs)
        theirs.eval()
        ceiling["infer_ceiling"] = 1 / conv_share(infer_theirs)
    return {
        **ceiling,
        "train_ours": 1 / train["ours"],
        "train_tv": 1 / train["tv"],
        "train_ratio": train["tv"] / train["ours"],
        "infer_ours": batch / infer["ours"],
        "infer_tv": batch / infer["tv"],
        "infer_ratio": infer["tv"] / infer["ours"],
    }


def bench_model(*, quick: bool, device: torch.device) -> list[dict]:
    from .torchvision_twin import PROXY_TWIN, TWIN_SETTINGS

    rows = []
    cases = [
        # The CPU proxy's geometry (scale=proxy): what a default trial trains.
        ("proxy", PROXY_TWIN, 10, 64, (128, 256), 8, 8, "P2-P6, 2-conv GN heads, stem+res2 frozen"),
        ("small", TWIN_SETTINGS, 10, 64, 128, 8, 80, "P3-P7, 4-conv heads"),
        ("paper width", TWIN_SETTINGS, 50, 256, 512, 2, 80, "P3-P7, 4-conv heads"),
    ]
    for label, settings, depth, channels, hw, batch, classes, arch in cases:
        repeats = 3 if quick else (15 if depth == 10 else 5)
        row = _bench_pair(
            depth,
            channels,
            hw,
            batch,
            repeats=repeats,
            device=device,
            settings=settings,
            num_classes=classes,
        )
        px = f"{hw[0]} x {hw[1]}" if isinstance(hw, tuple) else f"{hw}"
        row["setting"] = (
            f"{label}: R{depth}, {channels} ch, {arch}, {px} px, batch {batch}, {classes} classes"
        )
        rows.append(row)
    return rows


def bench_strategies(*, quick: bool, device: torch.device) -> list[dict]:
    from .model import build_retinanet
    from .sampling import build_strategy

    strategies = {
        "focal": dict(name="focal", alpha=0.25, gamma=2.0),
        "ohem 128 / 0.7": dict(name="ohem", batch_size=128, nms_thresh=0.7),
        "ohem 512 / 0.5": dict(name="ohem", batch_size=512, nms_thresh=0.5),
        "ohem_1to3 256 / 0.5": dict(name="ohem_1to3", batch_size=256, nms_thresh=0.5),
        "random_1to3 256": dict(name="random_1to3", batch_size=256),
    }
    # The proxy's model (scale=proxy), where the `ohem` sweep pays for the strategies.
    hw, batch, num_classes = (128, 256), 8, 8
    images, targets = _inputs(batch, hw, num_classes, device)
    models, fns = {}, {}
    for label, params in strategies.items():
        torch.manual_seed(0)
        model = build_retinanet(
            num_classes=num_classes,
            depth=10,
            freeze_at=2,
            backbone_norm="frozen_bn",
            min_level=2,
            max_level=6,
            base_size=32,
            fpn_channels=64,
            head_channels=64,
            head_convs=2,
            head_norm="GN",
            strategy=build_strategy(**params),
        ).to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        models[label] = model

        def step(model=model, opt=opt) -> None:
            losses = model(images, targets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()

        fns[label] = step
    times = time_alternating(fns, repeats=3 if quick else 12)
    return [
        {"strategy": k, "ms_per_step": 1000 * v, "vs_focal": v / times["focal"]}
        for k, v in times.items()
    ]


def _metrics_of(db: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    mlf = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = mlf.get_experiment_by_name("retina_sweep")
    runs = mlf.search_runs([exp.experiment_id], max_results=1000)
    return [r.data.metrics for r in runs if r.data.tags.get("is_parent") != "true"]


def bench_overhead(*, quick: bool) -> dict:
    """Wall time of runs outside training and evaluation steps."""
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            "scale=smoke",
            f"tracking.uri=sqlite:///{tmp}/m.db",
            f"paths.root={tmp}/sweeps",
            f"data.cache_dir={tmp}/cache",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Warm the dataset cache and the MLflow schema first: they happen once, not per run.
        subprocess.run(
            [sys.executable, "-m", "retina_sweep", *base, "seed=99"],
            cwd=tmp,
            env=env,
            check=True,
            capture_output=True,
        )
        walls = []
        for seed in range(1 if quick else 3):
            tic = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "retina_sweep", *base, f"seed={seed}"],
                cwd=tmp,
                env=env,
                check=True,
                capture_output=True,
            )
            walls.append(time.perf_counter() - tic)
        single = [m for m in _metrics_of(Path(tmp) / "m.db") if m.get("time_total_s") is not None][
            : len(walls)
        ]
        inside = [m["time_train_s"] + m["time_eval_s"] for m in single]
        in_run = [m["time_total_s"] - m["time_train_s"] - m["time_eval_s"] for m in single]

        n = 3 if quick else 6
        tic = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "retina_sweep",
                "-m",
                *base,
                f"seed={','.join(str(100 + i) for i in range(n))}",
            ],
            cwd=tmp,
            env=env,
            check=True,
            capture_output=True,
        )
        sweep_wall = time.perf_counter() - tic
        trials = [m for m in _metrics_of(Path(tmp) / "m.db")][-n:]
        sweep_inside = sum(m["time_train_s"] + m["time_eval_s"] for m in trials)
    return {
        "run_wall_s": statistics.median(walls),
        "run_inside_s": statistics.median(inside),
        "run_overhead_s": statistics.median(walls) - statistics.median(inside),
        "in_process_overhead_s": statistics.median(in_run),
        "sweep_trials": n,
        "sweep_wall_s": sweep_wall,
        "sweep_overhead_per_trial_s": (sweep_wall - sweep_inside) / n,
    }


def to_markdown(results: dict) -> str:
    lines = [
        f"### `python -m retina_sweep.bench` — {dt.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        "",
    ]
    if "model" in results:
        lines += [
            "Ours vs torchvision's RetinaNet, identical architecture and weights, same inputs, "
            "float32; ratio > 1 means ours is faster:",
            "",
            "| setting | train steps/s ours | torchvision | ratio | ceiling "
            "| infer img/s ours | torchvision | ratio | ceiling |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["model"]:
            tc = f"{r['train_ceiling']:.2f}x" if "train_ceiling" in r else "n/a"
            ic = f"{r['infer_ceiling']:.2f}x" if "infer_ceiling" in r else "n/a"
            lines.append(
                f"| {r['setting']} | {r['train_ours']:.2f} | {r['train_tv']:.2f} | "
                f"**{r['train_ratio']:.2f}x** | {tc} | {r['infer_ours']:.1f} | "
                f"{r['infer_tv']:.1f} | **{r['infer_ratio']:.2f}x** | {ic} |"
            )
        lines += [
            "",
            "Ceiling: 1 / (share of torchvision's step spent in convolutions, by torch.profiler "
            "on CPU) - the ratio a detector with the same convolutions would reach if everything "
            "else cost nothing.",
        ]
        lines.append("")
    if "strategies" in results:
        lines += [
            "Training step by strategy (the proxy's model: R10, 64 ch, P2-P6, 2-conv GN heads, "
            "128 x 256 px, batch 8, 8 classes, float32):",
            "",
            "| strategy | ms / step | vs focal |",
            "|---|---|---|",
        ]
        for r in results["strategies"]:
            lines.append(f"| {r['strategy']} | {r['ms_per_step']:.0f} | {r['vs_focal']:.2f}x |")
        lines.append("")
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "Run overhead (`scale=smoke`, wall time outside training and evaluation steps):",
            "",
            f"- one run as its own process: {o['run_wall_s']:.2f} s wall, of which "
            f"{o['run_inside_s']:.2f} s training + evaluation: **{o['run_overhead_s']:.2f} s** "
            "overhead (Python + torch/Hydra/MLflow imports, config composition, MLflow run, "
            "dataset index and model build);",
            f"- inside the task function (MLflow run, dataset index, model build, checkpoints): "
            f"**{o['in_process_overhead_s']:.2f} s**;",
            f"- a {o['sweep_trials']}-trial sweep in one process: {o['sweep_wall_s']:.2f} s "
            f"wall, **{o['sweep_overhead_per_trial_s']:.2f} s** per trial beyond its training "
            "and evaluation steps (the process start-up is shared by the trials).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retina_sweep.bench", description=__doc__)
    parser.add_argument("sections", nargs="*", default=[], help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke check)")
    parser.add_argument("--write", action="store_true", help="append to docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    sections = args.sections or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {}
    if "model" in sections:
        results["model"] = bench_model(quick=args.quick, device=device)
    if "strategies" in sections:
        results["strategies"] = bench_strategies(quick=args.quick, device=device)
    if "overhead" in sections:
        results["overhead"] = bench_overhead(quick=args.quick)
    text = to_markdown(results)
    print(text)
    if args.write:
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        with path.open("a") as fh:
            fh.write("\n" + text + "\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
