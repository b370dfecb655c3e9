"""Data validation: the gate between data and training.

A data set is only worth training on if every record is well formed, every image it names exists,
decodes and is of a sane size, and nothing held out for evaluation also occurs in training. This
module checks all of that in one pass and writes a JSON report that lists every failure by file,
record and field, so that a bad record can be found and fixed without reading code or tracebacks.

Four kinds of checks, all always present in the report (so reports are comparable run to run):

- ``reader``: structural problems the readers found (missing turn, empty answer, duplicate id within a
  file, malformed JSON with line and column, a missing/malformed manifest). Records with such problems
  never reach the later checks; the good records still do.
- ``expectation``: a great-expectations suite over the flattened rows (required fields, known task per
  split, answer length, globally unique ids, known splits, image present/absent per split).
- ``file``: checks that need the image files (path inside its root, exists, size in bytes, decodes,
  side lengths). Each distinct image is read once; every record naming a bad image is listed.
- ``leakage``: a held-out, held-in or MME image whose bytes *or decoded pixels* equal a train/align
  image, and a held-out or held-in example (instruction, answer, image) copied from training. The
  held-in split asks the training task types, so only its images (never its tasks) must be unseen.

Ids must be unique across all splits, not only within a file: reports, leakage findings and
predictions all name records by id, so one id meaning two records would make them ambiguous.
Vision-Flan's ids are unique per file; our generator and the real-source splitter keep them unique
across files, and a data set that does not is rejected here rather than mis-reported later.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from components.core.files import write_text
from components.data.records import SPLITS, DataError, RecordError, Row

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from components.core.config import ValidateParams

# How many failures of one check the JSON report lists; the rest are counted ("more").
MAX_FAILURES_LISTED = 200
# How many failures of one check the human summary names.
SUMMARY_FAILURES_SHOWN = 3
# Longest allowed caption (align split) when ValidateParams has no max_caption_chars.
# Above this many distinct images a progress bar is shown (when stderr is a terminal).
PROGRESS_MIN_IMAGES = 500

# The subtasks of the official MME release (folder names of MME_Benchmark_release_version).
MME_SUBTASKS = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation",
    "code_reasoning",
)
ALIGN_TASK = "caption"
IMAGE_SPLITS = ("train", "heldout", "heldin", "align", "mme")
TRAINING_IMAGE_SPLITS = ("train", "align")
HELDOUT_IMAGE_SPLITS = ("heldout", "heldin", "mme")  # test images: none may occur in training

# Check names in report order, with what each one means. Kinds: reader, expectation, file, leakage.
CHECKS: dict[str, tuple[str, str]] = {
    "manifest": ("reader", "manifest.json exists, parses and names the files"),
    "file_readable": ("reader", "every file the manifest names exists and is readable"),
    "json_syntax": ("reader", "every annotation file is valid JSON"),
    "record_structure": ("reader", "every record has an id, a human and a gpt turn, non-empty values"),
    "split_nonempty": ("reader", "every split named in the manifest has at least one good record"),
    "required_fields": ("expectation", "id, task, split, instruction and answer are present"),
    "instruction_nonempty": ("expectation", "the instruction is not empty"),
    "known_split": ("expectation", "split is one of " + ", ".join(SPLITS)),
    "known_task": ("expectation", "the task is known for its split (manifest tasks, caption, MME)"),
    "answer_length": ("expectation", "answer length is within [min_answer_chars, max_answer_chars] (not captions)"),
    "caption_length": ("expectation", "caption length (align split) is within [min_answer_chars, max_caption_chars]"),
    "unique_id": ("expectation", "ids are unique across all splits"),
    "image_present": ("expectation", "records of image splits name an image"),
    "text_has_no_image": ("expectation", "text-only records name no image"),
    "image_path": ("file", "the image path stays inside its root (no '../', not absolute)"),
    "image_exists": ("file", "the image file exists"),
    "image_bytes": ("file", "the image file is non-empty and at most max_image_bytes"),
    "image_decodes": ("file", "the image decodes completely, in a supported mode (not 32-bit float)"),
    "image_dimensions": ("file", "both image sides are within [min_image_side, max_image_side]"),
    "leakage_image": ("leakage", "no held-out/held-in/MME image equals a train/align image (bytes or pixels)"),
    "leakage_example": ("leakage", "no held-out/held-in example (instruction, answer, image) is in training"),
}

# Row column → the record field a person would edit, per record format.
_VF_FIELDS = {
    "id": "id", "task": "task_name", "split": "split", "instruction": "conversations[0].value",
    "answer": "conversations[1].value", "image": "image",
}
_MME_FIELDS = {
    "id": "id", "task": "subtask", "split": "split", "instruction": "question", "answer": "answer",
    "image": "image",
}


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """One named check and every failure it found (each a file/record/field/message)."""

    name: str
    kind: str
    description: str
    failures: list[RecordError] = field(default_factory=list)
    error: str | None = None  # the check itself could not run (e.g. an expectation raised)

    @property
    def success(self) -> bool:
        return not self.failures and self.error is None

    @property
    def failed(self) -> int:
        return len(self.failures)

    def to_dict(self, cap: int | None = None) -> dict[str, Any]:
        listed = self.failures[: MAX_FAILURES_LISTED if cap is None else cap]
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "success": self.success,
            "failed": self.failed,
            "failures": [
                {"file": f.file, "record": f.record, "field": f.field, "message": f.message} for f in listed
            ],
            "more": self.failed - len(listed),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`; ``to_dict()`` is exactly what the JSON report holds."""

    data_dir: str
    checks: list[CheckResult]
    stats: dict[str, Any]
    report_path: str | None = None
    elapsed_s: float = 0.0  # not written to the report, so that reruns give identical files

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "data_dir": self.data_dir,
            "checks_failed": len(self.failed_checks),
            "checks": [c.to_dict() for c in self.checks],
            "stats": self.stats,
        }

    def summary(self, per_check: int = SUMMARY_FAILURES_SHOWN) -> str:
        """A few lines for a terminal: the verdict, then each failing check with its first records."""
        rows = self.stats.get("rows", 0)
        head = (
            f"validation {'PASSED' if self.success else 'FAILED'}: {self.data_dir} — {rows} rows, "
            f"{len(self.checks) - len(self.failed_checks)}/{len(self.checks)} checks passed"
            + (f" in {self.elapsed_s:.1f} s" if self.elapsed_s else "")
        )
        lines = [head]
        for c in self.failed_checks:
            lines.append(f"  ✗ {c.name} ({c.failed} failure{'s' if c.failed != 1 else ''}): {c.description}")
            if c.error:
                lines.append(f"      check could not run: {c.error}")
            for f in c.failures[:per_check]:
                lines.append(f"      {f}")
            if c.failed > per_check:
                lines.append(f"      … and {c.failed - per_check} more")
        return "\n".join(lines)


def _new_checks() -> dict[str, CheckResult]:
    return {name: CheckResult(name, kind, desc) for name, (kind, desc) in CHECKS.items()}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def validate_dataset(p: "ValidateParams", *, progress: bool | None = None) -> ValidationReport:
    """Validate the data dir ``p.data_dir``, write ``p.report`` and return the report.

    Never raises for bad data: every problem becomes a failure in the report. ``progress`` shows a
    progress bar over the image files (default: only for large sets on a terminal).
    """
    start = time.perf_counter()
    checks = _new_checks()
    data_dir = Path(p.data_dir)
    stats: dict[str, Any] = {"rows": 0}

    loaded = _load(data_dir, checks)
    if loaded is None:
        return _finish(p, checks, stats, start)
    manifest, rows, errors, image_root, mme_root = loaded
    _check_manifest(manifest, data_dir, checks["manifest"])

    stats.update(_row_stats(rows, errors))
    if rows:
        try:
            _run_expectations(rows, manifest, p, checks)
        except Exception as exc:  # a GX failure must fail validation visibly, not crash the stage
            for c in checks.values():
                if c.kind == "expectation":
                    c.error = f"great-expectations could not run the suite: {type(exc).__name__}: {exc}"

        infos = _check_files(rows, image_root, mme_root, p, checks, progress)
        _check_leakage(rows, infos, checks)
        stats["images"] = _image_stats(infos)
    return _finish(p, checks, stats, start)


def _finish(p: "ValidateParams", checks: dict[str, CheckResult], stats: dict, start: float) -> ValidationReport:
    stats["failed_records"] = len(
        {(f.file, f.record) for c in checks.values() for f in c.failures if f.record}
    )
    report = ValidationReport(
        data_dir=str(p.data_dir), checks=list(checks.values()), stats=stats, report_path=str(p.report)
    )
    write_report(report, Path(p.report))
    report.elapsed_s = time.perf_counter() - start
    return report


def write_report(report: ValidationReport, path: Path) -> None:
    """Write the JSON report atomically, so a crash never leaves a half-written 'passed' file."""
    write_text(path, json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# reader-level checks
# ---------------------------------------------------------------------------------------------
def _load(data_dir: Path, checks: dict[str, CheckResult]) -> tuple[dict, list[Row], list[RecordError], Path, Path | None] | None:
    """Read the manifest, then each split on its own, so one unreadable file (a truncated JSON)
    fails its own check while every other split is still validated. None when there is no manifest.
    """
    from components.data.load import load_dataset_dir, read_manifest  # imported here: no import-time cost

    try:
        manifest = read_manifest(data_dir)
    except DataError as exc:
        checks["manifest"].failures.extend(exc.errors)
        return None
    except OSError as exc:  # unreadable directory: still a report, not a traceback
        checks["manifest"].failures.append(RecordError(str(data_dir / "manifest.json"), "", "", f"cannot read: {exc}"))
        return None

    files = manifest["files"]
    wanted = [s for s in SPLITS if s in files] + (["mme"] if manifest.get("mme_root") else [])
    rows: list[Row] = []
    errors: list[RecordError] = []
    image_root: Path = data_dir / manifest["image_root"]
    mme_root: Path | None = None
    for split in wanted:
        try:
            part = load_dataset_dir(data_dir, splits=(split,))
        except DataError as exc:
            for err in exc.errors:
                checks[_reader_check_name(err, whole_file=True)].failures.append(err)
            continue
        image_root = Path(part.image_root)
        if split == "mme":
            mme_root = part.mme_root
        rows += part.rows
        errors += part.errors
        for err in part.errors:
            checks[_reader_check_name(err)].failures.append(err)
        if not part.rows:
            where = str(part.mme_root) if split == "mme" else str(data_dir / files[split])
            checks["split_nonempty"].failures.append(RecordError(where, "", "", f"split {split!r} has no good records"))
    return manifest, rows, errors, image_root, mme_root


def _reader_check_name(err: RecordError, whole_file: bool = False) -> str:
    """Sort a reader error into the check it belongs to (by file, record and field)."""
    if Path(err.file).name == "manifest.json":
        return "manifest"
    if err.record.startswith("line ") and " col " in err.record:
        return "json_syntax"
    if whole_file:  # missing file, not UTF-8, not a list, no MME folder
        return "file_readable"
    if err.field == "image" and ("escape" in err.message or "absolute" in err.message):
        return "image_path"  # the reader refused the path; the row was dropped, the file never opened
    return "record_structure"


def _check_manifest(manifest: dict, data_dir: Path, check: CheckResult) -> None:
    """What read_manifest leaves to us: the task tables that the known-task check relies on."""
    file = str(data_dir / "manifest.json")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict):
        check.failures.append(RecordError(file, "", "tasks", "expected a mapping of task name → task info"))
        return
    for name, info in tasks.items():
        split = info.get("split") if isinstance(info, dict) else None
        if split not in ("train", "heldout"):
            check.failures.append(RecordError(
                file, "", f"tasks.{name}.split", f"expected 'train' or 'heldout', got {split!r}"))
    text_tasks = manifest.get("text_tasks")
    if text_tasks is not None and not isinstance(text_tasks, dict):
        check.failures.append(RecordError(file, "", "text_tasks", "expected a mapping of task name → task info"))
    # A real source (Vision-Flan) is converted by `mrt data`, which drops bad records and lists them in
    # the manifest: they must fail validation here, or they would vanish silently.
    dropped = (manifest.get("counts") or {}).get("read_errors") or 0
    if dropped:
        listed = manifest.get("read_errors") or []
        for msg in listed:
            check.failures.append(RecordError(file, "", "read_errors", f"dropped by `mrt data`: {msg}"))
        if len(listed) < dropped:
            check.failures.append(RecordError(
                file, "", "read_errors", f"{dropped - len(listed)} more records were dropped by `mrt data`"))


def _row_stats(rows: list[Row], errors: list[RecordError]) -> dict[str, Any]:
    per_split = Counter(r.split for r in rows)
    per_task: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        per_task[r.split][r.task] += 1
    return {
        "rows": len(rows),
        "reader_errors": len(errors),
        "rows_per_split": dict(sorted(per_split.items())),
        "rows_per_task": {s: dict(sorted(c.items())) for s, c in sorted(per_task.items())},
    }


# ---------------------------------------------------------------------------------------------
# great-expectations suite over the rows
# ---------------------------------------------------------------------------------------------
def rows_frame(rows: Iterable[Row]) -> "pd.DataFrame":
    """Rows → DataFrame (one column per Row field, default RangeIndex = position in ``rows``)."""
    import pandas as pd

    cols = ("id", "task", "split", "instruction", "answer", "image", "source", "index")
    return pd.DataFrame([[getattr(r, c) for c in cols] for r in rows], columns=list(cols), dtype=object)


def known_task_pairs(manifest: dict) -> list[tuple[str, str]]:
    """(split, task) pairs that may occur, from the manifest.

    train/heldout: the manifest's tasks in their own split (so a held-out task inside the train file
    fails: task leakage); heldin: the training tasks (a held-out task there fails too); align: the caption task; text: the manifest's ``text_tasks`` (else any task
    name or question type, for manifests written without that table); mme: the official subtasks
    plus any the manifest lists.
    """
    def table(key: str) -> dict:
        value = manifest.get(key)
        return value if isinstance(value, dict) else {}

    caption = table("caption_task").get("name") or ALIGN_TASK
    pairs: set[tuple[str, str]] = {("align", caption)}
    fallback_text: set[str] = set()
    for name, info in table("tasks").items():
        info = info if isinstance(info, dict) else {}
        split = info.get("split")
        for s in ((split,) if split in ("train", "heldout") else ("train", "heldout")):
            pairs.add((s, name))
            if s == "train":
                pairs.add(("heldin", name))
        fallback_text.add(name)
        if isinstance(info.get("type"), str):
            fallback_text.add(info["type"])
    pairs.update(("text", t) for t in (table("text_tasks") or fallback_text))
    pairs.update(("mme", t) for t in (*MME_SUBTASKS, *table("mme_subtasks")))
    return sorted(pairs)


def _build_suite(gx: Any, p: "ValidateParams", pairs: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    return [
        *[(f"required_fields:{col}", E.ExpectColumnValuesToNotBeNull(column=col))
          for col in ("id", "task", "split", "instruction", "answer")],
        ("instruction_nonempty", E.ExpectColumnValueLengthsToBeBetween(column="instruction", min_value=1)),
        ("known_split", E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))),
        ("known_task", E.ExpectColumnPairValuesToBeInSet(
            column_A="split", column_B="task", value_pairs_set=pairs, ignore_row_if="either_value_is_missing")),
        ("answer_length", E.ExpectColumnValueLengthsToBeBetween(
            column="answer", min_value=p.min_answer_chars, max_value=p.max_answer_chars,
            row_condition=Column("split") != "align")),
        ("caption_length", E.ExpectColumnValueLengthsToBeBetween(
            column="answer", min_value=p.min_answer_chars, max_value=p.max_caption_chars,
            row_condition=Column("split") == "align")),
        ("unique_id", E.ExpectColumnValuesToBeUnique(column="id")),
        ("image_present", E.ExpectColumnValuesToNotBeNull(
            column="image", row_condition=Column("split").is_in(list(IMAGE_SPLITS)))),
        ("text_has_no_image", E.ExpectColumnValuesToBeNull(column="image", row_condition=Column("split") == "text")),
    ]


def _gx_context(gx: Any) -> Any:
    """An in-memory context with progress bars and analytics off (nothing written to disk)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_expectations(rows: list[Row], manifest: dict, p: "ValidateParams", checks: dict[str, CheckResult]) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    df = rows_frame(rows)
    named = _build_suite(gx, p, known_task_pairs(manifest))
    context = _gx_context(gx)
    batch = (
        context.data_sources.add_pandas("mrt_rows")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="mrt_rows", expectations=[e for _, e in named]))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="mrt_rows", data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})

    id_positions: dict[Any, list[int]] = defaultdict(list)
    for pos, row in enumerate(rows):
        id_positions[row.id].append(pos)
    # Results come back in suite order; match them to our names by expectation id to be safe.
    by_id = {e.id: name for name, e in named}
    for res in result.results:
        name = by_id.get(res.expectation_config.id)
        if name is None:
            continue
        check = checks[name.split(":")[0]]
        info = res.exception_info or {}
        if info.get("raised_exception"):
            check.error = f"{res.expectation_config.type} raised: {info.get('exception_message')}"
            continue
        if res.success:
            continue
        column = name.split(":")[1] if ":" in name else None
        indexes = res.result.get("unexpected_index_list") or []
        for i in indexes:
            check.failures.append(_expectation_failure(name.split(":")[0], column, rows, int(i), id_positions, p))
        if not indexes:  # an aggregate failure with no rows to name
            check.failures.append(RecordError(str(p.data_dir), "", column or "", f"{res.expectation_config.type} failed"))


def _field(row: Row, column: str) -> str:
    return (_MME_FIELDS if row.split == "mme" else _VF_FIELDS).get(column, column)


def _record_name(row: Row) -> str:
    return row.id if isinstance(row.id, str) and row.id else f"#{row.index}"


def _expectation_failure(name: str, column: str | None, rows: list[Row], i: int,
                         id_positions: dict[Any, list[int]], p: "ValidateParams") -> RecordError:
    row = rows[i]
    if name == "required_fields":
        col = column or "id"
        return RecordError(row.source, _record_name(row), _field(row, col), f"{col} is missing")
    if name == "instruction_nonempty":
        return RecordError(row.source, _record_name(row), _field(row, "instruction"), "instruction is empty")
    if name == "known_split":
        return RecordError(row.source, _record_name(row), "split",
                           f"unknown split {row.split!r}; known: {', '.join(SPLITS)}")
    if name == "known_task":
        return RecordError(row.source, _record_name(row), _field(row, "task"),
                           f"task {row.task!r} is not a known task of split {row.split!r} "
                           "(see manifest.json 'tasks')")
    if name == "answer_length":
        n = len(row.answer) if isinstance(row.answer, str) else 0
        return RecordError(row.source, _record_name(row), _field(row, "answer"),
                           f"answer has {n} characters; expected {p.min_answer_chars}–{p.max_answer_chars}")
    if name == "caption_length":
        n = len(row.answer) if isinstance(row.answer, str) else 0
        return RecordError(row.source, _record_name(row), _field(row, "answer"),
                           f"caption has {n} characters; expected {p.min_answer_chars}–{p.max_caption_chars}")
    if name == "unique_id":
        others = [f"{rows[j].source} #{rows[j].index}" for j in id_positions.get(row.id, []) if j != i][:3]
        return RecordError(row.source, _record_name(row), "id",
                           f"duplicate id {row.id!r}; also used by {', '.join(others)}")
    if name == "image_present":
        return RecordError(row.source, _record_name(row), "image",
                           f"no image, but split {row.split!r} needs one")
    if name == "text_has_no_image":
        return RecordError(row.source, _record_name(row), "image",
                           f"text-only record names an image ({row.image!r})")
    return RecordError(row.source, _record_name(row), column or "", f"{name} failed")


# ---------------------------------------------------------------------------------------------
# file checks
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageInfo:
    """What reading one image file found; cached per path so shared images are read once."""

    path: str
    problem: tuple[str, str] | None = None  # (check name, message)
    size_bytes: int = 0
    byte_hash: str | None = None
    pixel_hash: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0


def inspect_image(path: Path, p: "ValidateParams") -> ImageInfo:
    """Stat, read, hash and decode one image, stopping at the first problem (never raises)."""
    from PIL import Image

    info = ImageInfo(str(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        info.problem = ("image_exists", f"image file not found: {path}")
        return info
    except OSError as exc:
        info.problem = ("image_exists", f"image file cannot be read: {path} ({exc})")
        return info
    if not path.is_file():
        info.problem = ("image_exists", f"not a regular file: {path}")
        return info
    info.size_bytes = st.st_size
    if st.st_size == 0:
        info.problem = ("image_bytes", f"image file is empty (0 bytes): {path}")
        return info
    if st.st_size > p.max_image_bytes:
        info.problem = ("image_bytes", f"image file has {st.st_size} bytes, more than max_image_bytes="
                                       f"{p.max_image_bytes}: {path}")
        return info
    try:
        data = path.read_bytes()
    except OSError as exc:
        info.problem = ("image_exists", f"image file cannot be read: {path} ({exc})")
        return info
    info.byte_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            info.mode, (info.width, info.height) = im.mode, im.size
            if not (p.min_image_side <= im.width <= p.max_image_side
                    and p.min_image_side <= im.height <= p.max_image_side):
                # Checked from the header, before decoding: a huge image is never decompressed.
                info.problem = ("image_dimensions", f"image is {im.width}x{im.height}; each side must be within "
                                                    f"[{p.min_image_side}, {p.max_image_side}]: {path}")
                return info
            im.load()
            from components.data.images import unsupported_image_mode  # the rule train/predict/benchmark apply

            why = unsupported_image_mode(im.mode)
            if why:
                info.problem = ("image_decodes", f"{why}: {path}")
                return info
            digest = hashlib.blake2b(digest_size=16)
            digest.update(f"{im.mode}:{im.width}x{im.height}:".encode())
            digest.update(im.tobytes())
            info.pixel_hash = digest.hexdigest()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        info.problem = ("image_decodes", f"image cannot be decoded ({type(exc).__name__}: {exc}): {path}")
    return info


def _check_files(rows: list[Row], image_root: Path, mme_root: Any, p: "ValidateParams",
                 checks: dict[str, CheckResult], progress: bool | None) -> dict[int, ImageInfo]:
    """Check every referenced image once; list every record that names a bad one.

    Returns the ImageInfo of each row by position in ``rows`` (rows without an image or with an escaping path are absent).
    """
    from components.data.load import resolve_image

    resolved: list[tuple[int, Row, Path]] = []
    for pos, row in enumerate(rows):
        if not isinstance(row.image, str) or not row.image:
            continue
        root = Path(mme_root) if row.split == "mme" and mme_root is not None else image_root
        try:
            resolved.append((pos, row, resolve_image(root, row.image)))
        except ValueError as exc:
            checks["image_path"].failures.append(RecordError(
                row.source, _record_name(row), _field(row, "image"), f"{exc}; the file was not opened"))

    unique_paths = list(dict.fromkeys(path for _, _, path in resolved))
    cache: dict[Path, ImageInfo] = {}
    show = progress if progress is not None else (len(unique_paths) >= PROGRESS_MIN_IMAGES and sys.stderr.isatty())
    if show:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("checking images", total=len(unique_paths))
            for path in unique_paths:
                cache[path] = inspect_image(path, p)
                bar.advance(task)
    else:
        for path in unique_paths:
            cache[path] = inspect_image(path, p)

    infos: dict[int, ImageInfo] = {}
    for pos, row, path in resolved:
        info = cache[path]
        infos[pos] = info
        if info.problem is not None:
            name, message = info.problem
            checks[name].failures.append(RecordError(row.source, _record_name(row), _field(row, "image"), message))
    return infos


def _image_stats(infos: dict[int, ImageInfo]) -> dict[str, Any]:
    distinct = {i.path: i for i in infos.values()}.values()
    decoded = [i for i in distinct if i.pixel_hash is not None]
    modes = Counter(i.mode for i in decoded)
    sides = [s for i in decoded for s in (i.width, i.height)]
    return {
        "distinct": len(distinct),
        "decoded": len(decoded),
        # Non-RGB modes (L, RGBA, P, I;16…) are not failures — every stage converts them by
        # components.data.images.to_rgb (16-bit scaled to 8) — but are noted; mode F fails image_decodes.
        "modes": dict(sorted(modes.items())),
        "min_side": min(sides) if sides else None,
        "max_side": max(sides) if sides else None,
        "total_bytes": sum(i.size_bytes for i in distinct),
    }


# ---------------------------------------------------------------------------------------------
# leakage
# ---------------------------------------------------------------------------------------------
def _check_leakage(rows: list[Row], infos: dict[int, ImageInfo], checks: dict[str, CheckResult]) -> None:
    """Held-out/held-in/MME images must not occur in train/align; their examples must not be copies."""
    by_bytes: dict[str, Row] = {}
    by_pixels: dict[str, Row] = {}
    examples: dict[tuple[str, str, str], Row] = {}
    for pos, row in enumerate(rows):
        info = infos.get(pos)
        if row.split not in TRAINING_IMAGE_SPLITS or info is None:
            continue
        if info.byte_hash:
            by_bytes.setdefault(info.byte_hash, row)
        if info.pixel_hash:
            by_pixels.setdefault(info.pixel_hash, row)
        key = _example_key(row, info)
        if key:
            examples.setdefault(key, row)

    for pos, row in enumerate(rows):
        info = infos.get(pos)
        if row.split not in HELDOUT_IMAGE_SPLITS or info is None:
            continue
        twin, how = by_bytes.get(info.byte_hash or ""), "bytes"
        if twin is None:
            twin, how = by_pixels.get(info.pixel_hash or ""), "pixels"
        if twin is not None:
            checks["leakage_image"].failures.append(RecordError(
                row.source, _record_name(row), _field(row, "image"),
                f"{row.split} image {row.image!r} has the same {how} as {twin.split} image {twin.image!r} "
                f"of record {_record_name(twin)} in {twin.source}"))
        key = _example_key(row, info)
        twin = examples.get(key) if key else None
        if twin is not None:
            checks["leakage_example"].failures.append(RecordError(
                row.source, _record_name(row), _field(row, "instruction"),
                f"{row.split} example (instruction, answer, image) is identical to {twin.split} record "
                f"{_record_name(twin)} in {twin.source}"))


def _example_key(row: Row, info: ImageInfo) -> tuple[str, str, str] | None:
    image_hash = info.pixel_hash or info.byte_hash
    if not image_hash or not isinstance(row.instruction, str) or not isinstance(row.answer, str):
        return None
    return (" ".join(row.instruction.split()).lower(), row.answer.strip().lower(), image_hash)
