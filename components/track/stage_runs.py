"""MLflow runs written by the stages themselves, while they work.

Every stage command logs its own runs — `mrt train` (the candidate), `mrt benchmark` (held-out and
MME scores into the run that trained the model), `mrt ablate` (a run per arm under an `ablation`
run), `mrt compare` (a run per method and seed under a `compare` run) and `mrt promote` — so
every route that runs the stage commands (`dvc repro`, a stage by hand, a flow that runs the stages)
records the same runs. A pipeline nests them under its own run by setting `MRT_PARENT_RUN_ID`
(:data:`components.track.tracking.PARENT_RUN_ENV`) for the stage commands it starts.

What a training run holds
    - params: the whole `train` section flattened (`train.method`, `train.steps`, `train.editors.*`,
      `train.lora.*`, …) — one schema for the candidate, the baselines and the ablation arms, so
      MLflow's compare view lines them up;
    - tags: `mrt.role` (candidate | baseline | ablation), `mrt.method`, `mrt.seed`, the data hash and
      base fingerprint, `mrt.model_hash` (the trained weights' content hash: how `mrt benchmark` and
      `mrt promote` find this run again) and MLflow's source tags (git commit, branch);
    - input: the data set (`mlflow.data`: name, path, content hash);
    - metrics, live: `train/loss` and `train/lr` per step with the time each step ended, flushed every
      `FLUSH_EVERY_S` seconds, so the run's curve grows while it trains and its duration is the
      training's; `system/*` samples; the quick evaluation of `mrt train` as `quick_heldout/*`
      (a few records per task). `heldout/*` and `mme/*` come from `mrt benchmark` only;
    - artifacts: the training report, the loss curve CSV and the model folder (no checkpoints).

Tracking never stops a stage: when the server cannot be reached the stage runs untracked and says
so once (`mrt promote`, which needs the registry, is the exception and fails clearly).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from components.track import tracking
if TYPE_CHECKING:  # pragma: no cover
    from components.core.config import TrackParams, TrainParams

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 2.0


class LiveRun:
    """One run being written while its stage works.

    A run may be *pending*: it is created on its first write, with the stage's start as its start
    time, so a stage that fails before it has anything to record (bad data, a corrupt first batch)
    leaves no run behind while a run that exists spans the whole stage. With no track, on a
    non-main rank or once a write failed, every method is a no-op (after one warning: tracking is a
    record of the work, never a reason to lose it)."""

    def __init__(self, track: "TrackParams | None", run_id: str | None, flush_every_s: float = FLUSH_EVERY_S,
                 pending: dict[str, Any] | None = None):
        self.track, self.run_id, self.flush_every_s = track, run_id, flush_every_s
        self._pending = pending
        self._monitor: Any = None
        self._buffer: list = []
        self._last_flush = time.monotonic()

    @property
    def active(self) -> bool:
        return self.run_id is not None or self._pending is not None

    def start(self) -> str | None:
        """Create the pending run now (a no-op when it exists or tracking is off); returns its id."""
        if self._pending is None:
            return self.run_id
        p, self._pending = self._pending, None
        track = self.track
        try:
            tracking.configure(track)
            self.run_id = tracking.start_run(track, p["name"], tags=p["tags"], params=p["params"],
                                             parent_run_id=p["parent"], start_time_ms=p["start_time_ms"])
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop the stage
            print(f"warning: MLflow at {tracking.tracking_uri(track)} unreachable ({type(exc).__name__}: "
                  f"{str(exc)[:200]}); {p['name']} runs untracked", flush=True)
            return None
        if p["system_metrics"]:
            self._monitor = tracking.system_metrics(self.run_id, track)
            self._monitor.__enter__()
        return self.run_id

    def close(self, status: str) -> None:
        """Flush, stop the system-metrics sampler and end the run (if one was created)."""
        self._pending = None
        self.flush()
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            with contextlib.suppress(Exception):
                monitor.__exit__(None, None, None)
        if self.run_id is not None and self.track is not None:
            with contextlib.suppress(Exception):
                tracking.end_run(self.run_id, status,
                                 track=self.track.model_copy(update={"retries": min(self.track.retries, 1)}))

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        self.start()
        if self.run_id is None:
            return
        try:
            fn(self.run_id, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("MLflow: %s failed on run %s (%s); this stage goes on untracked", what, self.run_id, exc)
            print(f"warning: MLflow: {what} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "the stage goes on untracked", flush=True)
            self.run_id = None

    def step(self, step: int, loss: float, lr: float) -> None:
        """One optimiser step's loss and learning rate, stamped now; written every flush_every_s."""
        self.start()
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if math.isfinite(loss):
            self._buffer.append(Metric("train/loss", float(loss), now, int(step)))
        self._buffer.append(Metric("train/lr", float(lr), now, int(step)))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        items, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if items and self.run_id is not None:
            self._guard("logging step metrics", lambda rid: tracking._log_metric_items(self.track, rid, items))

    def metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        self._guard("logging metrics", tracking.log_metrics, metrics, step, self.track)

    def tags(self, tags: Mapping[str, Any]) -> None:
        self._guard("setting tags", tracking.set_tags, tags, self.track)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._guard(f"uploading {path}", tracking.log_artifact, path, artifact_path, self.track)

    def model_folder(self, folder: str | os.PathLike) -> None:
        if Path(folder).is_dir():
            self._guard(f"uploading {folder}", lambda rid: tracking._log_model_folder(rid, Path(folder), self.track))

    def dataset(self, data_dir: str | os.PathLike, context: str = "train") -> None:
        """The data set as an MLflow input: its name (manifest or folder), path and content hash."""
        if self.active and Path(data_dir).is_dir():
            self._guard("logging the data set", lambda rid: log_dataset(self.track, rid, data_dir, context))


def log_dataset(track: "TrackParams", run_id: str, data_dir: str | os.PathLike, context: str = "train") -> None:
    """`data_dir` as a run input (`mlflow.data`): name from its manifest (else the folder name),
    source = the folder (local path), digest = the first 16 hex of its content hash; the profile
    holds the full sha256, the path, file count and size, and the manifest's task names."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from components.core.hashing import dir_hash

    root = Path(data_dir)
    manifest: dict[str, Any] = {}
    if (root / "manifest.json").is_file():
        with contextlib.suppress(ValueError, OSError):
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8")) or {}
    digest = dir_hash(root)
    files = [p for p in root.rglob("*") if p.is_file()]
    profile: dict[str, Any] = {"sha256": digest, "path": str(data_dir), "files": len(files),
                               "bytes": sum(p.stat().st_size for p in files)}
    if isinstance(manifest.get("tasks"), dict):
        profile["tasks"] = sorted(manifest["tasks"])
    name = str(manifest.get("name") or manifest.get("dataset") or root.resolve().name)
    ds = Dataset(name=name, digest=digest[:16], source_type="local",
                 source=json.dumps({"uri": str(root.resolve())}), profile=json.dumps(profile, default=str))
    c = tracking.client(track)
    tracking.call(track, f"log data set {name} on run {run_id}", c.log_inputs, run_id,
                  datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def _main_process() -> bool:
    """Under `accelerate launch`/torchrun only rank 0 tracks (every rank runs the same command)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def stage_run(track: "TrackParams | None", name: str, *, tags: Mapping[str, Any] | None = None,
              params: Mapping[str, Any] | None = None, parent: str | None = None,
              system_metrics: bool = False, lazy: bool = False) -> Iterator[LiveRun]:
    """A run for the block (child of `parent`, else of $MRT_PARENT_RUN_ID), FINISHED after it,
    FAILED when it raises. `lazy`: create it on its first write (start time = the block's start),
    so a block that fails before writing anything leaves no run. Yields an inactive LiveRun when
    `track` is None, on a non-main rank, or when the server cannot be reached (warned once)."""
    if track is None or not _main_process():
        yield LiveRun(None, None)
        return
    run = LiveRun(track, None, pending={
        "name": name, "tags": dict(tags or {}), "params": dict(params or {}), "system_metrics": system_metrics,
        "parent": parent or tracking.parent_run_id(), "start_time_ms": int(time.time() * 1000)})
    if not lazy:
        run.start()
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.close(status)


# ---------------------------------------------------------------------------------------------
# training and benchmark runs
# ---------------------------------------------------------------------------------------------
def train_params(tp: "TrainParams") -> dict[str, Any]:
    """The params every training run logs: the whole train section (one schema for every method)."""
    return {"train": tp.model_dump(mode="json")}


def train_tags(tp: "TrainParams", role: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    from components import __version__
    from components.core.hashing import dir_hash

    data = Path(tp.data_dir)
    return {
        "mrt.role": role,
        "mrt.method": tp.method,
        "mrt.seed": str(tp.seed),
        "mrt.data_hash": dir_hash(data) if data.exists() else "missing",
        "mrt.base_dir": tp.base_dir,
        "mrt.mrt_version": __version__,
        **{str(k): str(v) for k, v in (extra or {}).items()},
    }


def tracked_train(track: "TrackParams | None", tp: "TrainParams", *, role: str = "candidate", name: str | None = None,
                  tags: Mapping[str, Any] | None = None, parent: str | None = None,
                  system_metrics: bool | None = None) -> tuple[dict, str | None]:
    """`components.train.training.train` inside a live run; returns (report, run id or None).
    `system_metrics`: sample CPU/memory/GPU into the run (default: track.system_metrics)."""
    from components.train.training import train

    name = name or f"{role}-{tp.method}"
    sample = bool(track and track.system_metrics) if system_metrics is None else system_metrics
    with stage_run(track, name, tags=train_tags(tp, role, tags), params=train_params(tp), parent=parent,
                   system_metrics=sample, lazy=True) as run:
        report = train(tp, on_step=run.step)  # the run is created when the first step is done
        run.flush()
        run.dataset(tp.data_dir)
        run.metrics(tracking.training_metrics(report))
        if Path(tp.out_dir).is_dir():
            run.tags({tracking.MODEL_HASH_TAG: tracking.model_hash(tp.out_dir),
                      "mrt.base_fingerprint": report.get("base_fingerprint") or "unknown"})
        run.artifact(tp.report, "reports")
        run.artifact(tp.curve, "reports")
        run.model_folder(tp.out_dir)
        return report, run.run_id
