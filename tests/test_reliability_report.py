"""The Reliability table's pipeline: the pytest plugin records marked cases with their real results,
components.experiments.reliability renders them, `mrt report --reliability` puts them into README between markers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.experiments.reliability import (
    RELIABILITY_END,
    RELIABILITY_START,
    merge_cases,
    read_reliability,
    reliability_block,
    write_readme_reliability,
)
from components.core.markdown import ReportError

TESTS_DIR = Path(__file__).resolve().parent

SAMPLE_TESTS = '''
import pytest

rel = pytest.mark.reliability

@rel(area="bad input", case="good case", outcome="refused")
def test_passes():
    pass

@rel(area="faults", case="broken case", outcome="recovers")
def test_fails():
    assert False

@rel(area="security", case="skipped case", outcome="n/a")
def test_skips():
    pytest.skip("no infra")

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

@rel(area="security", case="setup error", outcome="n/a")
def test_setup_error(broken):
    pass

@pytest.mark.parametrize("cmd", [
    pytest.param("a", marks=rel(area="bad input", case="param case", outcome="refused")),
    pytest.param("b", marks=rel(area="bad input", case="param case", outcome="refused")),
])
def test_param(cmd):
    assert cmd in "ab"

def test_unmarked():
    pass
'''


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source), encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    reliability(area, case, outcome): x\n")
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "reliability_plugin", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sample.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_plugin_records_each_marked_case_with_its_real_result(tmp_path):
    out = tmp_path / "reports" / "reliability.json"
    proc = _pytest(tmp_path, SAMPLE_TESTS, "--reliability-report", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one test fails, one errors
    data = json.loads(out.read_text())
    by_test = {c["test"].split("::")[1]: c for c in data["cases"]}
    assert set(by_test) == {"test_passes", "test_fails", "test_skips", "test_setup_error", "test_param[a]", "test_param[b]"}
    assert by_test["test_passes"]["result"] == "passed"
    assert by_test["test_fails"]["result"] == "failed"
    assert by_test["test_skips"]["result"] == "skipped"
    assert by_test["test_setup_error"]["result"] == "failed"
    assert by_test["test_param[a]"] == {**by_test["test_param[a]"], "area": "bad input", "case": "param case",
                                        "outcome": "refused", "result": "passed"}
    assert data["counts"] == {"passed": 3, "failed": 2, "skipped": 1, "not run": 0}
    assert "--reliability-report" in data["command"]
    assert not list(out.parent.glob(".*.tmp")), "temporary file left behind"
    read_reliability(out)  # what the plugin writes, the renderer reads


def test_plugin_writes_nothing_without_the_option(tmp_path):
    proc = _pytest(tmp_path, SAMPLE_TESTS)
    assert proc.returncode == 1
    assert not list(tmp_path.rglob("*.json"))


def test_a_marker_missing_a_field_is_a_usage_error_naming_the_test(tmp_path):
    proc = _pytest(tmp_path, '''
        import pytest

        @pytest.mark.reliability(area="bad input", case="no outcome")
        def test_incomplete():
            pass
    ''')
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage-error exit code
    assert "test_incomplete" in proc.stderr + proc.stdout and "outcome" in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------
def _report(tmp_path: Path, cases: list[dict]) -> Path:
    path = tmp_path / "reliability.json"
    path.write_text(json.dumps({"format_version": 1, "generated_utc": "2026-11-28 17:00 UTC",
                                "command": "python -m pytest tests/x.py --reliability-report r.json", "cases": cases}))
    return path


def _case(test, area, case, result, outcome="refused"):
    return {"test": test, "area": area, "case": case, "outcome": outcome, "result": result}


CASES = [
    _case("t::a[validate]", "security", "path escape", "passed"),
    _case("t::a[train]", "security", "path escape", "failed"),
    _case("t::b", "bad input", "truncated JSON", "passed"),
    _case("t::c", "reproducibility", "same seed", "skipped"),
    _case("t::d", "faults", "sigkill", "passed"),
]


def test_merge_groups_parametrised_runs_and_keeps_the_worst_result():
    rows = merge_cases(CASES)
    assert [r["area"] for r in rows] == ["bad input", "faults", "security", "reproducibility"]
    sec = rows[2]
    assert sec["case"] == "path escape" and sec["result"] == "failed" and sec["runs"] == {"passed": 1, "failed": 1}


def test_block_shows_failures_and_provenance(tmp_path):
    block = reliability_block(read_reliability(_report(tmp_path, CASES)))
    assert "| area | case | expected outcome | result |" in block
    assert "| security | path escape | refused | ❌ FAILED (1/2) |" in block
    assert "| bad input | truncated JSON | refused | ✅ passed |" in block
    assert "| reproducibility | same seed | refused | skipped |" in block
    assert "4 cases (5 test runs: 3 passed, 1 failed, 1 skipped)" in block
    assert "python -m pytest tests/x.py --reliability-report r.json" in block and "2026-11-28 17:00 UTC" in block


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("cases"), "field 'cases'"),
    (lambda d: d["cases"][0].pop("outcome"), "field 'outcome'"),
    (lambda d: d["cases"][1].update(result="flaky"), "field 'result' is 'flaky'"),
])
def test_bad_report_is_refused_by_field(tmp_path, mutate, needle):
    path = _report(tmp_path, [dict(c) for c in CASES])
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=needle.replace("(", r"\(")):
        read_reliability(path)


README = f"""# Title

## Reliability

{RELIABILITY_START}
old table
{RELIABILITY_END}

## Tests
untouched
"""


def test_readme_block_is_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    write_readme_reliability(readme, _report(tmp_path, CASES))
    text = readme.read_text()
    assert "old table" not in text and "| faults | sigkill | refused | ✅ passed |" in text
    assert text.startswith("# Title\n\n## Reliability\n\n" + RELIABILITY_START + "\n<!-- written by")
    assert text.endswith(RELIABILITY_END + "\n\n## Tests\nuntouched\n")
    once = readme.read_text()
    write_readme_reliability(readme, _report(tmp_path, CASES))
    assert readme.read_text() == once  # idempotent


def test_missing_markers_or_report_leave_readme_untouched(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ReportError, match="reliability:start"):
        write_readme_reliability(readme, _report(tmp_path, CASES))
    readme.write_text(README)
    with pytest.raises(ReportError, match="not found"):
        write_readme_reliability(readme, tmp_path / "missing.json")
    assert readme.read_text() == README


def test_mrt_report_reliability_cli(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    readme = tmp_path / "README.md"
    readme.write_text(README)
    report = _report(tmp_path, CASES)
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(app, ["report", "-p", str(params), "--readme", str(readme), "--no-results",
                                      "--reliability", str(report), "--reliability-doc", str(readme)])
    assert result.exit_code == 0, result.output
    assert "| bad input | truncated JSON | refused | ✅ passed |" in readme.read_text()
    result = CliRunner().invoke(app, ["report", "-p", str(params), "--readme", str(readme), "--no-results"])
    assert result.exit_code == 1 and "nothing to write" in result.output


def test_repo_reliability_doc_has_the_markers_and_readme_points_to_it():
    from components.core.markdown import check_markers

    check_markers(TESTS_DIR.parent / "docs" / "reliability.md", RELIABILITY_START, RELIABILITY_END)
    assert "docs/reliability.md" in (TESTS_DIR.parent / "README.md").read_text(encoding="utf-8")
