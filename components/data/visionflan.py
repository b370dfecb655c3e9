"""Vision-Flan / LLaVA conversation JSON: read into `Row`s (reporting every bad record), and write.

The format (Vision-Flan's `annotation_191-task_1k.json`, LLaVA's instruction files, and ours):
a JSON list of `{"id", "task_name", "image", "conversations": [{"from": "human", "value":
"<image>\\n…"}, {"from": "gpt", "value": "…"}]}`. `image` is relative to the image folder;
`task_name` is optional (the task is then the image's folder, as in Vision-Flan's image tree).
Text-only records have no `image` and no `<image>` marker; they are valid only in the text split,
so a training record that lost its image is an error instead of silently becoming text-only.

Multi-turn records (LLaVA) become one row per human/gpt pair, with ids `<id>#turn<k>`; single-turn
records (Vision-Flan, ours) keep their id.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from components.core.files import write_text

from .paths import normalize_image_path
from .records import DataError, RecordError, Row

IMAGE_MARKER = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
KEY_ORDER = ("id", "task_name", "image", "conversations")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def make_record(id: str, task: str, instruction: str, answer: str, image: str | None = None) -> dict:
    """One single-turn record in the canonical key order (image records get the `<image>` marker)."""
    rec: dict[str, Any] = {"id": id, "task_name": task}
    if image is not None:
        rec["image"] = image
    human = f"{IMAGE_MARKER}\n{instruction}" if image is not None else instruction
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return rec


def row_to_record(row: Row) -> dict:
    return make_record(row.id, row.task, row.instruction, row.answer, row.image)


def _ordered(rec: dict) -> dict:
    out = {k: rec[k] for k in KEY_ORDER if k in rec}
    out.update((k, v) for k, v in rec.items() if k not in out)
    if isinstance(out.get("conversations"), list):
        out["conversations"] = [
            {**{k: t[k] for k in ("from", "value") if k in t}, **{k: v for k, v in t.items() if k not in ("from", "value")}}
            if isinstance(t, dict)
            else t
            for t in out["conversations"]
        ]
    return out


def dumps_json(obj: Any) -> str:
    """The one JSON style of the data set: indent 1, UTF-8 as is, trailing newline."""
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_visionflan(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as a Vision-Flan JSON list, keys in the canonical order; returns the path."""
    path = Path(path)
    write_text(path, dumps_json([_ordered(r) for r in records]))
    return path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_json_list(path: Path) -> list:
    """The top-level JSON list of `path`; DataError (file, "line L col C") when unreadable."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError([RecordError(name, "", "", "file not found")]) from None
    except UnicodeDecodeError as exc:
        raise DataError([RecordError(name, f"byte {exc.start}", "", "not valid UTF-8")]) from None
    except OSError as exc:
        raise DataError([RecordError(name, "", "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            [RecordError(name, f"line {exc.lineno} col {exc.colno}", "", f"malformed JSON: {exc.msg}")]
        ) from None
    if not isinstance(data, list):
        raise DataError([RecordError(name, "", "", f"expected a JSON list of records, got a {type(data).__name__}")])
    return data


def _turn_problems(conv: list, k: int, role: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(stripped value or None, [(field, message)]) for turn k that should come from `role`."""
    roles = HUMAN_ROLES if role == "human" else GPT_ROLES
    name = f"conversations[{k}]"
    if k >= len(conv):
        return None, [(name, f"missing {role} turn")]
    turn = conv[k]
    if not isinstance(turn, dict):
        return None, [(name, f"expected an object with 'from' and 'value', got {type(turn).__name__}")]
    problems = []
    if turn.get("from") not in roles:
        problems.append((f"{name}.from", f"expected {' or '.join(repr(r) for r in roles)}, got {turn.get('from')!r}"))
    value = turn.get("value")
    if not isinstance(value, str):
        problems.append((f"{name}.value", f"expected a string, got {type(value).__name__}"))
        return None, problems
    stripped = value.replace(IMAGE_MARKER, "").strip() if role == "human" else value.strip()
    if not stripped:
        problems.append((f"{name}.value", "empty " + ("instruction" if role == "human" else "answer")))
    return (stripped or None), problems


def parse_record(rec: Any, index: int, source: str, split: str) -> tuple[list[Row], list[tuple[str, str]], str | None]:
    """(rows, [(field, message)], valid id or None) for one record; rows only if there is no problem."""
    if not isinstance(rec, dict):
        return [], [("", f"expected a JSON object, got {type(rec).__name__}")], None
    problems: list[tuple[str, str]] = []

    rid = rec.get("id")
    if "id" not in rec:
        problems.append(("id", "missing id"))
        rid = None
    elif not isinstance(rid, str) or not rid.strip():
        problems.append(("id", f"id must be a non-empty string, got {rid!r}"))
        rid = None

    image = rec.get("image")
    if split == "text":
        if image is not None:
            problems.append(("image", "the text split holds text-only records; this one has an image"))
        image = None
    elif image is None:
        problems.append(("image", f"missing image (only the text split may hold text-only records; split is {split!r})"))
    elif not isinstance(image, str):
        problems.append(("image", f"expected a string path, got {type(image).__name__}"))
        image = None
    else:
        try:
            image = normalize_image_path(image)
        except ValueError as exc:
            problems.append(("image", str(exc)))
            image = None

    task = rec.get("task_name")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        problems.append(("task_name", f"task_name must be a non-empty string, got {task!r}"))
        task = None
    elif task is None and "image" in rec and image is not None:
        task = PurePosixPath(image).parent.name or None
        if task is None:
            problems.append(("task_name", "no task_name and the image is not inside a task folder"))
    elif task is None and split == "text":
        problems.append(("task_name", "text-only records need a task_name"))

    conv = rec.get("conversations")
    pairs: list[tuple[str, str]] = []
    if "conversations" not in rec:
        problems.append(("conversations", "missing conversations"))
    elif not isinstance(conv, list):
        problems.append(("conversations", f"expected a list of turns, got {type(conv).__name__}"))
    else:
        for k in range(0, max(len(conv), 1), 2):
            instr, p1 = _turn_problems(conv, k, "human")
            answer, p2 = _turn_problems(conv, k + 1, "gpt")
            problems += p1 + p2
            if split == "text" and k < len(conv) and isinstance(conv[k], dict):
                if IMAGE_MARKER in str(conv[k].get("value", "")):
                    problems.append((f"conversations[{k}].value", f"text-only record contains the {IMAGE_MARKER} marker"))
            if instr and answer:
                pairs.append((instr, answer))

    if problems:
        return [], problems, rid
    assert rid is not None and task is not None
    ids = [rid] if len(pairs) == 1 else [f"{rid}#turn{j}" for j in range(len(pairs))]
    rows = [
        Row(id=i, task=task, split=split, instruction=q, answer=a, image=image, source=source, index=index)
        for i, (q, a) in zip(ids, pairs)
    ]
    return rows, [], rid


def read_visionflan(annotation: Path, image_root: Path, split: str) -> tuple[list[Row], list[RecordError]]:
    """Rows of a Vision-Flan/LLaVA annotation file plus one RecordError per problem.

    `image_root` is where the record's images live; paths are checked to stay inside it (no file is
    opened here: existence and decoding are validation's job). Raises DataError only when the file
    as a whole cannot be read (missing, not UTF-8, malformed JSON, not a list).
    """
    annotation = Path(annotation)
    source = str(annotation)
    data = load_json_list(annotation)
    rows: list[Row] = []
    errors: list[RecordError] = []
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        got, problems, rid = parse_record(rec, i, source, split)
        label = rid if rid is not None else f"#{i}"
        errors += [RecordError(source, label, f, m) for f, m in problems]
        if rid is not None:
            if rid in first_seen:
                errors.append(RecordError(source, rid, "id", f"duplicate id (first at #{first_seen[rid]}, again at #{i})"))
                continue
            first_seen[rid] = i
        rows += got
    return rows, errors
