"""The Prefect pipeline runs the dvc.yaml stages through DVC: profiles become params.yaml, DVC decides what
runs (ran / restored from its run cache / skipped), task results are never persisted, stages log their
numbers, and — end to end on profiles/smoke.yaml — `dvc status` is clean right after `mrt run`."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.core.config import ParamsError, load_params
from flows import repro
from flows.pipeline import check_wiring, pipeline_stages, summary_rows

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "profiles/smoke.yaml"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _env() -> dict[str, str]:
    return {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _git(ws: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=ws, check=True, env=_env(), capture_output=True)


def _workspace(path: Path) -> Path:
    """A fresh checkout of the pipeline: code, dvc.yaml, params, profiles, the DVC project; a git commit."""
    path.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "tmp", "cache")
    for name in ("components", "flows", "profiles", ".dvc"):
        shutil.copytree(ROOT / name, path / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "README.md"):
        shutil.copy2(ROOT / name, path / name)
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "workspace")
    return path


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=_env(), capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------
# profiles → params.yaml
# ---------------------------------------------------------------------------------------------
def test_a_profile_is_written_into_params_yaml_keeping_comments(tmp_path):
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    before = (tmp_path / "params.yaml").read_text()

    changed = repro.write_params(SMOKE, [], tmp_path)
    assert "data.out_dir" in changed and "train.steps" in changed and "compare.methods" in changed
    text = (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml") == load_params(tmp_path / SMOKE)  # DVC now reads the profile
    assert "# mrt data: write the embedded" in text  # comments survive
    assert [ln.split(":")[0] for ln in text.splitlines() if ln and not ln[0].isspace() and ln[0] != "#"] == \
        [ln.split(":")[0] for ln in before.splitlines() if ln and not ln[0].isspace() and ln[0] != "#"]
    assert oct((tmp_path / "params.yaml").stat().st_mode & 0o777) == "0o644"

    assert repro.write_params(SMOKE, [], tmp_path) == []  # already there: not rewritten
    assert repro.write_params(SMOKE, ["train.steps=3"], tmp_path) == ["train.steps"]  # like `dvc exp run -S`
    assert load_params(tmp_path / "params.yaml").train.steps == 3

    text = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="train.stepz"):
        repro.write_params(SMOKE, ["train.stepz=3"], tmp_path)
    assert (tmp_path / "params.yaml").read_text() == text  # refused before anything is written

    assert repro.write_params("params.yaml", [], tmp_path) == []  # params.yaml resolves to itself


def test_profile_names_and_stage_switches():
    assert repro.profile_name("params.yaml") == "default"
    assert repro.profile_name("profiles/smoke.yaml") == "smoke"
    assert repro.profile_name("/x/My_Profile.yaml") == "my-profile"
    p = load_params(ROOT / "params.yaml")
    assert pipeline_stages(p) == repro.PIPELINE
    off = load_params(ROOT / "params.yaml", ["run.ablation=false", "run.baselines=false", "run.promote=false"])
    assert pipeline_stages(off) == ("data", "validate", "align", "train", "benchmark")
    assert set(repro.PIPELINE) == set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


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


def test_promotion_artifact_renders_any_promotion_report():
    from flows.pipeline import _decision_markdown

    md = _decision_markdown({"promote": False, "model_name": "m", "candidate_version": 3, "champion_version_before": 2,
                             "champion_version_after": 2, "candidate_heldout_mean": 0.4,
                             "conditions": [{"name": "beats frozen", "ok": False}], "reasons": ["too close to chance"]})
    assert md.startswith("# Promotion gate: REJECTED")
    assert "candidate v3; champion before v2, after v2" in md and "| candidate_heldout_mean | 0.4 |" in md
    assert "- too close to chance" in md


# ---------------------------------------------------------------------------------------------
# DVC decides: ran / skipped / restored, on a one-stage project
# ---------------------------------------------------------------------------------------------
def _tiny_project(ws: Path) -> Path:
    ws.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True, env=_env())
    (ws / "params.yaml").write_text("greet: {word: hello}\n")
    (ws / "dvc.yaml").write_text(
        "stages:\n  greet:\n    cmd: python -c \"import os, yaml; w = yaml.safe_load(open('params.yaml'))['greet']['word'];"
        " open('out.txt', 'w').write(w + ' ' + os.environ.get('MRT_PARENT_RUN_ID', '-'))\"\n"
        "    params: [greet]\n    outs: [out.txt]\n"
        "  fail:\n    cmd: python -c \"raise SystemExit(3)\"\n")
    return ws


def test_reproduce_runs_skips_and_restores_as_dvc_decides(tmp_path):
    ws = _tiny_project(tmp_path / "p")
    first = repro.reproduce("greet", ws, env={repro.PARENT_RUN_ENV: "run123"})
    assert first.status == "ran" and (ws / "out.txt").read_text() == "hello run123"  # the env reaches the command
    assert (ws / "dvc.lock").is_file() and repro.stale(["greet"], ws) == {}
    assert repro.reproduce("greet", ws).status == "skipped"
    (ws / "params.yaml").write_text("greet: {word: bye}\n")
    assert list(repro.stale(["greet"], ws)) == ["greet"]
    assert repro.reproduce("greet", ws).status == "ran"
    (ws / "params.yaml").write_text("greet: {word: hello}\n")
    back = repro.reproduce("greet", ws)
    assert back.status == "restored" and (ws / "out.txt").read_text() == "hello run123"  # DVC's run cache
    assert repro.reproduce("greet", ws, force=True).status == "ran"
    with pytest.raises(repro.ReproError, match="stage 'fail' failed.*dvc repro --single-item fail"):
        repro.reproduce("fail", ws)


def test_a_workspace_without_dvc_is_named(tmp_path):
    with pytest.raises(repro.ReproError, match="no dvc.yaml"):
        repro.check_workspace(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(repro.ReproError, match=r"not a DVC project \(no .dvc/\)"):
        repro.check_workspace(tmp_path)


def test_mrt_run_outside_a_dvc_project_says_so_before_prefect_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "-p", str(ROOT / SMOKE)])
    assert res.exit_code == 1 and "no dvc.yaml" in res.output
    res = CliRunner().invoke(app, ["run", "-p", str(ROOT / SMOKE), "-S", "ablate.stepz=3"])
    assert res.exit_code == 2 and "ablate.stepz" in res.output
    assert not (tmp_path / "build").exists() and not (tmp_path / "params.yaml").exists()  # nothing ran


def test_python_m_flows_pipeline_has_the_same_flags():
    from flows.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert main(["-p", str(ROOT / SMOKE), "-S", "train.steps=-1"]) == 2


# ---------------------------------------------------------------------------------------------
# Prefect: nothing persisted, nothing unpickled
# ---------------------------------------------------------------------------------------------
def test_no_prefect_task_or_flow_persists_results_or_caches():
    from prefect import Flow, Task
    from prefect.cache_policies import NO_CACHE

    import flows.ablation
    import flows.pipeline
    import flows.tasks

    objs = {f"{m.__name__}.{n}": o for m in (flows.pipeline, flows.tasks, flows.ablation)
            for n, o in vars(m).items() if isinstance(o, (Task, Flow))}
    assert {"flows.tasks.stage_task", "flows.pipeline.mrt_pipeline", "flows.ablation.ablation_flow"} <= set(objs)
    for name, obj in objs.items():
        assert obj.persist_result is False, name
        if isinstance(obj, Task):
            assert obj.cache_policy is NO_CACHE, name


def test_offline_settings_include_prefects_do_not_track():
    from components.core.offline import OFFLINE_ENV

    assert OFFLINE_ENV["DO_NOT_TRACK"] == "1"
    assert "DO_NOT_TRACK=1" in (ROOT / ".ci" / "run").read_text()
    assert os.environ.get("DO_NOT_TRACK") == "1"  # tests/conftest.py sets the offline variables


def test_stage_story_reads_the_numbers_from_the_reports(monkeypatch):
    from flows.tasks import stage_story

    monkeypatch.chdir(ROOT)
    p = load_params("params.yaml")
    if not Path(p.benchmark.report).is_file():
        pytest.skip("reports/ not present")
    bench = json.loads(Path(p.benchmark.report).read_text())
    line, nums = stage_story("benchmark", p)
    assert f"held-out mean {bench['heldout_mean']:.3f} on {bench['heldout_n']} records" in line
    assert nums["mme_total"] == bench["mme_total"]
    train = json.loads(Path(p.train.report).read_text())
    line, _ = stage_story("train", p)
    assert f"{train['steps']} steps" in line and f"→ {train['loss_final']:.3f}" in line
    line, nums = stage_story("promote", p)
    assert ("PROMOTED" in line) == bool(json.loads(Path(p.promote.report).read_text())["promote"])


# ---------------------------------------------------------------------------------------------
# the whole flow on the smoke profile
# ---------------------------------------------------------------------------------------------
class _Planted:
    """A pickle that, when loaded, writes a marker file: proof that something unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "executed"))


def test_stage_tasks_write_and_read_nothing_in_prefects_result_storage(tmp_path, prefect_harness):
    """Pickles planted in the result storage (where a cached task result would be looked up) are never
    loaded by stage tasks, and the tasks leave no result file of their own."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from flows.tasks import stage_task

    ws = _tiny_project(tmp_path / "p")
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    storage.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "executed.txt"
    for p in [p for p in storage.rglob("*") if p.is_file()] + [storage / "planted", storage / "mrt-stage-greet"]:
        p.write_bytes(pickle.dumps(_Planted(str(marker))))
    before = sorted(p.name for p in storage.rglob("*"))

    @flow(persist_result=False)
    def two_runs() -> list[str]:
        return [stage_task("greet", "params.yaml", str(ws))["status"] for _ in range(2)]

    assert two_runs() == ["ran", "skipped"]
    assert not marker.exists()
    assert sorted(p.name for p in storage.rglob("*")) == before


def _artifact_keys(flow_run_ids: list[str]) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
    return {a.key for a in arts if a.key}


def _flow_run_and_logs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])))
        ids = [flow_run_id] + [s.id for s in subs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    return run, [str(i) for i in ids], [lg.message for lg in logs], subs


@pytest.mark.slow
def test_mrt_run_smoke_then_dvc_status_is_clean(tmp_path, prefect_harness, monkeypatch):
    """`mrt run -p profiles/smoke.yaml` on a fresh checkout → dvc.lock written, `dvc status` clean; a second
    run is "up to date" and loads nothing planted in Prefect's result storage; an edit to a code file
    makes DVC name exactly the stages whose commands import it."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from flows.pipeline import UP_TO_DATE, mrt_pipeline
    from test_dvc_deps import command_imports

    ws = _workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/build/smoke/mlflow.db")
    (ws / "build" / "smoke").mkdir(parents=True)

    state = mrt_pipeline(params_file=SMOKE, overrides=[], return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    decision = json.loads(Path("build/smoke/reports/promotion.json").read_text())
    assert out["status"] == "trained" and out["promoted"] is decision["promote"]
    if not decision["promote"]:  # toy sizes rarely beat the baselines: the gate must then say which one
        assert any("constant" in r or "frozen" in r or "chance" in r for r in decision["reasons"]), decision["reasons"]
    assert {s: r["status"] for s, r in out["stages"].items()} == {s: "ran" for s in repro.PIPELINE}

    status = _dvc(ws, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(repro.PIPELINE)

    # DVC's views: every plot has data (the CSVs render through vega), metrics hold no timing
    plots = json.loads(_dvc(ws, "plots", "show", "--json").stdout)["data"]
    assert {"build/smoke/reports/train_curve.csv", "build/smoke/reports/ablation.csv",
            "build/smoke/reports/ablation.png", "build/smoke/reports/comparison.png"} <= set(plots)
    for path, entries in plots.items():
        for e in entries:
            assert e["type"] == "image" or e["content"]["data"]["values"], path
    metrics = _dvc(ws, "metrics", "show", "--json")
    assert metrics.returncode == 0 and "heldout_mean" in metrics.stdout and "wall" not in metrics.stdout

    # Prefect tells the story: named and tagged by profile and commit, per-profile artifacts, numbers in logs
    run, ids, logs, subs = _flow_run_and_logs(state.state_details.flow_run_id)
    assert run.name.startswith("smoke-") and "profile:smoke" in run.tags
    assert any(t.startswith("commit:") and t != "commit:nogit" for t in run.tags)
    assert [s.name for s in subs] == ["smoke-ablation"]
    assert {"smoke-validation-report", "smoke-benchmark-table", "smoke-ablation-table",
            "smoke-promotion-decision"} <= _artifact_keys(ids)
    train = json.loads(Path("build/smoke/reports/train.json").read_text())
    bench = json.loads(Path("build/smoke/reports/benchmark.json").read_text())
    joined = "\n".join(logs)
    assert f"train: mrt, {train['steps']} steps, loss" in joined
    assert f"benchmark: held-out mean {bench['heldout_mean']:.3f}" in joined
    assert ("promote: PROMOTED v1" if decision["promote"] else "promote: REJECTED") in joined

    # headline metric files: small, no wall times
    for name in ("validate", "align", "train", "benchmark", "ablate", "compare", "promote"):
        text = Path(f"build/smoke/reports/metrics/{name}.json").read_text()
        assert "wall" not in text and len(text) < 1500, name
    assert json.loads(Path("build/smoke/reports/metrics/benchmark.json").read_text())["heldout_mean"] == \
        bench["heldout_mean"]

    # files the pipeline writes are readable by all (safetensors' writer makes 0600 files)
    written = [p for d in ("build/smoke", "mlruns") if Path(d).is_dir() for p in Path(d).rglob("*")]
    private = [str(p) for p in written if p.is_file() and p.stat().st_mode & 0o044 != 0o044]
    assert private == []
    assert Path("build/smoke/models/base/model.safetensors").stat().st_mode & 0o777 == 0o644

    # nothing in Prefect's result storage is ever loaded: plant pickles there, run again
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    storage.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "executed.txt"
    existing = [p for p in storage.rglob("*") if p.is_file()]
    for target in existing + [storage / "planted", storage / "mrt-train-planted"]:
        target.write_bytes(pickle.dumps(_Planted(str(marker))))
    before = {p.name for p in storage.rglob("*")}
    again = mrt_pipeline(params_file=SMOKE, overrides=[])
    assert again["status"] == UP_TO_DATE
    assert not marker.exists()
    assert {p.name for p in storage.rglob("*")} == before  # the run wrote no result either

    # an edit to a code file: DVC names exactly the stages whose commands import it
    perturb = Path("components/evaluation/perturb.py")
    perturb.write_text(perturb.read_text() + "\n# an edit\n")
    stale = set(json.loads(_dvc(ws, "status", "--json").stdout))
    importers = {s for s, files in command_imports(ws).items() if "components/evaluation/perturb.py" in files}
    assert stale == importers & set(repro.PIPELINE) == {"benchmark", "ablate", "compare", "promote"}


@pytest.mark.slow
def test_failed_validation_stops_before_training_with_an_artifact(tmp_path, prefect_harness, monkeypatch):
    from flows.pipeline import PipelineStopped, mrt_pipeline

    ws = _workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/build/smoke/mlflow.db")
    (ws / "build" / "smoke").mkdir(parents=True)
    state = mrt_pipeline(params_file=SMOKE, overrides=["validate.max_answer_chars=2"], return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineStopped, match="validation failed"):
        state.result()
    assert not Path("build/smoke/models/base").exists() and not Path("build/smoke/models/editors").exists()
    assert "smoke-validation-report" in _artifact_keys([str(state.state_details.flow_run_id)])
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").is_file() else {"stages": {}}
    assert "validate" not in lock["stages"]  # DVC records only stages that succeeded
    assert "validate" in json.loads(_dvc(ws, "status", "--json").stdout)
