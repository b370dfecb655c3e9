"""The whole MRT pipeline as one Prefect flow whose tasks run the dvc.yaml stages.

Order: data → validate → align → train → benchmark → ablate → compare → promote → report.

Why it is built this way:
- dvc.yaml is the one description of the stages and of what is stale. Each task runs its stage
  through DVC (`flows.repro.reproduce`, i.e. `dvc repro --single-item <stage>`), so `mrt run` and
  `dvc repro` are the same pipeline: same commands, same `dvc.lock`, and `dvc status` is clean
  after either. A stage whose command, params and deps did not change is skipped by DVC; one
  whose inputs DVC has seen before is restored from DVC's run cache.
- The profile (`-p profiles/smoke.yaml`) and overrides (`-S key=value`) are written into
  `params.yaml` first (`flows.repro.write_params`, like `dvc exp run -S`): DVC reads params.yaml.
- A scheduled run (the `flows.deploy` deployment) is the same flow: when `dvc status` reports no
  stage changed — no code, data or params edit since the last run — it ends "up to date" in
  seconds without creating an MLflow run; otherwise it runs exactly the stale stages.
- A failed validation publishes the validation artifact and stops before anything trains.
- Each stage command logs its own MLflow runs; the flow opens a parent run and passes its id to
  the stage commands (`MRT_PARENT_RUN_ID`), and logs the reports and summary onto it.
- Flow runs are named `<profile>-<commit>-<time>` and tagged `profile:<p>` / `commit:<c>`;
  artifact keys start with the profile, so smoke and default runs never overwrite each other's.
- Run it with `mrt run` or `python -m flows.pipeline` (same flags), or as the deployment that
  `flows.deploy` schedules (entrypoint `flows/pipeline.py:mrt_pipeline`, from the repository root).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components.track import lifeline
from components.core.offline import set_offline_env
from flows import repro
from flows.tasks import load, stage_task

UP_TO_DATE = "up to date"


class PipelineStopped(RuntimeError):
    """The pipeline stopped on purpose before training (validation failed); the message says why."""


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
    from components.core.config import ParamsError

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
    from components.core.markdown import fmt_int, fmt_pm

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
    from components.track.tracking import _read_json

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

    from components.core.markdown import md_table
    from components.core.files import write_text

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
def pipeline_stages(params) -> tuple[str, ...]:
    """The dvc.yaml stages `mrt run` brings up to date, in order (run.ablation / baselines / promote
    leave theirs out; the report and promote stages need the comparison)."""
    skip = set()
    if not params.run.ablation:
        skip.add("ablate")
    if not params.run.baselines:  # promote reads the comparison (the gate's frozen base and seed spread)
        skip |= {"compare", "report", "promote"}
    if not params.run.promote:
        skip.add("promote")
    return tuple(s for s in repro.PIPELINE if s not in skip)


def _flow_run_name() -> str:
    """`<profile>-<commit>-<UTC time>`: what ran, from which code, when."""
    from prefect.runtime import flow_run

    params_file = (flow_run.parameters or {}).get("params_file") or "params.yaml"
    return f"{repro.profile_name(params_file)}-{repro.git_commit()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _tag_flow_run(tags: list[str]) -> None:
    """Add `tags` to this flow run (works for `mrt run` and for deployment runs alike)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags or []
        client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(tags)))


def _read(path: str) -> dict[str, Any] | None:
    import json

    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


@flow(name="mrt-pipeline", flow_run_name=_flow_run_name, persist_result=False)
def mrt_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """data → validate → align → train → benchmark → ablate → compare → promote → report, each a
    dvc.yaml stage run by DVC in the current directory (the repository root).

    `force`: every stage runs (`dvc repro --force`), stale or not. Returns the status ("trained" /
    "up to date"), what DVC did per stage, run ids, report paths and per-stage times."""
    from components.track import tracking
    from components.experiments.report import read_comparison

    set_offline_env()
    logger = get_run_logger()
    t_flow = time.perf_counter()
    repro.check_workspace(".")
    profile, commit = repro.profile_name(params_file), repro.git_commit(".")
    _tag_flow_run(["mrt", f"profile:{profile}", f"commit:{commit}"])
    changed = repro.write_params(params_file, overrides, ".")
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        logger.info("params.yaml now holds %s%s (DVC reads params.yaml): %d key(s) changed: %s", params_file,
                    f" with {' '.join(overrides or [])}" if overrides else "", len(changed), shown)
    params = load(repro.PARAMS_FILE, None)
    check_wiring(params)
    stages = pipeline_stages(params)
    stale = {} if force else repro.stale(stages, ".")
    if not force and not stale:
        msg = (f"{UP_TO_DATE}: DVC reports no change in any stage's code, data or params since its last run "
               f"({', '.join(stages)}); nothing to do (`--force` reruns every stage)")
        logger.info(msg)
        return {"status": UP_TO_DATE, "message": msg, "profile": profile, "commit": commit,
                "flow_s": time.perf_counter() - t_flow}
    logger.info("profile %s at %s: %s", profile, commit,
                "forced: every stage runs" if force else f"stale per DVC: {', '.join(stale)}")

    tracking.configure(params.track)
    lineage = tracking.lineage_tags(params, repro.PARAMS_FILE)
    parent = tracking.start_run(params.track, f"mrt-pipeline-{profile}",
                                tags={**lineage, "mrt.role": "pipeline", "mrt.profile": profile,
                                      **lifeline.owner_tag()})
    status = "FAILED"
    stage_runs: dict[str, dict[str, Any]] = {}
    try:
        for stage in stages:
            if stage == "ablate":
                from flows.ablation import ablation_flow

                stage_runs[stage] = ablation_flow(profile, force, parent)
                continue
            try:
                stage_runs[stage] = stage_task(stage, repro.PARAMS_FILE, ".", force, parent)
            except repro.ReproError:
                verdict = _read(params.validate_.report) if stage == "validate" else None
                if verdict is not None and verdict.get("success") is False:  # bad data, not a crash
                    _validation_artifact(profile, params)
                    raise PipelineStopped(f"validation failed, nothing was trained — see {params.validate_.report}")
                raise
            if stage == "validate":
                _validation_artifact(profile, params)

        train = _read(params.train.report) or {}
        bench = _read(params.benchmark.report) or {}
        candidate = {"method": params.train.method, "seed": params.train.seed,
                     "trainable_params": train.get("trainable_params"),
                     "heldout_mean": bench.get("heldout_mean"), "mme_total": bench.get("mme_total"),
                     **(candidate_scores(params.benchmark.report) if bench else {})}
        comparison = read_comparison(params.compare.report) if "compare" in stages else None
        create_table_artifact(_benchmark_table(candidate, comparison), key=f"{profile}-benchmark-table",
                              description=f"{profile}: candidate and baselines, held-out mean and MME total")
        decision = _read(params.promote.report) if "promote" in stages else None
        if decision is not None:
            md = _decision_markdown(decision)
            create_markdown_artifact(md, key=f"{profile}-promotion-decision",
                                     description=f"{profile}: promotion gate, candidate vs champion")

        did = ", ".join(f"{s} {r.get('status')}" for s, r in stage_runs.items())
        note = f"Profile `{profile}` at `{commit}`; parent MLflow run `{parent}`; DVC: {did}."
        rows = summary_rows(candidate, comparison, decision)
        write_summary(params.run.summary, rows, note)
        for path in [params.validate_.report, params.align.report, params.train.report, params.train.curve,
                     params.benchmark.report, params.run.summary, params.ablate.report_csv, params.ablate.report_md,
                     params.compare.report, params.compare.table, params.promote.report]:
            if Path(path).is_file():
                tracking.log_artifact(parent, path, "reports", track=params.track)
        status = "FINISHED"
        logger.info("done in %.1f s: %s", time.perf_counter() - t_flow, did)
        return {"status": "trained", "profile": profile, "commit": commit, "parent_run_id": parent,
                "stages": stage_runs, "promoted": None if decision is None else bool(decision.get("promote")),
                "summary": params.run.summary, "rows": rows,
                "timings": {s: r.get("wall_s") for s, r in stage_runs.items()},
                "flow_s": time.perf_counter() - t_flow}
    finally:
        tracking.end_run(parent, status, track=params.track)


def _decision_markdown(decision: dict[str, Any]) -> str:
    """promotion.json as Markdown: the verdict, the versions, the gate's numbers and its reasons."""
    def v(key: str) -> str:
        return "none" if decision.get(key) is None else f"v{decision[key]}"

    verdict = "PROMOTED" if decision.get("promote") else "REJECTED"
    lines = [f"# Promotion gate: {verdict}", "",
             f"Model `{decision.get('model_name')}`: candidate {v('candidate_version')}; champion "
             f"before {v('champion_version_before')}, after {v('champion_version_after')}.",
             "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in decision.items()
              if isinstance(v, (int, float, str, bool)) or v is None if k not in ("reasons", "model_uri")]
    lines += ["", "Reasons:"] + [f"- {r}" for r in decision.get("reasons") or []]
    return "\n".join(lines) + "\n"


def _validation_artifact(profile: str, params) -> None:
    report = _read(params.validate_.report)
    if report is None:
        return
    verdict = "PASSED" if report.get("success") else "FAILED"
    failed = [c for c in report.get("checks") or [] if not c.get("success", True)]
    lines = "\n".join(f"- {c.get('name')}: {c.get('description', '')}" for c in failed[:20]) or "- none"
    create_markdown_artifact(
        f"# Data validation {verdict}\n\nReport: `{params.validate_.report}`\n\nFailed checks:\n{lines}\n",
        key=f"{profile}-validation-report", description=f"{profile}: great-expectations + file checks: {verdict}")


# ---------------------------------------------------------------------------------------------
# command line: `python -m flows.pipeline` (and `mrt run`, which calls run())
# ---------------------------------------------------------------------------------------------
def run(params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Check the params before Prefect starts (a typo fails in a second, not after a server start),
    then run the flow."""
    set_offline_env()
    params = load(params_file, overrides)
    check_wiring(params)
    repro.check_workspace(".")
    lifeline.end_orphaned_runs(params.track)  # runs a killed pipeline left RUNNING end KILLED
    return mrt_pipeline(params_file=params_file, overrides=list(overrides or []), force=force)


def main(argv: list[str] | None = None) -> int:
    from components.core.config import ParamsError

    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("-p", "--params", default="params.yaml", help="params file (a profile)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="override: section.key=value (DVC syntax); repeatable")
    ap.add_argument("--force", action="store_true", help="run every stage, stale or not (dvc repro --force)")
    args = ap.parse_args(argv)
    try:
        result = run(args.params, args.overrides, args.force)
    except ParamsError as exc:
        print(f"params error:\n{exc}", file=sys.stderr)
        return 2
    except PipelineStopped as exc:
        print(f"pipeline stopped: {exc}", file=sys.stderr)
        return 1
    except repro.ReproError as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    if result.get("status") == UP_TO_DATE:
        return 0
    print(f"summary: {result['summary']}  MLflow parent run: {result['parent_run_id']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
