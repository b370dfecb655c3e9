"""The MME benchmark's release folder: read into `Row`s, and write (for the embedded MME-format set).

The release (`MME_Benchmark_release_version/`) uses two layouts side by side:

- flat — `existence/`, `count/`, `position/`, `color/`, `OCR/`, and the cognition subtasks:
  `<subtask>/<name>.png|jpg` beside `<subtask>/<name>.txt`;
- split — `artwork/`, `celebrity/`, `landmark/`, `posters/`, `scene/`:
  `<subtask>/images/<name>.jpg` and `<subtask>/questions_answer_YES_NO/<name>.txt`.

Each .txt holds one `question<TAB>Yes|No` line per question, two per image (one true, one false):
MME's acc+ counts an image only if both are answered right, so the pairing is part of the format.
Row ids are `<subtask>/<name>#<q>` (q = 0-based question number within the .txt), images are
relative to the MME root, answers stay "Yes"/"No" as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .records import DataError, RecordError, Row

SPLIT_QA_DIR = "questions_answer_YES_NO"
SPLIT_IMAGE_DIR = "images"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".JPG", ".JPEG", ".PNG", ".bmp", ".gif", ".webp")
ANSWERS = ("Yes", "No")
QUESTIONS_PER_IMAGE = 2
LAYOUTS = ("flat", "split")


@dataclass(frozen=True)
class MMEItem:
    name: str  # file stem, e.g. "0007"
    image: bytes  # encoded image file content
    questions: list[tuple[str, str]] = field(default_factory=list)  # [(question, "Yes"|"No")]
    ext: str = ".png"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _check_item(item: MMEItem) -> None:
    if not item.name or "/" in item.name or "\\" in item.name or item.name.startswith("."):
        raise ValueError(f"MME item name {item.name!r} must be a plain file stem")
    for q, a in item.questions:
        if a not in ANSWERS:
            raise ValueError(f"MME item {item.name}: answer {a!r} is not Yes or No")
        if not q.strip() or "\t" in q or "\n" in q:
            raise ValueError(f"MME item {item.name}: question {q!r} is empty or holds a tab/newline")


def write_mme_item(root: str | Path, subtask: str, item: MMEItem, layout: str = "flat") -> tuple[Path, Path]:
    """Write one image and its questions file; returns (image path, txt path)."""
    if layout not in LAYOUTS:
        raise ValueError(f"MME layout {layout!r}: expected one of {LAYOUTS}")
    _check_item(item)
    sub = Path(root) / subtask
    image_dir, txt_dir = (sub, sub) if layout == "flat" else (sub / SPLIT_IMAGE_DIR, sub / SPLIT_QA_DIR)
    image_dir.mkdir(parents=True, exist_ok=True)
    txt_dir.mkdir(parents=True, exist_ok=True)
    image_path = image_dir / f"{item.name}{item.ext}"
    txt_path = txt_dir / f"{item.name}.txt"
    image_path.write_bytes(item.image)
    txt_path.write_text("".join(f"{q}\t{a}\n" for q, a in item.questions), encoding="utf-8", newline="\n")
    return image_path, txt_path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _subtask_files(sub: Path) -> tuple[list[Path], Path]:
    """(question files, image folder) of a subtask folder in either layout."""
    qa = sub / SPLIT_QA_DIR
    if qa.is_dir():
        return sorted(qa.glob("*.txt")), sub / SPLIT_IMAGE_DIR
    return sorted(sub.glob("*.txt")), sub


def _read_txt(txt: Path, subtask: str, image_rel: str) -> tuple[list[Row], list[RecordError]]:
    rows: list[Row] = []
    errors: list[RecordError] = []
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [RecordError(str(txt), "", "", f"cannot read questions file: {exc}")]
    q = 0
    for ln, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        qid = q
        q += 1
        where = f"line {ln}"
        if "\t" not in line:
            errors.append(RecordError(str(txt), where, "answer", "no tab between question and answer"))
            continue
        question, answer = line.rsplit("\t", 1)
        question, answer = question.strip(), answer.strip()
        if answer not in ANSWERS:
            errors.append(RecordError(str(txt), where, "answer", f"expected exactly Yes or No, got {answer!r}"))
            continue
        if not question:
            errors.append(RecordError(str(txt), where, "question", "empty question"))
            continue
        rows.append(
            Row(
                id=f"{subtask}/{txt.stem}#{qid}",
                task=subtask,
                split="mme",
                instruction=question,
                answer=answer,
                image=image_rel,
                source=str(txt),
                index=ln - 1,
            )
        )
    if q != QUESTIONS_PER_IMAGE:
        errors.append(
            RecordError(str(txt), "", "", f"expected {QUESTIONS_PER_IMAGE} questions per image (one Yes, one No), found {q}")
        )
    return rows, errors


def read_mme(root: str | Path) -> tuple[list[Row], list[RecordError]]:
    """Rows of every subtask under an MME release root (both layouts) plus one RecordError per problem.

    Folders without question files (e.g. `eval_tool/`, `__MACOSX/`) are not subtasks and are skipped.
    DataError when the root is missing or holds no subtask at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError([RecordError(str(root), "", "", "MME folder not found")])
    rows: list[Row] = []
    errors: list[RecordError] = []
    subtasks = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        txts, image_dir = _subtask_files(sub)
        if not txts:
            continue
        subtasks += 1
        for txt in txts:
            image = _find_image(image_dir, txt.stem)
            if image is None:
                errors.append(
                    RecordError(str(txt), txt.stem, "image", f"no image {txt.stem}.* in {image_dir} for these questions")
                )
                continue
            got, errs = _read_txt(txt, sub.name, image.relative_to(root).as_posix())
            rows += got
            errors += errs
    if subtasks == 0:
        raise DataError([RecordError(str(root), "", "", "no MME subtask folders (<subtask>/*.txt) found")])
    return rows, errors
