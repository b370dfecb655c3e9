"""Faults: `mrt train` killed with SIGKILL mid-run resumes from its last checkpoint and ends with exactly
the editors (bytes), loss curve and held-out scores of an uninterrupted run (CPU, fixed seeds).

The runs are real `mrt train` processes (`python -m flows.cli train`), so nothing is shared in
memory between the killed run and the resumed one: only what the killed run left on disk. The kill
lands while training is running, after at least one checkpoint and before the last step — the test
checks both, so a run that finished before the kill cannot pass for a resumed one. (MLflow outages
and concurrent promotion: tests/test_registry*.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability_env import Workspace, workspace

STEPS, SAVE_EVERY = 40, 4
KILL_AFTER_STEP = 10  # the progress line that triggers the kill; checkpoints exist at 4 and 8 by then
PROGRESS = re.compile(r"step (\d+)/(\d+)")


def _train_cmd(ws: Workspace, out: str) -> list[str]:
    sets = {"train.out_dir": str(ws.models / out), "train.report": str(ws.reports / f"{out}.json"),
            "train.curve": str(ws.reports / f"{out}.csv"), "train.steps": STEPS, "train.save_every": SAVE_EVERY}
    return [sys.executable, "-m", "flows.cli", "train", "-p", str(ws.params),
            *[a for k, v in sets.items() for a in ("-S", f"{k}={v}")]]


def _env() -> dict[str, str]:
    from components.core.offline import set_offline_env

    set_offline_env()
    env = {**os.environ, "MRT_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MRT_DEBUG", None)
    return env


def _run(cmd, cwd: Path, log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as fh:
        return subprocess.run(cmd, cwd=cwd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=300)


def _run_and_kill(cmd, cwd: Path, log: Path) -> tuple[int, int]:
    """Start training, SIGKILL it once its progress reaches KILL_AFTER_STEP; (step seen, return code)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.monotonic() + 300
    try:
        with open(log, "w") as fh:
            for line in proc.stderr:
                fh.write(line)
                m = PROGRESS.search(line)
                if m:
                    seen = int(m.group(1))
                    if seen >= KILL_AFTER_STEP:
                        proc.send_signal(signal.SIGKILL)
                        break
                if time.monotonic() > deadline:
                    break
    finally:
        if proc.poll() is None and seen < KILL_AFTER_STEP:
            proc.kill()
        rc = proc.wait(timeout=60)
        proc.stderr.close()
    return seen, rc


@pytest.mark.slow
@pytest.mark.reliability(area="faults", case="`mrt train` killed with SIGKILL mid-run, then started again",
                         outcome="resumes from its last checkpoint; final editors byte-identical to an "
                                 "uninterrupted run, same loss curve and held-out scores")
def test_sigkill_mid_training_resumes_to_identical_editors(tmp_path_factory, tmp_path):
    ws = workspace(tmp_path_factory, tmp_path)
    ws.reports.mkdir(exist_ok=True)

    straight = _run(_train_cmd(ws, "straight"), ws.root, tmp_path / "straight.log")
    assert straight.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]

    seen, rc = _run_and_kill(_train_cmd(ws, "killed"), ws.root, tmp_path / "killed.log")
    log = (tmp_path / "killed.log").read_text()
    assert seen >= KILL_AFTER_STEP and rc == -signal.SIGKILL, f"not killed mid-run (step {seen}, rc {rc}):\n{log[-3000:]}"
    killed = ws.models / "killed"
    assert not (killed / "editors.safetensors").exists(), "the killed run had already finished"
    steps_saved = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert steps_saved and max(steps_saved) < STEPS, steps_saved

    resumed = _run(_train_cmd(ws, "killed"), ws.root, tmp_path / "resumed.log")
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resuming from" in (tmp_path / "resumed.log").read_text()

    a = json.loads((ws.reports / "straight.json").read_text())
    b = json.loads((ws.reports / "killed.json").read_text())
    assert a["resumed_from"] is None and b["resumed_from"] == max(steps_saved)
    for name in ("editors.safetensors",):
        assert (ws.models / "straight" / name).read_bytes() == (killed / name).read_bytes(), name
    cfg_a = json.loads((ws.models / "straight" / "editor_config.json").read_text())
    cfg_b = json.loads((killed / "editor_config.json").read_text())
    assert cfg_a == cfg_b
    assert (ws.reports / "straight.csv").read_text() == (ws.reports / "killed.csv").read_text()
    for key in ("loss_first", "loss_final", "heldout", "heldout_mean", "steps"):
        assert a[key] == b[key], key
