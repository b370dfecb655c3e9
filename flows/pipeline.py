"""The whole MRT pipeline as one Prefect flow, with one MLflow parent run per pipeline run.

Order: data → validate → base → candidate → benchmark → ablation → baselines → promote → summary.

Why it is built this way:
- Every stage is a task in `flows.tasks` that calls the same components function as `mrt <stage>`
  and is cached by the same inputs as its dvc.yaml stage, so `mrt run` and `dvc repro` agree on
  what is stale and produce the same files.
- A scheduled run first asks the registry: when the champion was trained on this very data
  (content hash) with these very params (hash of the resolved params), there is nothing new to
  learn and the run returns "up to date" after the data stage (a few seconds), unless `force`.
- A failed validation publishes a `validation-report` artifact and stops before anything trains:
  the flow run ends Failed with the failing checks in its message.
- Run it with `mrt run` or `python -m flows.pipeline` (same flags), or as the deployment that
  `flows.deploy` schedules (entrypoint `flows/pipeline.py:mrt_pipeline`, from the repository root).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components import lifeline
from components.offline import set_offline_env
from flows.tasks import (
    base_task,
    benchmark_task,
    compare_task,
    data_task,
    load,
    log_artifacts_task,
    log_benchmark_task,
    log_child_task,
    outputs_current,
    promote_task,
    train_task,
    validate_task,
)

UP_TO_DATE = "up to date"
LINEAGE_KEYS = ("mrt.data_hash", "mrt.params_hash")
ARTIFACT_KEYS = ("validation-report", "benchmark-table", "ablation-table", "promotion-decision")


class PipelineStopped(RuntimeError):
    """The pipeline stopped on purpose before training (validation failed); the message says why."""


def _run(task_obj, refresh: bool, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """Call a task; return (its result, whether Prefect served it from the cache). `refresh` runs
    it even when a cached result exists (and stores the new one under the same key)."""
    state = task_obj.with_options(refresh_cache=True if refresh else None)(*args, return_state=True, **kwargs)
    return state.result(), state.name == "Cached"


def _stale(force: bool, params, name: str, known: dict[str, str] | None) -> bool:
    """Run stage `name` for real: forced, or its outputs are not what its inputs produced."""
    return force or not outputs_current(params, name, known)


def up_to_date(current: dict[str, str], champion: dict[str, Any] | None) -> bool:
    """Whether the champion was made from the same data and params (its lineage tags)."""
    if not champion:
        return False
    tags = champion.get("tags") or {}
    return all(current.get(k) and tags.get(k) == current.get(k) for k in LINEAGE_KEYS)


# Paths one stage writes and the next reads: the flow chains stages through them (as dvc.yaml does),
# so they must name the same place — otherwise the candidate benchmarked or promoted is not the one trained.
WIRING = (
    ("data.out_dir", ("validate.data_dir", "align.data_dir", "train.data_dir", "benchmark.data_dir")),
    ("align.out_dir", ("train.base_dir", "benchmark.base_dir")),
    ("train.out_dir", ("benchmark.model_dir", "promote.candidate_dir")),
    ("benchmark.report", ("promote.benchmark_report",)),
    ("validate.report", ("promote.validation_report",)),
    ("compare.report", ("promote.comparison_report",)),
)
NULLABLE = {"promote.comparison_report"}  # null is allowed: the gate then records the frozen base as unknown


def check_wiring(params) -> None:
    """Raise ParamsError naming every pair of keys that should hold the same path and does not."""
    from components.config import ParamsError

    raw = params.to_dict()

    def get(dotted: str):
        section, key = dotted.split(".")
        return raw[section][key]

    bad = [f"{dst} is {get(dst)!r} but {src} is {get(src)!r}"
           for src, dsts in WIRING for dst in dsts
           if get(dst) != get(src) and not (dst in NULLABLE and get(dst) is None)]
    if bad:
        raise ParamsError("the pipeline chains stages through these paths; make them equal:\n  " + "\n  ".join(bad))


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
SUMMARY_HEADER = ("method", "trainable params", "held-out mean", "held-out chance-corr.", "held-in mean",
                  "MME total", "promoted?")


def _num(v: Any, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def summary_rows(candidate: dict[str, Any], comparison: dict[str, Any] | None,
                 decision: dict[str, Any] | None) -> list[list[str]]:
    """One row for the candidate, one per baseline method (mean ± std over seeds)."""
    from components.report import fmt_int, fmt_pm

    promoted = "—" if decision is None else ("yes" if decision.get("promote") else "no")
    rows = [[f"{candidate['method']} (candidate)", fmt_int(candidate.get("trainable_params")),
             _num(candidate.get("heldout_mean"), 3), _num(candidate.get("heldout_chance_corrected_mean"), 3),
             _num(candidate.get("heldin_mean"), 3), _num(candidate.get("mme_total"), 1), promoted]]
    for method, m in ((comparison or {}).get("methods") or {}).items():
        rows.append([method, fmt_int(m.get("trainable_params")), fmt_pm(m.get("heldout_mean"), 3),
                     fmt_pm(m.get("heldout_chance_corrected_mean"), 3), fmt_pm(m.get("heldin_mean"), 3),
                     fmt_pm(m.get("mme_total"), 1), "—"])
    base = candidate.get("baselines") or {}
    if base:  # what a model without eyes scores on the same records
        rows.append(["chance (uniform guess)", "—", _num(base.get("heldout_chance"), 3), "0.000",
                     _num(base.get("heldin_chance"), 3), _num(base.get("mme_chance"), 1), "—"])
        rows.append(["majority answer (best constant)", "—", _num(base.get("heldout_majority"), 3),
                     _num(base.get("heldout_majority_cc"), 3), _num(base.get("heldin_majority"), 3),
                     _num(base.get("mme_majority"), 1), "—"])
    return rows


def candidate_scores(report_path: str) -> dict[str, Any]:
    """The benchmark report's chance-corrected and held-in means and its baselines, for the summary."""
    from components.tracking import _read_json

    r = _read_json(report_path, "benchmark report")
    out, inn = r.get("heldout_summary") or {}, r.get("heldin_summary") or {}
    return {
        "heldout_chance_corrected_mean": out.get("chance_corrected_mean"),
        "heldin_mean": r.get("heldin_mean"),
        "baselines": {} if not out else {
            "heldout_chance": out.get("chance_mean"), "heldout_majority": out.get("majority_mean"),
            "heldout_majority_cc": out.get("majority_chance_corrected_mean"),
            "heldin_chance": inn.get("chance_mean"), "heldin_majority": inn.get("majority_mean"),
            "mme_chance": r.get("mme_chance_total"), "mme_majority": r.get("mme_majority_total"),
        },
    }


def write_summary(path: str, rows: list[list[str]], note: str) -> str:
    """Print the summary table (rich) and write it as Markdown to `path`; return the Markdown."""
    from rich.console import Console
    from rich.table import Table

    from components.report import md_table, write_text

    table = Table(title="mrt run", title_justify="left")
    for i, h in enumerate(SUMMARY_HEADER):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(stderr=False).print(table)
    md = f"# mrt run summary\n\n{note}\n\n" + md_table(SUMMARY_HEADER, rows, align="lrrrrrr") + "\n"
    write_text(path, md)
    return md


def _benchmark_table(candidate: dict[str, Any], comparison: dict[str, Any] | None) -> list[dict[str, Any]]:
    table = [{"model": "candidate", "method": candidate["method"], "seed": candidate.get("seed"),
              "trainable_params": candidate.get("trainable_params"), "heldout_mean": candidate.get("heldout_mean"),
              "mme_total": candidate.get("mme_total")}]
    for method, m in ((comparison or {}).get("methods") or {}).items():
        for r in m.get("runs") or []:
            table.append({"model": "baseline", "method": method, "seed": r.get("seed"),
                          "trainable_params": r.get("trainable_params"), "heldout_mean": r.get("heldout_mean"),
                          "mme_total": r.get("mme_total")})
    return table


# ---------------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------------
@flow(name="mrt-pipeline")
def mrt_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """data → validate → base → candidate → benchmark → ablation → baselines → promote → summary.

    `force`: train even when the champion was made from the same data and params, and recompute
    every cached stage (the base is still reused when its folder records the same inputs key).
    Returns the status ("trained" / "up to date"), run ids, report paths and per-stage times."""
    from components import registry, tracking
    from components.report import read_comparison

    set_offline_env()
    t_flow = time.perf_counter()
    params = load(params_file, overrides)
    check_wiring(params)
    overrides = list(overrides or [])
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}

    known: dict[str, str] = {}  # content hashes computed this run (path → hash), reused by later cache keys

    def record(name: str, result: dict[str, Any], was_cached: bool) -> dict[str, Any]:
        cached[name] = was_cached
        timings[name] = 0.0 if was_cached else float(result.get("stage_s") or 0.0)
        return result

    def run_stage(name: str, task_obj, *args: Any) -> dict[str, Any]:
        """A cached stage task: recomputed when forced or when its outputs are not what its inputs made."""
        return record(name, *_run(task_obj, _stale(force, params, name, known), params_file, overrides, *args))

    data = run_stage("data", data_task)
    known[os.path.normpath(data["data_dir"])] = data["data_hash"]

    tracking.configure(params.track)
    lineage = tracking.lineage_tags(params, params_file)
    if not force and up_to_date(lineage, registry.champion(params.track)):
        msg = (f"{UP_TO_DATE}: the champion of {params.track.registered_model!r} was trained on this data "
               f"({lineage['mrt.data_hash'][:12]}) with these params ({lineage['mrt.params_hash'][:12]}); "
               "nothing to retrain (use --force to retrain anyway)")
        print(msg)
        return {"status": UP_TO_DATE, "message": msg, "lineage": lineage, "timings": timings,
                "flow_s": time.perf_counter() - t_flow}

    parent = tracking.start_run(params.track, "mrt-pipeline",
                                tags={**lineage, "mrt.role": "pipeline", **lifeline.owner_tag()})
    tracking.log_params_flat(parent, params.to_dict(), prefix="", track=params.track)
    status = "FAILED"
    try:
        val = run_stage("validate", validate_task, known)
        verdict = "PASSED" if val["success"] else "FAILED"
        create_markdown_artifact(
            f"# Data validation {verdict}\n\nReport: `{val['report']}`\n\n```\n{val['summary']}\n```\n",
            key="validation-report", description=f"great-expectations + file checks: {verdict}")
        if not val["success"]:
            raise PipelineStopped(f"validation failed, nothing was trained — see {val['report']}:\n{val['summary']}")

        base, _ = _run(base_task, False, params_file, overrides, known, force)
        record("base", base, base["reused"])
        known[os.path.normpath(base["base_dir"])] = base["base_hash"]

        train = run_stage("train", train_task, known, parent)
        train_cached = cached["train"]
        candidate_run = train["run_id"]
        if train_cached:  # the cached run belongs to an earlier pipeline run: give this one its child too
            candidate_run = log_child_task(
                params_file, overrides, parent, f"candidate-{params.train.method}",
                tags={"mrt.role": "candidate", "mrt.method": params.train.method, "mrt.seed": str(params.train.seed),
                      "mrt.cached_from": train["run_id"]},
                run_params={"train": params.train.model_dump(mode="json")}, folder=train["out_dir"],
                train_report=train["report"], curve=train["curve"], log_model=True)

        bench = run_stage("benchmark", benchmark_task, known)
        log_benchmark_task(params_file, overrides, [candidate_run, parent], bench["report"])

        ablation = None
        if params.run.ablation:
            from flows.ablation import ablation_flow

            ablation = ablation_flow(params_file, overrides, parent, known, force)
            record("ablate", ablation, ablation["cached"])

        comparison = None
        if params.run.baselines:
            cmp_result = run_stage("compare", compare_task, known)
            comparison = read_comparison(cmp_result["report"])
            for r in cmp_result["runs"]:
                folder = Path(r["dir"])
                log_child_task(
                    params_file, overrides, parent, f"baseline-{r['method']}-seed{r['seed']}",
                    tags={"mrt.role": "baseline", "mrt.method": r["method"], "mrt.seed": str(r["seed"]),
                          "mrt.status": r["status"]},
                    run_params={"method": r["method"], "seed": r["seed"], "steps": params.compare.steps},
                    folder=str(folder), train_report=str(folder / "train.json"),
                    curve=str(folder / "train_curve.csv"), bench_report=str(folder / "benchmark.json"))

        candidate = {"method": params.train.method, "seed": params.train.seed,
                     "trainable_params": train.get("trainable_params"),
                     "heldout_mean": bench["heldout_mean"], "mme_total": bench["mme_total"],
                     **candidate_scores(bench["report"])}
        create_table_artifact(_benchmark_table(candidate, comparison), key="benchmark-table",
                              description="Candidate and baselines: held-out mean and MME total")

        decision = None
        if params.run.promote:
            t0 = time.perf_counter()
            promoted = promote_task(params_file, overrides, candidate_run)
            timings["promote"] = promoted.get("stage_s", time.perf_counter() - t0)
            decision = promoted["decision"]
            create_markdown_artifact(promoted["markdown"], key="promotion-decision",
                                     description="Promotion gate: candidate vs champion")

        note = (f"Parent MLflow run `{parent}`; params `{params_file}`"
                + (f" with {' '.join(overrides)}" if overrides else "") + ".")
        rows = summary_rows(candidate, comparison, decision)
        write_summary(params.run.summary, rows, note)

        reports = [params.validate_.report, params.align.report, params.train.report, params.train.curve,
                   params.benchmark.report, params.run.summary]
        if ablation:
            reports += [params.ablate.report_csv, params.ablate.report_md, params.ablate.plot]
        if comparison:
            reports += [params.compare.report, params.compare.table, params.compare.plot]
        if decision is not None:
            reports.append(params.promote.report)
        log_artifacts_task(params_file, overrides, parent, reports)
        tracking.set_tags(parent, {"mrt.base_fingerprint": tracking.base_fingerprint(
            params.train.base_dir, params.train.out_dir), "mrt.candidate_run_id": candidate_run},
            track=params.track)
        status = "FINISHED"
        return {"status": "trained", "parent_run_id": parent, "candidate_run_id": candidate_run,
                "promoted": None if decision is None else bool(decision.get("promote")),
                "summary": params.run.summary, "rows": rows, "timings": timings, "cached": cached,
                "flow_s": time.perf_counter() - t_flow}
    finally:
        tracking.end_run(parent, status, track=params.track)


# ---------------------------------------------------------------------------------------------
# command line: `python -m flows.pipeline` (and `mrt run`, which calls run())
# ---------------------------------------------------------------------------------------------
def run(params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Check the params before Prefect starts (a typo fails in a second, not after a server start),
    then run the flow."""
    set_offline_env()
    params = load(params_file, overrides)
    check_wiring(params)
    lifeline.end_orphaned_runs(params.track)  # runs a killed pipeline left RUNNING end KILLED
    return mrt_pipeline(params_file=params_file, overrides=list(overrides or []), force=force)


def main(argv: list[str] | None = None) -> int:
    from components.config import ParamsError

    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("-p", "--params", default="params.yaml", help="params file (a profile)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="override: section.key=value (DVC syntax); repeatable")
    ap.add_argument("--force", action="store_true", help="retrain even when the champion is up to date")
    args = ap.parse_args(argv)
    try:
        result = run(args.params, args.overrides, args.force)
    except ParamsError as exc:
        print(f"params error:\n{exc}", file=sys.stderr)
        return 2
    except PipelineStopped as exc:
        print(f"pipeline stopped: {exc}", file=sys.stderr)
        return 1
    if result.get("status") == UP_TO_DATE:
        return 0
    print(f"summary: {result['summary']}  MLflow parent run: {result['parent_run_id']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
