"""`mrt benchmark`'s MLflow logging: the benchmark's scores go into the run that trained the model.

Kept apart from `stage_runs` (the live-run machinery every stage uses) so that the training stage's
code does not import the benchmark's: dvc.yaml's deps follow imports module by module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.track import tracking
from components.track.stage_runs import LiveRun, _main_process, stage_run
from components.evaluation.metrics.mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS

if TYPE_CHECKING:  # pragma: no cover
    from components.core.config import BenchmarkParams, TrackParams


def tracked_benchmark(track: "TrackParams | None", bp: "BenchmarkParams", *, run_id: str | None = None,
                      label: str | None = None, parent: str | None = None) -> tuple[dict, str | None]:
    """`components.evaluation.benchmark.run_benchmark`, its scores logged into the run that trained the model
    (`run_id`, else found by the model's hash), or into a `benchmark` run of its own when there is
    none. Returns (report, the run id written or None)."""
    from components.evaluation.benchmark import run_benchmark

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
    run.metrics(flat_metrics(report))
    run.tags({"mrt.benchmarked": "true", "mrt.benchmark_report": bp.report})
    run.artifact(bp.report, "reports")


# Split-level numbers of `*_summary` logged as `<split>/<name>`; per task `<split>/<task>/<field>`.
SUMMARY_METRICS = ("chance_mean", "majority_mean", "train_majority_mean", "chance_corrected_mean",
                   "majority_chance_corrected_mean")


TASK_METRICS = ("chance", "majority", "train_majority", "chance_corrected")


# `heldout/<name>` keys that are not tasks (the promotion gate reads tasks as `heldout/<task>`).
AGGREGATE_NAMES = frozenset({"mean", "collapsed_tasks", *SUMMARY_METRICS})


def _summary_metrics(prefix: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    flat: dict[str, Any] = {f"{prefix}/{k}": summary.get(k) for k in SUMMARY_METRICS}
    flat[f"{prefix}/collapsed_tasks"] = len(summary.get("collapsed_tasks") or [])
    for task, e in (summary.get("tasks") or {}).items():
        flat.update({f"{prefix}/{task}/{k}": e.get(k) for k in TASK_METRICS})
        flat[f"{prefix}/{task}/collapsed"] = 1.0 if e.get("collapsed") else 0.0
    return flat


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report as MLflow metrics (the names docs/orchestration.md lists): heldout/<task>, heldout/mean, mme/<subtask>,
    mme/perception, mme/total, robustness/<kind>/mean, real_image/mean, trainable_params, trainable_pct;
    beside them the baselines: heldout/chance_mean, heldout/majority_mean, heldout/train_majority_mean,
    heldout/chance_corrected_mean, heldout/majority_chance_corrected_mean, heldout/collapsed_tasks (a
    count), per task heldout/<task>/{chance,majority,train_majority,chance_corrected,collapsed}; the
    same under heldin/ (heldin/<task>, heldin/mean, …); mme/chance_total, mme/majority_total,
    mme/collapsed_subtasks and per subtask mme/<subtask>/{chance,majority,collapsed}.
    Keys whose value is unknown (None) are left out; collapse flags are 1.0 / 0.0. Keys go through
    `tracking.mlflow_key` (task names may hold characters MLflow refuses)."""
    flat: dict[str, Any] = {f"heldout/{t}": s for t, s in report["heldout"].items()}
    flat["heldout/mean"] = report["heldout_mean"]
    flat.update(_summary_metrics("heldout", report.get("heldout_summary")))
    flat.update({f"heldin/{t}": s for t, s in (report.get("heldin") or {}).items()})
    flat["heldin/mean"] = report.get("heldin_mean")
    flat.update(_summary_metrics("heldin", report.get("heldin_summary")))
    flat.update({f"mme/{name}": s["score"] for name, s in report["mme"].items()})
    # A half of MME with none of its subtasks in the set has no score (not a score of 0).
    if any(name in PERCEPTION_SUBTASKS for name in report["mme"]):
        flat["mme/perception"] = report["mme_perception"]
    if any(name in COGNITION_SUBTASKS for name in report["mme"]):
        flat["mme/cognition"] = report["mme_cognition"]
    flat["mme/total"] = report["mme_total"]
    if report.get("mme_baselines"):
        flat["mme/chance_total"] = report.get("mme_chance_total")
        flat["mme/majority_total"] = report.get("mme_majority_total")
        flat["mme/collapsed_subtasks"] = len(report.get("mme_collapsed") or [])
        for name, b in report["mme_baselines"].items():
            flat[f"mme/{name}/chance"] = b.get("chance_score")
            flat[f"mme/{name}/majority"] = b.get("majority_score")
            flat[f"mme/{name}/collapsed"] = 1.0 if b.get("collapsed") else 0.0
    for kind, r in report["robustness"].items():
        flat[f"robustness/{kind}/mean"] = r["heldout_mean"]
        flat.update({f"robustness/{kind}/{t}": s for t, s in r["heldout"].items()})
    flat["real_image/mean"] = report["real_image_mean"]
    flat["trainable_params"] = report["model"]["trainable_params"]
    flat["trainable_pct"] = report["model"]["trainable_pct"]
    return {tracking.mlflow_key(k): float(v) for k, v in flat.items() if v is not None}

