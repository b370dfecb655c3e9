"""Lineage hashes: content-only, location-independent, sensitive to every byte and value."""

from __future__ import annotations

import pytest

from components.core.config import load_params
from components.core.hashing import dir_hash, file_hash, params_hash


def _tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_dir_hash_depends_on_content_not_location(tmp_path):
    files = {"a.json": b"{}", "img/x.png": b"\x89PNG", "img/y.png": b"2"}
    h1 = dir_hash(_tree(tmp_path / "one", files))
    h2 = dir_hash(_tree(tmp_path / "two", files))
    assert h1 == h2
    (tmp_path / "two" / "img" / "y.png").write_bytes(b"3")
    assert dir_hash(tmp_path / "two") != h1


def test_dir_hash_sees_renames_and_new_files(tmp_path):
    root = _tree(tmp_path / "d", {"a": b"1", "b": b"2"})
    before = dir_hash(root)
    (root / "b").rename(root / "c")
    assert dir_hash(root) != before
    (root / "c").rename(root / "b")
    assert dir_hash(root) == before
    (root / "extra").write_bytes(b"")
    assert dir_hash(root) != before


def test_file_hash_and_missing_path(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert file_hash(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(FileNotFoundError, match="nope"):
        dir_hash(tmp_path / "nope")


def test_params_hash_changes_with_any_value():
    p = load_params("params.yaml")
    same = load_params("params.yaml")
    assert params_hash(p.train) == params_hash(same.train)
    changed = load_params("params.yaml", ["train.editors.prefix.rank=5"])
    assert params_hash(changed.train) != params_hash(p.train)
    assert params_hash({"b": 1, "a": 2}) == params_hash({"a": 2, "b": 1})
