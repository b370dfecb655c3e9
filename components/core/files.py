"""Atomic, world-readable files: every report, manifest and model file the project writes goes through here.

A file is written to a temporary name beside its target, flushed to disk and renamed into place, so a
reader (DVC, MLflow, a second process) never sees half a file and a crash leaves the old one intact.
A folder (a data set, a copied base, a downloaded model) is filled under a temporary name beside it
and swapped in whole (`replace_folder`).
What the project writes holds no secret: files are 0644 and folders 0755 (`make_readable`), also where
a library (safetensors, mkstemp) would leave 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

FILE_MODE = 0o644  # what the project writes (reports, models) is readable by all; nothing it writes is a secret


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file beside `path` and rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; reports and models are for everyone to read
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def make_readable(path: str | Path) -> Path:
    """Files 0644 and folders 0755 under `path` (itself included). Writers that create private files
    (safetensors' `save_file`, `save_pretrained` through it, mkstemp) leave 0600 behind; what the
    project writes holds no secret."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o755)
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, FILE_MODE)
    elif path.is_file():
        os.chmod(path, FILE_MODE)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON (non-JSON values via str), atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def replace_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh, empty folder beside `folder` for the body to fill; when the body succeeds it takes
    `folder`'s place (the previous one is moved aside, then removed), when it raises it is removed and
    `folder` is left as it was. Readers never see a half-filled folder under the name. The staging
    names are unique, so two processes filling the same folder do not write into each other's."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        os.chmod(stage, 0o755)  # mkdtemp makes 0700; what the project writes is for everyone to read
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = stage.with_name(stage.name.removesuffix(".partial") + ".old")
    if folder.exists():
        folder.rename(old)
    stage.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
