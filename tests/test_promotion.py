"""Promotion under faults: two pipelines promoting at once, and the tracking server dying mid-promotion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from promotion_helpers import fast_track, promote_params, registered_versions

from components.track import registry, tracking

REPO = Path(__file__).resolve().parents[1]

# One child process = one pipeline run's `promote` step. The gate is slowed down so that both
# children are inside read-champion → gate → set-alias at the same time unless the lock serialises them.
CHILD = r"""
import json, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
import yaml
from components.track import registry
from components.core.config import Params
import components.evaluation.inference  # the heavy imports happen before the start line

params = Params.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
spans = Path(sys.argv[2])
real_gate = registry.gate
def slow_gate(*a, **k):
    t0 = time.time()
    time.sleep(1.5)
    d = real_gate(*a, **k)
    with open(spans, "a") as fh:
        fh.write(json.dumps([t0, time.time()]) + "\n")
    return d
registry.gate = slow_gate
Path(sys.argv[3]).write_text("ready")
while not Path(sys.argv[4]).exists():
    time.sleep(0.02)
registry.promote(params)
"""


@pytest.mark.slow
@pytest.mark.reliability(
    area="promote",
    case="two pipeline runs promote at once (one SQLite store)",
    outcome="serialised by a file lock: exactly one champion, the better model, every version complete",
)
def test_concurrent_promotions_end_with_one_consistent_champion(store, tiny_artifacts, tmp_path):
    import yaml

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    worse = promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.5}, "worse")
    better = promote_params(tmp_path, tiny_artifacts, {"a": 0.6, "b": 0.6}, "better")
    go, spans = tmp_path / "go", tmp_path / "spans.jsonl"
    procs = []
    for name, params in (("worse", worse), ("better", better)):
        pfile = tmp_path / name / "params.yaml"
        pfile.write_text(yaml.safe_dump(params.to_dict()))
        script = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", script, str(pfile), str(spans), str(tmp_path / f"{name}.ready"), str(go)],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{n}.ready").exists() for n in ("worse", "better")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.05)
    go.write_text("go")
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    # the critical sections did not overlap
    (a0, a1), (b0, b1) = sorted(json.loads(line) for line in spans.read_text().splitlines())
    assert a1 <= b0, "both promotions were inside read-champion → gate → set-alias at once"

    champ = registry.champion(store)
    decisions = {n: json.loads((tmp_path / n / "promotion.json").read_text()) for n in ("worse", "better")}
    assert champ["metrics"]["heldout/mean"] == pytest.approx(0.6)  # the better one, whoever came second
    assert decisions["better"]["promote"] and decisions["better"]["candidate_version"] == champ["version"]
    second = max(decisions.values(), key=lambda d: d["candidate_version"])
    assert second["champion_version_after"] == champ["version"]  # what the later one saw is what stayed
    if decisions["worse"]["candidate_version"] > decisions["better"]["candidate_version"]:
        assert not decisions["worse"]["promote"]  # came second: gated against the better champion
    versions = registered_versions(store)
    assert len(versions) == 2
    assert all(v.tags[registry.STATE_TAG] == "complete" for v in versions)
    assert registry.aliases(store)[registry.CHAMPION] == champ["version"]


# ---------------------------------------------------------------------------------------------
# outage
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts) that a test can kill."""

    def __init__(self, db: Path, artifacts: Path, port: int, log: Path):
        self.db, self.artifacts, self.port, self.log = db, artifacts, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
               str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def server(tmp_path, migrated_db, monkeypatch):
    db = tmp_path / "server.db"
    shutil.copyfile(migrated_db, db)  # skips the schema migrations at start-up
    srv = MlflowServer(db, tmp_path / "server-artifacts", _free_port(), tmp_path / "server.log")
    srv.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.chdir(tmp_path)
    yield srv
    srv.stop()


def _versions_in(db: Path, monkeypatch) -> dict[int, dict]:
    """Read the registry straight from the server's database (the server is down)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    local = fast_track()
    named = registry.aliases(local)
    return {int(v.version): {"tags": dict(v.tags), "aliases": sorted(a for a, n in named.items() if n == int(v.version))}
            for v in registered_versions(local)}


@pytest.mark.slow
@pytest.mark.reliability(
    area="promote",
    case="tracking server killed in the middle of a promotion",
    outcome="retried, then a clear TrackingError; champion untouched; the half-made version is deleted "
            "by the next promotion",
)
def test_server_outage_mid_promotion_leaves_no_half_registered_version(server, tiny_artifacts, tmp_path, monkeypatch):
    track = fast_track(retries=2, retry_delay_s=0.2)
    first = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.5}, "r1", track=track))
    assert first.promote and first.candidate_version == 1

    real_set_alias = registry.set_alias
    killed = []

    def kill_then_set_alias(*a, **k):  # the server dies after the version row exists, before its alias
        if not killed:
            server.stop()
            killed.append(time.monotonic())
        return real_set_alias(*a, **k)

    monkeypatch.setattr(registry, "set_alias", kill_then_set_alias)
    with pytest.raises(tracking.TrackingError) as err:
        registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.7, "b": 0.7}, "r2", track=track))
    waited = time.monotonic() - killed[0]
    msg = str(err.value)
    assert server.uri in msg and "set mrt-editors@candidate" in msg and "after 3 attempt(s)" in msg
    assert waited < 30, f"an outage took {waited:.0f} s to report"
    assert not (tmp_path / "r2" / "promotion.json").exists()
    monkeypatch.setattr(registry, "set_alias", real_set_alias)

    # while the server is down: v1 is still champion; v2 exists only as a pending row, with no alias
    state = _versions_in(server.db, monkeypatch)
    assert state[1]["aliases"] and registry.CHAMPION in state[1]["aliases"]
    assert state[2]["tags"][registry.STATE_TAG] == "pending" and state[2]["aliases"] == []

    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    third = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.7, "b": 0.7}, "r3", track=track))
    assert third.promote and third.champion_version_before == 1
    server.stop()
    state = _versions_in(server.db, monkeypatch)
    assert 2 not in state  # the half-made version is gone
    assert all(v["tags"][registry.STATE_TAG] == "complete" for v in state.values())
    assert registry.CHAMPION in state[third.candidate_version]["aliases"]


def test_outage_before_anything_is_registered_creates_no_version(store, tiny_artifacts, tmp_path, monkeypatch):
    """A tracking store that fails on every write: the error names the operation; nothing registered."""
    params = promote_params(tmp_path, tiny_artifacts, {"a": 0.5}, "r1")

    def down(*a, **k):
        raise ConnectionError("connection refused")

    monkeypatch.setattr("components.track.pyfunc_model.log_pyfunc", down)
    with pytest.raises(tracking.TrackingError, match="log the editor model of run .* failed after 2 attempt"):
        registry.promote(params)
    assert registered_versions(store) == []
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([tracking.experiment_id(store)])
    assert [r.info.status for r in runs] == ["FAILED"]  # the DVC-door run is closed as failed
