"""`mrt`: one command per pipeline stage. Each reads its params section, takes paths, writes outputs.

Heavy libraries (torch, transformers, great-expectations) are imported inside the commands so that
`mrt --help` and `mrt params` answer instantly. Errors a user can fix (bad params, bad data, a wrong
editor file) print one clear message and exit non-zero; set MRT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from components.core.offline import set_offline_env

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params file (a profile)")
SetOpt = typer.Option(None, "--set", "-S", help="override: section.key=value (DVC syntax); repeatable")


def _err(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)


def _friendly(fn: Callable) -> Callable:
    """Turn user-fixable errors into one message and an exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from components.core.config import ParamsError
        from components.data.records import DataError

        try:
            return fn(*args, **kwargs)
        except ParamsError as exc:
            _err(f"params error:\n{exc}")
            raise typer.Exit(EXIT_BAD_PARAMS) from None
        except (DataError, OSError, ValueError, KeyError) as exc:
            if os.environ.get("MRT_DEBUG"):
                raise
            kind = "data error" if isinstance(exc, DataError) else "error"
            _err(f"{kind}: {exc}")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def _summary(result: dict) -> str:
    """The report without its per-record examples (those stay in the report file)."""
    return json.dumps({k: v for k, v in result.items() if not k.endswith("examples")}, indent=2, default=str)


def _headline(kind: str, report: str, out: str) -> None:
    """The stage's headline metrics file (components.experiments.headline) beside its full report."""
    from components.experiments.headline import write_from_report

    if Path(report).is_file():
        write_from_report(kind, report, out)


def _load(params: str, overrides: Optional[List[str]]):
    from components.core.config import load_params
    from components.data.images import AnswerLimits, ImageLimits, configure, configure_answers

    cfg = load_params(params, overrides or [])
    configure(ImageLimits.from_validate(cfg.validate_))  # one input guard for every command
    configure_answers(AnswerLimits.from_validate(cfg.validate_))
    return cfg


@app.command("params")
@_friendly
def params_cmd(
    params: str = ParamsOpt,
    set_: Optional[List[str]] = SetOpt,
    count: bool = typer.Option(False, "--count", help="count editor parameters instead of printing params"),
    defaults: bool = typer.Option(False, "--defaults",
                                  help="print the defaults (what params.yaml holds) instead of the params file"),
    model: str = typer.Option(
        "llava-1.5-7b",
        "--model",
        help="with --count: 'llava-1.5-7b' (built on the meta device, the paper's placement) or a base folder "
        "(the placement in params)",
    ),
) -> None:
    """Print the resolved params (after -S overrides), the defaults with --defaults, or count editor
    parameters with --count."""
    import yaml

    if defaults:
        from components.core.config import Params

        typer.echo(yaml.safe_dump(Params().to_dict(), sort_keys=False), nl=False)
        return
    cfg = _load(params, set_)
    if not count:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    from components.editors.count import count_report

    report = count_report(model, cfg.train.editors)
    typer.echo(json.dumps(report, indent=2))


@app.command("data")
@_friendly
def data_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Write the data set (embedded visionflan-mini, or the real Vision-Flan/MME pointed at by params)."""
    from components.data.generate import write_dataset

    cfg = _load(params, set_)
    manifest = write_dataset(cfg.data)
    typer.echo(f"wrote {manifest}")


@app.command("validate")
@_friendly
def validate_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Validate the data (great-expectations suite, file checks, leakage); non-zero exit on failure."""
    from components.data.validation import validate_dataset

    cfg = _load(params, set_)
    report = validate_dataset(cfg.validate_)
    _headline("validate", cfg.validate_.report, cfg.validate_.metrics)
    typer.echo(report.summary())
    typer.echo(f"report: {cfg.validate_.report}")
    if not report.success:
        raise typer.Exit(EXIT_FAILED)


@app.command("align")
@_friendly
def align_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Build the frozen base: stage-one alignment (tiny/composed) or load a LLaVA checkpoint."""
    from components.align.run import align

    cfg = _load(params, set_)
    result = align(cfg.align)
    _headline("align", cfg.align.report, cfg.align.metrics)
    typer.echo(_summary(result))
    typer.echo(f"report: {cfg.align.report}")


@app.command("train")
@_friendly
def train_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Train editors (mrt) or a baseline (lora, full, frozen) on the frozen base (a live MLflow run)."""
    from components.core.hashing import params_hash
    from components.track.stage_runs import tracked_train

    cfg = _load(params, set_)
    result, run_id = tracked_train(cfg.track, cfg.train, role="candidate",
                                   tags={"mrt.params_hash": params_hash(cfg), "mrt.params_file": params})
    _headline("train", cfg.train.report, cfg.train.metrics)
    typer.echo(_summary(result))
    typer.echo(f"report: {cfg.train.report}" + (f"  MLflow run: {run_id}" if run_id else ""))


@app.command("benchmark")
@_friendly
def benchmark_cmd(
    params: str = ParamsOpt,
    set_: Optional[List[str]] = SetOpt,
    model_dir: Optional[str] = typer.Option(
        None, "--model-dir", help="editors/LoRA/full/frozen folder (default: benchmark.model_dir; 'none' = bare base)"
    ),
) -> None:
    """Score a model on the held-out tasks and the MME-format set (plus robustness passes); the
    scores go into the MLflow run that trained the model."""
    from components.track.benchmark_runs import tracked_benchmark

    cfg = _load(params, set_)
    bench = cfg.benchmark
    if model_dir is not None:
        bench = bench.model_copy(update={"model_dir": None if model_dir.lower() == "none" else model_dir})
    report, _ = tracked_benchmark(cfg.track, bench)
    _headline("benchmark", bench.report, bench.metrics)
    keys = ("heldout", "heldout_mean", "heldin_mean", "mme_perception", "mme_total", "mme_chance_total",
            "mme_majority_total", "mme_collapsed", "real_image_mean", "wall_s")
    summary = {k: report.get(k) for k in keys}
    for split in ("heldout", "heldin"):  # every mean beside chance and the best constant answer
        s = report.get(f"{split}_summary") or {}
        summary[f"{split}_baselines"] = {k: s.get(k) for k in ("chance_mean", "majority_mean", "train_majority_mean",
                                                                "chance_corrected_mean", "collapsed_tasks")}
    summary["robustness"] = {k: v.get("heldout_mean") for k, v in (report.get("robustness") or {}).items()}
    typer.echo(json.dumps(summary, indent=2, default=str))
    typer.echo(f"report: {bench.report}  predictions: {bench.predictions}")


@app.command("ablate")
@_friendly
def ablate_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Sweep editor placements (ablate section): each arm trains and benchmarks; CSV, Markdown table, plot."""
    from components.experiments.ablation import run_ablation

    cfg = _load(params, set_)
    runner = None
    if cfg.ablate.executor == "ray":  # Ray (through prefect-ray) lives in flows/; the local pool needs neither
        from flows.ray_runner import jobs_runner

        runner = jobs_runner(cfg.ablate)
    rows = run_ablation(cfg.ablate, cfg.train, cfg.benchmark, runner=runner, track=cfg.track)
    _headline("ablate", cfg.ablate.report_csv, cfg.ablate.metrics)
    failed = [r for r in rows if r.get("status") != "ok"]
    typer.echo(f"{len(rows) - len(failed)}/{len(rows)} arms ok; table: {cfg.ablate.report_md}, plot: {cfg.ablate.plot}")
    if failed:
        raise typer.Exit(EXIT_FAILED)


@app.command("compare")
@_friendly
def compare_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """MRT against LoRA, full fine-tuning and the frozen base on identical data, steps and seeds."""
    from components.experiments.compare import run_compare

    cfg = _load(params, set_)
    run_compare(cfg.compare, cfg.train, cfg.benchmark, track=cfg.track)
    _headline("compare", cfg.compare.report, cfg.compare.metrics)
    typer.echo(Path(cfg.compare.table).read_text(encoding="utf-8"))
    typer.echo(f"report: {cfg.compare.report}")


@app.command("report")
@_friendly
def report_cmd(
    params: str = ParamsOpt,
    set_: Optional[List[str]] = SetOpt,
    readme: Optional[str] = typer.Option(
        None, "--readme", help="file with the results markers (default: report.readme; the block is also "
        "written alone to report.results)"
    ),
    results: bool = typer.Option(True, "--results/--no-results", help="write the results block"),
    reliability: Optional[str] = typer.Option(
        None, "--reliability", help="also write the Reliability table from this pytest --reliability-report JSON"
    ),
    reliability_doc: str = typer.Option(
        "docs/reliability.md", "--reliability-doc", help="file with the reliability markers"
    ),
) -> None:
    """Write README's results table from the comparison (and ablation) reports — never by hand."""
    from components.core.markdown import ReportError
    from components.experiments import report as rep

    cfg = _load(params, set_)
    if not results and not reliability:
        raise ReportError("nothing to write: --no-results without --reliability FILE")
    target = readme if readme is not None else cfg.report.readme
    if results:
        ablation_csv = cfg.ablate.report_csv if Path(cfg.ablate.report_csv).exists() else None
        _, sources = rep.write_results(cfg.report.results, cfg.compare.report, ablation_csv, target or None)
        typer.echo(f"wrote {cfg.report.results}" + (f" and {target}'s results block" if target else "")
                   + f" from {', '.join(sources)}")
    if reliability:
        readme = target or "README.md"
        from components.experiments.reliability import write_readme_reliability

        write_readme_reliability(reliability_doc, reliability)
        typer.echo(f"updated {reliability_doc}'s reliability table from {reliability}")


@app.command("promote")
@_friendly
def promote_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Register the benchmarked candidate (alias candidate); move `champion` only if the gate passes."""
    from mlflow.exceptions import MlflowException

    from components.track.registry import PromotionError, promote
    from components.track.tracking import TrackingError

    cfg = _load(params, set_)
    try:
        decision = promote(cfg, params_file=params)
    except (TrackingError, PromotionError, MlflowException) as exc:
        if os.environ.get("MRT_DEBUG"):
            raise
        _err(f"promotion failed: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    _headline("promote", cfg.promote.report, cfg.promote.metrics)
    typer.echo(decision.markdown())
    typer.echo(f"report: {cfg.promote.report}")


@app.command("run")
@_friendly
def run_cmd(
    params: str = ParamsOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="run every stage, stale or not (dvc repro --force)"),
) -> None:
    """The whole pipeline as one Prefect flow whose tasks run the dvc.yaml stages (data → validate →
    align → train → benchmark → ablate → compare → promote → report); DVC decides what is stale.
    A profile or -S override is written into params.yaml first (DVC reads params.yaml)."""
    from components.track.lifeline import install_signal_handlers, start_watchdog
    from flows.pipeline import UP_TO_DATE, PipelineStopped, run
    from flows.repro import ReproError

    install_signal_handlers()  # SIGTERM/SIGHUP: runs end FAILED, Prefect's temporary server stops
    start_watchdog()  # SIGKILL: the watchdog stops what this process started
    try:
        result = run(params, set_ or [], force)
    except PipelineStopped as exc:
        _err(f"pipeline stopped: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except ReproError as exc:
        _err(f"pipeline failed: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    if result.get("status") == UP_TO_DATE:
        typer.echo(result["message"])
    else:
        typer.echo(f"summary: {result['summary']}  MLflow parent run: {result['parent_run_id']}")


@app.command("deploy")
@_friendly
def deploy_cmd(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Scheduled retraining (deploy section): serve the cron deployment here (work_pool null; blocks
    until Ctrl-C) or register it on a work pool for its workers. Needs a Prefect server that outlives
    this command (PREFECT_API_URL); without one it refuses instead of serving on a temporary server."""
    from flows.deploy import DeployError, api_url, deploy

    cfg = _load(params, set_)
    dp = cfg.deploy
    try:
        url = api_url()
    except DeployError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    where = f"work pool {dp.work_pool!r}" if dp.work_pool else "this process (Ctrl-C to stop)"
    typer.echo(f"deployment mrt-pipeline/{dp.name} on the Prefect server {url}: cron '{dp.cron}' ({dp.timezone}), "
               f"params {dp.params_file}, runs on {where}")
    stopped = (f"stopped serving mrt-pipeline/{dp.name}: no more scheduled runs from this process "
               "(the deployment stays registered on the server)")

    def forced() -> None:
        typer.echo(stopped + "; Prefect's shutdown did not finish in time and was cut short")

    try:
        dep_id = deploy(dp, forced)  # serving: returns once Ctrl-C / SIGTERM stopped it
    except KeyboardInterrupt:  # Ctrl-C before serving began (while registering)
        dep_id = None
    if dp.work_pool is None:
        typer.echo(stopped)
    elif dep_id:
        typer.echo(f"registered deployment {dep_id}; start a worker: prefect worker start --pool {dp.work_pool}")


@app.command("predict")
@_friendly
def predict_cmd(
    prompt: List[str] = typer.Option(..., "--prompt", help="instruction; repeat for a batch"),
    image: Optional[List[str]] = typer.Option(None, "--image", help="image file; one per --prompt"),
    base: Optional[str] = typer.Option(None, "--base", help="base model folder (default: train.base_dir)"),
    editors: Optional[str] = typer.Option(
        None, "--editors", help="editors/adapter folder (default: train.out_dir; 'none' for the bare base)"
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="a registered version instead of folders: models:/<name>@<alias> or models:/<name>/<n>"
    ),
    params: str = ParamsOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Answer prompts about images with greedy decoding, with or without editors."""
    from components.evaluation.inference import predict

    cfg = _load(params, set_)
    images = list(image or [])
    if images and len(images) != len(prompt):
        raise ValueError(f"got {len(images)} --image and {len(prompt)} --prompt; give one image per prompt")
    if model is not None:
        if base is not None or editors is not None:
            raise ValueError("--model names a registered version: use it without --base/--editors")
        from mlflow.exceptions import MlflowException

        from components.track.pyfunc_model import BaseModelError
        from components.track.registry import resolve_version
        from components.track.tracking import TrackingError

        try:
            found = resolve_version(model, track=cfg.track)
        except (TrackingError, MlflowException, BaseModelError) as exc:
            raise ValueError(f"{model}: {exc}") from None
        base, adapter, fingerprint = found["base_dir"], found["adapter_dir"], found["fingerprint"]
    else:
        adapter = None if editors == "none" else (editors or cfg.train.out_dir)
        fingerprint = None
    answers = predict(
        base_dir=base or cfg.train.base_dir,
        adapter_dir=adapter,
        images=images or [None] * len(prompt),
        prompts=list(prompt),
        params=cfg.predict,
        expect_fingerprint=fingerprint,
    )
    for q, a in zip(prompt, answers):
        typer.echo(json.dumps({"prompt": q, "answer": a}, ensure_ascii=False))


def main() -> None:
    set_offline_env()
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
