"""Multi-process training (train.devices=2, gloo on CPU) steps exactly like one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from retina_sweep.config import config_hash
from retina_sweep.data.loader import EpochShuffleSampler, GlobalBatchShardSampler
from retina_sweep.train import run


@pytest.mark.parametrize("with_draws", [False, True])
def test_global_batch_shards_union_to_the_single_process_batch(with_draws: bool) -> None:
    data = list(range(37))
    single = list(EpochShuffleSampler(data, seed=5, with_draws=with_draws))
    shards = [
        list(
            GlobalBatchShardSampler(
                data, batch_size=4, rank=r, world_size=3, seed=5, with_draws=with_draws
            )
        )
        for r in range(3)
    ]
    # 37 // 12 = 3 full global batches of 12 (with draws: the same images flipped the same way)
    for i in range(3):
        merged = sum((s[i * 4 : (i + 1) * 4] for s in shards), [])
        assert merged == single[i * 12 : (i + 1) * 12]
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchShardSampler(data, batch_size=4, rank=3, world_size=3)


def test_samplers_seek_to_a_batch_for_an_exact_resume() -> None:
    """A resumed run enters its epoch at the batch it reached (train.infinite_batches): the
    samplers then yield the rest of that epoch's order, and the next epoch from its start."""
    data = list(range(37))
    single = EpochShuffleSampler(data, seed=5, with_draws=True)
    full = list(single)
    single.set_start_batch(2, batch_size=12)
    assert list(single) == full[24:]
    assert list(single) == full  # one-shot: the next iteration starts at 0
    shards = [
        GlobalBatchShardSampler(data, batch_size=4, rank=r, world_size=3, seed=5, with_draws=True)
        for r in range(3)
    ]
    for s in shards:
        s.set_start_batch(2)
    merged = sum((list(s) for s in shards), [])
    assert merged == full[24:36]  # global batch 2 of 3 (37 // 12), as one process sees it


def _cfg(tmp_path: Path, root: str, devices: int):
    return compose_config(
        [
            "scale=smoke",
            "tracking=none",
            f"paths.root={tmp_path}/{root}",
            f"data.cache_dir={tmp_path}/cache",
            f"train.devices={devices}",
            "train.iterations=3",
            "train.warmup_iters=0",
            "train.lr=0.05",
            "train.checkpoint_every=0",
            "train.threads=1",
            # float32: bf16 autocast rounds the two processes' partial sums differently.
            "train.cpu_amp=false",
            # Per-rank batch statistics and per-sample random flips would differ between one
            # process and two by construction; everything else must match.
            "model.backbone.norm=gn",
            "data.flip_prob=0.0",
        ]
    )


@pytest.mark.slow
def test_two_gloo_workers_equal_one_process(tmp_path: Path) -> None:
    single = _cfg(tmp_path, "single", 1)
    double = _cfg(tmp_path, "ddp", 2)
    assert config_hash(single) == config_hash(double)  # devices is not part of the identity
    run(single)
    run(double)
    h = config_hash(single)
    a = torch.load(tmp_path / "single" / "checkpoints" / h / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "checkpoints" / h / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 3
    # The initial weights, built as the trainer builds them: training really moved them.
    torch.manual_seed(int(single.seed))
    initial = instantiate(single.model, strategy=instantiate(single.loss), _convert_="all")
    moved = 0
    for key, value in a["model"].items():
        if not torch.is_floating_point(value):
            continue
        diff = (b["model"][key] - value).abs().max().item()
        scale = value.abs().max().item()
        assert diff <= 1e-4 * scale + 1e-6, f"{key}: max diff {diff:.3g} (scale {scale:.3g})"
        moved += int((value - initial.state_dict()[key]).abs().max() > 1e-4)
    assert moved > 10
