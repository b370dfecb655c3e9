"""`dvc repro` from a fresh copy of the repo: the data and validate stages run through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "data", "models", "reports", ".pytest_cache", "__pycache__", "mlruns", "build"}


def _fresh_copy(dst: Path) -> None:
    for item in ROOT.iterdir():
        if item.name in SKIP or item.name.endswith(".egg-info"):
            continue
        if item.name == ".dvc":
            shutil.copytree(item, dst / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, dst / item.name)


@pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")
def test_dvc_repro_data_and_validate_in_a_fresh_copy(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _fresh_copy(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(train_per_task=3, heldout_per_task=3, heldin_per_task=2, align_size=20, text_per_type=2,
                          mme_images_per_subtask=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    dvc = [sys.executable, "-m", "dvc"]
    res = subprocess.run(dvc + ["repro", "validate"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr

    report = json.loads((repo / "reports" / "validation.json").read_text())
    assert report["success"] is True
    assert (repo / "data" / "visionflan-mini" / "manifest.json").exists()
    assert (repo / "dvc.lock").exists()

    # A second repro is a no-op: nothing changed, nothing reruns.
    again = subprocess.run(dvc + ["repro", "validate"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "didn't change" in again.stdout or "is cached" in again.stdout or "Skipping" in again.stdout, again.stdout


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _smoke_copy(dst: Path) -> dict:
    """A fresh copy whose params.yaml is params.yaml with profiles/smoke.yaml merged over it."""
    dst.mkdir()
    _fresh_copy(dst)
    smoke = yaml.safe_load((dst / "profiles" / "smoke.yaml").read_text())
    merged = _merge(yaml.safe_load((dst / "params.yaml").read_text()), smoke)
    (dst / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MLFLOW_TRACKING_URI=f"sqlite:///{dst}/build/smoke/mlflow.db",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, env=env)
    return env


def _metrics(repo: Path) -> tuple[dict, dict]:
    bench = json.loads((repo / "build/smoke/reports/benchmark.json").read_text())
    train = json.loads((repo / "build/smoke/reports/train.json").read_text())
    drop = {"wall_s", "train_wall_s", "throughput"}  # timings, not results
    return ({k: v for k, v in bench.items() if k not in drop and k != "model"},
            {k: v for k, v in train.items() if k not in drop})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")
def test_dvc_repro_smoke_is_deterministic_across_copies_and_exp_run_works_offline(tmp_path):
    """Two fresh copies, `dvc repro benchmark` with the smoke profile: identical benchmark and training
    numbers (data → validate → align → train → benchmark, all seeded). Then `dvc exp run -S` in one."""
    dvc = [sys.executable, "-m", "dvc"]
    procs = []
    for name in ("a", "b"):  # side by side: most of each repro is process start-up and imports
        repo = tmp_path / name
        env = _smoke_copy(repo)
        procs.append((repo, subprocess.Popen(dvc + ["repro", "benchmark"], cwd=repo, env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    results = []
    for repo, proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        results.append(_metrics(repo))
    assert results[0] == results[1]
    assert results[0][0]["heldout"] and results[0][0]["mme_total"] is not None

    # an experiment with one params change, offline: only train and benchmark rerun
    repo = tmp_path / "a"
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "smoke"], cwd=repo, check=True, env=env)
    res = subprocess.run(dvc + ["exp", "run", "-S", "train.steps=3", "benchmark"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Running stage 'train'" in res.stdout and "Running stage 'align'" not in res.stdout
    assert json.loads((repo / "build/smoke/reports/train.json").read_text())["steps"] == 3
