"""One training run end to end (scale=smoke) into a temporary MLflow store, resume, divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from mlflow.tracking import MlflowClient

from retina_sweep import train as train_mod
from retina_sweep.config import config_hash
from retina_sweep.train import lr_factor, resolve_lr, run


def smoke_cfg(tmp_path: Path, *extra: str):
    return compose_config(
        [
            "scale=smoke",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"paths.root={tmp_path}/sweeps",
            f"data.cache_dir={tmp_path}/cache",
            "tracking.log_every=1",
            *extra,
        ]
    )


def only_run(tmp_path: Path):
    mlf = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlf.get_experiment_by_name("retina_sweep")
    runs = mlf.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return mlf, runs


def test_lr_schedule_is_the_papers() -> None:
    kw = dict(iterations=90000, warmup_iters=500, warmup_factor=0.001, lr_decay=0.1)
    steps = [2 / 3, 8 / 9]
    assert lr_factor(0, lr_steps=steps, **kw) == pytest.approx(0.001)
    assert lr_factor(250, lr_steps=steps, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(500, lr_steps=steps, **kw) == 1.0
    assert lr_factor(59999, lr_steps=steps, **kw) == 1.0
    assert lr_factor(60000, lr_steps=steps, **kw) == pytest.approx(0.1)
    assert lr_factor(79999, lr_steps=steps, **kw) == pytest.approx(0.1)
    assert lr_factor(80000, lr_steps=steps, **kw) == pytest.approx(0.01)


def test_linear_scaling_rule() -> None:
    cfg = compose_config(["train.batch_size=8", "train.lr=null"])
    assert resolve_lr(cfg.train) == pytest.approx(0.01 * 8 / 16)
    cfg = compose_config(["train.lr=0.5"])
    assert resolve_lr(cfg.train) == 0.5


@pytest.mark.slow
def test_smoke_run_logs_params_metrics_tags_and_artifacts(tmp_path: Path) -> None:
    cfg = smoke_cfg(tmp_path)
    ap = run(cfg)
    assert 0.0 <= ap <= 100.0
    mlf, runs = only_run(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["outcome"] == "completed"
    assert r.data.tags["config_hash"] == config_hash(cfg)
    assert r.data.params["loss.gamma"] == "2.0" and r.data.params["model.backbone.depth"] == "10"
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ms_per_image"):
        assert key in r.data.metrics, key
    assert r.data.metrics["AP"] == pytest.approx(ap)
    history = mlf.get_metric_history(r.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert all(math.isfinite(m.value) for m in history)
    lr = [m.value for m in mlf.get_metric_history(r.info.run_id, "lr")]
    # warm-up over 2 iterations from 0.001x, then /10 at round(2/3 * 4) = 3 (smoke lr 0.01)
    assert lr == pytest.approx([1e-5, 0.005005, 0.01, 0.001])
    artifacts = {a.path for a in mlf.list_artifacts(r.info.run_id, "config")}
    assert "config/resolved.yaml" in artifacts
    ckpt = tmp_path / "sweeps" / "checkpoints" / config_hash(cfg) / "last.pt"
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    cfg = smoke_cfg(tmp_path, "train.iterations=6", "train.checkpoint_every=2")
    real_save = train_mod.atomic_save
    saved: list[int] = []

    def save_then_die(obj, path):
        real_save(obj, path)
        saved.append(obj["iteration"])
        if obj["iteration"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert saved == [2, 4]
    mlf, runs = only_run(tmp_path)
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["outcome"] == "killed"
    # the metrics logged before the interrupt are kept
    assert len(mlf.get_metric_history(runs[0].info.run_id, "loss")) == 4

    monkeypatch.setattr(train_mod, "atomic_save", real_save)
    run(cfg)
    mlf, runs = only_run(tmp_path)
    second = runs[1]
    assert second.info.status == "FINISHED"
    assert second.data.tags["resumed_from_iteration"] == "4"
    steps = [m.step for m in mlf.get_metric_history(second.info.run_id, "loss")]
    assert steps == [5, 6]


@pytest.mark.slow
def test_nonfinite_loss_marks_the_run_diverged(tmp_path: Path, monkeypatch) -> None:
    from retina_sweep import sampling

    real_forward = sampling.FocalStrategy.forward
    calls = {"n": 0}

    def nan_after_two(self, **kw):
        out = real_forward(self, **kw)
        calls["n"] += 1
        if calls["n"] >= 3:
            out["loss_cls"] = out["loss_cls"] * float("nan")
        return out

    monkeypatch.setattr(sampling.FocalStrategy, "forward", nan_after_two)
    ap = run(smoke_cfg(tmp_path))
    assert math.isnan(ap)
    mlf, runs = only_run(tmp_path)
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["outcome"] == "diverged"
    # 1-based, as the metric steps: the third iteration's loss was NaN (0-based before)
    assert r.data.tags["diverged_at"] == "3"
    assert "non-finite loss" in r.data.tags["error"]
    # what was logged before the divergence is kept
    assert [m.step for m in mlf.get_metric_history(r.info.run_id, "loss")] == [1, 2]


def test_autocast_dtype_by_device_and_setting(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_mod.autocast_dtype(True, False, cuda) == torch.float16
    assert train_mod.autocast_dtype(False, True, cuda) is None  # cpu_amp is the CPU's key only
    assert train_mod.autocast_dtype(True, False, cpu) is None  # amp is CUDA's float16
    assert train_mod.autocast_dtype(False, True, cpu) == torch.bfloat16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert train_mod.autocast_dtype(True, "auto", cpu) == torch.bfloat16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert train_mod.autocast_dtype(True, "auto", cpu) is None
    with pytest.raises(ValueError, match="train.cpu_amp"):
        train_mod.autocast_dtype(True, "bf16", cpu)


def test_cpu_amp_is_not_part_of_a_trials_identity() -> None:
    # An execution detail like the thread count: a store keeps its finished cells across it.
    base = compose_config(["train.cpu_amp=false"])
    assert config_hash(base) == config_hash(compose_config(["train.cpu_amp=true"]))
    assert config_hash(base) == config_hash(compose_config(["train.cpu_amp=auto"]))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["false", "true"])
def test_run_records_its_precision(tmp_path: Path, setting: str) -> None:
    run(smoke_cfg(tmp_path, f"train.cpu_amp={setting}", "train.iterations=2"))
    _, runs = only_run(tmp_path)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["precision"] == {"false": "fp32", "true": "bf16"}[setting]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    # What a scheduler's time limit or `kill` sends. Without the trial's handler the process
    # would end on the spot and the MLflow run would stay RUNNING; the test installs a handler
    # of its own first, so that a regression fails here instead of killing pytest.
    import os
    import signal

    class NotHandled(Exception):
        pass

    def not_handled(signum, frame):
        raise NotHandled

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        _killed_at_checkpoint(
            tmp_path, monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM)
        )
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored after the trial
    finally:
        signal.signal(signal.SIGTERM, previous)


def _killed_at_checkpoint(tmp_path: Path, monkeypatch, at: int, terminate) -> None:
    """A 6-iteration smoke trial whose checkpoint `at` calls `terminate` (which delivers a
    SIGTERM) ends KILLED, outcome killed, with that checkpoint."""
    cfg = smoke_cfg(tmp_path, "train.iterations=6", "train.checkpoint_every=2")
    real_save = train_mod.atomic_save

    def save_then_terminate(obj, path):
        real_save(obj, path)
        if obj["iteration"] == at:
            terminate()

    monkeypatch.setattr(train_mod, "atomic_save", save_then_terminate)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    mlf, runs = only_run(tmp_path)
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["outcome"] == "killed"
    assert runs[0].data.tags["error"] == "terminated by SIGTERM"
    ckpt = tmp_path / "sweeps" / "checkpoints" / config_hash(cfg) / "last.pt"
    assert torch.load(ckpt, weights_only=True)["iteration"] == at


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_swallowed_by_a_finalizer_still_ends_the_run_killed(
    tmp_path: Path, monkeypatch
) -> None:
    """A signal handler runs wherever the main thread is, finalizers included, where Python only
    prints the exception it raises; the handler acts once, so the trial trained on to its end
    (seen in CI: a SIGINT landed in SQLAlchemy's registry cleanup, and the trial's MLflow run
    was left RUNNING when its sweep stopped). The next step raises it again."""
    import os
    import signal
    import time

    class SignalOnCollect:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the finalizer

    def finalize() -> None:
        finalized = SignalOnCollect()
        del finalized  # its __del__ runs here, and the handler inside it

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # never the default (kills pytest)
    try:
        _killed_at_checkpoint(tmp_path, monkeypatch, 2, finalize)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_sigterm_inside_torch_save_ends_the_run_killed_not_failed(
    tmp_path: Path, monkeypatch
) -> None:
    """torch.save's C++ writer calls the file's Python write: a SIGTERM handled there comes out
    as torch's "RuntimeError: unexpected pos", and the trial was recorded FAILED (its sweep,
    whose handler had fired, went on to the next cell; seen in CI)."""
    import io
    import os
    import signal
    import time

    class SignalOnWrite(io.BytesIO):
        calls = 0

        def write(self, b):
            SignalOnWrite.calls += 1
            if SignalOnWrite.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, inside torch's writer callback
            return super().write(b)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # never the default (kills pytest)
    try:
        _killed_at_checkpoint(
            tmp_path, monkeypatch, 2, lambda: torch.save({"x": torch.zeros(9)}, SignalOnWrite())
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_sigterm_during_a_checkpoint_save_keeps_that_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    """A signal during the save is raised once the checkpoint is in place (signals.deferred):
    the run ends KILLED with the checkpoint it was writing, not the one before."""
    import os
    import signal
    import time

    real_save = torch.save

    def save_with_a_signal(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the save
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "save", save_with_a_signal)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # never the default (kills pytest)
    try:
        _killed_at_checkpoint(tmp_path, monkeypatch, 4, lambda: None)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_device_cuda_without_cuda_stops_before_anything_is_made(tmp_path: Path) -> None:
    from retina_sweep.config import ConfigError

    with pytest.raises(ConfigError, match=r"device='cuda'.*no CUDA device"):
        run(smoke_cfg(tmp_path, "device=cuda"))
    # It used to fail after the data were generated and the MLflow run opened.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()


def _constant_losses(monkeypatch, *, nan_at: tuple[int, ...] = ()) -> None:
    """Every step's loss is exactly 1.0 (0 gradients), NaN at the given 1-based calls: the
    logged averages are then known whatever the window."""
    from retina_sweep import sampling

    real_forward = sampling.FocalStrategy.forward
    calls = {"n": 0}

    def constant(self, **kw):
        out = real_forward(self, **kw)
        calls["n"] += 1
        bad = float("nan") if calls["n"] in nan_at else 0.0
        return {"loss_cls": out["loss_cls"] * 0 + 1.0 + bad, "loss_box": out["loss_box"] * 0}

    monkeypatch.setattr(sampling.FocalStrategy, "forward", constant)


def _kill_after_checkpoint_then_resume(cfg, monkeypatch, *, iteration: int) -> None:
    """Run `cfg` until its checkpoint at `iteration` is written, interrupt it there (Ctrl-C),
    then run it again: the second run resumes from that checkpoint."""
    real_save = train_mod.atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["iteration"] == iteration:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(train_mod, "atomic_save", real_save)
    run(cfg)


def test_logged_averages_after_a_resume_between_log_points(tmp_path: Path, monkeypatch) -> None:
    """Killed after iteration 3 with log_every 4: the first window after the resume holds one
    step, not four. The loss logged at step 4 used to be 1/4 of the true average, and the one
    at step 8 4x it."""
    _constant_losses(monkeypatch)
    cfg = smoke_cfg(
        tmp_path,
        "train.iterations=8",
        "train.checkpoint_every=3",
        "tracking.log_every=4",
        "train.warmup_iters=0",
    )
    _kill_after_checkpoint_then_resume(cfg, monkeypatch, iteration=3)
    mlf, runs = only_run(tmp_path)
    resumed = runs[1]
    assert resumed.data.tags["resumed_from_iteration"] == "3"
    history = mlf.get_metric_history(resumed.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(4, 1.0), (8, 1.0)]
    # The schedule resumed too: the lr logged at step 8 is the one of iteration 7.
    lrs = {m.step: m.value for m in mlf.get_metric_history(resumed.info.run_id, "lr")}
    sched = dict(warmup_iters=0, warmup_factor=float(cfg.train.warmup_factor))
    sched |= dict(lr_steps=list(cfg.train.lr_steps), lr_decay=float(cfg.train.lr_decay))
    want = resolve_lr(cfg.train) * lr_factor(7, iterations=8, **sched)
    assert lrs[8] == pytest.approx(want)


def test_a_tolerated_nonfinite_step_skips_only_the_update(tmp_path: Path, monkeypatch) -> None:
    """train.max_nonfinite=1 and a NaN at step 2: the run completes, and step 2 still gets its
    checkpoint and its log row (the finite steps' average); the skip used to drop both."""
    _constant_losses(monkeypatch, nan_at=(2,))
    cfg = smoke_cfg(tmp_path, "train.max_nonfinite=1", "tracking.log_every=2")
    saved: list[int] = []
    real_save = train_mod.atomic_save

    def record(obj, path):
        saved.append(obj["iteration"])
        real_save(obj, path)

    monkeypatch.setattr(train_mod, "atomic_save", record)
    run(cfg)
    mlf, runs = only_run(tmp_path)
    assert runs[0].data.tags["outcome"] == "completed"
    assert saved == [2, 4]
    history = mlf.get_metric_history(runs[0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.0), (4, 1.0)]


def test_sweep_force_retrains_a_finished_cell(tmp_path: Path) -> None:
    """A finished checkpoint used to make sweep.force=true re-evaluate the old weights only."""
    cfg = smoke_cfg(tmp_path, "train.iterations=2")
    run(cfg)
    run(smoke_cfg(tmp_path, "train.iterations=2", "sweep.force=true"))
    mlf, runs = only_run(tmp_path)
    assert "resumed_from_iteration" not in runs[1].data.tags
    assert [m.step for m in mlf.get_metric_history(runs[1].info.run_id, "loss")] == [1, 2]
    run(cfg)  # without force the finished checkpoint is reused, as before
    _, runs = only_run(tmp_path)
    assert runs[2].data.tags["resumed_from_iteration"] == "2"


def test_a_cold_pretraining_cache_gives_the_warm_caches_experiment(tmp_path: Path) -> None:
    """The first run on an empty cache pretrains the proxy's backbone in its own process; its
    detector used to start from other initial weights than every later run of the same config
    (the pretraining drew from the seeded RNG before the model was built)."""
    recipe = [
        "model.backbone.pretrained=synthetic",
        "model.backbone.synthetic_pretrain.steps=2",
        "model.backbone.synthetic_pretrain.batch_size=4",
        "model.backbone.synthetic_pretrain.crop=32",
        "train.iterations=1",
        "tracking=none",
        f"data.cache_dir={tmp_path}/cache",
    ]
    finals = []
    for name in ("cold", "warm"):
        cfg = compose_config(["scale=smoke", f"paths.root={tmp_path}/{name}", *recipe])
        run(cfg)
        ckpt = tmp_path / name / "checkpoints" / config_hash(cfg) / "last.pt"
        finals.append(torch.load(ckpt, weights_only=True)["model"])
    assert (tmp_path / "cache" / "pretrained").is_dir()
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key]), key


@pytest.mark.parametrize("loss", ["focal", "random_1to3"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(
    tmp_path: Path, monkeypatch, loss: str
) -> None:
    """Killed mid-epoch (16 images, batch 4: iteration 3 of an epoch of 4) and resumed, a run
    trains on the same batches, flips and (for random 1:3) sampled anchors as one that ran
    through: the final weights are bit-identical. The data order used to be re-seeded."""
    extra = [f"loss={loss}", "train.iterations=7", "train.checkpoint_every=3", "tracking=none"]
    whole = smoke_cfg(tmp_path / "whole", *extra, f"paths.root={tmp_path}/whole")
    run(whole)
    parts = smoke_cfg(tmp_path / "parts", *extra, f"paths.root={tmp_path}/parts")
    _kill_after_checkpoint_then_resume(parts, monkeypatch, iteration=3)
    h = config_hash(whole)
    a = torch.load(tmp_path / "whole" / "checkpoints" / h / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoints" / h / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 7
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_failed_checkpoint_save_keeps_the_old_one_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    train_mod.atomic_save({"iteration": 2}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        train_mod.atomic_save({"iteration": 4, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True) == {"iteration": 2}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the temp file is gone


def test_a_run_returns_the_final_metric_its_objective_names(tmp_path: Path, monkeypatch) -> None:
    """What a sweeper optimises: the final AP by default, another final metric when `objective`
    names it (the Optuna sweeper sets it to its hydra.sweeper.metric)."""
    from retina_sweep.config import ConfigError, validate

    final = {"AP": 30.0, "AP50": 50.0, "ms_per_image": 12.5, "summary": "s"}
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: dict(final))
    assert run(smoke_cfg(tmp_path)) == 30.0
    assert run(smoke_cfg(tmp_path, "objective=AP50")) == 50.0
    assert run(smoke_cfg(tmp_path, "objective=ms_per_image")) == 12.5
    with pytest.raises(ConfigError, match=r"objective='loss'.*one of AP, AP50"):
        validate(smoke_cfg(tmp_path, "objective=loss"))
