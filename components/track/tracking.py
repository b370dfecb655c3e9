"""MLflow tracking: runs, lineage tags, params/metrics/artifacts and system metrics, with retries.

Why it looks like this:
- Every call goes through an `MlflowClient` with an explicit run id. MLflow's "active run" is
  thread-local, and Prefect runs tasks in worker threads, so fluent calls (`mlflow.log_metric`)
  would land in the wrong run or in none.
- Every client call goes through :func:`call`, the one place that retries. A tracking server that
  goes away mid-run is retried `track.retries` times with exponential back-off, then raises a
  :class:`TrackingError` naming the URI and the operation. MLflow's own HTTP retry layer (7 tries,
  ~4 minutes by default) is turned down to 0 by :func:`configure` unless the user set
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` — two stacked retry layers would make an outage take minutes
  to report, and `track.retries` would not mean what it says.
- mlflow is imported inside the functions: importing it costs ~3 s and `mrt --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from components.core.config import Params, TrackParams

T = TypeVar("T")

TAG_PREFIX = "mrt."
MAX_PARAM_CHARS = 500  # MLflow rejects longer param values (server-side limit may be higher, never lower)
MAX_TAG_CHARS = 5000
METRIC_BATCH = 1000  # log_batch accepts at most 1000 metrics per call

# MLflow error codes that mean "try again" (server overloaded, database locked, connection lost).
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}
_TRANSIENT_WORDS = (
    "failed with exception",  # rest_utils wraps every requests error in this
    "connection refused",
    "max retries exceeded",
    "connection aborted",
    "remote end closed",
    "database is locked",
    "timed out",
)


class TrackingError(RuntimeError):
    """A tracking-server operation failed for good (after retries). The message names URI and operation."""


# ---------------------------------------------------------------------------------------------
# connection
# ---------------------------------------------------------------------------------------------
def tracking_uri(track: "TrackParams") -> str:
    """MLFLOW_TRACKING_URI when set (CI, a shared server), else params' track.tracking_uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or track.tracking_uri


def _quiet_http_retries() -> None:
    """One retry layer (ours) and no per-file progress bars in CLI/flow logs; user settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(track: "TrackParams"):
    """An MlflowClient bound to the resolved URI (and the same registry URI)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(track)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying: connection trouble, 5xx / 429, a locked SQLite database."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in _TRANSIENT_CODES:
            return True
        status = getattr(exc, "get_http_status_code", lambda: None)()
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        return any(w in str(exc).lower() for w in _TRANSIENT_WORDS)
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, OperationalError)


def call(track: "TrackParams", op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` with retries on transient errors: track.retries more tries, waiting
    retry_delay_s, 2×, 4×… between them. Non-transient MLflow errors (a missing run, a bad value)
    are raised unchanged at once so callers can react to them; a transient one that outlives the
    retries becomes a TrackingError naming the URI and `op`."""
    attempts = track.retries + 1
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise TrackingError(
                    f"MLflow at {tracking_uri(track)}: {op} failed after {attempts} attempt(s): "
                    f"{type(exc).__name__}: {str(exc)[:300]}"
                ) from exc
            time.sleep(track.retry_delay_s * (2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def configure(track: "TrackParams") -> str:
    """Point MLflow at the tracking URI, get or create the experiment, return the URI.

    Also sets the process-wide tracking/registry URI (the pyfunc logger and `models:/` loading read
    it) and turns MLflow's own HTTP retries down (see the module docstring)."""
    import mlflow

    global _configured
    _quiet_http_retries()
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(track.request_timeout_s)  # bounded by params
    _configured = track
    uri = tracking_uri(track)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id(track)
    return uri


def experiment_id(track: "TrackParams") -> str:
    """The id of track.experiment, created when missing (a concurrent creator wins harmlessly)."""
    from mlflow.exceptions import MlflowException

    c = client(track)
    exp = call(track, f"get experiment {track.experiment!r}", c.get_experiment_by_name, track.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return call(track, f"create experiment {track.experiment!r}", c.create_experiment, track.experiment)
    except MlflowException:
        exp = call(track, f"get experiment {track.experiment!r}", c.get_experiment_by_name, track.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# lineage
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _json_field(path: Path, key: str) -> str | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def base_fingerprint(
    base_dir: str | os.PathLike,
    editors_dir: str | os.PathLike | None = None,
    train_report: str | os.PathLike | None = None,
) -> str:
    """The base's fingerprint without loading its weights (hashing a 7B base takes minutes): the
    `fingerprint` align recorded in base_meta.json, else the `base_fingerprint` the editors were saved
    against (editor_config.json), else the one the training report recorded, else "unknown"."""
    candidates = [(Path(base_dir) / "base_meta.json", "fingerprint")]
    if editors_dir is not None:
        candidates.append((Path(editors_dir) / "editor_config.json", "base_fingerprint"))
    if train_report is not None:
        candidates.append((Path(train_report), "base_fingerprint"))
    for path, key in candidates:
        found = _json_field(path, key)
        if found:
            return found
    return "unknown"


def lineage_tags(params: "Params", params_file: str = "params.yaml") -> dict[str, str]:
    """What a run was made from: data (content hash of train.data_dir), params (hash of the whole
    resolved Params), the frozen base (fingerprint) and this package's version. Keys are prefixed
    `mrt.`; values are strings (MLflow tags). The code is recorded by MLflow's own source tags
    (`mlflow.source.git.commit`, …: :func:`source_tags`), set on every run :func:`start_run` makes."""
    from components import __version__
    from components.core.hashing import dir_hash, params_hash

    data_dir = Path(params.train.data_dir)
    tags = {
        "data_hash": dir_hash(data_dir) if data_dir.exists() else "missing",
        "params_hash": params_hash(params),
        "params_file": str(params_file),
        "base_fingerprint": base_fingerprint(params.train.base_dir, params.train.out_dir, params.train.report),
        "mrt_version": __version__,
    }
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def source_tags(name: str | None = None) -> dict[str, str]:
    """MLflow's own source tags for a run: user, source name/type and — when the working directory
    is a git checkout — `mlflow.source.git.commit`, `.branch` and `.repoURL`. MLflow derives the
    commit from the entry script's folder, which for the installed `mrt` script is not the project,
    so the commit is taken from the working directory (where every stage runs) instead."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    tags = {k: str(v) for k, v in resolve_tags({}).items()}
    tags[MLFLOW_SOURCE_TYPE] = "LOCAL"
    if name:
        tags[MLFLOW_SOURCE_NAME] = name
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[MLFLOW_GIT_BRANCH] = branch
        url = _git("config", "--get", "remote.origin.url")
        if url:
            tags[MLFLOW_GIT_REPO_URL] = url
    else:
        tags.pop(MLFLOW_GIT_COMMIT, None)  # MLflow's guess from the script's folder is not this project
    return tags


PARENT_RUN_ENV = "MRT_PARENT_RUN_ID"


def parent_run_id() -> str | None:
    """The run a stage's runs nest under: $MRT_PARENT_RUN_ID (a pipeline sets it to its own run for
    the stage commands it starts, e.g. through `dvc repro`), else None (a top-level run)."""
    return os.environ.get(PARENT_RUN_ENV) or None


MODEL_HASH_TAG = TAG_PREFIX + "model_hash"


def model_hash(model_dir: str | os.PathLike) -> str:
    """Content hash of a training output (editors / adapter / full model), resumable checkpoints
    excluded: the key that ties `mrt benchmark` and `mrt promote` to the run that trained it."""
    from components.core.hashing import dir_hash

    return dir_hash(model_dir, ignore=("__pycache__", ".DS_Store", "checkpoints"))


def find_model_run(track: "TrackParams", model_dir: str | os.PathLike | None) -> str | None:
    """The newest run in track.experiment that trained exactly the weights in `model_dir` (its
    `mrt.model_hash` tag), or None when there is no such run or no folder (callers then log into a
    run of their own). An unreachable server raises TrackingError, like every call."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    digest = model_hash(model_dir)
    c = client(track)
    runs = call(track, "find the run that trained " + str(model_dir), c.search_runs, [experiment_id(track)],
                filter_string=f"tags.`{MODEL_HASH_TAG}` = '{digest}'", order_by=["attributes.start_time DESC"],
                max_results=1)
    return runs[0].info.run_id if runs else None


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def start_run(
    track: "TrackParams",
    name: str,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    start_time_ms: int | None = None,
) -> str:
    """Create a run in track.experiment (a child of `parent_run_id` when given); returns its id.
    `params` are logged flat (nested dicts → dotted keys). `start_time_ms`: when the work began, for
    a run created once there is something to record (default: now)."""
    exp = experiment_id(track)
    all_tags = {**source_tags(), **{str(k): _clip(str(v), MAX_TAG_CHARS) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    c = client(track)
    run = call(track, f"create run {name!r}", c.create_run, exp, start_time=start_time_ms, tags=all_tags, run_name=name)
    run_id = run.info.run_id
    if params:
        log_params_flat(run_id, dict(params), prefix="", track=track)
    return run_id


def end_run(run_id: str, status: str = "FINISHED", track: "TrackParams | None" = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
    track = _track(track)
    c = client(track)
    call(track, f"end run {run_id} ({status})", c.set_terminated, run_id, status)


def set_tags(run_id: str, tags: Mapping[str, Any], track: "TrackParams | None" = None) -> None:
    from mlflow.entities import RunTag

    track = _track(track)
    c = client(track)
    items = [RunTag(str(k), _clip(str(v), MAX_TAG_CHARS)) for k, v in tags.items()]
    if items:
        call(track, f"set tags on run {run_id}", c.log_batch, run_id, tags=items)


_configured: "TrackParams | None" = None  # set by configure(): what calls without `track` use


def _track(track: "TrackParams | None") -> "TrackParams":
    """The track params for a call: the one given, else the last configure()d, else the defaults."""
    if track is not None:
        return track
    if _configured is not None:
        return _configured
    from components.core.config import TrackParams

    return TrackParams()


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def flatten(section: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts → {"a.b.c": "value"}; lists and scalars become strings (JSON for lists)."""
    flat: dict[str, str] = {}
    for key, value in section.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def log_params_flat(
    run_id: str, section_dict: Mapping[str, Any], prefix: str, track: "TrackParams | None" = None
) -> dict[str, str]:
    """Log a params section as flat MLflow params (values clipped to MLflow's 500-char limit).
    Returns what was logged. Re-logging the same value is fine; a different one is MLflow's error."""
    from mlflow.entities import Param

    track = _track(track)
    if hasattr(section_dict, "model_dump"):
        section_dict = section_dict.model_dump(mode="json", by_alias=True)  # type: ignore[union-attr]
    flat = {k: _clip(v, MAX_PARAM_CHARS) for k, v in flatten(section_dict, prefix).items()}
    items = [Param(k, v) for k, v in flat.items()]
    c = client(track)
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        call(track, f"log params on run {run_id}", c.log_batch, run_id, params=items[i : i + 100])
    return flat


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(key: str) -> str:
    """A metric key as MLflow accepts it (alphanumerics, _ - . space : /): every other character
    becomes '_'. Keys carry task names, and real Vision-Flan names such as
    'VQA-E+image_question_answer' hold a '+'."""
    return _MLFLOW_UNSAFE.sub("_", key)


def log_metrics(
    run_id: str, metrics: Mapping[str, float], step: int | None = None, track: "TrackParams | None" = None
) -> None:
    """Log metrics in batches (non-finite and None values are skipped: MLflow stores NaN but the
    registry gate must never compare against one). Characters MLflow refuses in a key become '_'
    (`mlflow_key`), as `benchmark_runs.flat_metrics` writes them."""
    import math

    from mlflow.entities import Metric

    track = _track(track)
    now = int(time.time() * 1000)
    items = [  # keys hold task names; MLflow refuses some of their characters (Vision-Flan's '+')
        Metric(mlflow_key(str(k)), float(v), now, int(step or 0))
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    _log_metric_items(track, run_id, items)


def _log_metric_items(track: "TrackParams", run_id: str, items: list) -> None:
    c = client(track)
    for i in range(0, len(items), METRIC_BATCH):
        call(track, f"log metrics on run {run_id}", c.log_batch, run_id, metrics=items[i : i + METRIC_BATCH])


def log_artifact(
    run_id: str, path: str | os.PathLike, artifact_path: str | None = None, track: "TrackParams | None" = None
) -> None:
    """Upload a file or a whole folder into the run's artifacts."""
    track = _track(track)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: artifact to log does not exist")
    c = client(track)
    if p.is_dir():
        call(track, f"log artifacts {p} on run {run_id}", c.log_artifacts, run_id, str(p), artifact_path)
    else:
        call(track, f"log artifact {p} on run {run_id}", c.log_artifact, run_id, str(p), artifact_path)


def _read_json(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{p}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def training_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The train report's numbers; its quick held-out evaluation as `quick_heldout/*` (held-out
    scores under `heldout/*` come from the benchmark only)."""
    out: dict[str, float] = {}
    for key in ("trainable_params", "trainable_pct", "total_params", "loss_first", "loss_final", "train_wall_s", "steps"):
        v = report.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    for task, score in (report.get("heldout") or {}).items():
        if isinstance(score, (int, float)):
            out[f"quick_heldout/{task}"] = float(score)
    if isinstance(report.get("heldout_mean"), (int, float)):
        out["quick_heldout/mean"] = float(report["heldout_mean"])
    return out


def _log_model_folder(run_id: str, folder: Path, track: "TrackParams") -> None:
    """The trained output without its resumable checkpoints (large, and not part of the model)."""
    for child in sorted(folder.iterdir()):
        if child.name == "checkpoints" or child.name.startswith(".") or ".tmp" in child.name:  # + interrupted writes
            continue
        dest = f"{folder.name}/{child.name}" if child.is_dir() else folder.name
        log_artifact(run_id, child, dest, track=track)


# ---------------------------------------------------------------------------------------------
# system metrics
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def system_metrics(run_id: str, track: "TrackParams") -> Iterator[None]:
    """Sample CPU / memory / disk / network (and GPU when present) into `run_id` as `system/*`
    metrics every track.system_metrics_interval_s while the block runs. A no-op when
    track.system_metrics is false. Monitoring trouble never fails the stage it watches."""
    if not track.system_metrics:
        yield
        return
    import logging

    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=track.system_metrics_interval_s,
            samples_before_logging=1,
            tracking_uri=tracking_uri(track),
        )
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - monitoring is best effort
        logging.getLogger(__name__).warning("system metrics disabled for run %s: %s", run_id, exc)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
            _final_sample(monitor, run_id, track)


def _final_sample(monitor: Any, run_id: str, track: "TrackParams") -> None:
    """MLflow's monitor publishes only after a full sampling interval, so a stage shorter than one
    interval (a smoke run, a cached resume) would leave no `system/*` metrics at all: take one sample
    at the end in that case. Best effort, like the monitor itself."""
    import logging

    try:
        from mlflow.tracking import MlflowClient

        metrics = MlflowClient(tracking_uri(track)).get_run(run_id).data.metrics
        if any(k.startswith("system/") for k in metrics):
            return
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # noqa: BLE001 - monitoring never fails the stage it watched
        logging.getLogger(__name__).warning("no final system-metrics sample for run %s: %s", run_id, exc)
