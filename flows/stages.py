"""What each pipeline stage reads and writes, taken from dvc.yaml, and the cache keys built from it.

Why dvc.yaml is the source: `dvc repro` and the Prefect flow must agree on when a stage is stale.
Reading the params sections, deps and outs of every stage from the one file DVC runs (with its
`${section.key}` interpolation resolved against the same params) means a dep added for DVC is
automatically a cache input of the flow — there is no second list to forget.

A stage's *inputs key* is a sha256 over its params sections (`hashing.params_hash`) and the content
hashes of its deps (`hashing.dir_hash`: data folders, the base, the code it runs). The flow uses it
twice: as the Prefect cache key of the stage's task, and — for the base — as the key the base folder
records. A cached result is only trusted while the stage's outputs are still what that run wrote:
after a successful run the flow records (inputs key → outputs hash) in a small *stamp* file, and the
flow only accepts Prefect's cached result while the outputs on disk still hash the same; otherwise it
runs the task with `refresh_cache` (which stores the new result under the same key). Outputs
overwritten by hand (`mrt train -S …` into the same folder) or deleted make the task run again. Nothing here
imports Prefect or torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.config import Params
from components.hashing import dir_hash, params_hash

_VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.\-]+)\s*\}")


class StageError(ValueError):
    """dvc.yaml does not describe a stage the flow runs, or names a params key that does not exist."""


@dataclass(frozen=True)
class Stage:
    """One dvc.yaml stage with its paths resolved against a params object."""

    name: str
    params: tuple[str, ...]  # params sections it reads
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots (everything the stage writes)


def _lookup(params: dict[str, Any], dotted: str, file: str, stage: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageError(f"{file}: stage {stage!r} uses ${{{dotted}}} but params have no key {dotted!r}")
        node = node[part]
    return node


def _resolve(text: str, params: dict[str, Any], file: str, stage: str) -> str:
    return _VAR.sub(lambda m: str(_lookup(params, m.group(1), file, stage)), text)


def _paths(entries: list[Any] | None) -> list[str]:
    """dvc.yaml lists hold plain strings or one-key mappings ({path: {cache: false}})."""
    out = []
    for entry in entries or []:
        if isinstance(entry, dict):
            out.extend(str(k) for k in entry)
        else:
            out.append(str(entry))
    return out


def load_stages(params: Params, dvc_file: str | Path = "dvc.yaml") -> dict[str, Stage]:
    """Every stage of `dvc_file`, resolved against `params` (paths as written, relative to the repo root)."""
    path = Path(dvc_file)
    if not path.is_file():
        raise StageError(f"{path}: not found — run the flow from the repository root (where dvc.yaml is)")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw = params.to_dict()
    stages = {}
    for name, spec in (doc.get("stages") or {}).items():
        sections = []
        for p in spec.get("params") or []:
            if isinstance(p, dict):  # `- other.yaml: [keys]`: not a section of our params file
                continue
            section = str(p).split(".")[0]
            if section not in raw:
                raise StageError(f"{path}: stage {name!r} reads params section {section!r}, which params lack")
            sections.append(str(p))
        deps = [_resolve(d, raw, str(path), name) for d in _paths(spec.get("deps"))]
        outs = [
            _resolve(o, raw, str(path), name)
            for key in ("outs", "metrics", "plots")
            for o in _paths(spec.get(key))
        ]
        stages[name] = Stage(name, tuple(sections), tuple(deps), tuple(outs))
    return stages


def stage(params: Params, name: str, dvc_file: str | Path = "dvc.yaml") -> Stage:
    stages = load_stages(params, dvc_file)
    if name not in stages:
        raise StageError(f"{dvc_file}: no stage {name!r} (stages: {', '.join(stages)})")
    return stages[name]


def _section_value(params: Params, dotted: str) -> Any:
    head, *rest = dotted.split(".")
    node: Any = params.section(head).model_dump(mode="json", by_alias=True)
    for part in rest:
        node = node[part]
    return node


def _path_hash(path: str) -> str:
    try:
        return dir_hash(path)
    except FileNotFoundError:
        return "missing"


def inputs_key(params: Params, st: Stage, known: dict[str, str] | None = None) -> str:
    """sha256 over the stage's params sections and its deps' content. `known` maps a path to a hash
    already computed this run (the data folder is hashed once, not by every stage)."""
    known = known or {}
    parts = {
        "stage": st.name,
        "params": {s: params_hash(_section_value(params, s)) for s in st.params},
        "deps": {d: known.get(os.path.normpath(d)) or _path_hash(d) for d in st.deps},
    }
    blob = json.dumps(parts, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def outputs_hash(st: Stage) -> str:
    blob = json.dumps({o: _path_hash(o) for o in st.outs}, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# stamps: (inputs key → outputs hash) of the last successful run of each stage
# ---------------------------------------------------------------------------------------------
def _stamp_path(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def write_stamp(state_dir: str | Path, st: Stage, key: str) -> Path:
    """Record that `key`'s run produced the outputs now on disk (atomic write)."""
    path = _stamp_path(state_dir, st.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"stage": st.name, "inputs_key": key, "outputs_hash": outputs_hash(st),
                       "outs": list(st.outs)}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def stamp_valid(state_dir: str | Path, st: Stage, key: str) -> bool:
    """True when the last successful run of `st` had inputs `key` and its outputs are unchanged."""
    path = _stamp_path(state_dir, st.name)
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("inputs_key") == key and stamp.get("outputs_hash") == outputs_hash(st)


def cache_key(st: Stage, key: str) -> str:
    """The Prefect cache key of a stage's task: its name and inputs key."""
    return f"mrt-{st.name}-{key}"
