"""Multi-process training through torch.distributed's own launcher API (what torchrun runs).

`launch(cfg)` spawns `train.devices` worker processes with
`torch.distributed.launcher.api.elastic_launch` on this machine: NCCL on CUDA (one GPU per
process), gloo on CPU. Each worker initialises the process group and calls
`retina_sweep.train.run_worker`; the global batch `train.batch_size` is split evenly among the
ranks (the config validation insists it divides), only rank 0 logs to MLflow, writes checkpoints
and runs the COCO evaluation, and the final AP of rank 0 is returned.
"""

from __future__ import annotations

import math
import os
import socket
import uuid

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["launch", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg_yaml: str) -> float:
    # Runs in a fresh process spawned by elastic_launch: RANK, WORLD_SIZE, LOCAL_RANK,
    # MASTER_ADDR and MASTER_PORT are set by the agent.
    from .train import run_worker

    cfg = OmegaConf.create(cfg_yaml)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = cfg.device in ("cuda", "auto") and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if cfg.train.get("threads") is None and not use_cuda:
        # Share the cores among the workers instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    torch.distributed.init_process_group(backend=backend)
    try:
        return run_worker(
            cfg,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=local_rank,
        )
    finally:
        torch.distributed.destroy_process_group()


def launch(cfg: DictConfig) -> float:
    """Run `cfg` on `cfg.train.devices` local processes; returns rank 0's final AP."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = int(cfg.train.devices)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"retina_sweep_{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # Workers get a plain resolved config (no Hydra runtime in the children).
    cfg_yaml = OmegaConf.to_yaml(_resolved(cfg))
    results = elastic_launch(config, _worker)(cfg_yaml)
    value = results.get(0, math.nan)
    return float(value) if value is not None else math.nan


def _resolved(cfg: DictConfig) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return OmegaConf.create(container)
