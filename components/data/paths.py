"""Image paths inside a data set are relative and must stay inside their root.

An annotation file is input from elsewhere: a record whose image is `../../home/user/.ssh/id_rsa`
or `/etc/passwd` must not make validation or training open that file. The check is lexical (no
`resolve()`), so an image root that is itself a symlink, as mounted data sets often are, still works.
"""

from __future__ import annotations

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
    """`root / rel`, refusing (ValueError naming the path) anything outside `root`."""
    return Path(root) / normalize_image_path(rel)
