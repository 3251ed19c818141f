"""MLflow tracking of one trial.

Everything goes through `MlflowClient` (no fluent global state), so several trials in one
process (Hydra's basic launcher) or in parallel processes (joblib) never share a "current run".

Conventions that the sweeper and the report rely on:
- tags: `config_hash` (trial identity, see `retina_sweep.config.config_hash`), `sweep`, `table`,
  `cell`, `seed`, `outcome` (completed | diverged | pruned | failed | killed), `git_commit`,
  and `mlflow.parentRunId` for a trial of a sweep;
- status: FINISHED for a completed or diverged trial (a divergence is a result, and rerunning the
  same config diverges again), FAILED for a crash (with the `error` tag), KILLED for an interrupt
  or a pruned trial;
- metrics are buffered and written with `log_batch`, not one database call per scalar;
- a password in a URL (`postgresql://user:secret@host/db`, `http://user:secret@host`) is written
  `***` in everything a run records (params, tags, text artifacts, its error): the Optuna
  sweeper passes its storage URL to every trial in the trial's config (`pruning.storage`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from .locks import exclusive

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URI = "sqlite:///mlflow.db"
TAG_KEYS = ("config_hash", "sweep", "table", "cell", "seed", "outcome")
# The MLflow status of each final outcome (see the module docstring).
OUTCOME_STATUS = {
    "completed": "FINISHED",
    "diverged": "FINISHED",
    "pruned": "KILLED",
    "killed": "KILLED",
    "failed": "FAILED",
}


# The user info of a URL: `scheme://user:password@` (SQLAlchemy's own URL syntax takes the
# password up to the first `@`). A quote or white space ends it, for URLs inside a message or an
# override (`storage:'postgresql://u:p@h/db'`); `/*` lets a URL missing its slashes match too.
_USERINFO = re.compile(r"\b(?P<head>[A-Za-z][A-Za-z0-9+.\-]*:/*[^:/@\s'\"]*):[^@\s'\"]+@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it written ``***``, as SQLAlchemy's
    ``URL.render_as_string(hide_password=True)`` writes it (``postgresql://user:***@host/db``).

    Storage and tracking URLs are shown (log lines, error messages) and recorded (MLflow params,
    tags and artifacts, Optuna user attributes) where others read them; the real URL is only
    ever used to connect."""
    return _USERINFO.sub(lambda m: f"{m['head']}:***@", text)


def redact_all(obj: Any) -> Any:
    """``obj`` with ``redact`` applied to every string in it (dicts, lists and tuples walked)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {redact_all(k): redact_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_all(v) for v in obj)
    return obj


def redact_files(directory: Path, pattern: str = "*.yaml") -> list[Path]:
    """Rewrite the files of ``directory`` matching ``pattern`` with ``redact`` applied; return
    those that changed (each replaced atomically: a reader sees the old file or the new one).

    Hydra saves a job's config, its own config and the job's overrides (``.hydra/config.yaml``,
    ``hydra.yaml``, ``overrides.yaml``) before it calls the task function, as given: with the
    Optuna sweeper's storage URL in ``pruning.storage``, or a tracking URI with its password.
    The task function calls this first (`redact_hydra_files`), so a password is on disk there
    for the job's first moments only. A missing directory changes nothing."""
    changed = []
    if not directory.is_dir():
        return changed
    for path in sorted(directory.glob(pattern)):
        text = path.read_text()
        masked = redact(text)
        if masked != text:
            tmp = path.with_name(f".{path.name}.redact.tmp")
            tmp.write_text(masked)
            os.replace(tmp, path)
            changed.append(path)
    return changed


def redact_hydra_files() -> list[Path]:
    """`redact_files` on the running Hydra job's output subdirectory (``.hydra/`` by default);
    nothing outside a Hydra job or with ``hydra.output_subdir=null``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except Exception:  # not inside a Hydra job (library use, tests)
        return []
    if hydra_cfg.output_subdir is None:
        return []
    return redact_files(Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir))


@contextlib.contextmanager
def redacted_log_records():
    """Log records made inside have ``redact`` applied to their message.

    Hydra's launchers log each job's overrides, and the Optuna sweeper's include the storage URL
    (`pruning={storage:...}`) that the job connects with. A record factory, not a handler's
    filter: Hydra replaces the root logger's handlers each time it configures a job's logging
    (the basic launcher runs jobs in the sweeper's process)."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format: left to the handler to report, as before
            return record
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def resolve_uri(uri: str | None) -> str:
    """`uri` or MLflow's default store, made absolute so worker processes share it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def retry(fn: Callable[[], T], *, attempts: int = 8, delay: float = 0.25) -> T:
    """Call `fn`, retrying on the transient errors of a shared SQLite store ("locked")."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MLflow wraps SQLAlchemy's OperationalError in its own types
            text = str(exc).lower()
            if i == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay * (2**i))
    raise AssertionError("unreachable")


def client(uri: str | None = None):
    """An `MlflowClient` on `uri` (or the default store).

    A SQLite store is opened under a file lock beside its database: MLflow creates the schema of
    a new database on first use, and two processes doing that at once (two runs started together
    on a fresh directory) made one fail with "table experiments already exists".
    """
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///") :])
    with exclusive(db.with_name(f".{db.name}.lock")):
        mlf = MlflowClient(tracking_uri=uri)  # its store creates or upgrades the schema
        mlf.search_experiments(max_results=1)  # (lazily in some MLflow versions: force it)
    return mlf


def store_lock(uri: str | None, name: str):
    """An inter-process lock named `name` for a read-then-write on the store `uri`: a file lock
    beside a SQLite database (the processes of one machine, which is where a SQLite store is
    shared), none for a tracking server."""
    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///") :])
    return exclusive(db.with_name(f".{db.name}.{name}.lock"))


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside its database file (`mlartifacts/`), not in cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides (mlflow-artifacts:/ proxied storage)


def experiment_id(mlf, name: str) -> str:
    """The id of experiment `name`, created (with its artifact root) when it does not exist."""
    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            # MLflow keeps a deleted experiment's name (in its trash) and refuses new runs in it
            # with "The experiment 1 must be in the 'active' state", which named neither.
            from .config import ConfigError

            raise ConfigError(
                f"tracking.experiment={name}: the MLflow experiment is deleted (in the trash) on "
                f"{redact(mlf.tracking_uri)}; restore it (mlflow experiments restore --experiment-id "
                f"{exp.experiment_id}) or give another tracking.experiment"
            )
        return exp.experiment_id
    try:
        root = artifact_root(mlf.tracking_uri)
        return mlf.create_experiment(name, artifact_location=root and f"{root}/{name}")
    except Exception:  # another process created it first
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (logged as their string)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class RunTracker:
    """One MLflow run for one trial; a no-op when tracking is disabled or on a non-zero rank."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        uri: str | None = None,
        experiment: str = "retina_sweep",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        flush_every: int = 50,
    ) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri) if enabled else None
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.flush_every = flush_every
        self.run_id: str | None = None
        self._buffer: list[Any] = []
        self._client = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, tags: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
        if not self.enabled:
            return None
        from mlflow.entities import Param, RunTag

        self._client = mlf = client(self.uri)
        exp_id = retry(lambda: experiment_id(mlf, self.experiment))
        all_tags = {k: redact(str(v)) for k, v in tags.items() if v is not None}
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        commit = git_commit()
        if commit:
            all_tags["git_commit"] = commit
            all_tags["mlflow.source.git.commit"] = commit
        run = retry(lambda: mlf.create_run(exp_id, run_name=self.run_name, tags=all_tags))
        self.run_id = run.info.run_id
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params a batch
            chunk = items[i : i + 100]
            retry(lambda chunk=chunk: mlf.log_batch(self.run_id, params=chunk))
        retry(lambda: mlf.log_batch(self.run_id, tags=[RunTag("outcome", "running")]))
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            self._buffer.append(Metric(k, float(v), now, int(step)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.run_id or not self._buffer:
            return
        buf, self._buffer = self._buffer, []
        for i in range(0, len(buf), 1000):
            chunk = buf[i : i + 1000]
            retry(lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))) for k, v in tags.items() if v is not None]
        retry(lambda: self._client.log_batch(self.run_id, tags=items))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.run_id:
            shown = redact(text)
            retry(lambda: self._client.log_text(self.run_id, shown, artifact_file))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.run_id:
            shown = redact_all(obj)
            retry(lambda: self._client.log_dict(self.run_id, shown, artifact_file))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id:
            retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, outcome: str, *, error: str | None = None, **extra_tags: Any) -> None:
        """Flush metrics and close the run with the MLflow status that `outcome` maps to."""
        if not self.run_id:
            return
        status = OUTCOME_STATUS[outcome]
        try:
            self.flush()
        finally:
            tags = {"outcome": outcome, **extra_tags}
            if error:
                tags["error"] = error[:5000]
            self.set_tags(tags)
            retry(lambda: self._client.set_terminated(self.run_id, status=status))
            log.info("MLflow run %s ended %s (%s)", self.run_id, status, outcome)


def tracker_from_config(cfg: DictConfig, *, rank: int = 0) -> RunTracker:
    t = cfg.tracking
    return RunTracker(
        enabled=bool(t.enabled) and rank == 0,
        uri=t.uri,
        experiment=t.experiment,
        run_name=t.run_name or (cfg.sweep.cell if cfg.sweep.cell else None),
        parent_run_id=t.parent_run_id,
        flush_every=max(1, int(t.log_every)) * 4,
    )


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (without Hydra's own node) flattened into MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return flatten(container)
