"""Checks that need a CUDA device; skipped (and saying so) where there is none, as in CI.

Run them on a GPU machine with `pytest -m cuda`. The same checks, as a script with timings, are
`tools/gpu_check.sh` (docs/benchmarks.md, "On a GPU").
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from mlflow.tracking import MlflowClient

from retina_sweep import pretrain
from retina_sweep.train import run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _smoke_config(tmp_path: Path, *overrides: str):
    """`scale=smoke` on the GPU, with its MLflow store, sweeps and data cache under tmp_path."""
    return compose_config(
        [
            "scale=smoke",
            "device=cuda",
            *overrides,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
        ]
    )


def _the_run(tmp_path: Path):
    """The one MLflow run of a `_smoke_config` run."""
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (r,) = mlf.search_runs([mlf.get_experiment_by_name("retina_sweep").experiment_id])
    return r


def test_crops_are_the_same_on_cpu_and_cuda() -> None:
    """The pretraining batches do not depend on the device: every random number comes from one
    CPU generator, and only the cropping runs where the images are."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 96), dtype=torch.uint8, generator=g)
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0], [50.0, 10.0, 90.0, 50.0]])] * 6
    labels = [torch.tensor([1, 2])] * 6
    padded, plabels, counts = pretrain._pad_boxes(boxes, labels)
    recipe = pretrain.PretrainRecipe(batch_size=16, crop=24)
    xc, yc = pretrain._sample_batch(
        images, padded, plabels, counts, 3, recipe, torch.Generator().manual_seed(0)
    )
    xg, yg = pretrain._sample_batch(
        images.cuda(), padded, plabels, counts, 3, recipe, torch.Generator().manual_seed(0)
    )
    assert yg.is_cuda and torch.equal(yc, yg.cpu())
    torch.testing.assert_close(xc, xg.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("amp", [False, True])
def test_a_smoke_run_trains_on_cuda(tmp_path: Path, amp: bool) -> None:
    """A whole run on the GPU, with and without mixed precision: finite losses, a FINISHED MLflow
    run with its final AP, and the peak GPU memory logged."""
    ap = run(_smoke_config(tmp_path, f"train.amp={str(amp).lower()}"))
    assert math.isfinite(ap) and 0.0 <= ap <= 100.0
    r = _the_run(tmp_path)
    assert r.info.status == "FINISHED"
    assert r.data.metrics["gpu_max_mem_gb"] > 0
    assert math.isfinite(r.data.metrics["loss"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_batch_norm_keeps_the_autocast_dtype_on_cuda(dtype: torch.dtype) -> None:
    """The proxy's frozen batch norm under CUDA autocast (float16 is CUDA's default): the output
    stays in the input's dtype and equals torchvision's float32 arithmetic to that dtype's
    precision."""
    import torchvision

    from retina_sweep.model.norm import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    ours, ref = FrozenBatchNorm2d(16), torchvision.ops.FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean"):
        getattr(ours, name).copy_(torch.randn(16, generator=g))
    ours.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.cuda(), ref.cuda()
    x = torch.randn(4, 16, 9, 13, generator=g).cuda()
    conv = torch.nn.Conv2d(16, 16, 1, bias=False).cuda()
    with torch.autocast("cuda", dtype=dtype):
        h = conv(x)  # an autocast activation, as the stem's convolution hands it on
        y = ours(h)
    assert h.dtype == dtype and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(h.float()), atol=0.05, rtol=0.02)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)  # float32: bit for bit


def test_the_distributed_launcher_trains_on_nccl(tmp_path: Path) -> None:
    """`train.devices` through torch.distributed's launcher on the GPU: one NCCL rank wrapping the
    model in DistributedDataParallel (the multi-GPU path, on the one GPU a test machine has)."""
    from retina_sweep import distributed

    ap = distributed.launch(_smoke_config(tmp_path))
    assert math.isfinite(ap) and 0.0 <= ap <= 100.0
    r = _the_run(tmp_path)
    assert r.info.status == "FINISHED" and r.data.metrics["gpu_max_mem_gb"] > 0
