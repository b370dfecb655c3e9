"""The stage commands log their own MLflow runs while they work: live step metrics with real
timestamps and durations, one param schema for every method, the data set as an input, MLflow's
source tags, held-out scores from the benchmark only — and no tracking server is no reason to fail."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from promotion_helpers import fast_track
from typer.testing import CliRunner

from components.track import tracking
from components.core.config import Params
from components.core.hashing import dir_hash

REPO = Path(__file__).resolve().parents[1]


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _params_file(tmp_path: Path, data: Path, base: Path, track=None, **train_kw) -> tuple[Path, Params]:
    from tiny_sweep import bench_params, train_params

    out = tmp_path / "editors"
    tp = train_params(tmp_path, data, base, out_dir=str(out), report=str(tmp_path / "train.json"),
                      curve=str(tmp_path / "curve.csv"), **train_kw)
    bp = bench_params(tmp_path, data, base).model_copy(update={"model_dir": str(out), "perturbations": []})
    params = Params.model_validate({"train": tp.model_dump(mode="json"), "benchmark": bp.model_dump(mode="json"),
                                    "track": (track or fast_track()).model_dump()})
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.to_dict()))
    return pfile, params


def _runs(role: str | None = None) -> list:
    exp = _client().get_experiment_by_name("mrt")
    runs = _client().search_runs([exp.experiment_id], max_results=200)
    return [r for r in runs if role is None or r.data.tags.get("mrt.role") == role]


def test_mrt_train_logs_live_and_mrt_benchmark_scores_the_same_run(store, tiny_setup, tmp_path):
    from flows.cli import app

    data, base = tiny_setup
    pfile, params = _params_file(tmp_path, data, base, steps=8, batch_size=2)
    res = CliRunner().invoke(app, ["train", "-p", str(pfile)])
    assert res.exit_code == 0, res.output
    (run,) = _runs("candidate")
    assert run.info.status == "FINISHED" and f"MLflow run: {run.info.run_id}" in res.output
    history = _client().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 9))
    stamps = [m.timestamp for m in history]
    assert len(set(stamps)) >= 2 and stamps == sorted(stamps)  # stamped as each step ended, not replayed
    assert run.info.start_time <= stamps[0] and stamps[-1] <= run.info.end_time
    report = json.loads(Path(params.train.report).read_text())
    assert (run.info.end_time - run.info.start_time) / 1000 >= report["train_wall_s"]  # the run spans training
    metrics = run.data.metrics
    assert metrics["quick_heldout/mean"] == pytest.approx(report["heldout_mean"])
    assert not [k for k in metrics if k.startswith("heldout/")]  # held-out scores come from the benchmark
    assert run.data.params["train.method"] == "mrt" and run.data.params["train.steps"] == "8"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == dir_hash(data)[:16] and json.loads(inp.dataset.profile)["sha256"] == dir_hash(data)
    assert json.loads(inp.dataset.source)["uri"] == str(Path(data).resolve())
    assert run.data.tags[tracking.MODEL_HASH_TAG] == tracking.model_hash(params.train.out_dir)
    assert {a.path for a in _client().list_artifacts(run.info.run_id, "editors")} >= {"editors/editors.safetensors"}

    res = CliRunner().invoke(app, ["benchmark", "-p", str(pfile)])
    assert res.exit_code == 0, res.output
    assert len(_runs()) == 1  # the benchmark scored the training run, it made no run of its own
    bench = json.loads(Path(params.benchmark.report).read_text())
    metrics = _client().get_run(run.info.run_id).data.metrics
    assert metrics["heldout/mean"] == pytest.approx(bench["heldout_mean"])
    assert metrics["quick_heldout/mean"] == pytest.approx(report["heldout_mean"])  # two evaluations, two keys


def test_candidate_baselines_and_arms_share_one_param_schema(store, tiny_setup, tmp_path, monkeypatch):
    from tiny_sweep import ablate_params, bench_params, compare_params, train_params

    from components.experiments.ablation import run_ablation
    from components.experiments.compare import run_compare
    from components.track.stage_runs import tracked_train

    data, base = tiny_setup
    tracking.configure(store)
    pipeline = tracking.start_run(store, "mrt-pipeline")
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, pipeline)  # what the pipeline flow sets for its stages
    tp = train_params(tmp_path, data, base, out_dir=str(tmp_path / "cand"), report=str(tmp_path / "c.json"),
                      curve=str(tmp_path / "c.csv"))
    bp = bench_params(tmp_path, data, base).model_copy(update={"perturbations": []})
    tracked_train(store, tp)
    run_compare(compare_params(tmp_path, methods=["lora", "frozen"], seeds=[0]), tp, bp, report=None, track=store)
    run_ablation(ablate_params(tmp_path, arms=["only-visual"]), tp, bp, report=None, track=store)

    training = {r.data.tags["mrt.role"] + "/" + r.data.params.get("train.method", "?"): r
                for r in _runs() if r.data.tags.get("mrt.role") in ("candidate", "baseline", "ablation")}
    assert set(training) == {"candidate/mrt", "baseline/lora", "baseline/frozen", "ablation/mrt"}, set(training)
    schemas = {name: set(r.data.params) for name, r in training.items()}
    assert all(s == schemas["candidate/mrt"] for s in schemas.values()), {
        n: s ^ schemas["candidate/mrt"] for n, s in schemas.items()}
    for name, r in training.items():
        assert r.data.tags["mrt.method"] == r.data.params["train.method"] != "unknown"
        assert r.info.status == "FINISHED"
    for name in ("baseline/lora", "baseline/frozen", "ablation/mrt"):  # scored by their benchmark
        assert "heldout/mean" in training[name].data.metrics and "mme/total" in training[name].data.metrics
    (compare,) = _runs("compare")
    (sweep,) = _runs("ablation-sweep")
    assert training["candidate/mrt"].data.tags["mlflow.parentRunId"] == pipeline
    assert compare.data.tags["mlflow.parentRunId"] == pipeline == sweep.data.tags["mlflow.parentRunId"]
    assert training["baseline/lora"].data.tags["mlflow.parentRunId"] == compare.info.run_id
    assert training["ablation/mrt"].data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert training["ablation/mrt"].data.tags["mrt.arm"] == "only-visual"


def test_no_metric_for_mme_subtasks_that_are_not_in_the_set():
    from components.track.benchmark_runs import flat_metrics

    report = {"model": {"trainable_params": 1, "trainable_pct": 0.1}, "heldout": {"t": 0.5}, "heldout_mean": 0.5,
              "mme": {"existence": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}, "mme_perception": 50.0,
              "mme_cognition": 0.0, "mme_total": 50.0, "robustness": {}, "real_image_mean": None}
    flat = flat_metrics(report)
    assert flat["mme/perception"] == 50.0 and flat["mme/total"] == 50.0 and "mme/cognition" not in flat
    report["mme"]["code_reasoning"] = {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    report["mme_cognition"] = 50.0
    assert flat_metrics(report)["mme/cognition"] == 50.0


def test_runs_carry_mlflow_source_tags_with_the_commit(monkeypatch, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(REPO)
    tags = tracking.source_tags("mrt train")
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.name"] == "mrt train"
    monkeypatch.chdir(tmp_path)  # outside any checkout: no commit rather than a wrong one
    assert "mlflow.source.git.commit" not in tracking.source_tags()


def test_mrt_train_without_a_reachable_tracking_server_trains_untracked(tiny_setup, tmp_path, monkeypatch):
    from flows.cli import app

    data, base = tiny_setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    pfile, params = _params_file(tmp_path, data, base, track=fast_track(retries=0))
    res = CliRunner().invoke(app, ["train", "-p", str(pfile)])
    assert res.exit_code == 0, res.output
    assert "unreachable" in res.output and "runs untracked" in res.output
    assert json.loads(Path(params.train.report).read_text())["steps"] == params.train.steps
