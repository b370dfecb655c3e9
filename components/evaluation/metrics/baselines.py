"""What an accuracy must be read against: chance, the best constant answer, chance correction, collapse.

Pure Python on answers and references (no model, no heavy imports), so the numbers in a report and
the numbers a unit test computes by hand come from one code path. Definitions:

- **chance**: the expected accuracy of a uniform random guess among a task's possible answers —
  1/(options in the instruction) for multiple choice (averaged over records), 1/2 for yes/no, and
  1/(distinct reference answers of the task, normalised) for free-text answers (colours, digits, …).
- **majority** (the best constant answer): the highest accuracy any *single* answer, given to every
  record of the task, reaches on the task's *test* references, scored by the task's own metric. The
  candidates are every reference answer and, for multiple choice, every option letter and option
  text of the task's instructions (a constant "2" can beat a constant "B" on a counting task). It is
  taken from the test answers on purpose: it is the strongest constant, so a model that does not
  beat it has shown nothing that the answer prior alone cannot give.
- **train_majority**: the most common answer among the task's *training* answers, scored on the test
  references — what a model that learnt only the answer prior would say. None when no training
  answers exist for the task.
- **chance-corrected** accuracy: (acc − chance) / (1 − chance): 0 at chance, 1 when perfect,
  negative below chance; None when chance is 1 (a task whose references hold one answer only).
- **collapsed**: the model gave the same answer (after normalisation) to every record of the task.

MME-format subtasks ask two questions per image, one true, one false, and score
100·acc + 100·acc+ (acc+: both questions of an image right). A uniform yes/no guess scores
acc 50 and acc+ 25 (score 75); a constant answer scores at most the share of its answer among the
references plus the share of images whose two answers are both it (50 + 0 on MME's balanced pairs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from components.evaluation.metrics.text import exact_match, letter_match, mme_yes_no, normalize_answer, option_letter, parse_options

MME_ANSWERS = ("yes", "no")


# ---------------------------------------------------------------------------------------------
# one task
# ---------------------------------------------------------------------------------------------
def _check(references: Sequence[str], options: Sequence[str | None] | None) -> list[str | None]:
    if not references:
        raise ValueError("baselines: a task needs at least one reference")
    opts = list(options) if options is not None else [None] * len(references)
    if len(opts) != len(references):
        raise ValueError(f"baselines: {len(opts)} options for {len(references)} references")
    return opts


def _hit(kind: str, answer: str, reference: str, options: str | None) -> bool:
    return letter_match(answer, reference, options) if kind == "letter" else exact_match(answer, reference)


def accuracy(kind: str, predictions: Sequence[str], references: Sequence[str],
             options: Sequence[str | None] | None = None) -> float:
    """Share of records whose prediction matches its reference by the task's metric."""
    opts = _check(references, options)
    if len(predictions) != len(references):
        raise ValueError(f"baselines: {len(predictions)} predictions for {len(references)} references")
    return sum(_hit(kind, p, r, o) for p, r, o in zip(predictions, references, opts)) / len(references)


def chance_level(kind: str, references: Sequence[str], options: Sequence[str | None] | None = None) -> float:
    """Expected accuracy of a uniform random guess (see the module docstring)."""
    opts = _check(references, options)
    if kind == "yesno":
        return 0.5
    if kind == "letter":
        per_record = []
        letters = {option_letter(r, o) for r, o in zip(references, opts)}
        for o in opts:
            k = len(parse_options(o)) if o else 0
            per_record.append(1.0 / (k if k >= 2 else max(len(letters), 1)))
        return sum(per_record) / len(per_record)
    return 1.0 / len({normalize_answer(r) for r in references})


def constant_candidates(kind: str, references: Sequence[str], options: Sequence[str | None] | None = None) -> list[str]:
    """Every single answer worth trying as a constant, in a fixed order (references first)."""
    opts = _check(references, options)
    out = list(dict.fromkeys(references))
    if kind == "letter":
        for o in opts:
            if o:
                for letter, text in parse_options(o).items():
                    out += [letter, text]
    return [c for c in dict.fromkeys(out) if c.strip()]


def best_constant(kind: str, references: Sequence[str],
                  options: Sequence[str | None] | None = None) -> tuple[str, float]:
    """(answer, accuracy) of the constant answer that scores highest on these references; ties go to
    the earliest candidate (the most common reference first), so the result is deterministic."""
    opts = _check(references, options)
    if kind != "letter":  # exact match: a constant scores the share of references equal to it
        answer = most_common(references)
        norm = normalize_answer(answer)
        return answer, sum(normalize_answer(r) == norm for r in references) / len(references)
    counts = Counter(references)
    candidates = sorted(constant_candidates(kind, references, opts), key=lambda c: -counts.get(c, 0))
    ref_letters = [option_letter(r, o) for r, o in zip(references, opts)]
    if None in ref_letters:  # as letter_match: a reference naming no option is a data error
        r = references[ref_letters.index(None)]
        raise ValueError(f"reference {r!r} names no option letter")
    best, best_acc = candidates[0], -1.0
    for c in candidates:
        acc = sum(option_letter(c, o) == ref for o, ref in zip(opts, ref_letters)) / len(references)
        if acc > best_acc:
            best, best_acc = c, acc
    return best, best_acc


def most_common(answers: Iterable[str]) -> str | None:
    """The most common answer (normalised for counting; the first spelling seen is returned), or None.
    Ties go to the answer seen first."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for a in answers:
        key = normalize_answer(a)
        counts[key] += 1
        spelling.setdefault(key, a)
    if not counts:
        return None
    top = max(counts.values())
    return next(spelling[k] for k in spelling if counts[k] == top)


def chance_corrected(acc: float | None, chance: float | None) -> float | None:
    """(acc − chance) / (1 − chance); None when either is unknown or chance is 1."""
    if acc is None or chance is None or chance >= 1.0:
        return None
    return (acc - chance) / (1.0 - chance)


def answer_spread(predictions: Sequence[str], read=normalize_answer) -> tuple[str | None, float]:
    """(most common answer as read by `read`, its share of the predictions)."""
    if not predictions:
        return None, 0.0
    counts = Counter(read(p) for p in predictions)
    top, n = counts.most_common(1)[0]
    return top, n / len(predictions)


def collapsed(predictions: Sequence[str], read=normalize_answer) -> bool:
    """True when every prediction reads as the same answer (two records or more)."""
    return len(predictions) >= 2 and answer_spread(predictions, read)[1] == 1.0


def task_entry(kind: str, predictions: Sequence[str], references: Sequence[str],
               options: Sequence[str | None] | None = None, train_answers: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the report says about one task: accuracy beside chance, the best constant, the
    training-majority constant, the chance-corrected accuracy and whether the answers collapsed."""
    opts = _check(references, options)
    acc = accuracy(kind, predictions, references, opts)
    chance = chance_level(kind, references, opts)
    answer, majority = best_constant(kind, references, opts)
    train_answer = most_common(train_answers)
    train_majority = (accuracy(kind, [train_answer] * len(references), references, opts)
                      if train_answer is not None else None)
    top, share = answer_spread(predictions)
    return {
        "accuracy": acc,
        "n": len(references),
        "chance": chance,
        "chance_corrected": chance_corrected(acc, chance),
        "majority": majority,
        "majority_answer": answer,
        "train_majority": train_majority,
        "train_majority_answer": train_answer,
        "top_answer": top,
        "top_share": share,
        "collapsed": collapsed(predictions),
    }


# ---------------------------------------------------------------------------------------------
# a split (held-out or held-in): unweighted means over its tasks
# ---------------------------------------------------------------------------------------------
def _mean(values: Iterable[float | None], require_all: bool = False) -> float | None:
    vals = list(values)
    known = [v for v in vals if v is not None]
    if not known or (require_all and len(known) != len(vals)):
        return None
    return sum(known) / len(known)


def split_summary(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The task entries plus their unweighted means: the raw mean beside chance, the best constant,
    the training-majority constant (only when every task has one) and the chance-corrected mean
    (over the tasks where it is defined), and the names of the tasks whose answers collapsed."""
    entries = dict(sorted(tasks.items()))
    e = list(entries.values())
    return {
        "tasks": entries,
        "mean": _mean(t["accuracy"] for t in e),
        "chance_mean": _mean(t["chance"] for t in e),
        "majority_mean": _mean(t["majority"] for t in e),
        "train_majority_mean": _mean((t["train_majority"] for t in e), require_all=True),
        "chance_corrected_mean": _mean(t["chance_corrected"] for t in e),
        "majority_chance_corrected_mean": _mean(chance_corrected(t["majority"], t["chance"]) for t in e),
        "collapsed_tasks": [name for name, t in entries.items() if t["collapsed"]],
    }


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------
def mme_subtask_baselines(references: Sequence[str], images: Sequence[str]) -> dict[str, Any]:
    """Chance and best-constant acc / acc+ / score (percent, MME's scale) of one subtask's questions."""
    if len(references) != len(images) or not references:
        raise ValueError(f"MME baselines: {len(references)} references for {len(images)} images")
    by_image: dict[str, list[str]] = {}
    for ref, img in zip(references, images):
        by_image.setdefault(img, []).append(ref.strip().lower())
    best: tuple[str, float, float] | None = None
    for answer in MME_ANSWERS:
        acc = 100.0 * sum(r.strip().lower() == answer for r in references) / len(references)
        acc_plus = 100.0 * sum(all(r == answer for r in refs) for refs in by_image.values()) / len(by_image)
        if best is None or acc + acc_plus > best[1] + best[2]:
            best = (answer, acc, acc_plus)
    answer, acc, acc_plus = best  # type: ignore[misc]
    return {
        "chance_acc": 50.0,
        "chance_acc_plus": 25.0,
        "chance_score": 75.0,
        "majority_answer": answer,
        "majority_acc": acc,
        "majority_acc_plus": acc_plus,
        "majority_score": acc + acc_plus,
    }


def mme_collapse(predictions: Sequence[str]) -> tuple[str | None, float, bool]:
    """(most common official yes/no reading, its share, collapsed?) of one subtask's predictions."""
    top, share = answer_spread(predictions, read=mme_yes_no)
    return top, share, collapsed(predictions, read=mme_yes_no)
