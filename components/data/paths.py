"""Image paths inside a data set are relative and must stay inside their root.

An annotation file is input from elsewhere: a record whose image is `../../home/user/.ssh/id_rsa`
or `/etc/passwd` must not make validation or training open that file. Two checks: a lexical one on
the recorded path (absolute, `..`), then, in `resolve_image`, the real path of the file must lie under
the real path of the root, so a symlink inside the data set that points outside it is refused too.
Both sides are resolved, so an image root that is itself a symlink (as mounted data sets often are)
still works; a symlinked folder *inside* the root must point inside the root.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path, PureWindowsPath


def normalize_image_path(rel: str) -> str:
    """The canonical relative form of an image path; ValueError if it is empty, absolute or escapes."""
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path {rel!r} is empty")
    text = rel.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(rel).drive or PureWindowsPath(rel).root:
        raise ValueError(f"image path {rel!r} is absolute; it must be relative to the image root")
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"image path {rel!r} escapes the image root")
    return norm


def resolve_image(root: Path, rel: str) -> Path:
    """`root / rel`, refusing (ValueError naming the path) anything outside `root`, symlinks included."""
    path = Path(root) / normalize_image_path(rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError(f"image path {rel!r} escapes the image root through a symbolic link (it resolves to {real})")
    return path
