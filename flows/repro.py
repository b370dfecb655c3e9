"""The pipeline's stages as DVC runs them: dvc.yaml is the one description of stages and staleness.

Why it is built this way:
- Every stage is a `dvc.yaml` stage whose command is `mrt <stage>`. The Prefect flow does not run
  components itself: each task asks DVC (`dvc.repo.Repo.reproduce(stage, single_item=True)`, the
  Python form of `dvc repro --single-item <stage>`) to bring one stage up to date. DVC decides
  whether the stage is stale (its command, params sections and deps against `dvc.lock`), runs the
  command, restores the outputs from its run cache when it saw these inputs before, and writes
  `dvc.lock` — so `dvc status` after `mrt run` has nothing to report, and `mrt run` after `dvc repro`
  has nothing to do.
- DVC reads `params.yaml`. A profile (`-p profiles/smoke.yaml`) or an override (`-S train.steps=3`)
  therefore becomes the workspace's `params.yaml` before anything runs (`write_params`), the way
  `dvc exp run -S` changes `params.yaml`: keys whose value changes are replaced in place, comments
  and order are kept, and `git diff params.yaml dvc.lock` shows what the run used.
- Nothing here imports Prefect; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.core.files import write_text

# The flow's stages, in the order `mrt run` runs them (dvc.yaml's graph allows this order).
PIPELINE = ("data", "validate", "align", "train", "benchmark", "ablate", "compare", "promote", "report")
PARAMS_FILE = "params.yaml"
PARENT_RUN_ENV = "MRT_PARENT_RUN_ID"  # the pipeline's MLflow run; a stage command nests its runs under it


class ReproError(RuntimeError):
    """A stage could not be brought up to date; the message names the stage and what to run."""


@dataclass
class StageRun:
    """What DVC did for one stage: ran its command, restored its outputs from the run cache, or skipped it."""

    stage: str
    status: str  # ran | restored | skipped
    wall_s: float
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# the workspace
# ---------------------------------------------------------------------------------------------
def check_workspace(root: str | Path = ".") -> Path:
    """The repository root: it must hold dvc.yaml and a DVC project (.dvc/)."""
    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ReproError(f"{root}: no dvc.yaml — run from the repository root")
    if not (root / ".dvc").is_dir():
        raise ReproError(f"{root}: not a DVC project (no .dvc/) — run `dvc init` (or `dvc init --no-scm`) first")
    return root


def git_commit(root: str | Path = ".") -> str:
    """The short commit of `root` (+ '-dirty' when tracked files differ), or 'nogit'."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return "nogit"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}-dirty" if dirty else sha


def profile_name(params_file: str | os.PathLike) -> str:
    """`params.yaml` → 'default', `profiles/smoke.yaml` → 'smoke' (lower case, letters/digits/dashes)."""
    stem = Path(params_file).stem
    name = "default" if stem == "params" else stem
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "default"


# ---------------------------------------------------------------------------------------------
# profiles and overrides → params.yaml (what DVC reads)
# ---------------------------------------------------------------------------------------------
def _set_changed(node: Any, new: dict[str, Any]) -> int:
    """Set every leaf of `new` on the round-trip mapping `node` where it differs; returns the count."""
    changed = 0
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            changed += _set_changed(node[key], value)
        elif key not in node or node[key] != value:
            node[key] = value
            changed += 1
    return changed


def write_params(params_file: str, overrides: list[str] | None, root: str | Path = ".") -> list[str]:
    """Make `root/params.yaml` resolve to `params_file` + `overrides` (validated first, see
    components.core.config). Only values that differ are replaced (comments and order kept); the file is
    written atomically with mode 0644. Returns the dotted keys that changed ([] = nothing written)."""
    from ruamel.yaml import YAML

    from components.core.config import load_params

    root = Path(root)
    target = root / PARAMS_FILE
    src = Path(params_file) if Path(params_file).is_absolute() else root / params_file
    wanted = load_params(src, list(overrides or [])).to_dict()
    current = load_params(target).to_dict() if target.is_file() else {}
    if wanted == current:
        return []

    def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
        keys = []
        for k, v in a.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                keys += diff(v, b[k], f"{prefix}{k}.")
            elif b.get(k, object()) != v:
                keys.append(f"{prefix}{k}")
        return keys

    changed = diff(wanted, current)
    rt = YAML(typ="rt")  # round trip (builds plain maps/lists, never objects): comments, order, quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(target.read_text(encoding="utf-8")) if target.is_file() else None
    if doc is None:
        doc = {}
    _set_changed(doc, wanted)
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(target, buf.getvalue())
    return changed


# ---------------------------------------------------------------------------------------------
# DVC
# ---------------------------------------------------------------------------------------------
class _Capture(logging.Handler):
    """Collects DVC's own log lines (which stage runs, what was restored) while a call runs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().strip()
        except Exception:  # noqa: BLE001 - a malformed DVC message must not fail the stage
            return
        if msg:
            self.lines.append(msg)


def _dvc_logger() -> logging.Logger:
    return logging.getLogger("dvc")


def stale(stages: tuple[str, ...] | list[str] = PIPELINE, root: str | Path = ".") -> dict[str, Any]:
    """`dvc status` of `stages`: {stage: what changed} for every stage DVC would rerun ({} = up to date)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = check_workspace(root)
    try:
        with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC resolves stage names against the cwd
            return repo.status(targets=list(stages))
    except DvcException as exc:
        raise ReproError(f"dvc status failed: {exc}") from None


def stage_env(parent_run_id: str | None = None, root: str | Path = ".") -> dict[str, str]:
    """Environment for the stage commands: this interpreter's scripts first on PATH (so `mrt` is the
    one of this install), the workspace first on PYTHONPATH (so the command runs the code DVC hashes
    as the stage's deps), and the pipeline's MLflow run for nesting."""
    pythonpath = os.pathsep.join(p for p in (str(Path(root).resolve()), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": pythonpath}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def reproduce(stage: str, root: str | Path = ".", force: bool = False,
              env: dict[str, str] | None = None) -> StageRun:
    """Bring one stage up to date through DVC (`dvc repro --single-item <stage>`, `--force` with force).

    Upstream stages are not touched: the flow runs them first, in PIPELINE order. Raises ReproError
    naming the stage when its command fails (the command's own output says why)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = check_workspace(root)
    capture = _Capture()
    log = _dvc_logger()
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(capture)
    log.propagate = False  # DVC prints its own lines; the caller logs a summary (no line twice)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC resolves stage names against the cwd
            done = repo.reproduce(stage, single_item=True, force=force, run_env=env or {})
    except DvcException as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f": {cause}" if cause else ""
        raise ReproError(f"stage {stage!r} failed{detail} — `dvc repro --single-item {stage}` reruns it") from None
    finally:
        log.removeHandler(capture)
        log.setLevel(old_level)
        log.propagate = old_propagate
    wall = time.perf_counter() - t0
    if not done:
        status = "skipped"
    elif any("is cached - skipping run" in line for line in capture.lines):
        status = "restored"
    else:
        status = "ran"
    return StageRun(stage, status, round(wall, 2), capture.lines)
