"""Multi-process training (train.devices=2, gloo on CPU): it steps exactly like one process, and
the ranks stay together when one of them sees a non-finite loss, when rank 0's pruner stops the
run, and when one of them crashes (no hang; tests/ddp_faults.py injects the faults)."""

from __future__ import annotations

import contextlib
import datetime
import math
from pathlib import Path

import pytest
import torch
from ddp_faults import read_log, run_command_with_deadline, run_with_deadline, started
from helpers import compose_config
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from retina_sweep import distributed
from retina_sweep.config import config_hash
from retina_sweep.data.loader import EpochShuffleSampler, GlobalBatchShardSampler, ShardSampler
from retina_sweep.evaluation import Inference, mean_ms_per_image, merge_shards, shard_max_images
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


def _ddp_smoke(tmp_path: Path, root: str, devices: int, *extra: str) -> list[str]:
    """A 3-iteration smoke run on `devices` processes (0 to 2) that one process matches step
    for step, outputs under `tmp_path/root`; `extra` overrides come last."""
    return [
        "scale=smoke",
        f"paths.root={tmp_path}/{root}",
        f"data.cache_dir={tmp_path}/cache",
        f"train.devices={devices}",
        "train.iterations=3",
        "train.warmup_iters=0",
        "train.checkpoint_every=0",
        "train.threads=1",
        # float32: bf16 autocast rounds the two processes' partial sums differently.
        "train.cpu_amp=false",
        # Per-rank batch statistics and per-sample random flips would differ between one
        # process and two by construction; everything else must match.
        "model.backbone.norm=gn",
        "data.flip_prob=0.0",
        *extra,
    ]


def _overrides(tmp_path: Path, root: str, devices: int) -> list[str]:
    return _ddp_smoke(tmp_path, root, devices, "tracking=none", "train.lr=0.05")


def _cfg(tmp_path: Path, root: str, devices: int):
    return compose_config(_overrides(tmp_path, root, devices))


@pytest.mark.slow
def test_two_gloo_workers_equal_one_process(tmp_path: Path) -> None:
    single = _cfg(tmp_path, "single", 1)
    double = _cfg(tmp_path, "ddp", 2)
    assert config_hash(single) == config_hash(double)  # devices is not part of the identity
    run(single)
    run(double)
    _assert_same_training(single, tmp_path / "single", tmp_path / "ddp")


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(tmp_path: Path) -> None:
    """An external launcher (torchrun, which also spans nodes) starts the entry point once per
    rank; each joins the launch's process group and they train as one process would."""
    import os
    import sys

    single = _cfg(tmp_path, "single", 1)
    run(single)
    root = Path(__file__).resolve().parents[1]
    overrides = _overrides(tmp_path, "torchrun", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "retina_sweep", *overrides]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    code, output = run_command_with_deadline(cmd, 150, cwd=tmp_path, env=env)
    assert code == 0, output
    _assert_same_training(single, tmp_path / "single", tmp_path / "torchrun")
    # A global batch that does not divide among the launch's ranks: one line, before training.
    code, output = run_command_with_deadline(
        [*cmd, "train.batch_size=3"], 150, cwd=tmp_path, env=env
    )
    assert code != 0
    assert "train.batch_size=3: the global batch must divide among the WORLD_SIZE=2" in output


@pytest.mark.slow
def test_torchrun_ranks_wait_for_a_cell_another_process_trains(tmp_path: Path) -> None:
    """Under torchrun as under `train.devices`, one process at a time trains a cell: rank 0 takes
    the cell's lock, saying it waits while another process holds it, and no rank trains until
    it has; after the release the launch trains the cell."""
    import os
    import subprocess
    import sys
    import time

    from retina_sweep.locks import exclusive

    overrides = [*_overrides(tmp_path, "torchrun", 1), "train.checkpoint_every=1"]
    cell = tmp_path / "torchrun" / "checkpoints" / config_hash(compose_config(overrides))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "retina_sweep", *overrides]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    deadline = time.monotonic() + 150
    with open(log, "w") as out, contextlib.ExitStack() as held:
        held.enter_context(exclusive(cell / ".lock"))  # another process, training this cell
        with started(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT) as proc:
            while "another process is training this cell" not in log.read_text():
                assert proc.poll() is None, log.read_text()  # it ran without waiting
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(2.0)
            assert proc.poll() is None, log.read_text()  # still waiting
            assert not (cell / "last.pt").exists()  # no step taken (a checkpoint at each)
            assert "training precision" not in log.read_text()  # rank 0 has built no model
            held.close()  # released: the ranks train the cell; a hang is killed at the deadline
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, log.read_text()
    assert torch.load(cell / "last.pt", weights_only=True)["iteration"] == 3


def test_a_single_process_launch_holds_the_cell_lock(tmp_path: Path, monkeypatch) -> None:
    """`torchrun --nproc_per_node=1` (LOCAL_RANK set, WORLD_SIZE=1) trains as one process does:
    holding the cell's lock for the run."""
    import fcntl

    cfg = compose_config(["scale=smoke", f"paths.root={tmp_path}", "tracking=none"])
    lock = Path(cfg.paths.checkpoints) / config_hash(cfg) / ".lock"
    lock.parent.mkdir(parents=True)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    held = []

    def training(cfg) -> float:
        # Another open file description of the lock: it can take the lock only if nobody holds it.
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
        return 1.0

    monkeypatch.setattr("retina_sweep.train._run_here", training)
    assert run(cfg) == 1.0
    assert held == [True]


def _assert_same_training(cfg, root_a: Path, root_b: Path) -> None:
    """The checkpoints of `cfg` under two roots hold the same trained weights (to float
    summation order), and training moved them."""
    h = config_hash(cfg)
    a = torch.load(root_a / "checkpoints" / h / "last.pt", weights_only=True)
    b = torch.load(root_b / "checkpoints" / h / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 3
    # The initial weights, built as the trainer builds them: training really moved them.
    torch.manual_seed(int(cfg.seed))
    initial = instantiate(cfg.model, strategy=instantiate(cfg.loss), _convert_="all")
    moved = 0
    for key, value in a["model"].items():
        if not torch.is_floating_point(value):
            continue
        diff = (b["model"][key] - value).abs().max().item()
        scale = value.abs().max().item()
        assert diff <= 1e-4 * scale + 1e-6, f"{key}: max diff {diff:.3g} (scale {scale:.3g})"
        moved += int((value - initial.state_dict()[key]).abs().max() > 1e-4)
    assert moved > 10


# ---------------------------------------------------------------------------------------------
# Faults under DDP: every test runs `run(cfg)` in a subprocess killed after DEADLINE seconds, so
# a hang fails it. A normal run takes 15-25 s on two shared cores.
# ---------------------------------------------------------------------------------------------
DEADLINE = 120.0


def _fault_overrides(tmp_path: Path, devices: int, *extra: str) -> list[str]:
    return _ddp_smoke(
        tmp_path,
        "sweeps",
        devices,
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_every=1",
        # the focal loss, with a fault on one rank (ddp_faults.faulty_focal)
        "loss._target_=ddp_faults.faulty_focal",
        *extra,
    )


def _runs(tmp_path: Path):
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.get_experiment_by_name("retina_sweep")
    return mlf, mlf.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _checkpoint(tmp_path: Path, overrides: list[str]):
    h = config_hash(compose_config(overrides))
    return torch.load(tmp_path / "sweeps" / "checkpoints" / h / "last.pt", weights_only=True)


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_by_all(tmp_path: Path) -> None:
    """train.max_nonfinite=1, NaN on rank 1 only at its 2nd iteration: both ranks skip that step
    (they would hang in DDP's all-reduce otherwise) and end with the weights of one process that
    skipped the same step."""
    nan_at_2 = ["+loss.fault=nonfinite", "+loss.fault_call=2", "train.max_nonfinite=1"]
    ddp = _fault_overrides(tmp_path / "ddp", 2, *nan_at_2, "+loss.fault_rank=1")
    rc, ap, out = run_with_deadline(ddp, DEADLINE)
    assert rc == 0, out
    assert math.isfinite(ap)
    assert "non-finite loss at iteration 2 on rank(s) 1, step skipped" in out
    mlf, runs = _runs(tmp_path / "ddp")
    assert [r.data.tags["outcome"] for r in runs] == ["completed"]
    # the skipped step is counted (the schedule moved on) but logs no loss
    assert [m.step for m in mlf.get_metric_history(runs[0].info.run_id, "loss")] == [1, 3]
    single = _fault_overrides(tmp_path / "single", 1, *nan_at_2, "+loss.fault_rank=0")
    rc, _, out = run_with_deadline(single, DEADLINE)
    assert rc == 0, out
    a, b = _checkpoint(tmp_path / "single", single), _checkpoint(tmp_path / "ddp", ddp)
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["model"].items():
        if torch.is_floating_point(value):
            diff = (b["model"][key] - value).abs().max().item()
            assert diff <= 1e-4 * value.abs().max().item() + 1e-6, key


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_ends_the_run_diverged(tmp_path: Path) -> None:
    """train.max_nonfinite=0, NaN on rank 1 only: every rank raises Diverged, the launch returns
    nan and rank 0's MLflow run ends diverged at the 1-based step of the NaN, naming the rank."""
    overrides = _fault_overrides(
        tmp_path, 2, "+loss.fault=nonfinite", "+loss.fault_rank=1", "+loss.fault_call=2"
    )
    rc, ap, out = run_with_deadline(overrides, DEADLINE)
    assert rc == 0, out
    assert math.isnan(ap)
    mlf, runs = _runs(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["outcome"] == "diverged"
    # the 2nd iteration's loss was NaN: diverged_at counts as the metric steps do
    assert r.data.tags["diverged_at"] == "2"
    assert [m.step for m in mlf.get_metric_history(r.info.run_id, "loss")] == [1]
    # rank 0's own loss was finite: the error says whose was not
    assert "non-finite loss at iteration 2 on rank(s) 1" in r.data.tags["error"]


@pytest.mark.slow
def test_rank0_pruning_stops_every_rank(tmp_path: Path) -> None:
    """The pruner runs on rank 0 (the only one with the metrics); its decision is broadcast, so
    rank 1 stops at the same step instead of waiting in DDP's next all-reduce."""
    log = tmp_path / "pruner.jsonl"
    overrides = _fault_overrides(
        tmp_path,
        2,
        "+loss.fault_call=0",  # no fault
        "train.eval_every=1",
        "+pruning._target_=ddp_faults.PruneAt",
        "+pruning.step=2",
        f"+pruning.log={log}",
    )
    rc, ap, out = run_with_deadline(overrides, DEADLINE)
    assert rc == 0, out
    assert math.isnan(ap)
    events = read_log(log)
    assert events == [
        {"event": "init", "step": 0, "rank": 0},  # rank 1 does not open the study
        {"event": "report", "step": 1, "rank": 0},
        {"event": "report", "step": 2, "rank": 0},
        {"event": "pruned", "step": 2, "rank": 0},  # the study is told once, by rank 0
    ]
    mlf, runs = _runs(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "KILLED" and r.data.tags["outcome"] == "pruned"
    assert r.data.tags["pruned_at"] == "2"
    assert [m.step for m in mlf.get_metric_history(r.info.run_id, "loss")] == [1, 2]


@pytest.mark.slow
def test_a_crash_on_one_rank_fails_the_launch_and_the_run(tmp_path: Path) -> None:
    """An exception on rank 1 only (a stand-in for a data error) while rank 0 waits in a
    collective: the launch raises one ChildFailedError naming it, nothing hangs, and rank 0's
    MLflow run is closed FAILED with rank 1's error (not gloo's "Connection closed by peer")."""
    overrides = _fault_overrides(
        tmp_path, 2, "+loss.fault=raise", "+loss.fault_rank=1", "+loss.fault_call=2"
    )
    rc, _, out = run_with_deadline(overrides, DEADLINE)
    assert rc != 0
    assert "ChildFailedError" in out and "injected data error on rank 1" in out
    _, runs = _runs(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FAILED" and r.data.tags["outcome"] == "failed"
    assert r.data.tags["error"] == (
        "rank 1 of 2 failed: RuntimeError: injected data error on rank 1"
    )


# ---------------------------------------------------------------------------------------------
# Sharded evaluation: every rank infers its shard of the val split, rank 0 evaluates the union.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("cap", [None, 1, 2, 5, 8, 13])
def test_capped_shards_union_to_the_first_images_in_order(world_size: int, cap) -> None:
    """Rank r infers the first `shard_max_images(cap, r, N)` images of its `ShardSampler` shard:
    together exactly the first `cap` images of the split, and `merge_shards` puts them back in
    the order one process sees them."""
    data = list(range(11))
    shards = [
        list(ShardSampler(data, rank=r, world_size=world_size))[
            : shard_max_images(cap, r, world_size)
        ]
        for r in range(world_size)
    ]
    assert merge_shards(shards) == data[:cap]
    assert shard_max_images(None, 0, world_size) is None
    with pytest.raises(ValueError, match="rank"):
        shard_max_images(cap, world_size, world_size)


def test_sharded_ms_per_image_is_the_mean_of_the_ranks_per_image_times() -> None:
    """Each rank's time per image leaves out its own first (warm-up) batch unless that is all it
    ran; a rank with no image (beyond a small cap) is left out of the mean."""
    warm = Inference(first_s=1.0, first_images=2, timed_s=0.3, timed_images=3)  # 100 ms
    only_warmup = Inference(first_s=0.6, first_images=2)  # 300 ms
    idle = Inference()
    assert warm.ms_per_image() == pytest.approx(100.0)
    assert idle.ms_per_image() is None
    assert mean_ms_per_image([warm, only_warmup, idle]) == pytest.approx(200.0)
    assert mean_ms_per_image([idle, idle]) is None


def _eval_overrides(tmp_path: Path, devices: int) -> list[str]:
    return _ddp_smoke(
        tmp_path,
        "sweeps",
        devices,
        # the detector, writing down which rank runs which images (ddp_faults.recording_model)
        "model._target_=ddp_faults.recording_model",
        f"+model.record={tmp_path}/forwards.jsonl",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        # Steps too small to move a weight: two processes train to weights equal to 1e-4 (their
        # partial sums round differently), and detections scored ~0.01 apart by so little are
        # ranked differently by COCOeval. With the same weights, the evaluations must agree
        # exactly.
        "train.lr=1e-30",
        # every candidate box is kept (up to the detections per image): after 3 iterations no
        # score reaches the default 0.05, and metrics over no detections would compare nothing
        "model.inference.score_thresh=0.0",
        # periodic evaluations at steps 1 and 2 on the first 5 of the 8 val images: rank 0 of
        # two infers images 0, 2, 4 and rank 1 images 1, 3
        "train.eval_every=1",
        "train.eval_max_images=5",
    )


def _val_metrics(tmp_path: Path) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """The final metrics of the only run, and the history of each periodic `val_*` metric."""
    mlf, runs = _runs(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.data.tags["outcome"] == "completed"
    history = {
        k: [(m.step, m.value) for m in mlf.get_metric_history(r.info.run_id, k)]
        for k in r.data.metrics
        if k.startswith("val_")
    }
    return r.data.metrics, history


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(tmp_path: Path) -> None:
    """Two gloo workers each infer their half of the val split (capped by train.eval_max_images
    to their images among the 5 that one process evaluates) and rank 0 evaluates the union: the
    periodic and final COCO metrics are those of one process, with the same images and
    detections counted."""
    rc, ap_single, out = run_with_deadline(_eval_overrides(tmp_path / "single", 1), DEADLINE)
    assert rc == 0, out
    rc, ap_ddp, out = run_with_deadline(_eval_overrides(tmp_path / "ddp", 2), DEADLINE)
    assert rc == 0, out
    # Who inferred what: one process runs the 8 val images at each of the 3 evaluations (the
    # capped ones forward whole batches of 4, 8 images). Of two, rank 0 runs images 0, 2, 4, 6
    # and rank 1 images 1, 3, 5, 7 of the final evaluation; capped to 5, rank 0 runs 0, 2 | 4, 6
    # (6 unused) and rank 1 its first batch 1, 3.
    forwards = read_log(tmp_path / "single" / "forwards.jsonl")
    assert {f["rank"] for f in forwards} == {0}
    split = [im for f in forwards[-2:] for im in f["images"]]  # the final evaluation
    assert len(split) == len(set(split)) == 8
    assert [im for f in forwards for im in f["images"]] == split * 3
    ranks = {r: [] for r in (0, 1)}
    for f in read_log(tmp_path / "ddp" / "forwards.jsonl"):
        ranks[f["rank"]].extend(f["images"])
    assert ranks[0] == split[0::2] * 3
    assert ranks[1] == (split[1:4:2] * 2) + split[1::2]

    single, single_val = _val_metrics(tmp_path / "single")
    ddp, ddp_val = _val_metrics(tmp_path / "ddp")
    assert single["num_images"] == ddp["num_images"] == 8  # the whole smoke val split
    assert single_val["val_num_images"] == ddp_val["val_num_images"] == [(1, 5.0), (2, 5.0)]
    assert ddp["num_detections"] > 0 and ddp_val["val_num_detections"][0][1] > 0
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "num_detections"):
        assert _same(single[key], ddp[key]), (key, single[key], ddp[key])
    assert _same(ap_single, ap_ddp)
    assert single_val.keys() == ddp_val.keys()
    for key in single_val:
        if key != "val_ms_per_image":
            assert [s for s, _ in single_val[key]] == [1, 2], key
            assert all(
                _same(a, b) for (_, a), (_, b) in zip(single_val[key], ddp_val[key], strict=True)
            ), (key, single_val[key], ddp_val[key])
    # the mean of the ranks' per-image forward times: a per-device latency
    assert 0 < ddp["ms_per_image"] < 10_000
    assert all(0 < v < 10_000 for _, v in ddp_val["val_ms_per_image"])


def _distinct(digests: list[str]) -> list[str]:
    """`digests` without consecutive repeats: one per evaluation (the buffers are constant within
    one, and each training step in between changes them)."""
    return [d for i, d in enumerate(digests) if i == 0 or d != digests[i - 1]]


@pytest.mark.slow
def test_sharded_evaluation_runs_every_shard_with_rank0_batchnorm_statistics(
    tmp_path: Path,
) -> None:
    """Trainable BatchNorm (the smoke backbone's `bn`, and one BN per level in the heads): each
    rank updates the running statistics from its own images in its last training forward, so
    before each evaluation the ranks take rank 0's buffers. Every shard of the periodic and final
    evaluations is then run with the same buffers, the checkpointed ones, and the sharded metrics
    are those of one process evaluating rank 0's checkpoint."""
    overrides = [*_eval_overrides(tmp_path, 2), "model.backbone.norm=bn", "model.head.norm=BN"]
    rc, ap_ddp, out = run_with_deadline(overrides, DEADLINE)
    assert rc == 0, out
    forwards = read_log(tmp_path / "forwards.jsonl")
    by_rank = {r: _distinct([f["buffers"] for f in forwards if f["rank"] == r]) for r in (0, 1)}
    # the periodic evaluations at steps 1 and 2 and the final one, each with its own statistics
    assert len(by_rank[0]) == 3, by_rank
    assert by_rank[1] == by_rank[0]

    # The same cell again in one process: it finds the finished checkpoint and only evaluates it.
    single = [*overrides, "train.devices=1"]
    rc, ap_single, out = run_with_deadline(single, DEADLINE)
    assert rc == 0, out
    evaluated = read_log(tmp_path / "forwards.jsonl")[len(forwards) :]
    assert {f["rank"] for f in evaluated} == {0}
    assert _distinct([f["buffers"] for f in evaluated]) == by_rank[0][-1:]

    _, runs = _runs(tmp_path)
    assert [r.data.tags["outcome"] for r in runs] == ["completed", "completed"]
    assert runs[1].data.tags["resumed_from_iteration"] == "3"  # nothing trained
    ddp, one = runs[0].data.metrics, runs[1].data.metrics
    assert ddp["num_images"] == one["num_images"] == 8
    assert ddp["num_detections"] > 0
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "num_detections"):
        assert _same(ddp[key], one[key]), (key, ddp[key], one[key])
    assert _same(ap_ddp, ap_single)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_collective_timeout_is_generous_and_reaches_the_process_group(monkeypatch) -> None:
    """Rank 0 runs COCOeval while the others wait in a collective: the process group gets
    RETINA_SWEEP_DIST_TIMEOUT_MIN (default 180 min), not gloo's 30 or NCCL's 10 minutes."""
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == datetime.timedelta(minutes=180)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    assert distributed.collective_timeout() == datetime.timedelta(minutes=7.5)
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.collective_timeout()

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setattr("retina_sweep.train.run_worker", lambda cfg, **kw: 1.0)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    cfg_yaml = "device: cpu\ntrain: {threads: 1}\n"
    assert distributed._worker(cfg_yaml, 600.0) == 1.0
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=10)}
