"""components.track.tracking against a real (SQLite) MLflow store: runs, lineage, metrics, retries."""

from __future__ import annotations

import json
import time

import pytest
from promotion_helpers import fast_track

from components.track import tracking
from components.core.config import Params
from components.core.hashing import dir_hash, params_hash


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def test_configure_prefers_env_and_creates_experiment_once(store, tmp_path, monkeypatch):
    uri = tracking.configure(store.model_copy(update={"tracking_uri": "sqlite:///elsewhere.db"}))
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not (tmp_path / "elsewhere.db").exists()
    first = tracking.experiment_id(store)
    assert tracking.experiment_id(store) == first
    assert _client().get_experiment_by_name("mrt").experiment_id == first
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(store.model_copy(update={"tracking_uri": "sqlite:///p.db"})) == "sqlite:///p.db"


def test_lineage_tags_name_code_data_params_and_base(store, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text("[1]")
    editors = tmp_path / "editors"
    editors.mkdir()
    (editors / "editor_config.json").write_text(json.dumps({"base_fingerprint": "sha256:abc"}))
    params = Params.model_validate({"train": {"data_dir": str(data), "out_dir": str(editors), "base_dir": str(tmp_path / "b")}})
    tags = tracking.lineage_tags(params, "my.yaml")
    assert tags["mrt.data_hash"] == dir_hash(data)
    assert tags["mrt.params_hash"] == params_hash(params)
    assert tags["mrt.base_fingerprint"] == "sha256:abc"
    assert tags["mrt.params_file"] == "my.yaml"
    assert not [k for k in tags if "git" in k]  # the code is MLflow's source tags' business
    assert all(k.startswith("mrt.") for k in tags)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "base_meta.json").write_text(json.dumps({"fingerprint": "sha256:base"}))
    assert tracking.lineage_tags(params)["mrt.base_fingerprint"] == "sha256:base"  # align's record wins
    (editors / "editor_config.json").unlink()  # a LoRA/full output: the training report still knows
    (tmp_path / "b" / "base_meta.json").write_text("{}")
    report = tmp_path / "train.json"
    report.write_text(json.dumps({"base_fingerprint": "sha256:report"}))
    with_report = params.model_copy(deep=True)
    with_report.train.report = str(report)
    assert tracking.lineage_tags(with_report)["mrt.base_fingerprint"] == "sha256:report"
    assert tracking.lineage_tags(params)["mrt.base_fingerprint"] == "unknown"
    moved = params.model_copy(deep=True)
    moved.train.data_dir = str(tmp_path / "gone")
    assert tracking.lineage_tags(moved)["mrt.data_hash"] == "missing"


def test_start_run_sets_mlflow_source_tags_inside_the_repo(store, monkeypatch):
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    tracking.configure(store)
    monkeypatch.chdir(repo)
    run = _client().get_run(tracking.start_run(store, "x"))
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]


def test_parent_child_runs_params_and_status(store):
    tracking.configure(store)
    parent = tracking.start_run(store, "pipeline", tags={"mrt.stage": "run"})
    child = tracking.start_run(
        store, "train", parent_run_id=parent,
        params={"train": {"lr": 0.0006, "editors": {"prefix": {"layers": [0, 1], "rank": 4}}}, "note": "x" * 900},
    )
    run = _client().get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["train.editors.prefix.layers"] == "[0, 1]"
    assert run.data.params["train.lr"] == "0.0006"
    assert len(run.data.params["note"]) == tracking.MAX_PARAM_CHARS
    tracking.end_run(child, "FAILED")
    tracking.end_run(parent)
    assert _client().get_run(child).info.status == "FAILED"
    assert _client().get_run(parent).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status"):
        tracking.end_run(parent, "DONE")


def test_call_retries_transient_errors_then_names_uri_and_operation(store):
    attempts = []

    def flaky():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    track = store.model_copy(update={"retries": 2, "retry_delay_s": 0.05})
    assert tracking.call(track, "flaky op", flaky) == "ok"
    assert len(attempts) == 3
    assert attempts[2] - attempts[1] >= 0.09  # exponential back-off: 0.05, then 0.1

    def down():
        raise ConnectionError("connection refused")

    with pytest.raises(tracking.TrackingError, match=r"mlflow\.db: log the thing failed after 3 attempt"):
        tracking.call(track, "log the thing", down)

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    calls = []

    def missing():
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException):
        tracking.call(track, "get run", missing)
    assert len(calls) == 1  # not retried: retrying cannot make a missing run appear


def test_system_metrics_sampled_into_the_run_and_switchable(store):
    tracking.configure(store)
    on = store.model_copy(update={"system_metrics": True, "system_metrics_interval_s": 0.2})
    run_id = tracking.start_run(on, "train")
    with tracking.system_metrics(run_id, on):
        time.sleep(1.0)
    metrics = _client().get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/system_memory") for k in metrics), sorted(metrics)

    quiet = tracking.start_run(store, "train")
    with tracking.system_metrics(quiet, store):  # store has system_metrics=False
        time.sleep(0.3)
    assert not [k for k in _client().get_run(quiet).data.metrics if k.startswith("system/")]


def test_a_stage_shorter_than_one_interval_still_gets_a_system_sample(store):
    # MLflow's monitor publishes only after a full interval; a fast stage must not end with none.
    tracking.configure(store)
    slow_interval = store.model_copy(update={"system_metrics": True, "system_metrics_interval_s": 30.0})
    run_id = tracking.start_run(slow_interval, "train")
    t0 = time.perf_counter()
    with tracking.system_metrics(run_id, slow_interval):
        pass
    assert time.perf_counter() - t0 < 20  # the shutdown does not wait out the interval
    metrics = _client().get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def test_calls_without_track_use_the_configured_one(store):
    tracking.configure(fast_track(experiment="other"))
    run_id = tracking.start_run(fast_track(experiment="other"), "x")
    tracking.log_metrics(run_id, {"a": 1.0, "nan": float("nan"), "none": None})
    assert _client().get_run(run_id).data.metrics == {"a": 1.0}
