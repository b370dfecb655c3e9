"""Prefect tasks: each one runs one dvc.yaml stage through DVC and tells what it did.

Why they look like this:
- A task takes the stage name, the workspace root and plain strings; it returns a small dict of
  paths and numbers (JSON types only). Models and tensors never cross a task boundary.
- Staleness is DVC's answer (`flows.repro`): tasks have no Prefect cache (`NO_CACHE`) and never
  persist their results (`persist_result=False`), so Prefect's result storage holds nothing that a
  later run could load — let alone unpickle.
- After the stage, the task reads the stage's report (JSON written by `mrt <stage>`) and logs one
  line with the numbers that matter: steps and loss, held-out accuracy beside chance, the gate's
  decision. A skipped stage still logs its numbers: they are what the outputs on disk hold.
- MLflow is the stage commands' business (each `mrt <stage>` logs its own runs); the flow only
  passes its parent run id to them (`flows.repro.PARENT_RUN_ENV`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.core.config import Params, load_params
from flows import repro


def load(params_file: str, overrides: list[str] | None) -> Params:
    return load_params(params_file, list(overrides or []))


def _json(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _f(value: Any, digits: int = 3) -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def _beside_chance(report: dict[str, Any]) -> str:
    """' (chance 0.xxx, majority 0.yyy, chance-corrected 0.zzz)' from the benchmark report's baselines."""
    from components.experiments.headline import benchmark_headline

    h = benchmark_headline(report)
    parts = [f"{label} {_f(h[key])}" for key, label in (("heldout_chance_mean", "chance"),
                                                         ("heldout_majority_mean", "majority answer"),
                                                         ("heldout_chance_corrected_mean", "chance-corrected"))
             if key in h]
    return (" (" + ", ".join(parts) + ")") if parts else ""


def stage_story(stage: str, params: Params) -> tuple[str, dict[str, Any]]:
    """One log line with the numbers that matter for `stage`, and those numbers, read from the reports
    the stage wrote. ("", {}) when the stage wrote nothing readable."""
    if stage == "data":
        manifest = _json(str(Path(params.data.out_dir) / "manifest.json")) or {}
        counts = manifest.get("counts") or manifest.get("splits") or {}
        nums = {k: v for k, v in counts.items() if isinstance(v, int)} if isinstance(counts, dict) else {}
        detail = ", ".join(f"{k} {v}" for k, v in nums.items())
        return f"data: {params.data.out_dir}" + (f" ({detail})" if detail else ""), nums
    if stage == "validate":
        r = _json(params.validate_.report)
        if r is None:
            return "", {}
        nums = {"success": bool(r.get("success")), "checks_failed": r.get("checks_failed"),
                "rows": (r.get("stats") or {}).get("rows")}
        verdict = "PASSED" if nums["success"] else "FAILED"
        return f"validate: {verdict}, {nums['checks_failed']} check(s) failed over {nums['rows']} rows", nums
    if stage == "align":
        r = _json(params.align.report)
        if r is None:
            return "", {}
        nums = {k: r.get(k) for k in ("backbone", "steps", "loss_first", "loss_final", "caption_token_accuracy",
                                      "text_exact_match")}
        return (f"align: {nums['backbone']} base, {nums['steps']} steps, loss {_f(nums['loss_first'])} → "
                f"{_f(nums['loss_final'])}, caption token accuracy {_f(nums['caption_token_accuracy'])}"), nums
    if stage == "train":
        r = _json(params.train.report)
        if r is None:
            return "", {}
        nums = {k: r.get(k) for k in ("method", "steps", "resumed_from", "loss_first", "loss_final",
                                      "trainable_params", "heldout_mean", "heldout_n")}
        return (f"train: {nums['method']}, {nums['steps']} steps, loss {_f(nums['loss_first'])} → "
                f"{_f(nums['loss_final'])}, {nums['trainable_params']} trainable params, quick held-out check "
                f"{_f(nums['heldout_mean'])} on {nums['heldout_n']} records"), nums
    if stage == "benchmark":
        r = _json(params.benchmark.report)
        if r is None:
            return "", {}
        nums = {k: r.get(k) for k in ("heldout_mean", "heldout_n", "mme_total", "mme_n")}
        return (f"benchmark: held-out mean {_f(nums['heldout_mean'])} on {nums['heldout_n']} records"
                f"{_beside_chance(r)}, MME total {_f(nums['mme_total'], 1)} on {nums['mme_n']} questions"), nums
    if stage == "ablate":
        from components.experiments.report import aggregate_arms, read_ablation_csv

        if not Path(params.ablate.report_csv).is_file():
            return "", {}
        arms = aggregate_arms(read_ablation_csv(params.ablate.report_csv))
        ok = [a for a in arms if isinstance((a.get("heldout_mean") or {}).get("mean"), (int, float))]
        best = max(ok, key=lambda a: a["heldout_mean"]["mean"], default=None)
        nums = {"arms": len(arms), "arms_ok": len(ok),
                "best_arm": best["arm"] if best else None,
                "best_heldout_mean": best["heldout_mean"]["mean"] if best else None}
        return (f"ablate: {len(ok)}/{len(arms)} arms ok, best {nums['best_arm']} "
                f"(held-out mean {_f(nums['best_heldout_mean'])})"), nums
    if stage == "compare":
        r = _json(params.compare.report)
        if r is None:
            return "", {}
        nums = {m: (v.get("heldout_mean") or {}).get("mean") for m, v in (r.get("methods") or {}).items()}
        return "compare: held-out mean " + ", ".join(f"{m} {_f(v)}" for m, v in nums.items()), nums
    if stage == "promote":
        r = _json(params.promote.report)
        if r is None:
            return "", {}
        nums = {k: r.get(k) for k in ("promote", "candidate_version", "champion_version_before",
                                      "champion_version_after", "candidate_heldout_mean", "champion_heldout_mean")}
        verdict = "PROMOTED" if nums["promote"] else "REJECTED"
        reasons = "; ".join(str(x) for x in (r.get("reasons") or [])[-2:])
        return (f"promote: {verdict} v{nums['candidate_version']} (held-out {_f(nums['candidate_heldout_mean'])} vs "
                f"champion {_f(nums['champion_heldout_mean'])}); champion is v{nums['champion_version_after']} — "
                f"{reasons}"), nums
    if stage == "report":
        return f"report: results block in {params.report.results}" + (
            f" and {params.report.readme}" if params.report.readme else ""), {}
    return "", {}


@task(name="mrt-stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, params_file: str, root: str = ".", force: bool = False,
               parent_run_id: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` (DVC decides whether it runs), then one line with its numbers.

    `params_file` (relative to `root`) is only read for the report paths: the stage itself reads
    params.yaml, which `flows.repro.write_params` made equal to the profile."""
    logger = get_run_logger()
    result = repro.reproduce(stage, root, force=force, env=repro.stage_env(parent_run_id, root))
    what = {"ran": f"ran `mrt {stage}` ({result.wall_s:.1f} s)",
            "restored": f"restored from DVC's run cache ({result.wall_s:.1f} s)",
            "skipped": "up to date (DVC: no dep, param or command changed)"}[result.status]
    logger.info("%s: %s", stage, what)
    line, nums = "", {}
    params_path = Path(params_file) if Path(params_file).is_absolute() else Path(root) / params_file
    try:
        with contextlib.chdir(root):  # report paths in params are relative to the workspace
            line, nums = stage_story(stage, load(str(params_path), None))
    except (ValueError, OSError, KeyError, TypeError) as exc:  # the stage ran; only its summary line is lost
        logger.warning("%s: could not read its report for the summary line: %s", stage, exc)
    if line:
        logger.info("%s", line)
    return {**result.to_dict(), "numbers": nums, "story": line}
