"""`mrt benchmark`'s MLflow logging: the benchmark's scores go into the run that trained the model.

Kept apart from `stage_runs` (the live-run machinery every stage uses) so that the training stage's
code does not import the benchmark's: dvc.yaml's deps follow imports module by module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from components import tracking
from components.stage_runs import LiveRun, _main_process, stage_run

if TYPE_CHECKING:  # pragma: no cover
    from components.config import BenchmarkParams, TrackParams


def tracked_benchmark(track: "TrackParams | None", bp: "BenchmarkParams", *, run_id: str | None = None,
                      label: str | None = None, parent: str | None = None) -> tuple[dict, str | None]:
    """`components.benchmark.run_benchmark`, its scores logged into the run that trained the model
    (`run_id`, else found by the model's hash), or into a `benchmark` run of its own when there is
    none. Returns (report, the run id written or None)."""
    from components.benchmark import run_benchmark

    kw = {"label": label} if label is not None else {}
    if track is not None and run_id is None and bp.model_dir and _main_process():
        try:
            tracking.configure(track)
            run_id = tracking.find_model_run(track, bp.model_dir)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: MLflow at {tracking.tracking_uri(track)} unreachable ({type(exc).__name__}); "
                  "the benchmark runs untracked", flush=True)
            report = run_benchmark(bp, **kw)
            return report, None
    if run_id is not None:
        report = run_benchmark(bp, **kw)
        run = LiveRun(track, run_id)
        _log_benchmark(run, bp, report)
        return report, run.run_id
    name = f"benchmark-{Path(bp.model_dir).name}" if bp.model_dir else "benchmark-base"
    with stage_run(track, name, tags={"mrt.role": "benchmark", "mrt.model_dir": str(bp.model_dir)}, parent=parent,
                   params={"benchmark": bp.model_dump(mode="json")}, lazy=True) as run:
        report = run_benchmark(bp, **kw)
        _log_benchmark(run, bp, report)
        return report, run.run_id


def _log_benchmark(run: LiveRun, bp: "BenchmarkParams", report: dict) -> None:
    from components.benchmark import flat_metrics

    run.metrics(flat_metrics(report))
    run.tags({"mrt.benchmarked": "true", "mrt.benchmark_report": bp.report})
    run.artifact(bp.report, "reports")


def log_benchmark(run_id: str, report_path: str | os.PathLike, track: "TrackParams | None" = None) -> dict[str, float]:
    """Log a benchmark report: `components.benchmark.flat_metrics` names plus the report artifact."""
    from components.benchmark import flat_metrics

    track = tracking._track(track)
    report = tracking._read_json(report_path, "benchmark report")
    try:
        metrics = flat_metrics(report)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{report_path}: benchmark report lacks field {exc}") from None
    tracking.log_metrics(run_id, metrics, track=track)
    tracking.log_artifact(run_id, report_path, "reports", track=track)
    return metrics
