"""Files the project writes are 0644 and its folders 0755 (nothing it writes is a secret): the atomic
writers (mkstemp makes 0600) and the safetensors writers (`save_file`/`save_pretrained` make 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.fixture(autouse=True)
def _umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writers_make_readable_files(tmp_path):
    from components.experiments.headline import write_headline
    from components.core.files import replace_folder, write_bytes, write_text

    assert _mode(write_text(tmp_path / "a" / "r.md", "x")) == 0o644
    assert _mode(write_bytes(tmp_path / "b.bin", b"x")) == 0o644
    assert _mode(write_headline(tmp_path / "m.json", {"a": 1})) == 0o644
    with replace_folder(tmp_path / "folder") as stage:
        (stage / "f").write_text("x")
    assert _mode(tmp_path / "folder") == 0o755


def test_validation_report_is_readable(tmp_path):
    from components.data.validation import ValidationReport, write_report

    report = ValidationReport(data_dir=str(tmp_path), checks=[], stats={})
    write_report(report, tmp_path / "validation.json")
    assert _mode(tmp_path / "validation.json") == 0o644


def test_safetensors_folders_are_made_readable(tmp_path):
    import torch
    from safetensors.torch import save_file

    from components.core.files import make_readable

    out = tmp_path / "model"
    (out / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(out / "sub" / "x.safetensors"))
    os.chmod(out / "sub", 0o700)
    assert _mode(out / "model.safetensors") == 0o600  # what safetensors leaves behind
    make_readable(out)
    assert _mode(out / "model.safetensors") == 0o644 and _mode(out / "sub" / "x.safetensors") == 0o644
    assert _mode(out / "sub") == 0o755 and _mode(out) == 0o755


def test_the_saved_base_is_readable(tmp_path):
    from components.model.backbone import save_base
    from tiny_llava import tiny_model

    model, processor = tiny_model(tmp_path)[:2]
    out = save_base(model, processor, tmp_path / "base", meta={"x": 1})
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}


def test_replace_folder_swaps_in_whole_or_not_at_all(tmp_path):
    from components.core.files import replace_folder

    target = tmp_path / "data"
    with replace_folder(target) as stage:
        (stage / "old.txt").write_text("1")
    with replace_folder(target) as stage:
        (stage / "new.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["new.txt"]  # replaced, not merged
    with pytest.raises(RuntimeError, match="boom"):
        with replace_folder(target) as stage:
            (stage / "half.txt").write_text("3")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind
