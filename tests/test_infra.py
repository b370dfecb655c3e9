"""infra/: the services script's pieces, and the production files checked for syntax and for
consistency with the code (pool name, ports, versions, placeholders, GPU asks, layer classes)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _services():
    spec = importlib.util.spec_from_file_location("mrt_infra_services", INFRA / "services.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


services = _services()


# ---------------------------------------------------------------------------------------------
# infra/services.py
# ---------------------------------------------------------------------------------------------
def test_free_port_is_bindable_and_closed():
    port = services.free_port()
    assert 1024 <= port <= 65535
    assert not services.port_open("127.0.0.1", port)


def test_backend_falls_back_to_sqlite_and_says_why(monkeypatch):
    monkeypatch.setattr(services, "find_pg_bin", lambda: None)
    backend, pg_bin, why = services.choose_backend("auto")
    assert backend == "sqlite" and pg_bin is None
    assert "PostgreSQL binaries" in why and "apt-get install postgresql" in why
    with pytest.raises(services.ServiceError, match="backend postgres: missing PostgreSQL binaries"):
        services.choose_backend("postgres")
    assert services.choose_backend("sqlite")[0] == "sqlite"


def test_backend_without_the_driver_is_sqlite_with_auto(monkeypatch, tmp_path):
    monkeypatch.setattr(services, "find_pg_bin", lambda: tmp_path)
    monkeypatch.setattr(services, "has_psycopg2", lambda: False)
    backend, _, why = services.choose_backend("auto")
    assert backend == "sqlite" and "psycopg2" in why


def test_pg_binaries_are_found_under_debian_layout(monkeypatch, tmp_path):
    for version in ("13", "15"):
        d = tmp_path / "usr/lib/postgresql" / version / "bin"
        d.mkdir(parents=True)
        for tool in ("initdb", "pg_ctl", "postgres", "pg_isready"):
            (d / tool).write_text("")
    monkeypatch.setattr(services.shutil, "which", lambda name: None)
    real_glob = services.glob.glob
    monkeypatch.setattr(services.glob, "glob",
                        lambda pat: real_glob(str(tmp_path) + pat) if pat.startswith("/usr/lib/postgresql") else real_glob(pat))
    assert services.find_pg_bin() == tmp_path / "usr/lib/postgresql/15/bin"  # the newest


def test_state_and_env_files_are_private_and_sourceable(tmp_path):
    rec = {"started_at": "now", "services": [], "env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                                                         "PREFECT_API_URL": "http://127.0.0.1:4200/api"}}
    services.write_state(tmp_path, rec)
    for name in (services.STATE_FILE, services.ENV_FILE):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    out = subprocess.run(["bash", "-c", f"source {tmp_path / services.ENV_FILE} && echo $PREFECT_API_URL"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "http://127.0.0.1:4200/api"
    assert services.read_state(tmp_path)["env"] == rec["env"]


def test_a_corrupt_state_file_is_an_error_naming_it(tmp_path):
    (tmp_path / services.STATE_FILE).write_text("{not json")
    with pytest.raises(services.ServiceError, match=r"services\.json: not valid JSON"):
        services.status(tmp_path)


def test_stop_and_status_with_nothing_started(tmp_path):
    assert services.stop(tmp_path) == []
    assert services.status(tmp_path) == {"running": False, "services": {}}
    res = subprocess.run([sys.executable, str(INFRA / "services.py"), "status", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1  # status exits non-zero unless everything is healthy


def test_kill_group_takes_the_whole_process_tree(tmp_path):
    # A parent that ignores SIGTERM and a child of it: both must be gone (SIGKILL after the grace time).
    script = "trap '' TERM; sleep 300 & sleep 300; wait"
    proc = services.spawn(["bash", "-c", script], tmp_path / "log", dict(os.environ))
    deadline = time.monotonic() + 5
    while len(services.group_members(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(services.group_members(proc.pid)) >= 2
    services.kill_group(proc.pid, timeout=1)
    proc.wait(timeout=5)
    assert services.group_members(proc.pid) == []


def test_wait_until_reports_a_dead_process_with_its_log(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("boom: address already in use\n")
    with pytest.raises(services.ServiceError, match="(?s)exited before it was healthy.*address already in use"):
        services.wait_until(lambda: False, 5, "svc", log, alive=lambda: False)
    with pytest.raises(services.ServiceError, match="not healthy after"):
        services.wait_until(lambda: False, 0.2, "svc", log, interval=0.05)


def test_a_service_that_dies_at_start_leaves_nothing_behind(tmp_path, monkeypatch):
    """MLflow's server exits at once: start fails naming it, and the Prefect server it had already
    started is stopped, the state file removed."""
    real_tool, real_spawn, spawned = services.tool, services.spawn, []
    monkeypatch.setattr(services, "tool", lambda name: ["bash", "-c", "echo no such store >&2; exit 3", "x"]
                        if name == "mlflow" else real_tool(name))
    monkeypatch.setattr(services, "spawn", lambda *a, **k: spawned.append(real_spawn(*a, **k)) or spawned[-1])
    with pytest.raises(services.ServiceError, match="(?s)mlflow server: the process exited.*no such store"):
        services.start(services.Plan(state=tmp_path, backend="sqlite", ui=False, timeout=120), log=lambda m: None)
    assert not (tmp_path / services.STATE_FILE).exists()
    assert len(spawned) == 2  # the mlflow stand-in and a real prefect server
    for proc in spawned:
        assert proc.poll() is not None and services.group_members(proc.pid) == []


def test_shell_wrapper_runs_the_module(tmp_path):
    res = subprocess.run([str(INFRA / "services.sh"), "stop", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    assert "nothing was running" in res.stdout


def test_state_dir_is_git_ignored():
    assert ".state/" in (INFRA / ".gitignore").read_text().split()
    assert ".env" in (INFRA / ".gitignore").read_text().split()


# ---------------------------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _installed(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def test_compose_has_the_four_services_wired_together(compose):
    svc = compose["services"]
    assert set(svc) == {"postgres", "mlflow", "prefect-server", "worker"}
    pg_env = svc["postgres"]["environment"]
    user, db = pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"]
    ml_cmd = svc["mlflow"]["command"]
    store = ml_cmd[ml_cmd.index("--backend-store-uri") + 1]
    assert store == f"postgresql+psycopg2://{user}@postgres:5432/{db}"  # password via PGPASSWORD, not argv
    assert "basic-auth" in ml_cmd and "--artifacts-destination" in ml_cmd
    pf_db = svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert pf_db.startswith(f"postgresql+asyncpg://{user}:") and pf_db.endswith("@postgres:5432/prefect")
    initdb = (INFRA / "compose" / "initdb.sql").read_text()
    for needed in ("prefect", "mlflow_auth"):
        assert f"CREATE DATABASE {needed};" in initdb
    auth = (INFRA / "compose" / "mlflow-auth.ini").read_text()
    assert f"postgresql+psycopg2://{user}@postgres:5432/mlflow_auth" in auth
    mount_targets = [v.split(":")[1] for v in svc["mlflow"]["volumes"]]
    assert svc["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] in mount_targets

    worker = svc["worker"]
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == services.POOL and cmd[cmd.index("--type") + 1] == "process"
    wenv = worker["environment"]
    ml_port = ml_cmd[ml_cmd.index("--port") + 1]
    pf_cmd = svc["prefect-server"]["command"]
    pf_port = pf_cmd[pf_cmd.index("--port") + 1]
    assert wenv["MLFLOW_TRACKING_URI"] == f"http://mlflow:{ml_port}"
    assert wenv["PREFECT_API_URL"] == f"http://prefect-server:{pf_port}/api"
    assert set(worker["depends_on"]) == {"prefect-server", "mlflow"}
    for name in ("mlflow", "prefect-server", "postgres"):
        assert "healthcheck" in svc[name], name


def test_compose_publishes_ports_on_localhost_only(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"


def test_compose_needs_its_secrets_and_ships_none(compose):
    text = (INFRA / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${MLFLOW_ADMIN_PASSWORD:?" in text and "${PREFECT_AUTH_STRING:?" in text
    example = (INFRA / "compose" / "env.example").read_text()
    for var in set(re.findall(r"\$\{([A-Z_]+)", text)):
        if var not in ("MLFLOW_PORT", "PREFECT_PORT", "PREFECT_UI_API_URL"):
            assert f"{var}=" in example, f"{var} is used by compose.yaml but not in compose/env.example"


def test_compose_images_match_the_installed_versions(compose):
    prefect_image = compose["services"]["prefect-server"]["image"]
    assert prefect_image.startswith(f"prefecthq/prefect:{_installed('prefect')}-python3.11"), prefect_image
    pg_image = compose["services"]["postgres"]["image"]
    assert re.match(r"postgres:\d+", pg_image)
    for name in ("mlflow", "worker"):
        assert compose["services"][name]["build"]["dockerfile"] == "infra/Dockerfile"


def test_gpu_overlay_asks_for_nvidia_devices():
    overlay = yaml.safe_load((INFRA / "compose.gpu.yaml").read_text())
    devices = overlay["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_installs_torch_first_and_the_services_extra():
    text = (INFRA / "Dockerfile").read_text()
    torch_at, project_at = text.index('"torch==${TORCH_VERSION}"'), text.index('pip install ".[services]"')
    assert torch_at < project_at
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"torch=={pinned}" in readme  # the same torch as the quick start
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("psycopg2") for d in extras["services"])
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "infra/.env" in ignored and "infra/.state" in ignored


# ---------------------------------------------------------------------------------------------
# the Kubernetes base job template
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s_template():
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


def test_k8s_template_is_a_valid_prefect_base_job_template(k8s_template):
    from prefect.server.schemas.actions import validate_base_job_template

    assert validate_base_job_template(k8s_template) == k8s_template  # every placeholder is declared


def test_k8s_template_asks_for_gpus_with_its_defaults(k8s_template):
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in k8s_template["variables"]["properties"].items() if "default" in v}
    job = apply_values(k8s_template["job_configuration"]["job_manifest"], {**defaults, "name": "mrt-run",
                                                                         "command": "prefect flow-run execute"})
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["image"] == "mrt-pipeline:latest" and pod["restartPolicy"] == "Never"
    assert container["env"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert job["spec"]["backoffLimit"] == 0  # a failed training run is not retried blindly by Kubernetes


# ---------------------------------------------------------------------------------------------
# accelerate configs
# ---------------------------------------------------------------------------------------------
def _launch_env(path: Path) -> tuple[object, dict[str, str]]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "flows.cli", "train"])
    args = _validate_launch_command(args)[0]
    return args, prepare_multi_gpu_env(args)


def test_ddp_config_launches_data_parallel_bf16():
    args, env = _launch_env(INFRA / "accelerate" / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 2
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_shards_the_backbone_blocks_that_exist(tmp_path):
    args, env = _launch_env(INFRA / "accelerate" / "fsdp.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    classes = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    # The blocks of the backbones components/model/backbone.py builds (LLaVA = CLIP vision tower + Llama LM).
    assert set(classes) == {"LlamaDecoderLayer", "CLIPEncoderLayer"}
    from tiny_llava import tiny_model

    model = tiny_model(tmp_path)[0]  # LLaVA-1.5's classes at a size that builds instantly
    present = {type(m).__name__ for m in model.modules()}
    assert set(classes) <= present
