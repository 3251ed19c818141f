"""One RetinaNet training run and its COCO evaluation: the unit every sweep trial is made of.

`run(cfg)` is what `python -m retina_sweep` calls for one Hydra job. It

1. validates the config (`retina_sweep.config.validate`) before anything is generated or built;
2. opens the MLflow run (rank 0 only) with the flattened config, the trial's config hash and its
   sweep tags;
3. trains with the paper's recipe: SGD (momentum 0.9, weight decay 1e-4), lr scaled linearly from
   0.01 at batch 16, linear warm-up, lr / 10 at 2/3 and 8/9 of the iterations;
4. evaluates periodically (the values a pruner needs) and at the end with pycocotools;
5. returns the final AP, the objective a sweeper optimises.

Checkpoints are written atomically under `paths.checkpoints/<config hash>/last.pt`, so relaunching
the same experiment resumes where it stopped. A non-finite loss ends the run as *diverged*
(a result, MLflow status FINISHED, outcome tag `diverged`) rather than as a crash.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .config import OBJECTIVES, ConfigError, config_hash, validate
from .signals import deferred, pending, raise_pending, terminate_as_interrupt
from .tracking import RunTracker, config_params, tracker_from_config

log = logging.getLogger(__name__)

__all__ = ["run", "cell_lock", "train", "Diverged", "TrialPruned", "lr_factor", "resolve_lr"]


class Diverged(RuntimeError):
    """The loss became non-finite: the run stops and is recorded as diverged.

    ``iteration`` counts from 1 (the first iteration is 1): it is the number of iterations done
    with the one that failed, the step its metrics would have been logged at (the MLflow tag
    ``diverged_at``, like ``pruned_at``). ``losses`` are this process's; in a distributed run
    ``ranks`` lists the ranks whose loss was non-finite (maybe not this one: all ranks stop).
    """

    def __init__(
        self, iteration: int, losses: dict[str, float], ranks: list[int] | None = None
    ) -> None:
        if ranks is None:
            message = f"non-finite loss at iteration {iteration}: {losses}"
        else:
            message = (
                f"non-finite loss at iteration {iteration} on rank(s) "
                f"{', '.join(map(str, ranks))} (the losses of this rank: {losses})"
            )
        super().__init__(message)
        self.iteration = iteration
        self.losses = losses
        self.ranks = ranks


class TrialPruned(RuntimeError):
    """A pruner (see `cfg.pruning`) asked the run to stop early, after ``iteration`` iterations
    (counted from 1: the step of the evaluation that decided, the MLflow tag ``pruned_at``)."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"pruned at iteration {iteration}")
        self.iteration = iteration


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
def resolve_lr(train_cfg: Any) -> float:
    """Explicit `train.lr`, else the linear scaling rule from the paper's 0.01 at batch 16."""
    if train_cfg.get("lr") is not None:
        return float(train_cfg.lr)
    return float(train_cfg.base_lr) * int(train_cfg.batch_size) / int(train_cfg.base_batch_size)


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def optimizer_param_groups(
    model: nn.Module, *, weight_decay: float, weight_decay_norm: float | None = None
) -> list[dict[str, Any]]:
    """The trainable parameters of `model` as SGD parameter groups.

    One group at `weight_decay` (the paper's recipe: every weight decays), unless
    `weight_decay_norm` is a different number: then the affine parameters of normalisation
    layers (GroupNorm, BatchNorm, LayerNorm) get their own group at that decay, as detectron2's
    `SOLVER.WEIGHT_DECAY_NORM` (0.0 by default there, and Detectron's `WEIGHT_DECAY_GN`). Decay
    on a norm's scale shrinks it towards 0 against the normalisation that follows from it, which
    is why detectron2 exempts them; the paper's heads have no norm, so it says nothing.
    """
    decay, norm = [], []
    seen: set[int] = set()
    separate = weight_decay_norm is not None and float(weight_decay_norm) != float(weight_decay)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm if separate and isinstance(module, NORM_TYPES) else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if norm:
        groups.append({"params": norm, "weight_decay": float(weight_decay_norm)})
    return groups


def lr_factor(
    iteration: int,
    *,
    iterations: int,
    warmup_iters: int,
    warmup_factor: float,
    lr_steps: list[float],
    lr_decay: float,
) -> float:
    """Multiplier of the base lr at `iteration`: linear warm-up times step decay.

    Steps are fractions of `iterations` (the paper: 60k and 80k of 90k = 2/3 and 8/9).
    """
    factor = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    milestones = [round(f * iterations) for f in lr_steps]
    return factor * lr_decay ** sum(iteration >= m for m in milestones)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "invalid config value device='cuda': no CUDA device is visible to this process "
                "(device=auto uses one when there is one, the CPU otherwise)"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX tiles or AVX512-BF16).

    Elsewhere oneDNN emulates bf16 and autocast would make training slower, not faster.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(amp: Any, cpu_amp: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step, or None for fp32.

    ``amp`` (bool) is float16 autocast with loss scaling on CUDA. ``cpu_amp`` is bfloat16 autocast
    on the CPU: ``true``, ``false`` or ``"auto"`` (only where the CPU has native bf16, see
    `cpu_has_native_bf16`). bfloat16 has float32's exponent range, so it needs no loss scaling.
    """
    if device.type == "cuda":
        return torch.float16 if bool(amp) else None
    if device.type != "cpu":
        return None
    if cpu_amp == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if isinstance(cpu_amp, bool):
        return torch.bfloat16 if cpu_amp else None
    raise ValueError(f"train.cpu_amp must be true, false or auto, got {cpu_amp!r}")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A SIGTERM / SIGINT during the save is raised once the checkpoint is in place: the
    # interrupted run keeps it (and an interrupt raised inside torch.save's C++ writer would
    # come out as "RuntimeError: unexpected pos").
    with deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                # On disk before the rename: after a power loss or a node failure the checkpoint
                # is the old one or the new one, never a renamed but empty file.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed save leaves no stray temp file behind
            raise


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file from a killed writer of an older version
        log.warning("ignoring unreadable checkpoint %s (%s); starting over", path, exc)
        return None


def infinite_batches(loader, start_iteration: int = 0) -> Iterator[Any]:
    """The loader's batches epoch after epoch, from batch `start_iteration` of the whole run:
    a resumed run gets exactly the batches an uninterrupted one would (the samplers' order is a
    function of (seed, epoch), and the interrupted epoch is entered at its batch)."""
    per_epoch = max(1, len(loader))
    epoch, offset = divmod(int(start_iteration), per_epoch)
    sampler = getattr(loader, "sampler", None)
    skip = 0  # batches to load and drop: only for a sampler that cannot seek
    if offset and hasattr(sampler, "set_start_batch"):
        sampler.set_start_batch(offset, loader.batch_size)
    else:
        skip = offset
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(epoch)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def to_device(images, targets, device: torch.device):
    images = images.to(device, non_blocking=True)
    moved = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, moved


def synthetic_backbone(cfg: DictConfig, device: torch.device | None = None) -> Path:
    """`model.backbone.pretrained: synthetic`: the cached backbone pretrained on the proxy
    (trained first, on `device` or else the trial's `cfg.device`, when the cache lacks it)."""
    from .pretrain import recipe_from, synthetic_pretrained_backbone

    return synthetic_pretrained_backbone(
        device=device if device is not None else pick_device(cfg.device),
        depth=int(cfg.model.backbone.depth),
        norm=str(cfg.model.backbone.norm),
        synthetic=OmegaConf.to_container(cfg.data.synthetic, resolve=True),
        cache_dir=cfg.data.get("cache_dir"),
        recipe=recipe_from(cfg.model.backbone.get("synthetic_pretrain")),
    )


def prepare(cfg: DictConfig) -> None:
    """Create what trials share before they start: the synthetic dataset and, if asked, the
    proxy-pretrained backbone (both cached). A sweeper calls this once per distinct data and
    backbone, so parallel trials do not all generate or pretrain the same thing at once."""
    if cfg.data.kind == "synthetic":
        from .data.synthetic import generate

        generate(cfg.data.get("cache_dir"), **OmegaConf.to_container(cfg.data.synthetic))
        if cfg.model.backbone.get("pretrained") == "synthetic":
            synthetic_backbone(cfg)
    else:
        # Once for the sweep: a wrong COCO root stops it here with the missing path named,
        # instead of failing every trial the same way.
        check_data_files(cfg)


def check_data_files(cfg: DictConfig) -> None:
    """Raise `MissingDataError` naming the first missing COCO folder or annotation file of the
    two splits (a cheap stat of each, before any run is opened or any weight built)."""
    if cfg.data.kind == "coco":
        from .data.coco import coco_paths

        coco_paths(cfg.data.root, cfg.data.train_split)
        coco_paths(cfg.data.root, cfg.data.val_split)


def build_pruner(cfg: DictConfig) -> Any | None:
    """The optional pruning callback (`cfg.pruning`, set by the Optuna sweeper)."""
    node = cfg.get("pruning")
    if node is None or node.get("_target_") is None:
        return None
    return instantiate(node)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(
    cfg: DictConfig,
    *,
    tracker: RunTracker,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train and evaluate; returns the final evaluation metrics (AP, AP50, ... ms_per_image).

    Raises `Diverged` on a non-finite loss and `TrialPruned` when `on_eval` asks to stop.
    """
    from .builders import build_datasets
    from .data.loader import build_loader
    from .evaluation import evaluate, per_category_metrics

    t_start = time.perf_counter()
    timings = {"train": 0.0, "eval": 0.0}
    device = pick_device(cfg.device, local_rank)
    distributed = world_size > 1
    tcfg = cfg.train
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))
    # The proxy's pretrained backbone first, before anything is seeded: on a cold cache it is
    # trained here and draws from the global RNGs, and the detector's initial weights must not
    # depend on whether the cache was warm (same config hash, same experiment).
    pretrained = None
    if cfg.model.backbone.get("pretrained") == "synthetic":
        pretrained = str(synthetic_backbone(cfg, device))
    seed_everything(int(cfg.seed) + rank)

    data = build_datasets(cfg.data, max_level=int(cfg.model.fpn.max_level))
    per_rank_batch = int(tcfg.batch_size) // world_size
    train_loader = build_loader(
        data.train,
        batch_size=per_rank_batch,
        train=True,
        num_workers=int(tcfg.num_workers),
        distributed=distributed,
        seed=int(cfg.seed),
        size_divisible=data.size_divisible,
    )
    # Evaluation is sharded too: rank r infers images r, r + N, ... of the val split
    # (`ShardSampler`), rank 0 gathers the detections and runs COCOeval (`evaluate`).
    val_loader = build_loader(
        data.val,
        batch_size=max(1, per_rank_batch),
        train=False,
        num_workers=int(tcfg.num_workers),
        distributed=distributed,
        size_divisible=data.size_divisible,
    )

    # The same seed builds the same initial weights on every rank (DDP also broadcasts them).
    torch.manual_seed(int(cfg.seed))
    extra = {}
    if world_size > 1 and cfg.loss.get("seed") is not None:
        # A seeded sampler (random 1:3) must draw differently on each rank's images.
        extra["seed"] = int(cfg.loss.seed) + rank
    strategy = instantiate(cfg.loss, _convert_="all", **extra)
    model_kwargs: dict[str, Any] = {}
    if pretrained is not None:
        model_kwargs["backbone"] = {
            **OmegaConf.to_container(cfg.model.backbone, resolve=True),
            "pretrained": pretrained,
        }
    model = instantiate(cfg.model, strategy=strategy, _convert_="all", **model_kwargs).to(device)
    if device.type == "cuda":
        # The logged peak is this run's: a cold cache pretrains the backbone in this process first,
        # and its peak (0.51 GiB for the proxy) hid the detector's (0.12 GiB) on an H200.
        torch.cuda.reset_peak_memory_stats(device)
    raw_model = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )

    base_lr = resolve_lr(tcfg)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        optimizer_param_groups(
            raw_model,
            weight_decay=float(tcfg.weight_decay),
            weight_decay_norm=tcfg.get("weight_decay_norm"),
        ),
        lr=base_lr,
        momentum=float(tcfg.momentum),
    )
    iterations = int(tcfg.iterations)
    sched_kwargs = dict(
        iterations=iterations,
        warmup_iters=int(tcfg.warmup_iters),
        warmup_factor=float(tcfg.warmup_factor),
        lr_steps=list(tcfg.lr_steps),
        lr_decay=float(tcfg.lr_decay),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, **sched_kwargs)
    )
    amp_dtype = autocast_dtype(tcfg.amp, tcfg.get("cpu_amp", False), device)
    use_amp = amp_dtype is not None
    # Loss scaling only for float16: bfloat16 keeps float32's exponent range.
    use_scaler = amp_dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]
    tracker.set_tags({"precision": precision})
    if rank == 0:
        log.info("training precision: %s (%s)", precision, device.type)

    ckpt_path = Path(cfg.paths.checkpoints) / config_hash(cfg) / "last.pt"
    start_iter = 0
    state = load_checkpoint(ckpt_path)
    if state is not None and int(state["iteration"]) >= iterations and cfg.sweep.get("force"):
        # sweep.force=true asks for the cell to be computed again: a finished checkpoint would
        # only be evaluated again, so it is set aside and replaced by this run's.
        log.info("sweep.force: training from scratch, not from the finished %s", ckpt_path)
        state = None
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and use_scaler:
            # A checkpoint written without float16 (CPU, bf16 or amp off: the precision is not
            # part of the identity) has an empty scaler state; the fresh scaler is right then.
            scaler.load_state_dict(state["scaler"])
        strategy_rng = getattr(raw_model.strategy, "generator", None)
        if strategy_rng is not None and state.get("strategy_rng") is not None:
            # Random 1:3 sampling draws from its own generator: resumed, it draws on.
            strategy_rng.set_state(state["strategy_rng"])
        start_iter = int(state["iteration"])
        log.info("resuming from %s at iteration %d", ckpt_path, start_iter)
        tracker.set_tags({"resumed_from_iteration": start_iter})

    def save(iteration: int) -> None:
        if rank != 0:
            return
        atomic_save(
            {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": iteration,
                "strategy_rng": (
                    raw_model.strategy.generator.get_state()
                    if getattr(raw_model.strategy, "generator", None) is not None
                    else None
                ),
            },
            ckpt_path,
        )

    def run_eval(max_images: int | None) -> dict[str, float] | None:
        """Every rank infers its shard of the val split; rank 0 gets the metrics of the
        whole (the first `max_images` images, as one process), the others None."""
        tic = time.perf_counter()
        if distributed:
            # The ranks' weights are equal (DDP averages the gradients), but each rank updated
            # its own BatchNorm running statistics in its last training forward (DDP only
            # broadcasts rank 0's buffers at the start of the next one): every shard is run with
            # rank 0's, the model that is checkpointed.
            for buffer in raw_model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        metrics = evaluate(
            raw_model,
            val_loader,
            data.val,
            device,
            max_images=max_images,
            distributed=distributed,
        )
        model.train()
        timings["eval"] += time.perf_counter() - tic
        return metrics

    # A resumed run sees the batches an uninterrupted one would, from the iteration reached.
    batches = infinite_batches(train_loader, start_iteration=start_iter)
    model.train()
    log_every = max(1, int(cfg.tracking.log_every))
    eval_every = int(tcfg.eval_every)
    ckpt_every = int(tcfg.checkpoint_every)
    clip = tcfg.get("clip_grad_norm")
    progress = None
    if tcfg.progress and rank == 0 and start_iter < iterations:
        from tqdm.auto import tqdm

        progress = tqdm(total=iterations, initial=start_iter, desc="train", dynamic_ncols=True)

    timings["setup"] = time.perf_counter() - t_start
    # The logging window: loss sums over `summed` finite steps (after a resume, or a skipped
    # non-finite step, a window holds fewer than log_every) and the training time of its steps
    # (images_per_s leaves out evaluations and checkpoints).
    window_images, window_time, summed = 0, 0.0, 0
    sums: dict[str, float] = {}
    nonfinite = 0
    lr_used = optimizer.param_groups[0]["lr"]
    for iteration in range(start_iter, iterations):
        raise_pending()  # a SIGTERM / SIGINT whose interrupt a finalizer swallowed
        tic = time.perf_counter()
        images, targets, image_sizes = next(batches)
        images, targets = to_device(images, targets, device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = model(images, targets, image_sizes=image_sizes)
        loss = sum(losses.values())
        local_finite = torch.isfinite(loss.detach())
        finite = local_finite
        if distributed:
            # Every rank takes the same branch: one rank skipping the backward (or raising)
            # while the others enter DDP's gradient all-reduce would hang them all.
            flag = local_finite.to(device=loss.device, dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        if not bool(finite):
            nonfinite += 1
            # Counted from 1, as the metric steps (`done` below): the number of this iteration.
            step = iteration + 1
            bad_ranks = _nonfinite_ranks(local_finite, rank, world_size) if distributed else None
            if nonfinite > int(tcfg.get("max_nonfinite", 0)):
                raise Diverged(step, {k: float(v.detach()) for k, v in losses.items()}, bad_ranks)
            log.warning(
                "non-finite loss at iteration %d%s, step skipped (%d of train.max_nonfinite=%d)",
                step,
                f" on rank(s) {', '.join(map(str, bad_ranks))}" if bad_ranks else "",
                nonfinite,
                int(tcfg.get("max_nonfinite", 0)),
            )
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        else:
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            summed += 1

        step_time = time.perf_counter() - tic
        timings["train"] += step_time
        window_time += step_time
        window_images += images.shape[0] * world_size
        done = iteration + 1
        if (done % log_every == 0 or done == iterations) and summed:
            row = {k: v / summed for k, v in sums.items()}
            row["lr"] = lr_used
            row["images_per_s"] = window_images / max(window_time, 1e-9)
            tracker.log_metrics(row, step=done)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    lr=f"{row['lr']:.2e}",
                    ips=f"{row['images_per_s']:.1f}",
                )
            sums, window_images, window_time, summed = {}, 0, 0.0, 0
        if progress is not None:
            progress.update(1)
        if ckpt_every and done % ckpt_every == 0 and done < iterations:
            save(done)
        if eval_every and done % eval_every == 0 and done < iterations:
            metrics = run_eval(tcfg.get("eval_max_images"))
            pruned = False
            if metrics is not None:
                # Per-category AP too (`val_AP-<name>`), as detectron2's evaluation hook logs it:
                # a class that a setting stops learning shows as its own curve.
                periodic = {f"val_{k}": v for k, v in metrics.items() if _is_num(v)}
                periodic |= per_category_metrics(
                    metrics.get("per_category_AP") or {}, prefix="val_AP-"
                )
                tracker.log_metrics(periodic, step=done)
                tracker.flush()
                if on_eval is not None:
                    try:
                        on_eval(done, metrics)
                    except TrialPruned:
                        pruned = True
            if distributed:
                # Rank 0 computes the metrics and decides; the broadcast also holds the other
                # ranks until it has, and they all stop together when pruned.
                flag = torch.tensor([int(pruned)], dtype=torch.int32, device=device)
                torch.distributed.broadcast(flag, src=0)
                pruned = bool(flag.item())
            if pruned:
                raise TrialPruned(done)
    if progress is not None:
        progress.close()
    save(iterations)

    metrics = run_eval(None)
    if distributed:
        torch.distributed.barrier()
    # Where the wall time went (the bench command reads these to measure the run overhead).
    tracker.log_metrics({f"time_{k}_s": v for k, v in timings.items()}, step=iterations)
    if rank == 0 and iterations > start_iter:
        n_its = iterations - start_iter
        log.info(
            "%d iterations in %.1f s (%.1f images/s over %d process(es)); evaluation %.1f s",
            n_its,
            timings["train"],
            n_its * int(tcfg.batch_size) / max(timings["train"], 1e-9),
            world_size,
            timings["eval"],
        )
    if device.type == "cuda":
        # Peak memory of this process's tensors (what detectron2 logs as max_mem): the number to
        # size the batch per GPU by.
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        tracker.log_metrics({"gpu_max_mem_gb": peak}, step=iterations)
        log.info("peak GPU memory %.2f GiB", peak)
    return metrics or {}


def _nonfinite_ranks(local_finite: torch.Tensor, rank: int, world_size: int) -> list[int]:
    """The ranks whose loss was non-finite at this iteration. A collective: every rank calls it
    (they all take the non-finite branch together, see `train`), and only then."""
    flags = torch.zeros(world_size, dtype=torch.int32, device=local_finite.device)
    flags[rank] = int(not bool(local_finite))
    torch.distributed.all_reduce(flags)
    return [r for r in range(world_size) if flags[r]]


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


FINAL_KEYS = OBJECTIVES  # the final metrics logged (and the values a run can return)


def run(cfg: DictConfig) -> float:
    """Validate, track and train one config; returns the final AP, or the final metric named by
    `objective` (nan if it diverged).

    With `train.devices > 1` (and not already inside a worker) the work is spawned over that many
    processes by `retina_sweep.distributed.launch`. One process at a time trains a cell (see
    `cell_lock`): the launching process holds the cell's lock for the run, or rank 0 of an
    external launch (`torchrun`).
    """
    validate(cfg)
    pick_device(cfg.device)  # device=cuda without CUDA: stop before any data or model is made
    check_data_files(cfg)
    if "LOCAL_RANK" not in os.environ:
        # Held by the launching process, not by the DDP ranks it spawns.
        with cell_lock(cfg):
            if int(cfg.train.devices) > 1:
                from .distributed import launch

                return launch(cfg)
            return _run_here(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.distributed.is_initialized():
        # Already one rank of a joined launch: whoever joined it holds the cell.
        return _run_here(cfg)
    if world > 1:
        # One rank of an external launch (`torchrun`, over one node or several): each rank ran
        # this entry point itself; it joins the launch's process group here.
        if int(cfg.train.batch_size) % world:
            raise ConfigError(
                f"invalid config value train.batch_size={cfg.train.batch_size}: the global batch "
                f"must divide among the WORLD_SIZE={world} processes of this launch"
            )
        from .distributed import joined

        with joined(cfg), cell_lock(cfg, ranks=True):
            return _run_here(cfg)
    # A launcher's only process (`torchrun --nproc_per_node=1`): one process, locked as one.
    with cell_lock(cfg):
        return _run_here(cfg)


@contextlib.contextmanager
def cell_lock(cfg: DictConfig, *, ranks: bool = False) -> Iterator[None]:
    """Hold the cell's lock, `paths.checkpoints/<config hash>/.lock`, inside the block, waiting
    (and saying so) while another process holds it.

    Two sweeps that share cells (alpha and gamma share three), two Optuna workers that drew the
    same point, or a sweep and a `torchrun` of the same config would otherwise train into one
    checkpoint at once. The second waits, then resumes the first one's checkpoint (only
    evaluating it when it is finished).

    `ranks=True`: called by every rank of a joined process group. Rank 0, the one that writes
    the checkpoints, takes the lock; the others wait for it at a barrier, so that none of them
    starts on the cell (building its model, resuming the checkpoint the other process is still
    advancing) while another process trains it. They wait there up to the process group's timeout
    (`distributed.collective_timeout`), after which the launch fails rather than hangs.
    """
    from .locks import exclusive

    lock = Path(cfg.paths.checkpoints) / config_hash(cfg) / ".lock"

    def waiting() -> None:
        log.info("another process is training this cell (%s); waiting for it", lock.parent)

    if not ranks:
        with exclusive(lock, on_wait=waiting):
            yield
        return
    rank0 = torch.distributed.get_rank() == 0
    with exclusive(lock, on_wait=waiting) if rank0 else contextlib.nullcontext():
        torch.distributed.barrier()
        yield


def _run_here(cfg: DictConfig) -> float:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return run_worker(cfg, rank=rank, world_size=world_size, local_rank=local_rank)


def run_worker(
    cfg: DictConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0
) -> float:
    """The body of `run` in one process (rank) of a possibly distributed run.

    SIGTERM (a scheduler's time limit, `kill`) interrupts it like Ctrl-C: the MLflow run ends
    KILLED with outcome `killed` instead of staying RUNNING (`retina_sweep.signals`).
    """
    with terminate_as_interrupt():
        return _run_worker(cfg, rank=rank, world_size=world_size, local_rank=local_rank)


def _run_worker(cfg: DictConfig, *, rank: int, world_size: int, local_rank: int) -> float:
    t_start = time.perf_counter()
    chash = config_hash(cfg)
    tracker = tracker_from_config(cfg, rank=rank)
    tags = {
        "config_hash": chash,
        "sweep": cfg.sweep.name,
        "table": cfg.sweep.table,
        "cell": cfg.sweep.cell,
        "seed": cfg.seed,
        "loss": cfg.loss.name,
    }
    tags.update(dict(cfg.get("extra_tags") or {}))
    tracker.start(tags=tags, params=config_params(cfg))
    if tracker.run_id:
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
        overrides = _hydra_overrides()
        if overrides is not None:
            tracker.log_text("\n".join(overrides) + "\n", "config/overrides.txt")

    # Every rank infers its shard of each evaluation, but only rank 0 gets the metrics, so only it
    # asks the pruner (its decision is broadcast in `train`): the other ranks do not open the
    # study (a storage connection each, for nothing).
    pruner = build_pruner(cfg) if rank == 0 else None

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        if pruner is not None and pruner.report(step, metrics):
            raise TrialPruned(step)

    try:
        metrics = train(
            cfg,
            tracker=tracker,
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            on_eval=on_eval,
        )
    except Diverged as exc:
        log.error(
            "run diverged: %s. With train.lr=%s (base_lr %s): a lower learning rate, a longer "
            "train.warmup_iters or train.clip_grad_norm=10 usually prevent it (the run is kept, "
            "outcome 'diverged')",
            exc,
            cfg.train.get("lr"),
            cfg.train.get("base_lr"),
        )
        # 1-based, as the metric steps and `pruned_at`: the loss of iteration `diverged_at`
        # (the step its metrics would have been logged at) was the non-finite one.
        tracker.finish("diverged", error=str(exc), diverged_at=exc.iteration)
        return math.nan
    except TrialPruned as exc:
        log.info("run pruned at iteration %d", exc.iteration)
        tracker.finish("pruned", pruned_at=exc.iteration)
        if pruner is not None and hasattr(pruner, "pruned") and rank == 0:
            return pruner.pruned(exc.iteration)  # the study is told once, by the rank that decided
        return math.nan
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as `signals.Terminated`
        tracker.finish("killed", error=str(exc) or "interrupted")
        raise
    except BaseException as exc:
        interrupt = pending()
        if interrupt is not None:
            # The signal came first: its interrupt was raised inside code that turned it into
            # this error (torch.save's C++ writer calling the file's write: "unexpected pos").
            tracker.finish("killed", error=str(interrupt))
            raise interrupt from exc
        tracker.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise

    final = {k: metrics[k] for k in FINAL_KEYS if k in metrics}
    # What the final metrics were computed on (the whole val split, every rank's shard of it).
    final |= {k: metrics[k] for k in ("num_images", "num_detections") if k in metrics}
    final["time_total_s"] = time.perf_counter() - t_start
    tracker.log_metrics(final, step=int(cfg.train.iterations))
    # Per-category AP as `AP-<name>` (not in `final`: no objective, the report shows them under each table).
    from .evaluation import per_category_metrics, per_category_table

    per_category = metrics.get("per_category_AP") or {}
    tracker.log_metrics(per_category_metrics(per_category), step=int(cfg.train.iterations))
    if "summary" in metrics and tracker.run_id:
        tracker.log_text(str(metrics["summary"]), "eval/coco_summary.txt")
    if per_category and tracker.run_id:
        table = per_category_table(per_category).to_csv(index=False)
        tracker.log_text(table, "eval/per_category_AP.csv")
    tracker.finish("completed")
    if rank == 0:
        shown = (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
        log.info("final COCO metrics: %s", ", ".join(shown))
    # What a sweeper optimises: the final AP unless `objective` names another final metric.
    return float(final.get(cfg.get("objective") or "AP", math.nan))


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not inside a Hydra job (library use, tests)
        return None
