"""The pipeline against real services, as in a shared deployment: no mocks of MLflow, Prefect or PostgreSQL.

infra/services.py starts PostgreSQL, an MLflow server on it, a Prefect server and a process worker on
pool mrt-pool; the smoke pipeline is deployed to that pool and triggered with run_deployment; the
worker runs it in a process of its own (it inherits MLFLOW_TRACKING_URI from the worker); then the
registered version and its aliases are read back through the MLflow server's API, and the rows are
checked in PostgreSQL itself. Finally every service is stopped and nothing may be left running.

Skipped only when the PostgreSQL binaries are absent (CI installs them: .ci/run).
"""

from __future__ import annotations

import json
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from uuid import UUID

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420  # the smoke flow takes ~1-2 min on 2 idle cores; generous for a loaded CI machine
DEPLOYMENT = "mrt-integration"


def _services():
    spec = importlib.util.spec_from_file_location("mrt_infra_services", ROOT / "infra" / "services.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


services = _services()

if services.find_pg_bin() is None:  # loud: this test is the only check of the production setup
    _why = ("PostgreSQL binaries (initdb, pg_ctl, postgres, pg_isready) NOT FOUND on PATH or under "
            "/usr/lib/postgresql/*/bin: the real-services integration test is SKIPPED. "
            "Install them (Debian: apt-get install -y postgresql; .ci/run does) to run it.")
    warnings.warn(_why, stacklevel=1)
    print(f"\n!!! {_why}\n", file=sys.stderr)
    pytestmark = [pytest.mark.integration, pytest.mark.skip(reason=_why)]
else:
    pytestmark = [pytest.mark.integration]


def _isolated_checkout(tmp: Path) -> Path:
    """A fresh git + DVC checkout of the pipeline under `tmp` (the flow writes the profile into its
    params.yaml and DVC its dvc.lock there), so the run shares no files with this repository."""
    from test_flows import _workspace

    return _workspace(tmp / "checkout")


def _wait_for_flow_run(client, run_id, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        fr = client.read_flow_run(run_id)
        if fr.state is not None and fr.state.is_final():
            return fr
        if time.monotonic() > deadline:
            return fr
        time.sleep(2)


def _left_running(record: dict) -> list[str]:
    left = []
    for svc in record["services"]:
        if svc.get("pgid") and services.group_members(svc["pgid"]):
            left.append(f"{svc['name']} (process group {svc['pgid']})")
        elif svc.get("pid") and services.pid_alive(svc["pid"]):
            left.append(f"{svc['name']} (pid {svc['pid']})")
        host = svc.get("host", "127.0.0.1")
        if svc.get("port") and services.port_open(host, svc["port"]):
            left.append(f"{svc['name']} still listening on {host}:{svc['port']}")
    return left


@pytest.mark.slow
def test_smoke_pipeline_as_a_deployment_on_real_services(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.core.config import load_params

    state = tmp_path / "state"
    plan = services.Plan(state=state, backend="postgres", ui=False, poll_seconds=2, timeout=240)
    t0 = time.monotonic()
    record = services.start(plan, log=lambda m: print(m, file=sys.stderr))
    startup_s = time.monotonic() - t0
    try:
        assert record["backend"] == "postgres"
        st = services.status(state)
        assert st["running"] and all(s["healthy"] for s in st["services"].values()), st
        env = record["env"]
        for name in ("postgres", "mlflow", "prefect-server", "prefect-worker"):
            assert name in st["services"]
        # Bound to this machine only.
        assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
        assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:")
        env_file = (state / "env").read_text()
        assert f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}" in env_file

        checkout = _isolated_checkout(tmp_path)
        params = load_params(checkout / "profiles" / "smoke.yaml")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            from flows.deploy import register

            # `mrt deploy -S deploy.work_pool=mrt-pool`'s path: the flow from a checkout by entrypoint
            # (a process pool needs no image; the pull step sets the working directory to the checkout).
            dp = params.deploy.model_copy(update={"name": DEPLOYMENT, "work_pool": services.POOL,
                                                  "params_file": "profiles/smoke.yaml"})
            deployment_id = register(dp, source=checkout)
            fr = run_deployment(UUID(deployment_id), timeout=0)
            t_run = time.monotonic()
            with get_client(sync_client=True) as client:
                fr = _wait_for_flow_run(client, fr.id, RUN_TIMEOUT_S)
            run_s = time.monotonic() - t_run
        worker_log = services.log_tail(state / "logs" / "prefect-worker.log", 60)
        assert fr.state is not None and fr.state.is_completed(), (
            f"flow run {fr.id} ended {fr.state and fr.state.name!r} after {run_s:.0f} s: "
            f"{fr.state and fr.state.message}\nworker log:\n{worker_log}")
        assert fr.work_pool_name == services.POOL and str(fr.deployment_id) == deployment_id
        assert str(fr.id) in (state / "logs" / "prefect-worker.log").read_text(), "the worker did not run it"

        # The registry, through the MLflow server's REST API.
        name = params.track.registered_model
        ml = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        versions = ml.search_model_versions(f"name = '{name}'")
        assert versions, f"no version of {name!r} registered on the server"
        candidate = ml.get_model_version_by_alias(name, "candidate")
        assert int(candidate.version) == max(int(v.version) for v in versions)
        # The gate's decision, as the promote stage recorded it: champion only if it beat the baselines.
        decision = json.loads((checkout / params.promote.report).read_text())
        expected = {"candidate": int(candidate.version)}
        if decision["promote"]:
            expected["champion"] = int(candidate.version)
        run = ml.get_run(candidate.run_id)
        assert run.info.status == "FINISHED"
        assert ml.get_experiment(run.info.experiment_id).name == params.track.experiment
        assert any(k.startswith("heldout/") for k in run.data.metrics), sorted(run.data.metrics)
        # Artifacts go through the server (proxied store), not to a path on this machine's disk.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert any(Path(record["services"][1]["artifacts"]).rglob("*")), "the server's artifact store is empty"

        # And the rows really are in PostgreSQL.
        import psycopg2

        pg = record["services"][0]
        with psycopg2.connect(host=pg["host"], port=pg["port"], dbname="mlflow", user="mrt",
                              passfile=pg["pgpass"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (name,))
            aliases = dict(cur.fetchall())
        assert aliases == expected, (aliases, decision["reasons"])
        print(f"services healthy after {startup_s:.1f} s; flow run {run_s:.1f} s", file=sys.stderr)
    finally:
        stopped = services.stop(state, timeout=30)
        pg_root = services.pg_root_if_exists(state)
    assert stopped == ["postgres", "mlflow", "prefect-server", "prefect-worker"]
    assert _left_running(record) == []
    assert not (state / "services.json").exists() and not (state / "env").exists()
    assert services.status(state) == {"running": False, "services": {}}
    assert pg_root is not None  # the cluster's data survives a plain stop ...
    services.stop(state, purge=True)  # ... and --purge deletes it, wherever the PostgreSQL user could write
    assert not pg_root.exists() and not state.exists()
