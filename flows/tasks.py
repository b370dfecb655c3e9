"""Prefect tasks: each one calls the same `components` function as its `mrt <stage>` command.

Why they look like this:
- Tasks take the params file + overrides (and run ids, paths, hashes) and load params themselves;
  they return small dicts of paths, ids and numbers. Models and tensors never cross a task boundary.
- Compute tasks (data, validate, train, benchmark, ablate, compare) are cached by their inputs key
  (`flows.stages`: the dvc.yaml stage's params sections + deps' content hashes), with persisted
  results; a stamp makes sure the outputs on disk are still the ones that key produced.
- Tracking tasks (child runs, artifacts) are cheap, never cached and retried: every pipeline run
  gets a complete MLflow parent with its children even when the computation came from the cache.
- Retries only where a retry can help (file and tracking-server I/O); training is deterministic,
  so retrying a failed training run would fail the same way after minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from components.config import Params, load_params
from flows import stages

IO_RETRIES = 2
IO_RETRY_DELAY_S = 2


def load(params_file: str, overrides: list[str] | None) -> Params:
    return load_params(params_file, list(overrides or []))


def _stage_key(name: str):
    """A Prefect cache_key_fn for the dvc.yaml stage `name`."""

    def key_fn(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
        params = load(parameters["params_file"], parameters.get("overrides"))
        st = stages.stage(params, name)
        return stages.cache_key(st, stages.inputs_key(params, st, parameters.get("known_hashes")))

    key_fn.__name__ = f"cache_key_{name}"
    return key_fn


def outputs_current(params: Params, name: str, known: dict[str, str] | None) -> bool:
    """Whether the outputs on disk are what the stage's current inputs produced (its stamp says so):
    only then may a cached result stand in for running the stage."""
    st = stages.stage(params, name)
    return stages.stamp_valid(params.run.state_dir, st, stages.inputs_key(params, st, known))


def _stamp(params: Params, name: str, known: dict[str, str] | None) -> None:
    """After a successful run: record (inputs key → outputs hash) so the next run may reuse it."""
    st = stages.stage(params, name)
    stages.write_stamp(params.run.state_dir, st, stages.inputs_key(params, st, known))


def _cached_task(name: str, **kw):
    return task(name=f"mrt-{name}", cache_key_fn=_stage_key(name), persist_result=True, **kw)


# ---------------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------------
@_cached_task("data", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def data_task(params_file: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """`mrt data`: write the data set; return its folder and content hash."""
    from components.data.generate import write_dataset
    from components.hashing import dir_hash

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    write_dataset(params.data, progress=False)
    stage_s = time.perf_counter() - t0
    _stamp(params, "data", None)
    return {"data_dir": params.data.out_dir, "data_hash": dir_hash(params.data.out_dir), "stage_s": stage_s}


@_cached_task("validate")
def validate_task(params_file: str, overrides: list[str] | None = None,
                  known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """`mrt validate`: the great-expectations suite, file checks and leakage; never raises for bad data."""
    from components.validation import validate_dataset

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    report = validate_dataset(params.validate_, progress=False)
    stage_s = time.perf_counter() - t0
    _stamp(params, "validate", known_hashes)
    failed = [c.to_dict(cap=20) for c in report.failed_checks]
    return {"success": report.success, "report": params.validate_.report, "summary": report.summary(),
            "failed_checks": failed, "stage_s": stage_s}


BASE_KEY_FILE = "pipeline_inputs.json"


def base_key(params: Params, known: dict[str, str] | None = None) -> str:
    """The base's inputs key: the align stage's params + data + code (dvc.yaml's align deps)."""
    return stages.inputs_key(params, stages.stage(params, "align"), known)


@task(name="mrt-base", cache_policy=NO_CACHE)
def base_task(params_file: str, overrides: list[str] | None = None, known_hashes: dict[str, str] | None = None,
              force: bool = False) -> dict[str, Any]:
    """`mrt align`: build the frozen base — or reuse it when its folder records the same inputs key.

    The key lives in the base folder itself (BASE_KEY_FILE), so a base survives a new Prefect
    server or a copied checkout. `force` does not rebuild it: alignment is deterministic, the same
    key gives the same weights; delete the folder to rebuild."""
    from components.backbone import align
    from components.hashing import dir_hash

    params = load(params_file, overrides)
    key = base_key(params, known_hashes)
    out = Path(params.align.out_dir)
    record = out / BASE_KEY_FILE
    reused = False
    stage_s = 0.0
    if record.is_file() and Path(params.align.report).is_file():
        try:
            reused = json.loads(record.read_text(encoding="utf-8")).get("inputs_key") == key
        except ValueError:
            reused = False
    if not reused:
        record.unlink(missing_ok=True)  # a half-built base must never look valid
        t0 = time.perf_counter()
        align(params.align)
        stage_s = time.perf_counter() - t0
        record.write_text(json.dumps({"inputs_key": key, "data_dir": params.align.data_dir}, indent=2) + "\n",
                          encoding="utf-8")
    return {"base_dir": str(out), "base_hash": dir_hash(out), "inputs_key": key, "reused": reused,
            "report": params.align.report, "stage_s": stage_s}


@_cached_task("train")
def train_task(params_file: str, overrides: list[str] | None = None, known_hashes: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> dict[str, Any]:
    """`mrt train`: the candidate, inside an MLflow child run of the pipeline's parent run with system
    metrics sampled while it trains. Returns the run id and report paths."""
    from components.hashing import params_hash
    from components.stage_runs import tracked_train

    params = load(params_file, overrides)
    tp = params.train
    t0 = time.perf_counter()
    report, run_id = tracked_train(params.track, tp, role="candidate", parent=parent_run_id,
                                   tags={"mrt.params_hash": params_hash(params), "mrt.params_file": params_file})
    stage_s = time.perf_counter() - t0
    _stamp(params, "train", known_hashes)
    return {"run_id": run_id, "out_dir": tp.out_dir, "report": tp.report, "curve": tp.curve,
            "trainable_params": report.get("trainable_params"), "trainable_pct": report.get("trainable_pct"),
            "stage_s": stage_s}


@_cached_task("benchmark")
def benchmark_task(params_file: str, overrides: list[str] | None = None,
                   known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """`mrt benchmark`: the candidate on the held-out tasks and the MME-format set (+ robustness)."""
    from components.benchmark import run_benchmark

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    report = run_benchmark(params.benchmark)
    stage_s = time.perf_counter() - t0
    _stamp(params, "benchmark", known_hashes)
    return {"report": params.benchmark.report, "heldout_mean": report["heldout_mean"],
            "mme_total": report["mme_total"], "trainable_params": report["model"].get("trainable_params"),
            "stage_s": stage_s}


@_cached_task("ablate")
def ablate_task(params_file: str, overrides: list[str] | None = None,
                known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """`mrt ablate`: every arm of the placement grid, trained and benchmarked (process pool)."""
    from components.ablation import run_ablation

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    from flows.ray_runner import jobs_runner

    rows = run_ablation(params.ablate, params.train, params.benchmark, runner=jobs_runner(params.ablate))
    stage_s = time.perf_counter() - t0
    _stamp(params, "ablate", known_hashes)
    return {"rows": rows, "csv": params.ablate.report_csv, "markdown": params.ablate.report_md,
            "plot": params.ablate.plot, "stage_s": stage_s}


@_cached_task("compare")
def compare_task(params_file: str, overrides: list[str] | None = None,
                 known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """`mrt compare`: the baselines (and MRT) on identical data, steps and seeds."""
    from components.compare import run_compare, run_dir

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    summary = run_compare(params.compare, params.train, params.benchmark)
    stage_s = time.perf_counter() - t0
    _stamp(params, "compare", known_hashes)
    runs = [
        {"method": m, "seed": r["seed"], "status": r["status"],
         "dir": str(run_dir(params.compare.out_dir, m, r["seed"]))}
        for m, entry in summary["methods"].items()
        for r in entry["runs"]
    ]
    return {"report": params.compare.report, "table": params.compare.table, "plot": params.compare.plot,
            "runs": runs, "stage_s": stage_s}


# ---------------------------------------------------------------------------------------------
# tracking (never cached, retried)
# ---------------------------------------------------------------------------------------------
@task(name="mrt-log-run", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def log_child_task(params_file: str, overrides: list[str] | None, parent_run_id: str, name: str,
                   tags: dict[str, str], run_params: dict[str, Any], folder: str | None = None,
                   train_report: str | None = None, curve: str | None = None,
                   bench_report: str | None = None, log_model: bool = False) -> str:
    """One finished child run (an ablation arm, a baseline, a cached candidate) from its report files."""
    from components import tracking

    params = load(params_file, overrides)
    track = params.track
    run_id = tracking.start_run(track, name, tags=tags, params=run_params, parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        if train_report and Path(train_report).is_file():
            tracking.log_training(run_id, train_report, curve, folder if log_model else None, track=track)
        if bench_report and Path(bench_report).is_file():
            tracking.log_benchmark(run_id, bench_report, track=track)
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status, track=track)
    return run_id


@task(name="mrt-log-benchmark", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def log_benchmark_task(params_file: str, overrides: list[str] | None, run_ids: list[str], report: str) -> None:
    """The candidate's benchmark metrics onto its run (and the parent): the registry gate reads them."""
    from components import tracking

    params = load(params_file, overrides)
    for run_id in run_ids:
        tracking.log_benchmark(run_id, report, track=params.track)


@task(name="mrt-log-artifacts", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def log_artifacts_task(params_file: str, overrides: list[str] | None, run_id: str, paths: list[str]) -> list[str]:
    """Reports onto the parent run (those that exist)."""
    from components import tracking

    params = load(params_file, overrides)
    logged = []
    for p in paths:
        if p and Path(p).exists():
            tracking.log_artifact(run_id, p, "reports", track=params.track)
            logged.append(p)
    return logged


@task(name="mrt-promote", cache_policy=NO_CACHE)
def promote_task(params_file: str, overrides: list[str] | None, run_id: str) -> dict[str, Any]:
    """`mrt promote`: register the candidate (alias candidate) and move champion only through the gate."""
    from components import registry

    params = load(params_file, overrides)
    t0 = time.perf_counter()
    decision = registry.promote(params, run_id, params_file)
    stage_s = time.perf_counter() - t0
    return {"decision": decision.to_dict(), "markdown": decision.markdown(), "promote": bool(decision.promote),
            "stage_s": stage_s}
