"""`mrt benchmark`: one model over the held-out Vision-Flan-format tasks and the MME-format set.

What it measures and why this way:
- Held-out tasks are tasks no training split contains (zero-shot, as in the paper). The held-in
  split (when the data has one) asks the training task types about images no training split holds,
  so a reader can tell "does not perceive" (held-in low) from "does not transfer" (held-in high,
  held-out low). Each task is
  scored by the metric its answer kind calls for — option-letter matching for multiple choice (so
  "(b)", "B) square" and "square" all count as B, the options being read from the instruction),
  normalised exact match for everything else — through the local `evaluate` modules in
  `components/evaluation/metrics/`, so a published number and a unit test come from one code path.
- Every accuracy stands beside what a model without eyes gets (`components.evaluation.metrics.baselines`): the
  task's chance level, the best constant answer on its test references ("majority") and the most
  common training answer; the chance-corrected mean (acc − chance)/(1 − chance) stands beside the raw
  mean, and a task whose answers all read the same is flagged as collapsed. MME subtasks likewise get
  the random-guess and best-constant scores and a collapse flag.
- MME is scored by the `mme_score` module, which reproduces the official tool bit for bit, and the
  official results layout is written too, so the official `calculation.py` can re-score the run.
- Robustness (an open question of the method): the held-out tasks again under image noise, blur and
  colour jitter (`components.evaluation.perturb`, deterministic per record), and the real-image (domain-shift)
  tasks reported on their own. MME is skipped in the perturbed passes to save time.
- Decoding is greedy and batched with left padding (`components.evaluation.inference.generate`), so a run is
  deterministic and a record's answer does not depend on its batch: two runs give identical
  reports apart from `wall_s`.

Outputs: the report JSON (flat enough for `dvc metrics show`: per task, per MME subtask, overall,
per perturbation, and the `*_summary` / `mme_baselines` blocks with the baselines), written atomically; a predictions JSONL with every answer beside its reference
(one line per record per pass) for error analysis; the MME results folder.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from components.core.config import BenchmarkParams
from components.core.files import write_text
from components.data.records import DataError, RecordError, Row
from components.evaluation.outputs import count_params, detect_kind, kind_named

CLEAN = "none"  # the `perturbation` of unperturbed records in the predictions file
LETTER_METRIC = "vf_option_letter"
TEXT_METRIC = "vf_exact_match"
MME_METRIC = "mme_score"
METRIC_BY_KIND = {
    "letter": LETTER_METRIC,
    "word": TEXT_METRIC,
    "number": TEXT_METRIC,
    "yesno": TEXT_METRIC,
    "text": TEXT_METRIC,
}
MIN_OPTIONS = 2  # an instruction with fewer lettered options than this has no options text


# ---------------------------------------------------------------------------------------------
# metric choice and per-record correctness
# ---------------------------------------------------------------------------------------------
def _data_error(file: str, record: str, field: str, message: str) -> DataError:
    return DataError([RecordError(file, record, field, message)])


def task_kinds(manifest: dict, tasks: Sequence[str], manifest_path: str) -> dict[str, str]:
    """task → answer kind, from the manifest; an error names the manifest and the field."""
    info = manifest.get("tasks")
    if not isinstance(info, dict):
        raise _data_error(manifest_path, "", "tasks", "expected a mapping of task name to task info")
    kinds = {}
    for task in sorted(set(tasks)):
        entry = info.get(task)
        if not isinstance(entry, dict):
            raise _data_error(manifest_path, "", f"tasks.{task}", "evaluated task missing from the manifest")
        kind = entry.get("answer_kind")
        if kind not in METRIC_BY_KIND:
            raise _data_error(
                manifest_path, "", f"tasks.{task}.answer_kind",
                f"expected one of {', '.join(METRIC_BY_KIND)}, got {kind!r}",
            )
        kinds[task] = kind
    return kinds


def options_text(instruction: str) -> str | None:
    """The instruction itself when it carries lettered options ("(A) 4 (B) 3"), else None.

    `parse_options` only picks option markers out of the text, so the question around them does no
    harm; without markers the letter metric must run without options (any letter A–Z counts).
    """
    from components.evaluation.metrics.text import parse_options

    return instruction if len(parse_options(instruction)) >= MIN_OPTIONS else None


def check_references(rows: Sequence[Row], kinds: dict[str, str]) -> None:
    """Refuse, before any generation, a letter-task reference that names no option."""
    from components.evaluation.metrics.text import option_letter

    for r in rows:
        if kinds[r.task] == "letter" and option_letter(r.answer, options_text(r.instruction)) is None:
            raise _data_error(
                r.source, r.id, "answer", f"letter task {r.task!r}: reference {r.answer!r} names no option"
            )


def is_correct(kind: str, prediction: str, row: Row) -> bool:
    """One record's hit, by the same functions the `evaluate` modules wrap."""
    from components.evaluation.metrics.text import exact_match, letter_match

    if kind == "letter":
        return letter_match(prediction, row.answer, options_text(row.instruction))
    return exact_match(prediction, row.answer)


@lru_cache(maxsize=None)
def _metric(name: str):
    """Each local `evaluate` module is loaded once per process (evaluate.load costs ~0.5 s)."""
    from components.evaluation.metrics import load_metric

    return load_metric(name)


def score_heldout(rows: Sequence[Row], predictions: Sequence[str], kinds: dict[str, str]) -> dict[str, Any]:
    """Per-task scores (the task's metric module), their unweighted mean, and per-record hits."""
    if len(rows) != len(predictions):
        raise ValueError(f"score_heldout: {len(predictions)} predictions for {len(rows)} rows")
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_task[r.task].append(i)
    per_task: dict[str, float] = {}
    for task in sorted(by_task):
        idx = by_task[task]
        preds = [predictions[i] for i in idx]
        refs = [rows[i].answer for i in idx]
        if kinds[task] == "letter":
            out = _metric(LETTER_METRIC).compute(
                predictions=preds, references=refs, options=[options_text(rows[i].instruction) for i in idx]
            )
            per_task[task] = float(out["letter_match"])
        else:
            per_task[task] = float(_metric(TEXT_METRIC).compute(predictions=preds, references=refs)["exact_match"])
    correct = [is_correct(kinds[r.task], pred, r) for r, pred in zip(rows, predictions)]
    mean = sum(per_task.values()) / len(per_task) if per_task else None
    return {"per_task": per_task, "mean": mean, "n": len(rows), "correct": correct}


def score_mme(rows: Sequence[Row], predictions: Sequence[str]) -> dict[str, Any]:
    """The `mme_score` module over MME rows (task = subtask, image relative to the MME root), plus
    per-record hits read the official way."""
    from components.evaluation.metrics.text import mme_yes_no

    result = _metric(MME_METRIC).compute(
        predictions=list(predictions),
        references=[r.answer for r in rows],
        subtasks=[r.task for r in rows],
        images=[r.image for r in rows],
    )
    result["correct"] = [mme_yes_no(pred) == r.answer.strip().lower() for r, pred in zip(rows, predictions)]
    return result


def summarize_split(rows: Sequence[Row], predictions: Sequence[str], kinds: dict[str, str],
                    train_answers: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Per task: accuracy beside chance, the best constant answer, the training-majority answer, the
    chance-corrected accuracy and the collapse flag; plus their means (`baselines.split_summary`)."""
    from components.evaluation.metrics.baselines import split_summary, task_entry

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_task[r.task].append(i)
    tasks = {}
    for task, idx in by_task.items():
        kind = kinds[task]
        options = [options_text(rows[i].instruction) for i in idx] if kind == "letter" else None
        tasks[task] = task_entry(kind, [predictions[i] for i in idx], [rows[i].answer for i in idx], options,
                                 (train_answers or {}).get(task, ()))
    return split_summary(tasks)


def summarize_mme(rows: Sequence[Row], predictions: Sequence[str]) -> dict[str, Any]:
    """Per MME subtask: random-guess and best-constant acc / acc+ / score and the collapse flag
    (answers read the official way); plus the chance and constant totals over the subtasks present."""
    from components.evaluation.metrics.baselines import mme_collapse, mme_subtask_baselines

    by_sub: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_sub[r.task].append(i)
    subtasks = {}
    for sub, idx in by_sub.items():
        entry = mme_subtask_baselines([rows[i].answer for i in idx], [rows[i].image for i in idx])
        top, share, flat = mme_collapse([predictions[i] for i in idx])
        subtasks[sub] = {**entry, "top_answer": top, "top_share": share, "collapsed": flat}
    return {
        "subtasks": subtasks,
        "chance_total": sum(e["chance_score"] for e in subtasks.values()),
        "majority_total": sum(e["majority_score"] for e in subtasks.values()),
        "collapsed_subtasks": [sub for sub, e in subtasks.items() if e["collapsed"]],
    }


def training_answers(data_dir: str | Path, manifest: dict, tasks: Sequence[str]) -> dict[str, list[str]]:
    """task → the answers training saw for it: its rows of the train split, or, for a type asked only
    by the text-only split (held-out types), those text rows (manifest `text_tasks[*].for_task`).
    Records the readers reject are left to validation; the good ones count."""
    from components.data.load import load_dataset_dir

    wanted = set(tasks)
    text_for = {name: info.get("for_task") for name, info in (manifest.get("text_tasks") or {}).items()
                if isinstance(info, dict)}
    files = manifest.get("files") or {}
    splits = tuple(s for s in ("train", "text") if s in files)
    if not splits or not wanted:
        return {}
    loaded = load_dataset_dir(data_dir, splits=splits)
    train: dict[str, list[str]] = defaultdict(list)
    text: dict[str, list[str]] = defaultdict(list)
    for r in loaded.rows:
        if r.split == "train" and r.task in wanted:
            train[r.task].append(r.answer)
        elif r.split == "text" and text_for.get(r.task) in wanted:
            text[text_for[r.task]].append(r.answer)
    return {t: train.get(t) or text.get(t) or [] for t in sorted(wanted)}


def cap_mme(rows: Sequence[Row], per_task: int | None) -> list[Row]:
    """At most `per_task` questions per subtask, whole images only (MME scores images in pairs)."""
    if per_task is None:
        return list(rows)
    images_per_subtask = max(1, per_task // 2)
    kept: dict[str, list[str]] = defaultdict(list)
    out = []
    for r in rows:
        images = kept[r.task]
        if r.image not in images:
            if len(images) >= images_per_subtask:
                continue
            images.append(r.image)
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def _resolve_model(p: BenchmarkParams, model: Any, processor: Any):
    """A LoadedModel: loaded from p.base_dir / p.model_dir, or wrapped around what the caller passed."""
    from components.evaluation.inference import LoadedModel, load_model

    if model is None:
        if processor is not None:
            raise ValueError("run_benchmark: a processor was passed without a model")
        detect_kind(p.model_dir)  # a bad model_dir fails here, naming it, before the base is loaded
        return load_model(p.base_dir, p.model_dir)
    if isinstance(model, LoadedModel):
        return model
    if processor is None:
        raise ValueError("run_benchmark: pass the processor with the model (or a LoadedModel)")
    return LoadedModel(model, processor, detect_kind(p.model_dir))


def model_info(p: BenchmarkParams, loaded: Any, label: str | None) -> dict[str, Any]:
    """What was benchmarked. `trainable_params`: what the method trained, counted on the loaded
    model by its kind (outputs.py): editors, LoRA matrices, what full fine-tuning unfreezes, 0 for
    the frozen or bare base; None if unknowable."""
    trainable = kind_named(loaded.kind).trained_params(loaded.model, loaded.extra)
    total = count_params(loaded.model, loaded.extra)
    return {
        "label": label,
        "base_dir": str(p.base_dir),
        "model_dir": None if p.model_dir is None else str(p.model_dir),
        "method": loaded.kind,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": None if trainable is None else 100.0 * trainable / max(total, 1),
    }


# ---------------------------------------------------------------------------------------------
# generation with a progress bar over batches
# ---------------------------------------------------------------------------------------------
class _Progress:
    """A rich bar over batches on a terminal; one plain line per pass otherwise (CI, DVC logs)."""

    def __init__(self, total: int, desc: str):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.raw, self.desc, self.t0, self.bar = desc, escape(desc), time.time(), None
        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(self.desc, total=total)
            self.bar.start()
        self.console = console

    def advance(self, pass_name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.desc} ({pass_name})")

    def pass_done(self, pass_name: str, n: int) -> None:
        if self.bar is None:
            elapsed = time.time() - self.t0
            self.console.print(f"{self.raw}: {pass_name} pass, {n} records ({elapsed:.0f} s)", highlight=False,
                               markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _images(data, rows: Sequence[Row], perturbation: str, seed: int) -> list[Any]:
    """The PIL images of `rows`, perturbed unless the pass is clean (text-only rows: None)."""
    from components.data.images import load_image
    from components.evaluation.perturb import perturb_image

    out = []
    for r in rows:
        try:
            im = load_image(data.image_path(r)) if r.image is not None else None
        except ValueError as exc:  # name the record and field, not only the image file
            raise _data_error(r.source, r.id, "image", str(exc)) from None
        out.append(im if im is None or perturbation == CLEAN else perturb_image(im, perturbation, seed, r.id))
    return out


def _answer(loaded, formatter, data, rows: Sequence[Row], perturbation: str, p: BenchmarkParams, bar: _Progress):
    """Greedy answers for one pass. Images are read (and perturbed) one batch at a time, so memory
    stays bounded by the batch however large the real held-out images are."""
    from components.evaluation.inference import generate

    out: list[str] = []
    for start in range(0, len(rows), p.batch_size):
        chunk = rows[start : start + p.batch_size]
        out += generate(loaded.model, loaded.processor, _images(data, chunk, perturbation, p.perturb_seed),
                        [r.instruction for r in chunk], max_new_tokens=p.max_new_tokens,
                        batch_size=p.batch_size, formatter=formatter)
        bar.advance(perturbation)
    bar.pass_done(perturbation, len(rows))
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _prediction_lines(rows: Sequence[Row], preds: Sequence[str], correct: Sequence[bool], perturbation: str):
    for r, pred, hit in zip(rows, preds, correct):
        yield json.dumps(
            {"id": r.id, "task": r.task, "split": r.split, "perturbation": perturbation,
             "instruction": r.instruction, "reference": r.answer, "prediction": pred, "correct": bool(hit)},
            ensure_ascii=False,
        )


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _load_rows(p: BenchmarkParams):
    from components.data.load import MANIFEST, load_dataset_dir
    from components.evaluation.inference import pick_per_task

    data = load_dataset_dir(p.data_dir, splits=("heldout", "heldin", "mme"))
    if data.errors:
        raise DataError(data.errors)
    heldout = data.split("heldout")
    if not heldout:
        raise _data_error(str(Path(p.data_dir) / MANIFEST), "", "files.heldout", "the data set has no held-out rows")
    heldin = data.split("heldin")  # absent from data sets written without one (the real Vision-Flan)
    if p.per_task is not None:
        heldout = pick_per_task(heldout, p.per_task)
        heldin = pick_per_task(heldin, p.per_task)
    mme = cap_mme(data.split("mme"), p.per_task)
    known = data.manifest.get("tasks")
    for split, rows in (("held-out", heldout), ("held-in", heldin)):
        unknown = [r for r in rows if isinstance(known, dict) and r.task not in known]
        if unknown:  # name the record, not only the manifest: the record is what a person fixes
            r = unknown[0]
            raise _data_error(r.source, r.id, "task_name", f"{split} task {r.task!r} is not among the tasks of "
                              f"{Path(p.data_dir) / MANIFEST} ({len(unknown)} record(s) in all)")
    kinds = task_kinds(data.manifest, [r.task for r in heldout + heldin], str(Path(p.data_dir) / MANIFEST))
    check_references(heldout + heldin, kinds)
    answers = training_answers(p.data_dir, data.manifest, sorted({r.task for r in heldout + heldin}))
    return data, heldout, heldin, mme, kinds, answers


def run_benchmark(
    p: BenchmarkParams, *, model: Any = None, processor: Any = None, label: str | None = None
) -> dict[str, Any]:
    """Benchmark one model; write p.report, p.predictions and p.mme_results_dir; return the report.

    `model`: None loads p.base_dir with p.model_dir (editors / LoRA / full / frozen / None = bare
    base). An `inference.LoadedModel` (preferred: it carries the method and the editors, so the
    trainable count is known) or a bare model plus `processor` is used as is, e.g. right after
    training; p.model_dir then only names it in the report. `label` names the run in the report
    and on the progress bar (an ablation arm, a method).
    """
    from components.data.batching import ChatFormatter
    from components.core.threads import set_threads

    t0 = time.time()
    set_threads()
    data, heldout, heldin, mme, kinds, train_answers = _load_rows(p)
    loaded = _resolve_model(p, model, processor)

    # MME and held-in: clean pass only (the perturbations ask about robustness of held-out transfer).
    passes = {CLEAN: heldout + heldin + mme, **{kind: heldout for kind in p.perturbations}}
    formatter = ChatFormatter(loaded.processor, max_length=10**9)
    total = sum(math.ceil(len(rows) / p.batch_size) for rows in passes.values())
    bar = _Progress(total, f"benchmark {label or loaded.kind}")
    try:
        answers = {name: _answer(loaded, formatter, data, rows, name, p, bar) for name, rows in passes.items()}
    finally:
        bar.close()

    n_h, n_i = len(heldout), len(heldin)
    heldout_preds = answers[CLEAN][:n_h]
    heldin_preds = answers[CLEAN][n_h : n_h + n_i]
    clean = score_heldout(heldout, heldout_preds, kinds)
    lines = list(_prediction_lines(heldout, heldout_preds, clean["correct"], CLEAN))
    heldin_scored = score_heldout(heldin, heldin_preds, kinds) if heldin else None
    if heldin_scored is not None:
        lines += _prediction_lines(heldin, heldin_preds, heldin_scored["correct"], CLEAN)
    mme_result = mme_summary = None
    if mme:
        from components.evaluation.metrics.mme import write_mme_results

        mme_preds = answers[CLEAN][n_h + n_i :]
        mme_result = score_mme(mme, mme_preds)
        mme_summary = summarize_mme(mme, mme_preds)
        write_mme_results(list(zip(mme, mme_preds)), p.mme_results_dir)
        lines += _prediction_lines(mme, mme_preds, mme_result["correct"], CLEAN)
    robustness = {}
    for kind in p.perturbations:
        scored = score_heldout(heldout, answers[kind], kinds)
        robustness[kind] = {
            "heldout": scored["per_task"],
            "heldout_mean": scored["mean"],
            "heldout_mean_delta": scored["mean"] - clean["mean"],
        }
        lines += _prediction_lines(heldout, answers[kind], scored["correct"], kind)

    real = {t: s for t, s in clean["per_task"].items() if data.manifest["tasks"][t].get("real_images")}
    report = {
        "model": model_info(p, loaded, label),
        "heldout": clean["per_task"],
        "heldout_mean": clean["mean"],
        "heldout_n": n_h,
        "heldout_summary": summarize_split(heldout, heldout_preds, kinds, train_answers),
        "heldin": {} if heldin_scored is None else heldin_scored["per_task"],
        "heldin_mean": None if heldin_scored is None else heldin_scored["mean"],
        "heldin_n": n_i,
        "heldin_summary": None if not heldin else summarize_split(heldin, heldin_preds, kinds, train_answers),
        "mme": {} if mme_result is None else {
            name: {k: s[k] for k in ("acc", "acc_plus", "score")} for name, s in mme_result["subtasks"].items()
        },
        "mme_perception": None if mme_result is None else mme_result["perception"],
        "mme_cognition": None if mme_result is None else mme_result["cognition"],
        "mme_total": None if mme_result is None else mme_result["total"],
        "mme_n": len(mme),
        "mme_baselines": None if mme_summary is None else mme_summary["subtasks"],
        "mme_chance_total": None if mme_summary is None else mme_summary["chance_total"],
        "mme_majority_total": None if mme_summary is None else mme_summary["majority_total"],
        "mme_collapsed": [] if mme_summary is None else mme_summary["collapsed_subtasks"],
        "robustness": robustness,
        "real_image_tasks": real,
        "real_image_mean": sum(real.values()) / len(real) if real else None,
        "wall_s": round(time.time() - t0, 2),
    }
    write_text(p.predictions, "".join(line + "\n" for line in lines))
    write_text(p.report, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


