"""Scheduled retraining: the cron deployment registered against a temporary Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import DeployParams, ParamsError, load_params
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
