"""Small Markdown helpers shared by every report: tables, "mean ± std" cells, provenance lines and
generated blocks between markers in README-like files."""

from __future__ import annotations

import math
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from components.core.files import write_text

class ReportError(ValueError):
    """A report or README cannot be read or written; the message names the file and what is wrong."""


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """{"mean", "std", "values"} over the values that exist; std is the sample standard deviation
    (ddof 1; 0.0 for a single value); mean and std are None when there is no value."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def fmt_pm(stat: dict[str, Any] | None, digits: int) -> str:
    """"0.421 ± 0.012" (several values), "0.421" (one), "—" (none)."""
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    if len(stat.get("values") or []) > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def fmt_int(value: Any) -> str:
    return "—" if value is None or value == "" else f"{int(value):,}"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column: l, r or c."""
    align = align or "l" * len(header)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def produced_by(stage: str) -> str:
    """Which command is producing a report: `dvc repro` sets DVC_STAGE for the stages it runs."""
    return f"dvc repro (stage {os.environ['DVC_STAGE']})" if os.environ.get("DVC_STAGE") else f"mrt {stage}"


def check_markers(readme_path: str | Path, start_marker: str, end_marker: str) -> str:
    """The README's text, after checking it holds each marker exactly once, in order (ReportError if not)."""
    readme_path = Path(readme_path)
    if not readme_path.is_file():
        raise ReportError(f"{readme_path}: README not found")
    text = readme_path.read_text(encoding="utf-8")
    for marker in (start_marker, end_marker):
        count = text.count(marker)
        if count != 1:
            raise ReportError(
                f"{readme_path}: marker '{marker}' found {count} times, expected once; put one "
                f"'{start_marker}' and one '{end_marker}' line where the block belongs"
            )
    if text.index(end_marker) < text.index(start_marker):
        raise ReportError(f"{readme_path}: '{end_marker}' comes before '{start_marker}'")
    return text


def replace_marked_block(readme_path: str | Path, start_marker: str, end_marker: str, block: str) -> bool:
    """Put `block` between the two markers of the README (atomically; untouched if equal or on error).
    Shared by every generated README block (results, reliability). Returns whether the file changed."""
    text = check_markers(readme_path, start_marker, end_marker)
    start, end = text.index(start_marker), text.index(end_marker)
    new = text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]
    if new != text:
        write_text(readme_path, new)
    return new != text

