"""Scheduled retraining: the cron deployment registered against a temporary Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.config import DeployParams, ParamsError, load_params
from flows.deploy import ENTRYPOINT, REPO_ROOT, build_deployment, register

ROOT = Path(__file__).resolve().parents[1]


def _read(dep_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(dep_id)


def test_deploy_params_are_checked():
    p = load_params(ROOT / "params.yaml")
    assert p.deploy.name and len(p.deploy.cron.split()) == 5
    with pytest.raises(ParamsError, match="deploy.cron"):
        load_params(ROOT / "params.yaml", ["deploy.cron=0 3 * *"])


def test_entrypoint_points_at_the_flow():
    path, name = ENTRYPOINT.split(":")
    assert (REPO_ROOT / path).is_file() and REPO_ROOT == ROOT
    import flows.pipeline as pipeline

    assert getattr(pipeline, name).name == "mrt-pipeline"


def test_served_deployment_registers_cron_timezone_and_parameters(prefect_harness):
    dp = DeployParams(name="mrt-retrain-test", cron="15 4 * * 2", timezone="Europe/Paris",
                      params_file="profiles/smoke.yaml")
    dep = _read(register(dp))
    assert dep.name == "mrt-retrain-test"
    assert dep.parameters == {"params_file": "profiles/smoke.yaml"}
    assert len(dep.schedules) == 1
    sched = dep.schedules[0].schedule
    assert sched.cron == "15 4 * * 2" and sched.timezone == "Europe/Paris"
    assert dep.work_pool_name is None  # served by the process that runs `mrt deploy`
    assert build_deployment(dp).entrypoint.endswith("pipeline.py:mrt_pipeline")


def test_pool_deployment_loads_the_flow_from_the_repo_root(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="mrt-test-pool", type="process"))
        except ObjectAlreadyExists:
            pass
    dp = DeployParams(name="mrt-retrain-pool", work_pool="mrt-test-pool")
    dep = _read(register(dp))
    assert dep.work_pool_name == "mrt-test-pool"
    assert dep.entrypoint == ENTRYPOINT
    assert dep.parameters == {"params_file": "params.yaml"}
    assert dep.schedules[0].schedule.cron == dp.cron
    # the worker runs it with the repository root as working directory (relative params paths work)
    steps = [next(iter(s.values())) for s in dep.pull_steps or []]
    assert any(str(v.get("directory")) == str(REPO_ROOT) for v in steps), dep.pull_steps


# ---------------------------------------------------------------------------------------------
# `mrt deploy`: no temporary server, a clean stop
# ---------------------------------------------------------------------------------------------
def test_mrt_deploy_refuses_without_a_prefect_server(monkeypatch):
    from typer.testing import CliRunner

    import flows.deploy
    from flows.cli import app

    called = []
    monkeypatch.setattr(flows.deploy, "deploy", lambda dp: called.append(dp))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        res = CliRunner().invoke(app, ["deploy", "-p", str(ROOT / "params.yaml")])
    assert res.exit_code == 1, res.output
    assert "PREFECT_API_URL is not set" in res.output and "prefect server start" in res.output
    assert called == []  # nothing was served on a temporary server


def test_mrt_deploy_says_where_it_serves_and_stops_cleanly_on_ctrl_c(monkeypatch):
    from typer.testing import CliRunner

    import flows.deploy
    from flows.cli import app

    def interrupted(dp, on_forced_stop=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.deploy, "deploy", interrupted)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        res = CliRunner().invoke(app, ["deploy", "-p", str(ROOT / "params.yaml")])
    assert res.exit_code == 0
    assert "on the Prefect server http://127.0.0.1:4200/api" in res.output
    assert "stopped serving mrt-pipeline/mrt-retrain" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output


def test_deployment_is_tagged_with_its_profile():
    dp = DeployParams(name="x", params_file="profiles/smoke.yaml")
    assert "profile:smoke" in build_deployment(dp).tags


@pytest.mark.slow
def test_mrt_deploy_serves_until_sigint_and_exits_without_a_traceback(prefect_harness, tmp_path):
    """The real thing: `mrt deploy` serving on a Prefect server, then Ctrl-C (SIGINT)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "-p", str(ROOT / "params.yaml"),
                             "-S", "deploy.name=mrt-sigint-test"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        dep = None
        while time.monotonic() < deadline and dep is None and proc.poll() is None:
            time.sleep(1)
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                found = [d for d in client.read_deployments() if d.name == "mrt-sigint-test"]
            dep = found[0] if found else None
        assert dep is not None, "the deployment was never registered"
        time.sleep(3)  # let the runner start polling
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "stopped serving mrt-pipeline/mrt-sigint-test" in out


def test_one_ctrl_c_stops_serving_even_when_the_shutdown_hangs(tmp_path):
    """Prefect's shutdown that never ends (a task outliving its cancellation) must not keep `mrt deploy`
    alive: after SHUTDOWN_GRACE_S the process leaves, saying so, with exit code 0."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "hang.py"
    script.write_text(
        "import sys, time, types\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import prefect, flows.deploy as d\n"
        "def hanging_serve(*a, **k):\n"
        "    print('serving', flush=True)\n"
        "    try:\n"
        "        time.sleep(600)\n"
        "    except KeyboardInterrupt:\n"
        "        while True:\n"
        "            time.sleep(0.1)  # a shutdown that never finishes\n"
        "prefect.serve = hanging_serve\n"
        "d.build_deployment = lambda dp: None\n"
        "d.SHUTDOWN_GRACE_S = 1.0\n"
        "d.serve(types.SimpleNamespace(), lambda: print('forced stop', flush=True))\n"
        "print('returned normally')\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "serving"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "forced stop" in out and "returned normally" not in out, out
