"""Content hashes for lineage and caching: data folders, files and params sections.

The same three hashes key the Prefect cache, tag every MLflow run and decide whether a scheduled
run has anything new to train on, so they must not depend on where the data lives or on file
modification times — only on relative paths and bytes (and, for params, on their values).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_hash(path: str | Path) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_hash(path: str | Path, ignore: tuple[str, ...] = ("__pycache__", ".DS_Store")) -> str:
    """sha256 over (relative path, size, bytes) of every file under `path`, in sorted order.

    A single file is hashed like a folder holding it, so a stage output may be either. Raises
    FileNotFoundError naming the path when it does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: cannot hash a path that does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        if any(part in ignore for part in Path(rel).parts):
            continue
        digest.update(rel.encode("utf-8") + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def params_hash(section: Any) -> str:
    """sha256 of a params section (a pydantic model or plain data) as canonical JSON."""
    if hasattr(section, "model_dump"):
        section = section.model_dump(mode="json", by_alias=True)
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
