"""The Prefect pipeline: stage specs from dvc.yaml, cache keys and stamps, the skip logic, and the whole
flow on profiles/smoke.yaml under a temporary Prefect server (artifacts, MLflow runs, registry)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from components.config import ParamsError, load_params
from flows import stages
from flows.pipeline import LINEAGE_KEYS, UP_TO_DATE, PipelineStopped, check_wiring, summary_rows, up_to_date

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "profiles/smoke.yaml"
FLOW_STAGES = ("data", "validate", "align", "train", "benchmark", "ablate", "compare")


def _workspace(path: Path) -> Path:
    """A directory that looks like the repo root to the flow: dvc.yaml, the smoke profile and the code
    (the stages hash their code deps), outputs written under build/smoke/ inside it."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", path / "dvc.yaml")
    (path / "profiles").mkdir(exist_ok=True)
    shutil.copy2(ROOT / SMOKE, path / SMOKE)
    (path / "components").symlink_to(ROOT / "components", target_is_directory=True)
    return path


# ---------------------------------------------------------------------------------------------
# stages: dvc.yaml is the one description of every stage
# ---------------------------------------------------------------------------------------------
def test_flow_stages_are_the_dvc_stages_resolved_against_params():
    params = load_params(ROOT / "params.yaml")
    found = stages.load_stages(params, ROOT / "dvc.yaml")
    assert set(FLOW_STAGES) <= set(found)
    train = found["train"]
    assert train.params == ("train", "predict")
    assert params.train.base_dir in train.deps and params.train.data_dir in train.deps
    assert {params.train.out_dir, params.train.report, params.train.curve} <= set(train.outs)
    assert found["ablate"].params == ("ablate", "train", "benchmark")
    assert params.compare.report in found["compare"].outs
    # a profile moves every path: the same stages resolve to the profile's folders
    smoke = load_params(ROOT / SMOKE)
    assert stages.stage(smoke, "align", ROOT / "dvc.yaml").outs[0] == "build/smoke/models/base"


def test_unknown_stage_and_bad_interpolation_are_named(tmp_path):
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(stages.StageError, match="no stage 'nope'"):
        stages.stage(params, "nope", ROOT / "dvc.yaml")
    bad = tmp_path / "dvc.yaml"
    bad.write_text("stages:\n  x:\n    cmd: mrt x\n    deps: ['${train.no_such_key}']\n")
    with pytest.raises(stages.StageError, match=r"stage 'x' uses \$\{train.no_such_key\}"):
        stages.load_stages(params, bad)
    with pytest.raises(stages.StageError, match="not found"):
        stages.load_stages(params, tmp_path / "missing.yaml")


def test_inputs_key_follows_params_sections_and_dep_content(tmp_path, monkeypatch):
    monkeypatch.chdir(_workspace(tmp_path / "ws"))
    data = Path("build/smoke/data")
    data.mkdir(parents=True)
    (data / "a.json").write_text("[1]")
    p = load_params(SMOKE)
    st = stages.stage(p, "validate")
    key = stages.inputs_key(p, st)
    assert stages.inputs_key(p, st) == key  # deterministic
    assert stages.inputs_key(load_params(SMOKE, ["train.steps=99"]), st) == key  # not its section
    assert stages.inputs_key(load_params(SMOKE, ["validate.max_answer_chars=9"]), st) != key
    (data / "a.json").write_text("[2]")
    assert stages.inputs_key(p, st) != key  # dep content
    assert stages.inputs_key(p, st, {os.path.normpath(str(data)): "x"}) != stages.inputs_key(p, st)  # known hash used


def test_stamp_vouches_only_for_unchanged_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(_workspace(tmp_path / "ws"))
    p = load_params(SMOKE)
    st = stages.stage(p, "validate")
    report = Path(p.validate_.report)
    report.parent.mkdir(parents=True)
    report.write_text('{"success": true}')
    key = stages.inputs_key(p, st)
    assert not stages.stamp_valid(p.run.state_dir, st, key)  # never ran
    stages.write_stamp(p.run.state_dir, st, key)
    assert stages.stamp_valid(p.run.state_dir, st, key)
    assert not stages.stamp_valid(p.run.state_dir, st, "other-key")
    report.write_text('{"success": false}')  # overwritten by hand
    assert not stages.stamp_valid(p.run.state_dir, st, key)
    report.unlink()  # deleted
    assert not stages.stamp_valid(p.run.state_dir, st, key)
    assert stages.cache_key(st, key) == f"mrt-validate-{key}"


# ---------------------------------------------------------------------------------------------
# scheduled-run skip and summary (pure)
# ---------------------------------------------------------------------------------------------
def test_up_to_date_needs_same_data_and_params_hash():
    cur = {"mrt.data_hash": "d1", "mrt.params_hash": "p1", "mrt.git_commit": "c"}
    assert up_to_date(cur, {"tags": {"mrt.data_hash": "d1", "mrt.params_hash": "p1", "mrt.git_commit": "other"}})
    assert not up_to_date(cur, {"tags": {"mrt.data_hash": "d2", "mrt.params_hash": "p1"}})  # data changed
    assert not up_to_date(cur, {"tags": {"mrt.data_hash": "d1", "mrt.params_hash": "p2"}})  # params changed
    assert not up_to_date(cur, {"tags": {}})
    assert not up_to_date(cur, None)  # no champion yet
    assert not up_to_date({"mrt.data_hash": "", "mrt.params_hash": ""}, {"tags": {k: "" for k in LINEAGE_KEYS}})


def test_stage_paths_must_chain():
    check_wiring(load_params(ROOT / "params.yaml"))
    check_wiring(load_params(ROOT / SMOKE))
    with pytest.raises(ParamsError) as err:
        check_wiring(load_params(ROOT / "params.yaml", ["benchmark.model_dir=models/lora", "train.base_dir=x"]))
    msg = str(err.value)
    assert "benchmark.model_dir is 'models/lora' but train.out_dir is 'models/editors'" in msg
    assert "train.base_dir is 'x' but align.out_dir is 'models/base'" in msg


def test_summary_rows_candidate_then_baselines():
    lora = {"trainable_params": 81920, "heldout_mean": {"mean": 0.4, "std": 0.01, "values": [0.39, 0.41]},
            "mme_total": {"mean": 250.0, "std": 0.0, "values": [250.0]}}
    cmp = {"methods": {"lora": lora}}
    base = {"heldout_chance": 0.429, "heldout_majority": 0.55, "heldout_majority_cc": 0.2, "heldin_chance": 0.3,
            "heldin_majority": 0.44, "mme_chance": 375.0, "mme_majority": 250.0}
    rows = summary_rows({"method": "mrt", "trainable_params": 13240, "heldout_mean": 0.4431, "mme_total": 254.25,
                         "heldout_chance_corrected_mean": 0.05, "heldin_mean": 0.35, "baselines": base},
                        cmp, {"promote": True})
    assert rows[0] == ["mrt (candidate)", "13,240", "0.443", "0.050", "0.350", "254.2", "yes"]
    assert rows[1] == ["lora", "81,920", "0.400 ± 0.010", "—", "—", "250.0", "—"]
    assert rows[2] == ["chance (uniform guess)", "—", "0.429", "0.000", "0.300", "375.0", "—"]
    assert rows[3] == ["majority answer (best constant)", "—", "0.550", "0.200", "0.440", "250.0", "—"]
    assert summary_rows({"method": "mrt"}, None, None)[0][-1] == "—"


# ---------------------------------------------------------------------------------------------
# the whole flow on the smoke profile (one temporary Prefect server for the session)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_ws(tmp_path_factory, prefect_harness):
    ws = _workspace(tmp_path_factory.mktemp("flow") / "ws")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(ws)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws}/build/smoke/mlflow.db"
    (ws / "build" / "smoke").mkdir(parents=True)
    try:
        yield ws
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def _mlflow(ws: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws}/build/smoke/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(ws: Path, filter_string: str = ""):
    c = _mlflow(ws)
    exp = c.get_experiment_by_name("mrt")
    return c.search_runs([exp.experiment_id], filter_string=filter_string, max_results=500) if exp else []


def _artifact_keys(flow_run_ids: list[str]) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        arts = client.read_artifacts(artifact_filter=flt)
    return {a.key for a in arts if a.key}


def _flow_run_and_subflows(flow_run_id) -> list[str]:
    """The flow run's id and those of its subflow runs (linked through a task run of the parent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        task_ids = {t.id for t in tasks}
        subflows = [r for r in client.read_flow_runs() if r.parent_task_run_id in task_ids]
    return [str(flow_run_id)] + [str(r.id) for r in subflows]


@pytest.mark.slow
def test_failed_validation_stops_before_training_with_an_artifact(smoke_ws):
    from flows.pipeline import mrt_pipeline

    state = mrt_pipeline(params_file=SMOKE, overrides=["validate.max_answer_chars=2"], return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineStopped, match="validation failed"):
        state.result()
    assert not Path("build/smoke/models/base").exists() and not Path("build/smoke/models/editors").exists()
    assert "validation-report" in _artifact_keys([str(state.state_details.flow_run_id)])
    failed = [r for r in _runs(smoke_ws, "tags.`mrt.role` = 'pipeline'") if r.info.status == "FAILED"]
    assert len(failed) == 1


@pytest.mark.slow
def test_smoke_flow_end_to_end_then_skip_then_retrain(smoke_ws):
    from flows.pipeline import mrt_pipeline

    # 1. first run: everything trains, artifacts, MLflow parent + children, registry aliases
    state = mrt_pipeline(params_file=SMOKE, overrides=[], return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["status"] == "trained" and out["promoted"] is True
    assert not any(out["cached"][k] for k in ("train", "benchmark", "ablate", "compare"))
    assert set(out["timings"]) >= {"data", "validate", "base", "train", "benchmark", "ablate", "compare", "promote"}
    summary = Path(out["summary"]).read_text()
    assert "mrt (candidate)" in summary and "lora" in summary and "frozen" in summary

    runs = _flow_run_and_subflows(state.state_details.flow_run_id)
    assert len(runs) == 2  # the pipeline and its ablation subflow
    keys = _artifact_keys(runs)
    assert {"validation-report", "benchmark-table", "ablation-table", "promotion-decision"} <= keys

    parent = out["parent_run_id"]
    c = _mlflow(smoke_ws)
    prun = c.get_run(parent)
    assert prun.info.status == "FINISHED"
    assert all(prun.data.tags.get(k) for k in LINEAGE_KEYS) and prun.data.tags["mrt.role"] == "pipeline"
    assert prun.data.params["train.method"] == "mrt" and "heldout/mean" in prun.data.metrics
    children = {r.info.run_name: r for r in _runs(smoke_ws, f"tags.mlflow.parentRunId = '{parent}'")}
    assert {"candidate-mrt", "ablation-all-seed0", "ablation-only-projector-seed0", "baseline-frozen-seed0",
            "baseline-mrt-seed0", "baseline-lora-seed0"} <= set(children)
    cand = children["candidate-mrt"].data
    for name in ("heldout/mean", "mme/total", "mme/perception", "trainable_params", "trainable_pct"):
        assert name in cand.metrics, name
    assert any(k.startswith("heldout/hx_") for k in cand.metrics)
    assert any(k.startswith("system/") for k in cand.metrics)  # sampled while training
    assert children["ablation-only-projector-seed0"].data.params["arm"] == "only-projector"
    assert children["baseline-lora-seed0"].data.tags["mrt.method"] == "lora"
    artifacts = {a.path for a in c.list_artifacts(parent, "reports")}
    assert "reports/benchmark.json" in artifacts and "reports/run_summary.md" in artifacts

    model = "mrt-editors"
    cand_v = c.get_model_version_by_alias(model, "candidate")
    champ_v = c.get_model_version_by_alias(model, "champion")
    assert cand_v.version == champ_v.version and cand_v.run_id == out["candidate_run_id"]

    # 2. same data, same params: the scheduled run is a no-op
    n_parents = len(_runs(smoke_ws, "tags.`mrt.role` = 'pipeline'"))
    again = mrt_pipeline(params_file=SMOKE, overrides=[])
    assert again["status"] == UP_TO_DATE
    assert len(_runs(smoke_ws, "tags.`mrt.role` = 'pipeline'")) == n_parents  # no new pipeline run

    # 3. the data the champion was trained on differs from today's: retrain (stages whose own inputs did
    #    not change come from the cache, the new candidate still gets its runs and a registry version)
    c.set_model_version_tag(model, champ_v.version, "mrt.data_hash", "0" * 64)
    third = mrt_pipeline(params_file=SMOKE, overrides=[])
    assert third["status"] == "trained" and third["parent_run_id"] != parent
    assert third["cached"]["train"] and third["cached"]["ablate"] and third["cached"]["compare"]
    assert int(c.get_model_version_by_alias(model, "candidate").version) > int(cand_v.version)
    kids = {r.info.run_name for r in _runs(smoke_ws, f"tags.mlflow.parentRunId = '{third['parent_run_id']}'")}
    assert "candidate-mrt" in kids and "baseline-lora-seed0" in kids

    # 4. an output overwritten behind the flow's back is not trusted: that stage runs again, the others
    #    come from the cache (run.summary changes the params hash, so the run is not "up to date")
    bench = Path(load_params(SMOKE).benchmark.report)
    original = json.loads(bench.read_text())["heldout_mean"]
    report = json.loads(bench.read_text())
    report["heldout_mean"] = 1.0
    bench.write_text(json.dumps(report))
    fourth = mrt_pipeline(params_file=SMOKE, overrides=["run.summary=build/smoke/reports/other.md"])
    assert fourth["status"] == "trained"
    assert not fourth["cached"]["benchmark"] and fourth["cached"]["train"]
    assert json.loads(bench.read_text())["heldout_mean"] == original


def test_mrt_run_rejects_bad_params_before_starting_prefect(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from components.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "-p", str(ROOT / SMOKE), "-S", "ablate.stepz=3"])
    assert res.exit_code == 2
    assert "ablate.stepz" in res.output
    assert not (tmp_path / "build").exists()  # nothing ran


def test_python_m_flows_pipeline_has_the_same_flags():
    from flows.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert main(["-p", str(ROOT / SMOKE), "-S", "train.steps=-1"]) == 2
