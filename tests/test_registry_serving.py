"""Registered versions that MLflow's own tools can serve: linked to their logged model, holding the
editors and a reference to the base (never its weights), checking the base on load, with the gate's
figures as numbers, and answering through `mlflow models serve`."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from promotion_helpers import build_model, migrated_db, promote_params, store, tiny_artifacts  # noqa: F401

from components.track import registry, tracking
from components.track.pyfunc_model import BASE_DIR_ENV, BaseModelError

REPO = Path(__file__).resolve().parents[1]


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A second tiny base of the same shape with other weights: another fingerprint."""
    return build_model(tmp_path_factory.mktemp("other_model"), seed=2)[0]


def test_version_is_registered_with_its_training_run_and_gate_figures_as_metrics(store, tiny_artifacts, tmp_path):
    base, editors, _ = tiny_artifacts
    tracking.configure(store)
    # the run `mrt train` made for these very weights (tagged with their content hash)
    train_run = tracking.start_run(store, "candidate-mrt", tags={tracking.MODEL_HASH_TAG: tracking.model_hash(editors)})
    tracking.end_run(train_run)
    d = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.7}, "r1", margin=0.02))
    assert d.promote and d.run_id != train_run

    mv = _client().get_model_version(store.registered_model, str(d.candidate_version))
    model_id = d.model_uri.split("/")[-1]
    logged = _client().get_logged_model(model_id)
    assert mv.source == d.model_uri and mv.run_id == train_run == logged.source_run_id
    # the logged model's page lists the version (what `mlflow.register_model` records)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "mrt-editors", "version": d.candidate_version}]
    # figures are numbers on the logged model, not strings on the version
    assert not [k for k in mv.tags if k.startswith(("heldout/", "mme/"))], mv.tags
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics["heldout/mean"] == pytest.approx(0.6) and metrics["heldout/b"] == pytest.approx(0.7)
    assert metrics["mme/total"] == 50.0 and "mme/cognition" not in metrics  # no cognition subtask in the set
    assert logged.params["gate.margin"] == "0.02" and logged.params["validation_passed"] == "true"
    assert "gate.max_task_drop" in logged.params and not [k for k in logged.params if k.endswith(("_dir", "report"))
                                                           and k.startswith("gate.")]  # settings, not paths
    assert metrics["gate/promote"] == 1.0 and metrics["gate/validation"] == 1.0  # the decision, as numbers
    assert registry.champion(store)["metrics"]["heldout/a"] == pytest.approx(0.5)  # what the gate reads
    promote_run = _client().get_run(d.run_id).data
    assert promote_run.metrics["promotion/candidate_heldout_mean"] == pytest.approx(0.6)

    worse = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.5}, "r2"))
    assert not worse.promote and worse.champion_heldout_mean == pytest.approx(0.6)
    assert _client().get_run(worse.run_id).data.metrics["promotion/task_delta/b"] == pytest.approx(-0.2)


def test_version_holds_editors_and_a_base_reference_not_the_base(store, tiny_artifacts, tmp_path):
    from mlflow.artifacts import download_artifacts

    base, editors, _ = tiny_artifacts
    d = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5}, "r1"))
    got = Path(download_artifacts(artifact_uri=f"models:/mrt-editors/{d.candidate_version}", dst_path=str(tmp_path / "v")))
    files = {p.relative_to(got).as_posix(): p.stat().st_size for p in got.rglob("*") if p.is_file()}
    base_bytes = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt"))]
    assert weights == ["artifacts/editors/editors.safetensors"], weights  # the editors, nothing of the base
    assert not [f for f in files if "/checkpoints/" in f or f.endswith("/checkpoints")]  # resumable state, not code
    assert sum(files.values()) < 2_000_000, sum(files.values())  # editors + code + metadata
    editor_bytes = sum(p.stat().st_size for p in editors.glob("editor*") if p.is_file())
    not_code = sum(n for f, n in files.items() if not f.startswith("code/"))
    assert not_code < editor_bytes + 16_000 < base_bytes, (not_code, editor_bytes, base_bytes)
    ref = json.loads((got / "artifacts" / "base_ref.json").read_text())
    editor_fp = json.loads((editors / "editor_config.json").read_text())["base_fingerprint"]
    assert ref["fingerprint"] == editor_fp and ref["base_dir"] == str(base)
    assert "code/components/track/pyfunc_model.py" in files and not [f for f in files if "__pycache__" in f]
    reqs = (got / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.startswith("mrt-pipeline")]
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "transformers", "safetensors", "pandas", "pydantic"}
    assert all("==" in r and "+" not in r for r in reqs), reqs  # pins an index serves (no local build labels)


def test_loading_a_version_checks_the_base_fingerprint(store, tiny_artifacts, other_base, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from typer.testing import CliRunner

    from flows.cli import app
    from components.evaluation.inference import BaseMismatchError

    base, editors, _ = tiny_artifacts
    params = promote_params(tmp_path, tiny_artifacts, {"a": 0.5}, "r1")
    assert registry.promote(params).promote
    expected = json.loads((editors / "editor_config.json").read_text())["base_fingerprint"]

    monkeypatch.setenv(BASE_DIR_ENV, str(other_base))
    with pytest.raises(BaseMismatchError) as err:
        mlflow.pyfunc.load_model("models:/mrt-editors@champion")
    msg = str(err.value)
    assert str(other_base) in msg and expected in msg and "MRT_BASE_DIR" in msg, msg

    monkeypatch.setenv(BASE_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(BaseModelError) as err:
        mlflow.pyfunc.load_model("models:/mrt-editors@champion")
    msg = str(err.value)
    assert "missing" in msg and str(base) in msg and expected in msg and str(tmp_path / "nowhere") in msg, msg

    import yaml

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.to_dict()))
    for where, words in ((str(other_base), "is not the"), (str(tmp_path / "nowhere"), "is missing")):
        monkeypatch.setenv(BASE_DIR_ENV, where)
        res = CliRunner().invoke(app, ["predict", "-p", str(pfile), "--model", "models:/mrt-editors@champion",
                                       "--prompt", "hi"])
        assert res.exit_code == 1 and words in res.output and expected in res.output, res.output

    monkeypatch.delenv(BASE_DIR_ENV)
    assert len(mlflow.pyfunc.load_model("models:/mrt-editors@champion").predict({"prompt": ["hi"]})) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_ask(tmp_path: Path, tiny_artifacts, env_manager: str, start_timeout_s: float) -> None:
    """Promote the tiny model, serve the champion with MLflow's server, ask it two questions and
    compare the answers with `mrt predict`'s."""
    from components.evaluation.inference import predict

    base, editors, image = tiny_artifacts
    assert registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5}, "r1")).promote
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model's logged code must be enough
    env.update(OMP_NUM_THREADS="1", MRT_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mrt-editors@champion",
         "--env-manager", env_manager, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def tail() -> str:
        log.flush()
        return (tmp_path / "serve.log").read_text()[-3000:]

    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert proc.poll() is None, tail()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow models serve did not come up in {start_timeout_s:.0f} s\n{tail()}"
            time.sleep(0.5)
        prompts = ["What color is the image?", "Describe it."]
        b64 = base64.b64encode(image.read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["prompt", "image"], "data": [[prompts[0], b64], [prompts[1], None]]}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answers = json.loads(r.read())["predictions"]
        assert answers == predict(base, editors, [image, None], prompts)
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request_on_the_champion(store, tiny_artifacts, tmp_path):
    """`mlflow models serve -m models:/mrt-editors@champion` in this environment answers like `mrt predict`."""
    _serve_and_ask(tmp_path, tiny_artifacts, "local", 120)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pyenv") is None, reason="MLflow's default env manager (virtualenv) needs pyenv")
def test_mlflow_models_serve_with_the_default_env_manager(store, tiny_artifacts, tmp_path):
    """The same with MLflow's default env manager: a fresh virtualenv built from the version's
    python_env.yaml and requirements (from the package index; no project install), running the
    logged code. Building the environment takes minutes once; MLflow keeps it (~/.mlflow/envs) for
    every later version with the same requirements."""
    _serve_and_ask(tmp_path, tiny_artifacts, "virtualenv", 900)
