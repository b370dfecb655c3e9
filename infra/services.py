#!/usr/bin/env python3
"""Start, health-check and stop the services the pipeline talks to in a shared setting.

    python infra/services.py start [--backend auto|postgres|sqlite] [--host 127.0.0.1]
    python infra/services.py status
    python infra/services.py stop
    source infra/.state/env        # MLFLOW_TRACKING_URI, PREFECT_API_URL for the CLI and flows

What runs (every one bound to 127.0.0.1 unless --host says otherwise, each on a free port):
- PostgreSQL (Debian's binaries, found on PATH or under /usr/lib/postgresql/*/bin) as the MLflow
  backend store, run as a non-root user because initdb refuses root; SQLite when PostgreSQL (or its
  Python driver) is absent and --backend is auto.
- An MLflow tracking server on that store with a local artifact store it serves itself
  (``--artifacts-destination``), so clients need no access to the server's disk.
- A Prefect server (its own PREFECT_HOME, SQLite) and a process work pool ``mrt-pool`` with one
  worker; flow runs the worker starts inherit MLFLOW_TRACKING_URI and PREFECT_API_URL.

Why it is a Python module and not a shell script: ports, health checks with deadlines, process
groups and the state file are easier to get right (and to test) here. ``infra/services.sh`` is a thin
wrapper. Every service starts in a session of its own, so ``stop`` can kill its whole process group
(MLflow's and Prefect's servers fork workers); PostgreSQL is stopped by ``pg_ctl stop -m fast`` and
checked afterwards. ``stop`` verifies that no process of any recorded group is left.

State lives in ``infra/.state/`` (or --state-dir / MRT_INFRA_STATE): ``services.json`` (pids, ports,
URIs, logs), ``env`` (to ``source``), ``logs/``, and the data (PostgreSQL cluster, MLflow artifacts,
Prefect's database), which survives stop/start.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = ROOT / "infra" / ".state"
POOL = "mrt-pool"
WORKER_NAME = "mrt-worker-1"
PG_DB = "mlflow"
PG_SUPERUSER = "mrt"
STATE_FILE = "services.json"
ENV_FILE = "env"
# The one list of what phones home (components/core/offline.py: a module with no dependencies), imported
# by path so this script also runs from a checkout where the project is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.core.offline import OFFLINE_ENV  # noqa: E402


class ServiceError(RuntimeError):
    """A service did not start, answer or stop in time; the message names it and quotes its log."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def client_host(bind_host: str) -> str:
    """The address clients on this machine use for a server bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def http_ok(url: str, timeout: float = 2.0, method: str = "GET", body: dict | None = None) -> tuple[bool, Any]:
    """(True, parsed body) when `url` answers 2xx; (False, the error) otherwise. Never raises."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - local URLs only
            raw = resp.read().decode("utf-8", "replace")
            try:
                return True, json.loads(raw)
            except ValueError:
                return True, raw
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, exc


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: str | Path | None = None,
               alive: Callable[[], bool] | None = None, interval: float = 0.5) -> float:
    """Poll `check` until true; seconds it took. ServiceError (with the log's tail) on timeout or death."""
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if alive is not None and not alive():
            raise ServiceError(f"{what}: the process exited before it was healthy; log {log}:\n{log_tail(log or '')}")
        if time.monotonic() - t0 > timeout:
            raise ServiceError(f"{what}: not healthy after {timeout:.0f} s; log {log}:\n{log_tail(log or '')}")
        time.sleep(interval)


def wait_all(items: list[tuple[str, Callable[[], bool], str | Path, subprocess.Popen]], timeout: float,
             interval: float = 0.5) -> None:
    """wait_until for several services at once: (what, check, log, process) each. A process that
    exits fails the wait at once, naming it, instead of after the others become healthy."""
    pending = list(items)
    t0 = time.monotonic()
    while pending:
        for item in list(pending):
            what, check, log, proc = item
            if check():
                pending.remove(item)
            elif proc.poll() is not None:
                raise ServiceError(f"{what}: the process exited before it was healthy; log {log}:\n{log_tail(log)}")
        if not pending:
            return
        if time.monotonic() - t0 > timeout:
            what, _, log, _ = pending[0]
            raise ServiceError(f"{what}: not healthy after {timeout:.0f} s; log {log}:\n{log_tail(log)}")
        time.sleep(interval)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(Path(stat).parent.name))
    return out


def kill_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM the group, wait, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session (its pid is its process group id), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps it; closed in this process right after
    try:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(cwd or ROOT), start_new_session=True)
    finally:
        fh.close()


def tool(name: str) -> list[str]:
    """A console script of this Python's environment (mlflow, prefect), else `python -m name`."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", name]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    # A caller's own server addresses must not leak into the services we start.
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILE"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path)) or (0,)


def find_pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: pg_ctl's on PATH, else the newest
    /usr/lib/postgresql/<version>/bin (Debian installs them there, off PATH)."""
    candidates = []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for d in candidates:
        if all((d / t).exists() for t in ("initdb", "pg_ctl", "postgres", "pg_isready")):
            return d
    return None


def has_psycopg2() -> bool:
    import importlib.util

    return importlib.util.find_spec("psycopg2") is not None


def pg_os_user() -> str | None:
    """The user PostgreSQL runs as: None (this user) unless we are root; then `postgres` when it
    exists (Debian's package creates it), else a system user `mrt` made for the purpose."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "mrt"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "mrt"],
                   check=True, capture_output=True)
    return "mrt"


def as_user(user: str | None, cmd: list[str]) -> list[str]:
    if user is None:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user, "--", *cmd]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(_shq(c) for c in cmd)]


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _user_can_write(user: str | None, path: Path) -> bool:
    if user is None:
        return os.access(path, os.W_OK | os.X_OK)
    return subprocess.run(as_user(user, ["test", "-w", str(path), "-a", "-x", str(path)]),
                          capture_output=True).returncode == 0


def _fallback_pg_root(state: Path) -> Path:
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"mrt-infra-{digest}" / "postgres"


def pg_root(state: Path, user: str | None) -> Path:
    """Where the cluster lives: <state>/postgres when the PostgreSQL user can reach it; otherwise
    (a checkout under /root, say) a fixed folder under /var/tmp named after the state dir."""
    root = state / "postgres"
    if user is None:
        return root
    root.mkdir(parents=True, exist_ok=True)
    shutil.chown(root, user, user)
    root.chmod(0o700)
    if _user_can_write(user, root):
        return root
    alt = _fallback_pg_root(state)
    alt.mkdir(parents=True, exist_ok=True)
    for d in (alt.parent, alt):
        shutil.chown(d, user, user)
        d.chmod(0o700)
    return alt


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{what}: no answer after {timeout:.0f} s ({' '.join(cmd)})") from None
    if res.returncode != 0:
        raise ServiceError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}".strip())
    return res.stdout


def start_postgres(state: Path, bind_host: str, pg_bin: Path, timeout: float) -> dict[str, Any]:
    """initdb on first use (scram-sha-256 over TCP, a random password kept in the state dir), start
    on a free port, create the `mlflow` database; the service record with the MLflow store URI."""
    user = pg_os_user()
    root = pg_root(state, user)
    data, run_dir, log = root / "data", root / "run", state / "logs" / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    secret = state / "pg-password"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(24))
        secret.chmod(0o600)
    password = secret.read_text().strip()
    own = (lambda p: shutil.chown(p, user, user)) if user else (lambda p: None)
    if not (data / "PG_VERSION").exists():
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        own(pwfile)
        try:
            _run(as_user(user, [str(pg_bin / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, f"--pwfile={pwfile}",
                                "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                                "--no-instructions"]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    run_dir.mkdir(exist_ok=True)
    own(run_dir)
    # The server log is written by the PostgreSQL user; keep it beside the cluster, link it from logs/.
    pg_log = root / "server.log"
    port = free_port(client_host(bind_host))
    _run(as_user(user, [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(pg_log), "-w", "-t", str(int(timeout)),
                        "-o", f"-p {port} -c listen_addresses={bind_host} -c unix_socket_directories={run_dir}",
                        "start"]), "pg_ctl start", timeout=timeout + 10)
    with contextlib.suppress(OSError):
        log.unlink(missing_ok=True)
        log.symlink_to(pg_log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    host = client_host(bind_host)
    wait_until(lambda: subprocess.run([str(pg_bin / "pg_isready"), "-h", host, "-p", str(port), "-q"]).returncode == 0,
               timeout, "postgresql", pg_log, lambda: pid_alive(pid))
    env = {**os.environ, "PGPASSWORD": password}
    exists = _run([str(pg_bin / "psql"), "-h", host, "-p", str(port), "-U", PG_SUPERUSER, "-d", "postgres", "-tAc",
                   f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"], "psql", env=env).strip()
    if exists != "1":
        _run([str(pg_bin / "createdb"), "-h", host, "-p", str(port), "-U", PG_SUPERUSER, PG_DB], "createdb", env=env)
    # The password reaches MLflow through libpq's password file, never through a URI or argv (ps shows those).
    pgpass = state / "pgpass"
    pgpass.write_text(f"{host}:{port}:{PG_DB}:{PG_SUPERUSER}:{password}\n")
    pgpass.chmod(0o600)
    return {
        "name": "postgres", "pid": pid, "pgid": None, "port": port, "host": host, "log": str(pg_log),
        "data": str(data), "os_user": user, "bin": str(pg_bin), "pgpass": str(pgpass),
        "uri": f"postgresql+psycopg2://{PG_SUPERUSER}@{host}:{port}/{PG_DB}",
    }


def stop_postgres(rec: dict[str, Any], timeout: float) -> None:
    pg_ctl = Path(rec["bin"]) / "pg_ctl"
    if pid_alive(rec.get("pid")) and Path(rec["data"], "postmaster.pid").exists():
        subprocess.run(as_user(rec.get("os_user"), [str(pg_ctl), "-D", rec["data"], "-m", "fast", "-w", "-t",
                                                    str(int(timeout)), "stop"]), capture_output=True, timeout=timeout + 10)
    if pid_alive(rec.get("pid")):  # pg_ctl could not do it: the postmaster and its children by force
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], signal.SIGQUIT)
        wait_until(lambda: not pid_alive(rec["pid"]), 10, "postgresql stop", rec.get("log"))


# ---------------------------------------------------------------------------------------------
# MLflow, Prefect server, work pool, worker
# ---------------------------------------------------------------------------------------------
def start_mlflow(state: Path, bind_host: str, store_uri: str, env: dict[str, str],
                 extra_env: dict[str, str] | None = None) -> tuple[dict, subprocess.Popen]:
    port = free_port(client_host(bind_host))
    artifacts = state / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = state / "logs" / "mlflow.log"
    cmd = [*tool("mlflow"), "server", "--backend-store-uri", store_uri, "--artifacts-destination", str(artifacts),
           "--host", bind_host, "--port", str(port), "--workers", "1"]
    # Job execution (huey consumers for MLflow's GenAI jobs) is seven more processes this pipeline never uses.
    menv = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    proc = spawn(cmd, log, menv)
    url = f"http://{client_host(bind_host)}:{port}"
    return {"name": "mlflow", "pid": proc.pid, "pgid": proc.pid, "port": port, "url": url, "log": str(log),
            "health": f"{url}/health", "artifacts": str(artifacts), "store": store_uri}, proc


def start_prefect_server(state: Path, bind_host: str, env: dict[str, str], ui: bool) -> tuple[dict, subprocess.Popen]:
    port = free_port(client_host(bind_host))
    home = state / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    log = state / "logs" / "prefect-server.log"
    senv = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [*tool("prefect"), "server", "start", "--host", bind_host, "--port", str(port), "--no-background",
           "--ui" if ui else "--no-ui"]
    proc = spawn(cmd, log, senv)
    url = f"http://{client_host(bind_host)}:{port}/api"
    return {"name": "prefect-server", "pid": proc.pid, "pgid": proc.pid, "port": port, "url": url, "log": str(log),
            "health": f"{url}/health", "home": str(home)}, proc


def client_env(state: Path, env: dict[str, str], prefect_url: str, mlflow_url: str) -> dict[str, str]:
    """What the CLI, the worker and its flow runs see."""
    return {**env, "PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url,
            "PREFECT_HOME": str(state / "prefect-client")}


def create_pool(cenv: dict[str, str]) -> None:
    _run([*tool("prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
         f"prefect work-pool create {POOL}", env=cenv, timeout=90)


def start_worker(state: Path, cenv: dict[str, str], poll_seconds: float) -> tuple[dict, subprocess.Popen]:
    port = free_port("127.0.0.1")
    log = state / "logs" / "prefect-worker.log"
    wenv = {**cenv, "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port),
            "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds)}
    cmd = [*tool("prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", WORKER_NAME,
           "--install-policy", "never", "--with-healthcheck"]
    proc = spawn(cmd, log, wenv, cwd=ROOT)
    return {"name": "prefect-worker", "pid": proc.pid, "pgid": proc.pid, "port": port, "log": str(log),
            "health": f"http://127.0.0.1:{port}/health", "pool": POOL, "worker": WORKER_NAME}, proc


def worker_registered(prefect_url: str) -> bool:
    ok, body = http_ok(f"{prefect_url}/work_pools/{POOL}/workers/filter", method="POST", body={})
    return ok and isinstance(body, list) and any(w.get("name") == WORKER_NAME for w in body)


# ---------------------------------------------------------------------------------------------
# the verbs
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    state: Path = DEFAULT_STATE
    host: str = "127.0.0.1"
    backend: str = "auto"  # auto | postgres | sqlite
    timeout: float = 180.0
    ui: bool = True
    poll_seconds: float = 5.0


def choose_backend(backend: str) -> tuple[str, Path | None, str]:
    """(backend, pg bin folder, why): postgres when asked or available, sqlite otherwise."""
    pg_bin = find_pg_bin()
    missing = []
    if pg_bin is None:
        missing.append("PostgreSQL binaries (initdb, pg_ctl, postgres, pg_isready; Debian: apt-get install postgresql)")
    if not has_psycopg2():
        missing.append("the psycopg2 driver (pip install -e '.[services]')")
    if backend == "sqlite":
        return "sqlite", None, "asked for sqlite"
    if not missing:
        return "postgres", pg_bin, f"PostgreSQL from {pg_bin}"
    if backend == "postgres":
        raise ServiceError("backend postgres: missing " + "; ".join(missing))
    return "sqlite", None, "falling back to SQLite: missing " + "; ".join(missing)


def read_state(state: Path) -> dict[str, Any] | None:
    f = state / STATE_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise ServiceError(f"{f}: not valid JSON ({exc}); remove it after checking that nothing runs") from None


def write_state(state: Path, record: dict[str, Any]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    f = state / STATE_FILE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.chmod(0o600)  # holds the PostgreSQL password inside the store URI
    tmp.replace(f)
    env = state / ENV_FILE
    lines = [f"# written by infra/services.py start at {record['started_at']}; `source` it"]
    lines += [f"export {k}={_shq(v)}" for k, v in record["env"].items()]
    env.write_text("\n".join(lines) + "\n")
    env.chmod(0o600)


def start(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start every service, wait until each is healthy, write the state; on failure stop what started."""
    state = plan.state.resolve()
    existing = read_state(state)
    if existing and any(_alive(s) for s in existing["services"]):
        raise ServiceError(f"services already running (state {state / STATE_FILE}); run `stop` first")
    state.mkdir(parents=True, exist_ok=True)
    backend, pg_bin, why = choose_backend(plan.backend)
    if backend == "sqlite" and plan.backend == "auto":
        log(f"WARNING: {why}")
    record: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": backend,
                              "host": plan.host, "state": str(state), "services": [], "env": {}}
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        env = base_env()
        if backend == "postgres":
            pg = start_postgres(state, plan.host, pg_bin, plan.timeout)
            record["services"].append(pg)
            write_state(state, record)  # from here on `stop` can clean up even if this process dies
            store, store_env = pg["uri"], {"PGPASSFILE": pg["pgpass"]}
            log(f"postgres   up on {pg['host']}:{pg['port']} ({time.monotonic() - t0:.1f} s)")
        else:
            store, store_env = f"sqlite:///{state / 'mlflow.db'}", {}
        ml, ml_proc = start_mlflow(state, plan.host, store, env, store_env)
        pf, pf_proc = start_prefect_server(state, plan.host, env, plan.ui)
        procs += [ml_proc, pf_proc]
        record["services"] += [ml, pf]
        write_state(state, record)
        # Both servers start side by side (each takes 5-20 s); whichever dies first fails the start at once.
        wait_all([("prefect server", lambda: http_ok(pf["health"])[0], pf["log"], pf_proc),
                  ("mlflow server", lambda: http_ok(ml["health"])[0], ml["log"], ml_proc)], plan.timeout)
        log(f"prefect    up at {pf['url']}; mlflow up at {ml['url']} ({time.monotonic() - t0:.1f} s)")
        cenv = client_env(state, env, pf["url"], ml["url"])
        create_pool(cenv)
        wk, wk_proc = start_worker(state, cenv, plan.poll_seconds)
        procs.append(wk_proc)
        record["services"].append(wk)
        write_state(state, record)
        wait_until(lambda: http_ok(wk["health"])[0] and worker_registered(pf["url"]), plan.timeout,
                   "prefect worker", wk["log"], lambda: wk_proc.poll() is None)
        log(f"worker     {WORKER_NAME} polling pool {POOL} ({time.monotonic() - t0:.1f} s)")
        record["env"] = {"MLFLOW_TRACKING_URI": ml["url"], "PREFECT_API_URL": pf["url"], "MRT_WORK_POOL": POOL}
        record["healthy_after_s"] = round(time.monotonic() - t0, 1)
        write_state(state, record)
        log(f"state: {state / STATE_FILE}; `source {state / ENV_FILE}`")
        return record
    except BaseException:
        with contextlib.suppress(Exception):
            stop_services(record["services"], timeout=20)
        for p in procs:  # reap, so no zombie outlives us
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        with contextlib.suppress(OSError):
            (state / STATE_FILE).unlink()
            (state / ENV_FILE).unlink()
        raise


def _alive(svc: dict[str, Any]) -> bool:
    if svc.get("pgid"):
        return bool(group_members(svc["pgid"]))
    return pid_alive(svc.get("pid"))


def health(svc: dict[str, Any]) -> bool:
    if svc["name"] == "postgres":
        return subprocess.run([str(Path(svc["bin"]) / "pg_isready"), "-h", svc["host"], "-p", str(svc["port"]), "-q"],
                              capture_output=True).returncode == 0
    return http_ok(svc["health"])[0]


def status(state: Path) -> dict[str, Any]:
    """Per service: running (any process of it alive) and healthy (its health check answers)."""
    rec = read_state(state.resolve())
    if rec is None:
        return {"running": False, "services": {}}
    out = {}
    for svc in rec["services"]:
        alive = _alive(svc)
        out[svc["name"]] = {"running": alive, "healthy": alive and health(svc), "port": svc.get("port"),
                            "url": svc.get("url"), "log": svc.get("log")}
    return {"running": any(s["running"] for s in out.values()), "services": out, "env": rec.get("env", {}),
            "backend": rec.get("backend")}


def stop_services(services: list[dict[str, Any]], timeout: float = 30) -> list[str]:
    """Stop in reverse start order (worker first, PostgreSQL last); what is still alive afterwards."""
    for svc in reversed(services):
        if svc["name"] == "postgres":
            stop_postgres(svc, timeout)
        elif svc.get("pgid"):
            kill_group(svc["pgid"], timeout)
    left = []
    for svc in services:
        if _alive(svc):
            left.append(svc["name"])
    return left


def stop(state: Path, timeout: float = 30, purge: bool = False) -> list[str]:
    """Stop everything the state file names; remove the state and env files once nothing is left.
    `purge` also deletes the data (PostgreSQL cluster, artifacts, Prefect database, logs)."""
    state = state.resolve()
    rec = read_state(state)
    names: list[str] = []
    if rec is not None:
        left = stop_services(rec["services"], timeout)
        if left:
            raise ServiceError(f"still running after stop: {', '.join(left)} (state kept in {state / STATE_FILE})")
        for name in (STATE_FILE, ENV_FILE):
            with contextlib.suppress(OSError):
                (state / name).unlink()
        names = [s["name"] for s in rec["services"]]
    if purge:
        pg = pg_root_if_exists(state)
        if pg is not None and pg != state / "postgres":
            shutil.rmtree(pg.parent, ignore_errors=True)  # the /var/tmp fallback folder of this state dir
        if state.exists():
            shutil.rmtree(state, ignore_errors=True)
    return names


def pg_root_if_exists(state: Path) -> Path | None:
    """Where start() put this state dir's cluster, without creating anything."""
    for candidate in (state / "postgres" / "data", _fallback_pg_root(state) / "data"):
        if candidate.exists():
            return candidate.parent
    return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infra/services.py", description=__doc__.split("\n")[0])
    ap.add_argument("verb", choices=["start", "status", "stop", "env"])
    ap.add_argument("--state-dir", default=os.environ.get("MRT_INFRA_STATE", str(DEFAULT_STATE)))
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--backend", choices=["auto", "postgres", "sqlite"], default="auto",
                    help="MLflow backend store (auto: PostgreSQL when installed, else SQLite)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to become healthy")
    ap.add_argument("--no-ui", action="store_true", help="start the Prefect server without its UI")
    ap.add_argument("--purge", action="store_true", help="stop: also delete the data (database, artifacts, logs)")
    ap.add_argument("--poll-seconds", type=float, default=5.0, help="how often the worker asks for flow runs")
    args = ap.parse_args(argv)
    state = Path(args.state_dir)
    try:
        if args.verb == "start":
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"WARNING: binding to {args.host}: the servers have no authentication here; see "
                      "docs/infrastructure.md, 'Authentication for a shared MLflow server', before exposing them", file=sys.stderr)
            start(Plan(state=state, host=args.host, backend=args.backend, timeout=args.timeout, ui=not args.no_ui,
                       poll_seconds=args.poll_seconds))
        elif args.verb == "status":
            st = status(state)
            print(json.dumps(st, indent=2))
            healthy = st["running"] and all(s["healthy"] for s in st["services"].values())
            return 0 if healthy else 1
        elif args.verb == "env":
            rec = read_state(state.resolve())
            if rec is None:
                print("no services started (no state file)", file=sys.stderr)
                return 1
            print((state / ENV_FILE).read_text(), end="")
        else:
            stopped = stop(state, purge=args.purge)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}" + (f"; deleted {state}" if args.purge else ""))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
