"""`mrt ablate`: a sweep over editor placements, each arm trained and benchmarked on its own.

Why it is built this way:
- The grid is a pure function of (ablate params, the placement in `train.editors`): `expand_grid`
  imports no torch, so `mrt ablate --list`-style checks, DVC and tests see the arms instantly, and
  arm names are stable ids ("only-visual", "no-prefix", "depth-odd", "len-2", "rank-x2") that
  `ablate.arms` can pick from.
- Each arm is one *job*: plain dicts of TrainParams/BenchmarkParams (never models), so the same
  job runs in this process (workers == 1) or in a spawned worker of a process pool. Workers are
  spawned, not forked: a forked torch with live threads can deadlock.
- A failing arm is recorded (status "failed" + the error) and the sweep goes on. A worker that dies
  outright (out of memory, a segfault) breaks a whole ProcessPoolExecutor without saying which job
  killed it, so the jobs caught in a broken pool are re-run one process each: the culprit fails
  alone and the innocent ones finish.
- Arms write into `<ablate.out_dir>/<arm>/seed-<n>/` (editors, train/benchmark reports, a log); an
  arm killed mid-training resumes from its checkpoints when the sweep is re-run (same inputs only),
  while an arm that finished removed them and trains again.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from components.train.methods import METHODS
from components.core.config import AblateParams, BenchmarkParams, EditorParams, ParamsError, TrackParams, TrainParams

GROUPS = ("visual", "projector", "prefix", "suffix")
LAYERED = ("visual", "prefix", "suffix")  # groups with a depth (layer spec)
POSITIONAL = ("prefix", "suffix")  # groups with a token length

# The grids. Default: sized for 2 CPU cores (~16 arms x 300 steps in about 5 minutes with 2 workers).
# Full: every variant of the paper's ablations (docs/method.md: rank grid, group removal, length 2-10, depth).
DEFAULT_DEPTHS = ("odd", "first_half", "second_half")
FULL_DEPTHS = ("odd", "even", "first_half", "second_half")
DEFAULT_LENGTHS = (2, 6)
FULL_LENGTHS = (1, 2, 6, 8, 10)
DEFAULT_RANK_FACTORS = (0.5, 2.0)
FULL_RANK_FACTORS = (0.5, 2.0, 4.0)
FULL_RANK_GRID = (2, 4, 6, 8)  # visual rank x multimodal (projector, prefix, suffix) rank, as in the paper

GROUP_FAMILIES = ("reference", "only", "leave-one-out")  # the arms that add or remove whole groups

LOG_NAME = "log.txt"
EXTRA_POOL_ATTEMPTS = 1  # re-runs, in a process of its own, of a job caught in a broken pool


@dataclass(frozen=True)
class Arm:
    """One point of the sweep: a named placement trained with one seed."""

    name: str
    editors: EditorParams
    seed: int
    family: str  # reference | only | leave-one-out | depth | length | rank

    @property
    def key(self) -> str:
        return f"{self.name}/seed-{self.seed}"


# ---------------------------------------------------------------------------------------------
# the grid (pure)
# ---------------------------------------------------------------------------------------------
def enabled_groups(editors: EditorParams) -> list[str]:
    """Groups that place at least one editor (before resolving layer words against a model)."""
    on = []
    for g in GROUPS:
        if g == "projector":
            if editors.projector.enabled:
                on.append(g)
        elif getattr(editors, g).layers not in ("none", []):
            on.append(g)
    return on


def _edit(base: EditorParams, changes: dict[str, dict[str, Any]]) -> EditorParams:
    raw = base.model_dump(mode="json")
    for group, fields in changes.items():
        raw[group].update(fields)
    return EditorParams.model_validate(raw)


def _off(group: str) -> dict[str, Any]:
    return {"enabled": False} if group == "projector" else {"layers": "none"}


def _scale(rank: int, factor: float) -> int:
    return max(1, int(math.floor(rank * factor + 0.5)))


def _factor_name(f: float) -> str:
    return f"x{f:g}"


def _depth_name(word: str) -> str:
    return "depth-" + word.replace("_", "-")


def placement_variants(grid: str, base: EditorParams) -> list[tuple[str, str, EditorParams]]:
    """(name, family, editors) of every distinct placement in `grid`, reference first.

    Variants that would place no editor at all, or that repeat an earlier variant's placement
    (e.g. "only-visual" when visual is the only group on), are left out: they cost a training run
    and say nothing new.
    """
    if grid not in ("default", "full"):
        raise ParamsError(f"ablate.grid: unknown grid {grid!r} (expected default or full)")
    on = enabled_groups(base)
    if not on:
        raise ParamsError("train.editors: every group is off (layers none, projector disabled); nothing to ablate")
    full = grid == "full"
    out: list[tuple[str, str, EditorParams]] = [("all", "reference", base)]
    for g in on:
        out.append((f"only-{g}", "only", _edit(base, {o: _off(o) for o in GROUPS if o != g})))
    for g in on:
        out.append((f"no-{g}", "leave-one-out", _edit(base, {g: _off(g)})))
    layered = [g for g in on if g in LAYERED]
    for word in FULL_DEPTHS if full else DEFAULT_DEPTHS:
        if layered:
            out.append((_depth_name(word), "depth", _edit(base, {g: {"layers": word} for g in layered})))
    positional = [g for g in on if g in POSITIONAL]
    for length in FULL_LENGTHS if full else DEFAULT_LENGTHS:
        if positional:
            out.append((f"len-{length}", "length", _edit(base, {g: {"length": length} for g in positional})))
    for f in FULL_RANK_FACTORS if full else DEFAULT_RANK_FACTORS:
        changes = {g: {"rank": _scale(getattr(base, g).rank, f)} for g in on}
        out.append((f"rank-{_factor_name(f)}", "rank", _edit(base, changes)))
    if full:
        multimodal = [g for g in on if g != "visual"]
        for v in FULL_RANK_GRID if "visual" in on else (None,):
            for m in FULL_RANK_GRID if multimodal else (None,):
                changes = {"visual": {"rank": v}} if v is not None else {}
                changes.update({g: {"rank": m} for g in multimodal} if m is not None else {})
                name = "rank-" + "-".join(x for x in (v and f"v{v}", m and f"m{m}") if x)
                out.append((name, "rank", _edit(base, changes)))

    seen: list[EditorParams] = []
    distinct = []
    for name, family, editors in out:
        if not enabled_groups(editors) or any(editors == s for s in seen):
            continue
        seen.append(editors)
        distinct.append((name, family, editors))
    return distinct


def arm_seeds(p: AblateParams) -> tuple[list[int], list[int]]:
    """(seeds of every arm, seeds of the group arms): `seeds`, and `seeds` + `group_seeds`, each
    without repeats (a repeated seed would train twice into one folder)."""
    return list(dict.fromkeys(p.seeds)), list(dict.fromkeys([*p.seeds, *p.group_seeds]))


def expand_grid(p: AblateParams, base: EditorParams) -> list[Arm]:
    """The arms to run: every placement of `p.grid` (or those named in `p.arms`) x every seed in `p.seeds`,
    and the group arms (reference, only-*, no-*) also x `p.group_seeds`.

    Order is the grid's (reference, only-*, no-*, depth-*, len-*, rank-*), seeds innermost. A name in
    `p.arms` that the grid does not hold is an error listing the valid names.
    """
    variants = placement_variants(p.grid, base)
    names = [name for name, _, _ in variants]
    unknown = [a for a in dict.fromkeys(p.arms) if a not in names]
    if unknown:
        raise ParamsError(
            f"ablate.arms: unknown arm {', '.join(repr(u) for u in unknown)} for grid {p.grid!r} "
            f"and this train.editors placement; valid arms: {', '.join(names)}"
        )
    wanted = set(p.arms)
    seeds, group_seeds = arm_seeds(p)
    return [
        Arm(name, editors, seed, family)
        for name, family, editors in variants
        if not wanted or name in wanted
        for seed in (group_seeds if family in GROUP_FAMILIES else seeds)
    ]


# ---------------------------------------------------------------------------------------------
# jobs: train + benchmark, runnable in this process or in a spawned worker
# ---------------------------------------------------------------------------------------------
def make_job(
    key: str,
    train: TrainParams,
    bench: BenchmarkParams,
    folder: str | Path,
    *,
    per_task: int | None,
    **train_changes: Any,
) -> dict[str, Any]:
    """A picklable job: train `train` (with `train_changes`) into `folder`, then benchmark it there.

    Every output of the job lives in `folder`; the benchmark reads the base the job trained on and
    skips the robustness passes (an ablation compares placements, not perturbations).
    """
    folder = Path(folder)
    tp = train.model_copy(
        update={"out_dir": str(folder), "report": str(folder / "train.json"), "curve": str(folder / "train_curve.csv"),
                **train_changes}
    )
    tp = TrainParams.model_validate(tp.model_dump(mode="json"))  # re-validate the changed copy
    bp = bench.model_copy(
        update={
            "base_dir": tp.base_dir,
            "model_dir": str(folder),
            "report": str(folder / "benchmark.json"),
            "predictions": str(folder / "predictions.jsonl"),
            "mme_results_dir": str(folder / "mme_results"),
            "perturbations": [],
            "per_task": per_task,
        }
    )
    bp = BenchmarkParams.model_validate(bp.model_dump(mode="json"))
    return {
        "key": key,
        "train": tp.model_dump(mode="json"),
        "bench": bp.model_dump(mode="json"),
        "log": str(folder / LOG_NAME),
    }


def _set_threads_env(threads: int) -> None:
    for var in ("MRT_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def _warm_modules(jobs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """Heavy modules every job will import: loaded once per worker up front, so that the first job
    of each worker is not charged their import time and arms' wall times stay comparable."""
    mods = ["torch", "transformers", "components.train.training", "components.evaluation.benchmark", "components.evaluation.inference"]
    for name in dict.fromkeys(j["train"].get("method", "mrt") for j in jobs):
        mods += [m for m in METHODS[name].warm_imports if m not in mods]
    if any(j.get("tracking") for j in jobs):
        mods += ["mlflow", "mlflow.tracking", "components.track.stage_runs"]
    return tuple(mods)


def _warm(modules: Sequence[str]) -> None:
    import importlib

    for name in modules:
        with contextlib.suppress(ImportError):  # a missing module is reported by the job that needs it
            importlib.import_module(name)
    with contextlib.suppress(ImportError):
        from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401 - lazy in transformers


def _init_worker(threads: int, modules: Sequence[str] = ()) -> None:
    """Runs first in every spawned worker: offline env and thread count before torch is imported."""
    from components.core.offline import set_offline_env

    set_offline_env()
    _set_threads_env(threads)
    _warm(modules)


@contextlib.contextmanager
def _log_to(path: str | None):
    """Send the job's progress lines to its log file: arms running side by side would interleave
    their bars on one terminal. The parent prints one line per finished arm instead."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train then benchmark one job; never raises for a failure of the job itself."""
    t0 = time.time()
    out: dict[str, Any] = {"key": job["key"], "status": "ok", "error": "", "pid": os.getpid(),
                           "train": None, "benchmark": None}

    def fail(exc: Exception) -> None:
        out["status"] = "failed"
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=20)

    try:
        with _log_to(job.get("log")):
            print(f"=== {job['key']}: started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})", flush=True)
            try:
                from components.evaluation.benchmark import run_benchmark
                from components.train.training import train

                tp = TrainParams.model_validate(job["train"])
                bp = BenchmarkParams.model_validate(job["bench"])
                trk = job.get("tracking")
                if trk:  # a live MLflow run for this job (components.track.stage_runs)
                    from components.core.config import TrackParams
                    from components.track.benchmark_runs import tracked_benchmark
                    from components.track.stage_runs import tracked_train

                    track = TrackParams.model_validate(trk["track"])
                    out["train"], out["run_id"] = tracked_train(
                        track, tp, role=trk["role"], name=trk["name"], tags=trk.get("tags"), parent=trk.get("parent"),
                        system_metrics=False)
                    out["benchmark"] = (tracked_benchmark(track, bp, run_id=out["run_id"], label=job["key"])[0]
                                        if out["run_id"] else run_benchmark(bp, label=job["key"]))
                else:
                    out["train"] = train(tp)
                    out["benchmark"] = run_benchmark(bp, label=job["key"])
            except Exception as exc:  # noqa: BLE001 - a failing arm is a result, not the end of the sweep
                fail(exc)
                print(out["traceback"], file=sys.stderr)  # into the job's log
    except OSError as exc:  # the log itself cannot be opened (folder not writable)
        fail(exc)
    out["job_wall_s"] = round(time.time() - t0, 2)
    tr, bm = out["train"] or {}, out["benchmark"] or {}
    # The time of the work itself (what train and benchmark measure), not of the worker's imports.
    parts = [tr.get("wall_s"), bm.get("wall_s")]
    out["wall_s"] = round(sum(parts), 2) if all(x is not None for x in parts) else out["job_wall_s"]
    return out


def _failed(job: dict[str, Any], error: str) -> dict[str, Any]:
    return {"key": job["key"], "status": "failed", "error": error, "pid": None, "train": None,
            "benchmark": None, "wall_s": None, "job_wall_s": None}


@contextlib.contextmanager
def _threads_in_process(threads: int):
    """threads_per_worker for jobs run in this process; the caller's setting comes back afterwards."""
    saved = {v: os.environ.get(v) for v in ("MRT_NUM_THREADS",)}
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch is not None else None
    os.environ["MRT_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        torch = sys.modules.get("torch")
        if torch is not None and saved_torch is not None:
            torch.set_num_threads(saved_torch)


Reporter = Callable[[int, int, dict[str, Any]], None]


def print_progress(done: int, total: int, result: dict[str, Any]) -> None:
    bench = result.get("benchmark") or {}
    if result["status"] == "ok":
        what = f"held-out {bench.get('heldout_mean', float('nan')):.3f}"
        if bench.get("mme_total") is not None:
            what += f", MME {bench['mme_total']:.1f}"
    else:
        what = f"FAILED: {result['error'].splitlines()[0] if result['error'] else ''}"
    print(f"[{done}/{total}] {result['key']}: {what} ({result.get('wall_s') or 0:.0f} s)", file=sys.stderr, flush=True)


def run_jobs(
    jobs: Sequence[dict[str, Any]], workers: int, threads: int, report: Reporter | None = print_progress
) -> list[dict[str, Any]]:
    """Run every job; results in the jobs' order. workers == 1 (or one job) runs them here, one
    after another; otherwise a spawn-context process pool of `workers` processes, each with
    `threads` torch threads."""
    n = len(jobs)
    results: list[dict[str, Any] | None] = [None] * n
    done = 0
    lock = threading.Lock()

    def record(i: int, result: dict[str, Any]) -> None:
        nonlocal done
        with lock:
            results[i] = result
            done += 1
            if report is not None:
                report(done, n, result)

    if n == 0:
        return []
    modules = _warm_modules(jobs)
    if min(workers, n) == 1:
        with _threads_in_process(threads):
            _warm(modules)
            for i, job in enumerate(jobs):
                record(i, run_job(job))
        return results  # type: ignore[return-value]

    ctx = multiprocessing.get_context("spawn")
    caught: list[int] = []
    with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, modules)) as pool:
        futures: dict[Future, int] = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = futures[fut]
                try:
                    record(i, fut.result())
                except BrokenProcessPool:
                    caught.append(i)
                except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be unpickled
                    record(i, _failed(jobs[i], f"{type(exc).__name__}: {exc}"))
    if caught:
        _rerun_isolated(sorted(caught), jobs, workers, threads, modules, ctx, record)
    return results  # type: ignore[return-value]


def _rerun_isolated(indices: Iterable[int], jobs, workers: int, threads: int, modules, ctx, record) -> None:
    """Jobs caught in a broken pool, each in a one-process pool of its own (`workers` at a time)."""

    def one(i: int) -> None:
        last = "the worker process died"
        for _ in range(EXTRA_POOL_ATTEMPTS):
            try:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker,
                                         initargs=(threads, modules)) as pool:
                    record(i, pool.submit(run_job, jobs[i]).result())
                    return
            except BrokenProcessPool as exc:
                last = f"the worker process died (out of memory or a crash in native code): {exc}"
            except Exception as exc:  # noqa: BLE001
                last = f"{type(exc).__name__}: {exc}"
        record(i, _failed(jobs[i], last))

    with ThreadPoolExecutor(max_workers=workers) as threads_pool:
        list(threads_pool.map(one, indices))


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------
def arm_dir(out_dir: str | Path, arm: Arm) -> Path:
    return Path(out_dir) / arm.name / f"seed-{arm.seed}"


def _model_config(base_dir: str):
    """The base's LlavaConfig (config.json only, no weights), to print resolved layers; None if unreadable."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(base_dir))
    except Exception:  # noqa: BLE001 - the arms report the real problem when they load the base
        return None


def ablation_rows(arms: Sequence[Arm], results: Sequence[dict[str, Any]], out_dir: str | Path,
                  model_config: Any = None) -> list[dict[str, Any]]:
    """One flat row per arm x seed (the CSV's rows): placement, size, scores, time, status."""
    from components.editors.placement import describe_placement

    rows = []
    for arm, res in zip(arms, results):
        tr, bm = res.get("train") or {}, res.get("benchmark") or {}
        row: dict[str, Any] = {"arm": arm.name, "seed": arm.seed, "family": arm.family,
                               **describe_placement(arm.editors, model_config)}
        trainable = tr.get("trainable_params")
        if trainable is None:
            trainable = (bm.get("model") or {}).get("trainable_params")
        held_out, held_in = bm.get("heldout_summary") or {}, bm.get("heldin_summary") or {}
        benchmarked = bool(bm)
        row.update(
            trainable_params=trainable,
            heldout_mean=bm.get("heldout_mean"),
            heldout_chance_corrected_mean=held_out.get("chance_corrected_mean"),
            heldin_mean=bm.get("heldin_mean"),
            mme_total=bm.get("mme_total"),
            mme_perception=bm.get("mme_perception"),
            # how many tasks / MME subtasks got one answer for every record (None: not benchmarked)
            collapsed_heldout=len(held_out.get("collapsed_tasks") or []) if benchmarked else None,
            collapsed_heldin=len(held_in.get("collapsed_tasks") or []) if held_in else None,
            collapsed_mme=len(bm.get("mme_collapsed") or []) if bm.get("mme_baselines") else None,
            # the baselines of the evaluated records (the same for every arm scored on them)
            heldout_chance_mean=held_out.get("chance_mean"),
            heldout_majority_mean=held_out.get("majority_mean"),
            heldout_majority_chance_corrected_mean=held_out.get("majority_chance_corrected_mean"),
            heldin_chance_mean=held_in.get("chance_mean"),
            heldin_majority_mean=held_in.get("majority_mean"),
            mme_chance_total=bm.get("mme_chance_total"),
            mme_majority_total=bm.get("mme_majority_total"),
        )
        for task, score in sorted((bm.get("heldout") or {}).items()):
            row[f"heldout/{task}"] = score
        for task, score in sorted((bm.get("heldin") or {}).items()):
            row[f"heldin/{task}"] = score
        row.update(
            train_wall_s=tr.get("train_wall_s"),
            wall_s=res.get("wall_s"),
            status=res["status"],
            error=res.get("error", ""),
            out_dir=str(arm_dir(out_dir, arm)),
        )
        rows.append(row)
    return rows


def run_ablation(ablate: AblateParams, train: TrainParams, bench: BenchmarkParams,
                 report: Reporter | None = print_progress,
                 runner: Callable[..., list[dict[str, Any]]] | None = None,
                 track: TrackParams | None = None) -> list[dict[str, Any]]:
    """Train and benchmark every arm of the grid; write ablate.report_csv, report_md and plot.

    Each arm is `train` with method mrt, the arm's editors and seed, and `ablate.steps` steps, then
    `bench` on the arm's folder with `ablate.per_task` records per held-out task. Returns the CSV's
    rows in grid order (failed arms included, status "failed"). With `track`, the sweep is an
    `ablation` MLflow run and every arm a live child run of it (components.track.stage_runs).
    """
    from components.track.stage_runs import stage_run

    with stage_run(track, "ablation", tags={"mrt.role": "ablation-sweep", "mrt.grid": ablate.grid},
                   params={"ablate": ablate.model_dump(mode="json")}) as sweep:
        rows = _run_ablation(ablate, train, bench, report, runner, track if sweep.active else None, sweep.run_id)
        for path in (ablate.report_csv, ablate.report_md, ablate.plot):
            sweep.artifact(path, "reports")
        return rows


def _run_ablation(ablate: AblateParams, train: TrainParams, bench: BenchmarkParams, report: Reporter | None,
                  runner: Callable[..., list[dict[str, Any]]] | None, track: TrackParams | None,
                  parent: str | None) -> list[dict[str, Any]]:
    from components.experiments.report import ablation_markdown, write_ablation_csv, write_ablation_plot
    from components.core.files import write_text

    arms = expand_grid(ablate, train.editors)
    jobs = [
        make_job(arm.key, train, bench, arm_dir(ablate.out_dir, arm), per_task=ablate.per_task, method="mrt",
                 editors=arm.editors, seed=arm.seed, steps=ablate.steps)
        for arm in arms
    ]
    if track is not None:
        for arm, job in zip(arms, jobs):
            job["tracking"] = {"track": track.model_dump(mode="json"), "parent": parent, "role": "ablation",
                               "name": f"ablation-{arm.name}-seed{arm.seed}",
                               "tags": {"mrt.arm": arm.name, "mrt.family": arm.family}}
    t0 = time.time()
    # `runner(jobs, report)`: another executor with run_jobs' contract (flows.ray_runner.jobs_runner for Ray).
    results = runner(jobs, report) if runner else run_jobs(jobs, ablate.workers, ablate.threads_per_worker, report)
    wall = time.time() - t0
    rows = ablation_rows(arms, results, ablate.out_dir, _model_config(train.base_dir))
    seeds, group_seeds = arm_seeds(ablate)
    meta = {
        "grid": ablate.grid,
        "steps": ablate.steps,
        "lr": train.rate_for("mrt"),
        "seeds": seeds,
        "group_seeds": group_seeds,
        "workers": ablate.workers,
        "executor": ablate.executor,
        "threads_per_worker": ablate.threads_per_worker,
        "per_task": ablate.per_task,
        "base_dir": train.base_dir,
        "data_dir": train.data_dir,
        "wall_s": round(wall, 1),
    }
    write_ablation_csv(ablate.report_csv, rows)
    write_text(ablate.report_md, ablation_markdown(rows, meta))
    write_ablation_plot(ablate.plot, rows, meta)
    return rows
