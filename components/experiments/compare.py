"""`mrt compare`: MRT against LoRA, full fine-tuning and the frozen base on identical data, steps and seeds.

Every method is the `train` section with only `method`, `seed`, `steps` and the output folder
changed, so the base, data, batch size, learning-rate schedule and the batches themselves (a pure
function of the seed, see training.StepSampler) are the same for all of them; MRT uses
`train.editors`, the paper's placement scaled to the model (the params default). Runs go through
the ablation's executor (`ablation.run_jobs`): a process pool of spawned workers, or this process
when workers == 1, and a failed run is recorded while the others finish.

The frozen base is benchmarked once, with the first seed: it trains nothing and decoding is greedy,
so every seed would give the same numbers (its std is reported as 0 over that one run).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from components.experiments.ablation import Reporter, print_progress, make_job, run_jobs
from components.core.config import BenchmarkParams, CompareParams, TrackParams, TrainParams
from components.core.markdown import mean_std, produced_by, utc_now
from components.train.methods import METHODS


def run_dir(out_dir: str | Path, method: str, seed: int) -> Path:
    return Path(out_dir) / method / f"seed-{seed}"


def compare_runs(cmp: CompareParams) -> list[tuple[str, int]]:
    """(method, seed) pairs to run, methods in `cmp.methods` order; a method that trains nothing
    (the frozen base) once."""
    runs = []
    for method in dict.fromkeys(cmp.methods):
        seeds = list(dict.fromkeys(cmp.seeds)) if METHODS[method].trains else cmp.seeds[:1]
        runs += [(method, s) for s in seeds]
    return runs


def _summary_field(bm: dict[str, Any], split: str, key: str) -> Any:
    return (bm.get(f"{split}_summary") or {}).get(key)


def _collapsed(bm: dict[str, Any], split: str) -> list[str]:
    return list(_summary_field(bm, split, "collapsed_tasks") or [])


def _acc_plus_mean(bm: dict[str, Any]) -> float | None:
    """Mean over MME subtasks of acc+ (both questions of an image right, in %): what a constant answer
    cannot reach (it scores acc 50 / acc+ 0 on every subtask)."""
    values = [s.get("acc_plus") for s in (bm.get("mme") or {}).values() if s.get("acc_plus") is not None]
    return sum(values) / len(values) if values else None


def _run_entry(seed: int, result: dict[str, Any], folder: Path) -> dict[str, Any]:
    tr, bm = result.get("train") or {}, result.get("benchmark") or {}
    model = bm.get("model") or {}
    return {
        "seed": seed,
        "status": result["status"],
        "error": result.get("error", ""),
        "heldout_mean": bm.get("heldout_mean"),
        "heldout_chance_corrected_mean": _summary_field(bm, "heldout", "chance_corrected_mean"),
        "heldin_mean": bm.get("heldin_mean"),
        "heldin_chance_corrected_mean": _summary_field(bm, "heldin", "chance_corrected_mean"),
        "mme_total": bm.get("mme_total"),
        "mme_perception": bm.get("mme_perception"),
        "mme_acc_plus_mean": _acc_plus_mean(bm),
        "collapsed": {"heldout": _collapsed(bm, "heldout"), "heldin": _collapsed(bm, "heldin"),
                      "mme": list(bm.get("mme_collapsed") or [])},
        "heldout": bm.get("heldout") or {},
        "heldin": bm.get("heldin") or {},
        "trainable_params": tr.get("trainable_params", model.get("trainable_params")),
        "trainable_pct": tr.get("trainable_pct", model.get("trainable_pct")),
        "train_wall_s": tr.get("train_wall_s"),
        "wall_s": result.get("wall_s"),
        "out_dir": str(folder),
    }


def reference_baselines(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Chance and constant-answer baselines of the evaluated records, from the first benchmarked run
    (every method is scored on the same records, so they are the same for all): per split the means
    and per task chance / majority (best constant on the test set) / train_majority; MME totals."""
    bm = next((r.get("benchmark") for r in results if r.get("status") == "ok" and r.get("benchmark")), None) or {}
    out: dict[str, Any] = {}
    for split in ("heldout", "heldin"):
        summary = bm.get(f"{split}_summary")
        if summary:
            out[split] = {
                **{k: summary.get(k) for k in ("chance_mean", "majority_mean", "train_majority_mean",
                                                "majority_chance_corrected_mean")},
                "per_task": {t: {k: e.get(k) for k in ("chance", "majority", "majority_answer", "train_majority",
                                                       "train_majority_answer")}
                             for t, e in (summary.get("tasks") or {}).items()},
            }
    if bm.get("mme_baselines"):
        out["mme"] = {"chance_total": bm.get("mme_chance_total"), "majority_total": bm.get("mme_majority_total"),
                      "per_subtask": {s: {"chance": b.get("chance_score"), "majority": b.get("majority_score")}
                                      for s, b in bm["mme_baselines"].items()}}
    return out


def summarize(runs: Sequence[tuple[str, int]], results: Sequence[dict[str, Any]], cmp: CompareParams,
              out_dir: str | Path | None = None) -> dict[str, Any]:
    """The comparison report: per method the mean ± sample std over its successful seeds of the
    held-out mean and its chance-corrected mean, the held-in mean, MME total, every held-out and
    held-in task and wall time, how many seeds collapsed to one answer per task, plus its trainable
    parameters and every run (failed ones with their error); and the chance / constant-answer
    baselines of the evaluated records (`baselines`)."""
    out_dir = cmp.out_dir if out_dir is None else out_dir
    entries: dict[str, list[dict[str, Any]]] = {}
    for (method, seed), res in zip(runs, results):
        entries.setdefault(method, []).append(_run_entry(seed, res, run_dir(out_dir, method, seed)))
    methods = {}
    for method, rs in entries.items():
        ok = [r for r in rs if r["status"] == "ok"]
        tasks = sorted({t for r in ok for t in r["heldout"]})
        heldin_tasks = sorted({t for r in ok for t in r["heldin"]})
        first_ok = ok[0] if ok else {}
        methods[method] = {
            "status": "ok" if len(ok) == len(rs) else ("failed" if not ok else "partial"),
            "seeds": [r["seed"] for r in rs],
            "heldout_mean": mean_std(r["heldout_mean"] for r in ok),
            "heldout_chance_corrected_mean": mean_std(r["heldout_chance_corrected_mean"] for r in ok),
            "heldin_mean": mean_std(r["heldin_mean"] for r in ok),
            "heldin_chance_corrected_mean": mean_std(r["heldin_chance_corrected_mean"] for r in ok),
            "mme_total": mean_std(r["mme_total"] for r in ok),
            "mme_perception": mean_std(r["mme_perception"] for r in ok),
            "mme_acc_plus_mean": mean_std(r.get("mme_acc_plus_mean") for r in ok),
            "per_task": {t: mean_std(r["heldout"].get(t) for r in ok) for t in tasks},
            "heldin_per_task": {t: mean_std(r["heldin"].get(t) for r in ok) for t in heldin_tasks},
            # per split, task → in how many of the successful seeds the answers collapsed to one value
            "collapsed": {split: dict(sorted(Counter(t for r in ok for t in r["collapsed"][split]).items()))
                          for split in ("heldout", "heldin", "mme")},
            "trainable_params": first_ok.get("trainable_params"),
            "trainable_pct": first_ok.get("trainable_pct"),
            "wall_s": mean_std(r["wall_s"] for r in ok),
            "runs": rs,
        }
    return {
        "methods": methods,
        "baselines": reference_baselines(results),
        "seeds": list(cmp.seeds),
        "steps": cmp.steps,
        "per_task": cmp.per_task,
        "std": "sample standard deviation over seeds (ddof 1); 0 for a single run",
        "produced_by": produced_by("compare"),
        "created": utc_now(),
    }


def run_compare(cmp: CompareParams, train: TrainParams, bench: BenchmarkParams,
                report: Reporter | None = print_progress, track: TrackParams | None = None) -> dict[str, Any]:
    """Train (frozen: no training) and benchmark each method x seed; write cmp.report (JSON),
    cmp.table (Markdown) and cmp.plot (PNG); return the report. With `track`, the comparison is a
    `compare` MLflow run and every method x seed a live child run of it (components.track.stage_runs)."""
    from components.track.stage_runs import stage_run

    with stage_run(track, "compare", tags={"mrt.role": "compare"},
                   params={"compare": cmp.model_dump(mode="json")}) as parent:
        summary = _run_compare(cmp, train, bench, report, track if parent.active else None, parent.run_id)
        for path in (cmp.report, cmp.table, cmp.plot):
            parent.artifact(path, "reports")
        return summary


def _run_compare(cmp: CompareParams, train: TrainParams, bench: BenchmarkParams, report: Reporter | None,
                 track: TrackParams | None, parent: str | None) -> dict[str, Any]:
    import json

    from components.experiments.report import comparison_markdown, write_comparison_plot
    from components.core.files import write_text

    runs = compare_runs(cmp)
    jobs = [
        make_job(f"{method}/seed-{seed}", train, bench, run_dir(cmp.out_dir, method, seed), per_task=cmp.per_task,
                 method=method, seed=seed, steps=cmp.steps)
        for method, seed in runs
    ]
    if track is not None:
        for (method, seed), job in zip(runs, jobs):
            job["tracking"] = {"track": track.model_dump(mode="json"), "parent": parent, "role": "baseline",
                               "name": f"baseline-{method}-seed{seed}", "tags": {}}
    t0 = time.time()
    results = run_jobs(jobs, cmp.workers, cmp.threads_per_worker, report)
    summary = summarize(runs, results, cmp)
    for method, entry in summary["methods"].items():  # each method's own step size (train.lr may be per method)
        entry["lr"] = train.rate_for(method)
    summary.update(base_dir=train.base_dir, data_dir=train.data_dir, workers=cmp.workers,
                   threads_per_worker=cmp.threads_per_worker, wall_s=round(time.time() - t0, 1))
    write_text(cmp.report, json.dumps(summary, indent=2, default=str) + "\n")
    write_text(cmp.table, comparison_markdown(summary))
    write_comparison_plot(cmp.plot, summary)
    return summary
