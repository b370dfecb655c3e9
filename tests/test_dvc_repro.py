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
    params["data"].update(train_per_task=3, heldout_per_task=3, align_size=20, text_per_type=2,
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
