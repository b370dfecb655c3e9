"""pytest plugin: the Reliability table's source of truth is the test run itself.

Every bad-input / fault / security / reproducibility case test carries
``@pytest.mark.reliability(area=..., case=..., outcome=...)``. With
``--reliability-report=reports/reliability.json`` this plugin writes, once the session ends, each
marked test's area, case, expected outcome and what actually happened (passed / failed / skipped),
so README's table (`mrt report --reliability reports/reliability.json`) can never claim a case that
was not run or hide one that failed. The file is written atomically (temporary file, then rename).

Spell the option with `=`: as `--reliability-report PATH`, pytest's first pass takes an existing
PATH for a test path and skips tests/conftest.py, which is what loads this plugin.

A reliability marker missing one of its three fields is a collection error naming the test, with or
without the option, so the table cannot silently lose a column.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

MARKER = "reliability"
FIELDS = ("area", "case", "outcome")
OPTION = "--reliability-report"
REPORT_FORMAT = 1


def pytest_addoption(parser):
    parser.addoption(
        OPTION, action="store", default=None, metavar="PATH",
        help="write the reliability cases (area, case, outcome, result) of this run to PATH as JSON",
    )


def marker_fields(item) -> dict[str, str] | None:
    """The area/case/outcome of an item's reliability marker (the closest one), or None."""
    mark = item.get_closest_marker(MARKER)
    if mark is None:
        return None
    missing = [f for f in FIELDS if not isinstance(mark.kwargs.get(f), str) or not mark.kwargs[f].strip()]
    if missing or mark.args:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.{MARKER} needs keyword arguments {', '.join(FIELDS)} (non-empty strings); "
            f"missing or empty: {', '.join(missing) or '(none)'}" + ("; positional arguments are not allowed" if mark.args else "")
        )
    return {f: mark.kwargs[f].strip() for f in FIELDS}


class ReliabilityRecorder:
    """Collects the marked items, then their results phase by phase; writes the JSON at the end."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.cases: dict[str, dict] = {}

    def pytest_collection_finish(self, session):
        for item in session.items:
            fields = marker_fields(item)
            if fields is not None:
                self.cases[item.nodeid] = {"test": item.nodeid, **fields, "result": "not run"}

    def pytest_runtest_logreport(self, report):
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        if report.failed:
            case["result"] = "failed"  # a failure in setup, call or teardown is a failure
        elif report.skipped and case["result"] != "failed":
            case["result"] = "skipped"
        elif report.when == "call" and report.passed and case["result"] == "not run":
            case["result"] = "passed"

    def pytest_sessionfinish(self, session):
        cases = list(self.cases.values())
        data = {
            "format_version": REPORT_FORMAT,
            "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m pytest " + " ".join(session.config.invocation_params.args),
            "python": sys.version.split()[0],
            "counts": {r: sum(c["result"] == r for c in cases) for r in ("passed", "failed", "skipped", "not run")},
            "cases": cases,
        }
        write_json_atomic(self.path, data)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pytest_collection_modifyitems(config, items):
    for item in items:  # validate every marker, with or without the option
        marker_fields(item)


def pytest_configure(config):
    path = config.getoption(OPTION, default=None)
    if path:
        config.pluginmanager.register(ReliabilityRecorder(path), "reliability-recorder")
