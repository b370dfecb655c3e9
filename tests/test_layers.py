"""The package layers (pyproject.toml, [tool.importlinter]): flows over experiments over track over
align over train over evaluation over editors over model over data over core, and no import cycle
inside a package. Function-local imports count as much as top-level ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_layers_and_acyclic_packages_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_a_wrong_way_import_breaks_the_layer_contract(tmp_path):
    # A copy of the packages with one upward import added: the check must notice it.
    for pkg in ("components", "flows"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "components" / "data" / "records.py", "a", encoding="utf-8") as fh:
        fh.write(textwrap.dedent("""

            def _upward():
                from components.train import training  # noqa: F401
        """))
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                        "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "components.data.records -> components.train.training" in r.stdout
