"""Headline metric files: the few numbers of each stage that `dvc metrics show/diff` and `dvc exp show` compare.

Why separate files: the full reports (reports/benchmark.json, …) hold per-task tables, per-record
examples, provenance and wall times — hundreds of columns that make DVC's tables unreadable and
`dvc metrics diff` show only timing noise. Each `mrt <stage>` writes, next to its report, a small
JSON of the numbers a reader compares across runs: accuracies (with chance and majority when the
report has them), MME totals, parameter counts, final losses, the gate's decision. No wall times:
they change on every run and say nothing about the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from components.core.files import write_text


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pick(report: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: report[k] for k in keys if _number(report.get(k))}


def _mean(stat: Any) -> Any:
    """A comparison/ablation entry is {mean, std, values} or a plain number."""
    return stat.get("mean") if isinstance(stat, dict) else stat


def validate_headline(report: dict[str, Any]) -> dict[str, Any]:
    return {"success": bool(report.get("success")), **_pick(report, ("checks_failed",))}


def align_headline(report: dict[str, Any]) -> dict[str, Any]:
    return _pick(report, ("loss_final", "caption_token_accuracy", "text_exact_match"))


def train_headline(report: dict[str, Any]) -> dict[str, Any]:
    out = _pick(report, ("loss_final", "trainable_params"))
    if _number(report.get("heldout_mean")):  # the quick check after training, not the benchmark
        out["quick_eval_mean"] = report["heldout_mean"]
    return out


def benchmark_headline(report: dict[str, Any]) -> dict[str, Any]:
    """Held-out mean beside whatever chance / majority / chance-corrected figures the report carries,
    the MME total, and the model's trainable parameters."""
    out = _pick(report, ("heldout_mean",))
    out.update({k: v for k, v in report.items()
                if _number(v) and k.startswith("heldout") and ("chance" in k or "majority" in k)})
    summary = report.get("heldout_summary") or {}  # per-split baselines: {chance_mean, majority_mean, ...}
    for key in ("chance_corrected_mean", "chance_mean", "majority_mean"):
        if _number(summary.get(key)):
            out[f"heldout_{key}"] = summary[key]
    out.update(_pick(report, ("heldin_mean", "mme_total", "mme_chance_total", "mme_majority_total")))
    params = (report.get("model") or {}).get("trainable_params")
    if _number(params):
        out["trainable_params"] = params
    return out


def compare_headline(report: dict[str, Any]) -> dict[str, Any]:
    """Per method: held-out mean (and its chance-corrected mean when present) and MME total (means over
    seeds) and trainable parameters."""
    out: dict[str, Any] = {}
    for method, m in (report.get("methods") or {}).items():
        row = {}
        for key in ("heldout_mean", "heldout_chance_corrected_mean", "mme_total", "trainable_params"):
            v = _mean(m.get(key))
            if _number(v):
                row[key] = v
        out[method] = row
    return out


def ablate_headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out mean per arm (mean over the seeds that finished)."""
    from components.experiments.report import aggregate_arms

    means = {str(a["arm"]): _mean(a.get("heldout_mean")) for a in aggregate_arms(rows)}
    return {"heldout_mean": {arm: v for arm, v in means.items() if _number(v)}}


def promote_headline(report: dict[str, Any]) -> dict[str, Any]:
    return {"promoted": bool(report.get("promote")),
            **_pick(report, ("candidate_version", "champion_version_after"))}


def write_headline(path: str | Path, numbers: dict[str, Any]) -> Path:
    """Write the headline JSON atomically (mode 0644)."""
    return write_text(path, json.dumps(numbers, indent=2, sort_keys=False) + "\n")


def write_from_report(kind: str, report_path: str | Path, out: str | Path) -> Path:
    """The headline file of stage `kind` from its report file (JSON; ablate: the CSV)."""
    if kind == "ablate":
        from components.experiments.report import read_ablation_csv

        return write_headline(out, ablate_headline(read_ablation_csv(report_path)))
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    fn = {"validate": validate_headline, "align": align_headline, "train": train_headline,
          "benchmark": benchmark_headline, "compare": compare_headline, "promote": promote_headline}[kind]
    return write_headline(out, fn(report))
