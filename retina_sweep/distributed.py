"""Multi-process training through torch.distributed's own launcher API (what torchrun runs).

`launch(cfg)` spawns `train.devices` worker processes with
`torch.distributed.launcher.api.elastic_launch` on this machine: NCCL on CUDA (one GPU per
process), gloo on CPU. Each worker initialises the process group and calls
`retina_sweep.train.run_worker`; the global batch `train.batch_size` is split evenly among the
ranks (the config validation insists it divides). Every rank infers its shard of the val split
at each evaluation; rank 0 gathers the detections and runs COCOeval on them
(`retina_sweep.evaluation.evaluate`). Only rank 0 logs to MLflow and writes checkpoints, and the
final AP of rank 0 is returned.

When a worker fails (an exception, or killed by a signal), the agent stops the others and
`launch` raises torch's `ChildFailedError`, whose report names the first failure and its
traceback. The MLflow run, which rank 0 may have left RUNNING (killed while blocked in a
collective) or closed with the error it saw (gloo's "Connection closed by peer"), is then closed
FAILED with that first failure as its `error`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

__all__ = ["launch", "joined", "free_port", "collective_timeout", "TIMEOUT_ENV"]

# Minutes a collective may wait for the other ranks (see `collective_timeout`).
TIMEOUT_ENV = "RETINA_SWEEP_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 180.0
# The MLflow tag that ties rank 0's run to its launch (the elastic run id).
LAUNCH_TAG = "elastic_run_id"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective for the others: `$RETINA_SWEEP_DIST_TIMEOUT_MIN`
    minutes, 180 by default.

    Every rank infers its shard of an evaluation, periodically and at the end, then waits in a
    collective (the gather of the detections, the pruning decision's broadcast, the final
    barrier) for the slowest shard and for rank 0's COCOeval of the union. torch's defaults, 30
    min for gloo and 10 min for NCCL, may be shorter than that at paper scale (a slow or shared
    machine, uneven shards, a periodic evaluation without `train.eval_max_images`): the waiting
    ranks would time out and fail a healthy run at its end. A generous limit costs little: a
    crashed worker does not wait for it (the elastic agent sees the process end and stops the
    others within a second); only a real deadlock does. An environment variable, not a config
    key: the train section is part of a trial's identity (`config_hash`).
    """
    raw = os.environ.get(TIMEOUT_ENV)
    minutes = DEFAULT_TIMEOUT_MIN
    if raw not in (None, ""):
        try:
            minutes = float(raw)
        except ValueError:
            minutes = math.nan
        if not (math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number of minutes, got {raw!r}")
    return datetime.timedelta(minutes=minutes)


@contextlib.contextmanager
def joined(cfg: DictConfig, timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """This process as one rank of a launch, inside the block: the process group initialised
    from what the launcher set in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), NCCL with the local GPU on CUDA, gloo on CPU,
    and destroyed at the end. Used by `launch`'s workers and by the ranks of an external
    launcher (`torchrun`, over one node or several)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device in ("cuda", "auto") and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if cfg.train.get("threads") is None and not use_cuda:
        # Share this node's cores among its ranks instead of oversubscribing them.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    torch.distributed.init_process_group(backend=backend, timeout=timeout or collective_timeout())
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _worker(cfg_yaml: str, timeout_s: float | None = None) -> float:
    # Runs in a fresh process spawned by elastic_launch: RANK, WORLD_SIZE, LOCAL_RANK,
    # MASTER_ADDR and MASTER_PORT are set by the agent.
    from .train import run_worker

    cfg = OmegaConf.create(cfg_yaml)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    with joined(cfg, timeout):
        return run_worker(
            cfg,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
        )


def launch(cfg: DictConfig) -> float:
    """Run `cfg` on `cfg.train.devices` local processes; returns rank 0's final AP."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    timeout_s = collective_timeout().total_seconds()  # a bad value stops here, before any spawn
    nproc = int(cfg.train.devices)
    run_id = f"retina_sweep_{uuid.uuid4().hex[:8]}"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # Workers get a plain resolved config (no Hydra runtime in the children), with a tag that
    # lets this process find rank 0's MLflow run if a worker fails.
    resolved = _resolved(cfg)
    with open_dict(resolved):
        resolved.extra_tags = {**(resolved.get("extra_tags") or {}), LAUNCH_TAG: run_id}
    cfg_yaml = OmegaConf.to_yaml(resolved)
    try:
        results = elastic_launch(config, _worker)(cfg_yaml, timeout_s)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        _record_failure(resolved, run_id, f"rank {rank} of {nproc} failed: {_summary(failure)}")
        raise
    value = results.get(0, math.nan)
    return float(value) if value is not None else math.nan


def _summary(failure: Any) -> str:
    """The last line of a worker's failure message (`ExcType: message` for an exception)."""
    message = failure.message
    if isinstance(message, dict):  # an error file's {"message": ..., "extraInfo": {traceback}}
        message = message.get("message", "")
    message = str(message or "")
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def _record_failure(cfg: DictConfig, run_id: str, error: str) -> None:
    """Close rank 0's MLflow run of launch `run_id` FAILED with `error`, unless it ended with a
    result (completed, diverged, pruned): best effort, the launch's own error comes first."""
    if not cfg.tracking.get("enabled"):
        return
    try:
        from .tracking import OUTCOME_STATUS, client, retry

        mlf = client(cfg.tracking.get("uri"))
        exp = mlf.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return
        runs = mlf.search_runs([exp.experiment_id], filter_string=f"tags.{LAUNCH_TAG} = '{run_id}'")
        for r in runs:
            if r.data.tags.get("outcome") in ("completed", "diverged", "pruned"):
                continue
            rid = r.info.run_id
            retry(lambda rid=rid: mlf.set_tag(rid, "outcome", "failed"))
            retry(lambda rid=rid: mlf.set_tag(rid, "error", error[:5000]))
            retry(lambda rid=rid: mlf.set_terminated(rid, status=OUTCOME_STATUS["failed"]))
    except Exception as exc:  # never hide the workers' failure behind a tracking error
        log.warning("could not mark the MLflow run of %s failed: %s", run_id, exc)


def _resolved(cfg: DictConfig) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return OmegaConf.create(container)
