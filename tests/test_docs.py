"""The user docs stand alone: every relative link resolves, and none points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"^[a-z]+:", path):  # an anchor or a URL
                continue
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_doc_names_files_outside_the_repository():
    outside = re.compile(r"\b(METHOD|DESIGN|STACK)\.md\b|(?<![\w.])/(tmp|work|home|root)/")
    hits = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()}"
            for doc in DOCS for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
            if outside.search(line)]
    assert not hits, "\n".join(hits)


def test_no_code_or_config_names_files_outside_the_repository_or_removed_tools():
    """Comments and docstrings point at the project's own docs, never at notes outside it."""
    names = re.compile(r"\b(METHOD|DESIGN|STACK|RESULTS)\.md\b|gpu_host_overhead|gpu_kernel_tuning|heldin_probe")
    files = [p for d in ("components", "flows", "tests", "benchmarks", "infra", "profiles")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".sh", ".toml", ".json")]
    files += [ROOT / "params.yaml", ROOT / "dvc.yaml", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files if p.is_file() and p.name != "test_docs.py"
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if names.search(line)]
    assert not hits, "\n".join(hits)
