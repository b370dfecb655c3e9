"""MME scoring that agrees with the official MME tool, and the results layout that tool reads.

The official tool (`eval_tool/calculation.py` of the MME release) reads one file per subtask,
`<subtask>.txt`, each line `image<TAB>question<TAB>gt<TAB>prediction`, and takes the lines two at a
time as the two questions of one image (by position, not by name). Per subtask: acc = share of
questions whose yes/no reading (:func:`~components.evaluation.metrics.text.mme_yes_no`) equals the lower-cased
gt, acc+ = share of images with both right, score = 100·acc + 100·acc+; perception and cognition are
the sums over their subtasks. Published MME numbers come from that tool, so this module copies its
arithmetic (same operations in the same order, so floats agree to the last bit) and its reading of
the file. Where the tool would crash (a missing field, an odd line count, a gt other than yes/no)
or silently mis-pair (the two lines of a pair naming different images), this module raises a
ValueError that names the file and the line instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.files import write_text
from components.evaluation.metrics.text import mme_yes_no

PERCEPTION_SUBTASKS = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS


@dataclass(frozen=True)
class MMEAnswer:
    """One answered MME question: the unit both the writer and the scorers work on."""

    subtask: str
    image: str
    question: str
    answer: str  # ground truth, "Yes"/"No" (any case)
    prediction: str


@dataclass(frozen=True)
class _Question:
    gt: str  # lower-cased ground truth as the tool sees it
    pred: str  # raw prediction


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def _check_subtask(name: str, where: str) -> None:
    if name not in MME_SUBTASKS:
        raise ValueError(f"{where}: unknown MME subtask {name!r}; expected one of {', '.join(MME_SUBTASKS)}")


def _score_subtask(pairs: Sequence[tuple[_Question, _Question]]) -> dict[str, Any]:
    """acc, acc+ and score of one subtask, computed as the official tool does (×100)."""
    n_questions = 2 * len(pairs)
    correct = other = both = 0
    for pair in pairs:
        right = 0
        for q in pair:
            label = mme_yes_no(q.pred)
            other += label == "other"
            right += label == q.gt
        correct += right
        both += right == 2
    acc = correct / n_questions  # sklearn's accuracy_score: mean of 0/1 hits, exact for these counts
    acc_plus = both / len(pairs)
    score = 0
    score += acc * 100  # the tool adds acc·100, then acc+·100, to a running total
    score += acc_plus * 100
    return {
        "acc": acc * 100,
        "acc_plus": acc_plus * 100,
        "score": score,
        "questions": n_questions,
        "images": len(pairs),
        "other": other,
    }


def _summarise(per_subtask: dict[str, dict[str, Any]]) -> dict[str, Any]:
    perception = 0
    cognition = 0
    ordered: dict[str, dict[str, Any]] = {}
    for name in MME_SUBTASKS:  # the tool's order, so the sums round the same way
        if name in per_subtask:
            ordered[name] = per_subtask[name]
            if name in PERCEPTION_SUBTASKS:
                perception += per_subtask[name]["score"]
            else:
                cognition += per_subtask[name]["score"]
    return {
        "subtasks": ordered,
        "perception": float(perception),
        "cognition": float(cognition),
        "total": float(perception + cognition),
    }


def _gt(answer: str, where: str) -> str:
    gt = answer.lower()
    if gt not in ("yes", "no"):
        raise ValueError(f"{where}: ground truth must be Yes or No, got {answer!r}")
    return gt


def score_mme(
    predictions: Sequence[str],
    references: Sequence[str],
    subtasks: Sequence[str],
    images: Sequence[str],
) -> dict[str, Any]:
    """Score answered MME questions held in memory.

    The questions of an image are grouped by (subtask, image) name; each image must have exactly
    two. When the two questions of every image are adjacent (the MME layout) the groups are the
    ones the official tool forms by position, so the numbers are identical.

    Returns ``{"subtasks": {name: {acc, acc_plus, score, questions, images, other}}, "perception",
    "cognition", "total"}`` with acc, acc_plus and score in percent (score ≤ 200 per subtask).
    """
    n = len(predictions)
    lengths = {"references": len(references), "subtasks": len(subtasks), "images": len(images)}
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        sizes = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise ValueError(f"MME inputs differ in length: predictions {n}, {sizes}")
    if n == 0:
        raise ValueError("MME: no predictions to score")
    groups: dict[str, dict[str, list[_Question]]] = {}
    for i, (pred, ref, sub, img) in enumerate(zip(predictions, references, subtasks, images)):
        where = f"MME input #{i} (subtask {sub!r}, image {img!r})"
        _check_subtask(sub, where)
        if not isinstance(pred, str):
            raise ValueError(f"{where}: prediction must be a str, got {type(pred).__name__}")
        groups.setdefault(sub, {}).setdefault(img, []).append(_Question(_gt(ref, where), pred))
    per_subtask = {}
    for sub, by_image in groups.items():
        pairs = []
        for img, questions in by_image.items():
            if len(questions) != 2:
                raise ValueError(
                    f"MME subtask {sub!r}, image {img!r}: expected 2 questions per image, got {len(questions)}"
                )
            pairs.append((questions[0], questions[1]))
        per_subtask[sub] = _score_subtask(pairs)
    return _summarise(per_subtask)


# ---------------------------------------------------------------------------------------------
# the official results folder
# ---------------------------------------------------------------------------------------------
def _read_results_file(path: Path) -> list[tuple[_Question, _Question]]:
    try:
        # Text mode with universal newlines and readlines(): the tool's own reading of the file.
        with path.open(encoding="utf-8") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    if not lines:
        raise ValueError(f"{path}: empty results file (expected two lines per image)")
    if len(lines) % 2:
        raise ValueError(
            f"{path}: {len(lines)} lines, an odd number; every image needs its two questions on consecutive lines"
        )
    parsed: list[tuple[str, _Question]] = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.rstrip("\n").split("\t")
        where = f"{path}, line {lineno}"
        if len(fields) != 4:
            raise ValueError(
                f"{where}: expected 4 tab-separated fields (image, question, gt, prediction), got {len(fields)}"
            )
        image, _question, gt, pred = fields
        if not image:
            raise ValueError(f"{where}: empty image field")
        parsed.append((image, _Question(_gt(gt, f"{where}, field 'gt'"), pred)))
    pairs = []
    for k in range(0, len(parsed), 2):
        (img_a, qa), (img_b, qb) = parsed[k], parsed[k + 1]
        if img_a != img_b:
            raise ValueError(
                f"{path}, lines {k + 1}-{k + 2}: the two questions of an image must be consecutive, "
                f"but they name different images ({img_a!r}, {img_b!r})"
            )
        pairs.append((qa, qb))
    return pairs


def score_mme_results(results_dir: str | Path, subtasks: Iterable[str] | None = None) -> dict[str, Any]:
    """Score an official-layout MME results folder exactly as the official tool does.

    ``subtasks`` None scores every known subtask whose ``<subtask>.txt`` is present and refuses
    any other ``*.txt`` (a misspelt ``ocr.txt`` must not vanish from the perception sum silently);
    naming subtasks scores just those and each file must exist. Same result shape as
    :func:`score_mme`.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: MME results folder not found")
    if subtasks is None:
        present = {p.stem for p in root.glob("*.txt") if p.is_file()}
        unknown = sorted(present - set(MME_SUBTASKS))
        if unknown:
            raise ValueError(
                f"{root}: files that are not MME subtasks: {', '.join(u + '.txt' for u in unknown)} "
                f"(expected names: {', '.join(MME_SUBTASKS)}; pass subtasks= to score a subset)"
            )
        names = [s for s in MME_SUBTASKS if s in present]
        if not names:
            raise ValueError(f"{root}: no MME results files (<subtask>.txt) found")
    else:
        names = list(subtasks)
        for s in names:
            _check_subtask(s, str(root))
            if not (root / f"{s}.txt").is_file():
                raise ValueError(f"{root / (s + '.txt')}: results file not found")
    return _summarise({s: _score_subtask(_read_results_file(root / f"{s}.txt")) for s in names})


_SPACES = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def _clean(text: str) -> str:
    """Tabs and line breaks would split the tool's line or field; each becomes one space.

    One for one, so the first four characters keep their places and the tool's yes/no reading of
    the written prediction equals :func:`mme_yes_no` of the original.
    """
    return text.translate(_SPACES)


def _field(obj: Any, names: tuple[str, ...], index: int) -> Any:
    for name in names:
        if isinstance(obj, Mapping):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    raise ValueError(f"MME result #{index}: missing field {' / '.join(repr(n) for n in names)}")


def _as_item(obj: Any, index: int) -> MMEAnswer:
    """Accept an MMEAnswer, a (Row, prediction) pair, or a mapping/object with the fields."""
    if isinstance(obj, MMEAnswer):
        item = obj
    else:
        if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], str):
            row, prediction = obj
        else:
            row, prediction = obj, _field(obj, ("prediction",), index)
        item = MMEAnswer(
            subtask=_field(row, ("subtask", "task"), index),
            image=_field(row, ("image",), index),
            question=_field(row, ("question", "instruction"), index),
            answer=_field(row, ("answer", "gt"), index),
            prediction=prediction,
        )
    for name in ("subtask", "image", "question", "answer", "prediction"):
        value = getattr(item, name)
        if not isinstance(value, str):
            raise ValueError(f"MME result #{index}, field '{name}': expected a str, got {type(value).__name__}")
    return item


def write_mme_results(rows_with_predictions: Iterable[Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``<subtask>.txt`` files in the official layout, one per subtask present.

    Each input is an :class:`MMEAnswer`, a ``(Row, prediction)`` pair (Row from
    ``components.data.records``: task = subtask, instruction = question, answer = gt) or a mapping
    with those fields plus ``prediction``. Images keep their first-seen order and their two
    questions are written on consecutive lines; the image column is the file name, as in the
    release's templates. Tabs and line breaks inside questions and predictions become spaces.
    Everything is checked before anything is written; ``<subtask>.txt`` files of subtasks absent
    from this call are removed from ``out_dir`` (the folder is scored as a whole). Returns
    subtask → file path.
    """
    by_subtask: dict[str, dict[str, list[MMEAnswer]]] = {}
    for index, obj in enumerate(rows_with_predictions):
        item = _as_item(obj, index)
        where = f"MME result #{index} (subtask {item.subtask!r}, image {item.image!r})"
        _check_subtask(item.subtask, where)
        name = item.image.replace("\\", "/").rsplit("/", 1)[-1]
        if not name or _clean(name) != name:
            raise ValueError(f"{where}, field 'image': not a usable file name")
        _gt(item.answer.strip(), f"{where}, field 'answer'")
        by_subtask.setdefault(item.subtask, {}).setdefault(item.image, []).append(item)
    if not by_subtask:
        raise ValueError("write_mme_results: no results to write")
    for sub, by_image in by_subtask.items():
        for image, items in by_image.items():
            if len(items) != 2:
                raise ValueError(
                    f"MME subtask {sub!r}, image {image!r}: expected 2 questions per image, got {len(items)}"
                )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in MME_SUBTASKS:  # a subtask left from an earlier run would be scored with this one
        if stale not in by_subtask and (out / f"{stale}.txt").is_file():
            (out / f"{stale}.txt").unlink()
    written: dict[str, Path] = {}
    for sub in [s for s in MME_SUBTASKS if s in by_subtask]:
        lines = []
        for image, items in by_subtask[sub].items():
            name = image.replace("\\", "/").rsplit("/", 1)[-1]
            for it in items:
                gt = "Yes" if it.answer.strip().lower() == "yes" else "No"
                lines.append("\t".join((name, _clean(it.question), gt, _clean(it.prediction))) + "\n")
        written[sub] = write_text(out / f"{sub}.txt", "".join(lines))
    return written
