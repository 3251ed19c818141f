"""Batching: padded collate and a seeded DataLoader builder.

Reproducibility: a training loader's order comes from `EpochShuffleSampler` (or
`GlobalBatchShardSampler` across processes), a permutation that is a pure function of
`(seed, epoch)`; the trainer calls `set_epoch` before each pass. The same generator draws one
uniform number per position of the epoch, and the sampler hands it to the dataset with the index
(`(index, draw)`, see `CocoDetection.__getitem__`), which flips the image when
`draw < flip_prob`. So the augmentation is a function of `(seed, epoch, position)` alone: the
same with 0, 1 or 8 DataLoader workers, and the same for N processes with batch b as for one
with batch N * b. (Before 2026-11-27 the flips came from the workers' torch RNG and changed with
`num_workers`, which the config hash leaves out as a runtime knob.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

__all__ = ["collate", "build_loader", "EpochShuffleSampler", "Collate", "ShardSampler"]


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisible: int = 128
) -> tuple[torch.Tensor, list[dict[str, Any]], list[tuple[int, int]]]:
    """Stack images of different sizes into one zero-padded batch.

    Args:
        batch: `(image (3, H_i, W_i), target)` pairs.
        size_divisible: the padded height and width are multiples of it. It must be the stride
            of the coarsest pyramid level (2 ** max_level, 128 for P7) so that every level's
            feature map tiles the padded image exactly and anchors line up with features.

    Returns:
        `(images (N, 3, Hp, Wp), targets, image_sizes)`; images are placed at the top-left
        corner and padded with 0 (the mean colour after normalisation), so box coordinates are
        unchanged; `image_sizes[i] = (H_i, W_i)` is the unpadded size.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    if size_divisible < 1:
        raise ValueError(f"size_divisible must be >= 1, got {size_divisible}")
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    pad_h = int(math.ceil(max_h / size_divisible) * size_divisible)
    pad_w = int(math.ceil(max_w / size_divisible) * size_divisible)
    channels = images[0].shape[0]
    out = images[0].new_zeros((len(images), channels, pad_h, pad_w))
    for i, (im, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        out[i, :, :h, :w].copy_(im)
    return out, targets, sizes


class Collate:
    """Picklable `collate` with a fixed `size_divisible` (for DataLoader worker processes)."""

    def __init__(self, size_divisible: int = 128) -> None:
        self.size_divisible = int(size_divisible)

    def __call__(self, batch):
        return collate(batch, self.size_divisible)


class EpochShuffleSampler(Sampler[Any]):
    """Random permutation of the dataset that depends only on `(seed, epoch)`.

    Unlike a RandomSampler fed by a running generator, the order of epoch e can be recreated
    without replaying epochs 0..e-1 (e.g. after resuming), like DistributedSampler does.
    With `with_draws`, each item is `(index, draw)`: `draw` in [0, 1) is the augmentation's
    random number for that position of the epoch, from the same generator (module docstring).
    """

    def __init__(self, data_source: Sized, seed: int = 0, *, with_draws: bool = False) -> None:
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.epoch = 0
        self.with_draws = bool(with_draws)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start_batch(self, batches: int, batch_size: int) -> None:
        """Start the next iteration `batches` batches of `batch_size` into the epoch (a resumed
        run continues the interrupted epoch exactly); later iterations start at 0 again."""
        self._skip = int(batches) * int(batch_size)

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        skip, self._skip = self._skip, 0
        if not self.with_draws:
            return iter(order[skip:])
        draws = torch.rand(self.num_samples, generator=g, dtype=torch.float64).tolist()
        return iter(list(zip(order, draws, strict=True))[skip:])

    def __len__(self) -> int:
        return self.num_samples


class GlobalBatchShardSampler(Sampler[Any]):
    """The `EpochShuffleSampler` order, cut into global batches shared out among the ranks.

    Global batch i is `perm[i*B:(i+1)*B]` with `B = batch_size * world_size`, exactly the batch a
    single process with batch B would draw; rank r takes its r-th slice of `batch_size` images.
    So N processes with per-rank batch b step on the same images as one process with batch N*b
    (torch's DistributedSampler interleaves ranks and draws another permutation instead).
    Only full global batches are used, as training drops the last incomplete batch.
    """

    def __init__(
        self,
        data_source: Sized,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        with_draws: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.order = EpochShuffleSampler(data_source, seed=seed, with_draws=with_draws)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        global_batch = self.batch_size * self.world_size
        self.num_batches = len(data_source) // global_batch
        if self.num_batches == 0:
            raise ValueError(
                f"the training set has {len(data_source)} images, fewer than the global batch "
                f"{global_batch}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def set_start_batch(self, batches: int, batch_size: int | None = None) -> None:
        """Start the next iteration `batches` global batches into the epoch (see
        `EpochShuffleSampler.set_start_batch`; the batch size is this sampler's own)."""
        self._start = int(batches)

    def __iter__(self) -> Iterator[Any]:
        perm = list(self.order)
        b, gb = self.batch_size, self.batch_size * self.world_size
        start, self._start = getattr(self, "_start", 0), 0
        for i in range(start, self.num_batches):
            start = i * gb + self.rank * b
            yield from perm[start : start + b]

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


class ShardSampler(Sampler[int]):
    """Rank `r` of `world_size` takes items `r, r + world_size, ...` of the dataset, in order.

    For a sharded evaluation: every image is in exactly one shard. torch's DistributedSampler
    pads the shards to equal length by repeating images, and a repeated image would be counted
    twice by COCOeval once the shards' detections are gathered.
    """

    def __init__(self, data_source: Sized, *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = len(data_source)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def _seed_worker(worker_id: int) -> None:
    # DataLoader already seeds torch per worker (base_seed + worker_id); extend that seed to
    # numpy and random so any transform using them is reproducible too and not shared by forks.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    distributed: bool = False,
    seed: int = 0,
    pin_memory: bool | None = None,
    size_divisible: int = 128,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader yielding `(images (N,3,Hp,Wp), targets, image_sizes)` from `collate`.

    Args:
        dataset: e.g. a `CocoDetection`.
        batch_size: images per batch (per process when distributed).
        train: shuffle (a permutation per epoch, see `EpochShuffleSampler`) and drop the last
            incomplete batch (a tiny last batch would give a noisy step); evaluation keeps the
            dataset order and every image.
        num_workers: DataLoader worker processes (0 = load in the main process).
        distributed: shard among the ranks of the initialised process group: training with
            `GlobalBatchShardSampler` (same global batches as one process), evaluation with
            `ShardSampler` (each image in exactly one shard, none repeated to even them out).
        seed: seeds the shuffling and the workers' RNGs (hence the flips).
        pin_memory: pinned host memory for faster host-to-GPU copies; None = when CUDA is
            available.
        size_divisible: see `collate` (2 ** max_level).
        drop_last: override the default (= `train`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if drop_last is None:
        drop_last = bool(train)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if distributed and train:
        sampler: Sampler[Any] = GlobalBatchShardSampler(
            dataset,
            batch_size=batch_size,
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            seed=seed,
            with_draws=True,
        )
    elif distributed:
        sampler = ShardSampler(
            dataset,
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
        )
    elif train:
        sampler = EpochShuffleSampler(dataset, seed=seed, with_draws=True)
    else:
        sampler = SequentialSampler(dataset)
    if drop_last and len(dataset) < batch_size and not distributed:
        raise ValueError(_too_small_message(dataset, batch_size))
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collate(size_divisible),
        pin_memory=bool(pin_memory),
        drop_last=bool(drop_last),
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        # Training iterates epoch after epoch: keep the workers instead of re-forking them.
        persistent_workers=bool(train) and num_workers > 0,
    )


def _too_small_message(dataset: Dataset, batch_size: int) -> str:
    """Why a training set smaller than one batch is refused, naming its annotation file and,
    when `skip_empty` left images out, that as the likely cause."""
    ann_file = getattr(dataset, "ann_file", None)
    source = f" ({ann_file})" if ann_file is not None else f" ({type(dataset).__name__})"
    msg = (
        f"the training set{source} has {len(dataset)} images, fewer than "
        f"batch_size={batch_size}: every batch would be dropped"
    )
    skipped = int(getattr(dataset, "num_skipped_empty", 0) or 0)
    if skipped:
        msg += (
            f"; {skipped} of its {skipped + len(dataset)} images were skipped because they have "
            "no non-crowd box of positive size and data.skip_empty is true: check the boxes in "
            "the annotation file, or set data.skip_empty=false or a smaller batch size"
        )
    return msg
