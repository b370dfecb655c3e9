"""The Reliability table (docs/reliability.md), rendered from what the test suite recorded — never typed by hand.

`python -m pytest -m reliability --reliability-report=reports/reliability.json` (the plugin in
tests/reliability_plugin.py) runs and records every `@pytest.mark.reliability(area, case, outcome)`
test of the suite with its result; `mrt report --no-results --reliability reports/reliability.json` puts the table between
the reliability markers of docs/reliability.md (`--reliability-doc`) through the same marker-replacement helper as the results block
(components.experiments.report.replace_marked_block). A case that failed or was skipped shows as such: the
table states what the last run showed, not what the tests intend.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from components.core.markdown import ReportError, md_table, replace_marked_block

RELIABILITY_START = "<!-- reliability:start -->"
RELIABILITY_END = "<!-- reliability:end -->"
RESULTS = ("passed", "failed", "skipped", "not run")
RESULT_LABELS = {"passed": "✅ passed", "failed": "❌ FAILED", "skipped": "skipped", "not run": "not run"}
AREA_ORDER = ("bad input", "faults", "promote", "tracking", "security", "reproducibility")  # others follow
_CASE_FIELDS = ("area", "case", "outcome", "result")


def read_reliability(path: str | Path) -> dict[str, Any]:
    """The plugin's JSON, checked field by field (ReportError naming the file, the case and the field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; run pytest with --reliability-report={path} first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON report ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ReportError(f"{path}: field 'cases': expected a list of cases")
    for i, case in enumerate(data["cases"]):
        if not isinstance(case, dict):
            raise ReportError(f"{path}: cases[{i}]: expected an object")
        for field in _CASE_FIELDS:
            if not isinstance(case.get(field), str) or not case[field]:
                raise ReportError(f"{path}: cases[{i}] ({case.get('test', '?')}): field '{field}' missing or empty")
        if case["result"] not in RESULTS:
            raise ReportError(f"{path}: cases[{i}] ({case.get('test', '?')}): field 'result' is "
                              f"{case['result']!r}; expected one of {', '.join(RESULTS)}")
    return data


def merge_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (area, case, outcome): a case run under several commands (parametrised) is one row,
    and its result is the worst of its runs (failed > not run > skipped > passed), with the run count."""
    worst = {"failed": 3, "not run": 2, "skipped": 1, "passed": 0}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in cases:
        key = (c["area"], c["case"], c["outcome"])
        row = rows.setdefault(key, {"area": c["area"], "case": c["case"], "outcome": c["outcome"],
                                    "result": "passed", "runs": Counter()})
        row["runs"][c["result"]] += 1
        if worst[c["result"]] > worst[row["result"]]:
            row["result"] = c["result"]
    order = {a: i for i, a in enumerate(AREA_ORDER)}
    return sorted(rows.values(), key=lambda r: order.get(r["area"], len(order)))  # stable: test order kept


def _result_cell(row: dict[str, Any]) -> str:
    runs = row["runs"]
    total = sum(runs.values())
    label = RESULT_LABELS[row["result"]]
    if total == 1:
        return label
    return f"{label} ({runs['passed']}/{total})" if row["result"] != "passed" else f"{label} ({total} runs)"


def reliability_block(data: dict[str, Any], source: str = "reports/reliability.json") -> str:
    rows = merge_cases(data["cases"])
    counts = Counter(c["result"] for c in data["cases"])
    summary = ", ".join(f"{counts[r]} {r}" for r in RESULTS if counts[r])
    table = md_table(["area", "case", "expected outcome", "result"],
                     [[r["area"], r["case"], r["outcome"], _result_cell(r)] for r in rows], align="lllc")
    return "\n".join([
        f"<!-- written by `mrt report --reliability {source}`; re-run it instead of editing this block -->",
        "",
        f"Produced by `{data.get('command', 'pytest')}` on {data.get('generated_utc', '?')}: "
        f"{len(rows)} cases ({len(data['cases'])} test runs: {summary or 'none'}).",
        "",
        table,
    ])


def write_readme_reliability(readme_path: str | Path, report_json: str | Path) -> str:
    """Replace the reliability block of `readme_path` (docs/reliability.md or any file with the markers) with the table from `report_json`; returns the block.
    The file is untouched when its markers or the report are wrong."""
    from components.core.markdown import check_markers

    check_markers(readme_path, RELIABILITY_START, RELIABILITY_END)
    block = reliability_block(read_reliability(report_json), str(report_json))
    replace_marked_block(readme_path, RELIABILITY_START, RELIABILITY_END, block)
    return block
