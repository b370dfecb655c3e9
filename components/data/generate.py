"""`mrt data`: write the data directory — the embedded "visionflan-mini" set, or the real Vision-Flan.

Embedded: every split is generated from `DataParams` alone, deterministically (one numpy stream
per task, seeded from (seed, crc32(name)); same seed ⇒ byte-identical annotations, manifest and
PNGs). Held-out, held-in and MME images are redrawn until their PNG hash differs from every
train/align image, so no test picture can be memorised in training. The held-in split asks the
training task types (same task names, phrasings and answer balance) about such unseen images: a
model that fails it does not perceive; one that passes it but fails held-out does not transfer.

Real (`source: visionflan`): the 186k-record annotation is split into train / held-out by
`data.heldout_tasks` and written in the same layout, with the manifest pointing at the real image
folder (35 GB are never copied) and, if given, the real MME release.

Either way the directory is built beside `out_dir` and swapped in only when complete, so a failed
run leaves the previous data set intact.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from components.core.config import DataParams
from components.core.files import replace_folder, write_text

from .load import FORMAT_VERSION, MANIFEST
from .mme import MMEItem, read_mme, write_mme_item
from .mnist import load_mnist
from .records import DataError, RecordError, Row
from .render import png_bytes, png_hash, render
from .tasks import (
    ALL_TYPES,
    CAPTION_PHRASINGS,
    CAPTION_TASK,
    HELDOUT_TYPES,
    MME_SUBTASKS,
    TRAIN_TYPES,
    TaskContext,
    TaskType,
    balanced_targets,
    caption_example,
    make_example,
    mme_example,
    text_instruction,
)
from .visionflan import dumps_json, make_record, read_visionflan, row_to_record, write_visionflan

DATASET_NAME = "visionflan-mini"
SPLIT_FILES = {
    "train": "annotation_train.json",
    "heldout": "annotation_heldout.json",
    "heldin": "annotation_heldin.json",
    "align": "annotation_align.json",
    "text": "annotation_text.json",
}
IMAGE_ROOT = "images"
MME_ROOT = "mme/MME_Benchmark_release_version"
MAX_REDRAWS = 1000  # a held-out/MME image colliding with a training image this often is a bug
MAX_LISTED_ERRORS = 200  # real source: record errors listed in the manifest (all are counted)


def stream(seed: int, key: str) -> np.random.Generator:
    """The random stream of one task: independent of every other task and of Python's hash()."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(key.encode("utf-8"))])


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[str], None]]:
    """advance(description) callback backed by a rich progress bar (a no-op when disabled)."""
    if not enabled:
        yield lambda desc: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task(label, total=total)

        def advance(desc: str) -> None:
            bar.update(task, advance=1, description=desc)

        yield advance


# ---------------------------------------------------------------------------------------------
# embedded
# ---------------------------------------------------------------------------------------------
class _EmbeddedWriter:
    def __init__(self, p: DataParams, stage: Path, advance: Callable[[str], None]):
        self.p = p
        self.stage = stage
        self.advance = advance
        self.train_hashes: set[str] = set()
        _, self.labels = load_mnist()
        # Disjoint MNIST pools: captions may show handwritten digits, the held-out task others.
        perm = stream(p.seed, "mnist/pools").permutation(len(self.labels))
        half = len(perm) // 2
        self.heldout_pool = np.sort(perm[:half])
        self.align_pool = np.sort(perm[half:])

    def _image(self, rel: str, data: bytes) -> None:
        path = self.stage / IMAGE_ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def _render(self, scene) -> bytes:
        return png_bytes(render(scene, self.p.image_size))

    def _unseen(self, draw: Callable[[], tuple], what: str) -> tuple:
        """Call draw() → (scene, payload) until the scene's PNG is not a training image; (payload, png)."""
        for _ in range(MAX_REDRAWS):
            scene, payload = draw()
            data = self._render(scene)
            if png_hash(data) not in self.train_hashes:
                return payload, data
        raise RuntimeError(f"{what}: {MAX_REDRAWS} redraws all collided with training images")

    def train_task(self, t: TaskType) -> list[dict]:
        rng = stream(self.p.seed, t.task_name)
        ctx = TaskContext()
        recs = []
        for i, target in enumerate(balanced_targets(rng, t.outcomes, self.p.train_per_task)):
            ex = make_example(t, rng, target, ctx)
            rid = f"{t.task_name}_{i:05d}"
            rel = f"{t.task_name}/{rid}.png"
            data = self._render(ex.scene)
            self.train_hashes.add(png_hash(data))
            self._image(rel, data)
            recs.append(make_record(rid, t.task_name, ex.instruction, ex.answer, rel))
            self.advance(t.task_name)
        return recs

    def align(self) -> list[dict]:
        rng = stream(self.p.seed, CAPTION_TASK)
        ctx = TaskContext(mnist_pool=self.align_pool, mnist_labels=self.labels)
        recs = []
        for i in range(self.p.align_size):
            ex = caption_example(rng, ctx)
            rid = f"{CAPTION_TASK}_{i:05d}"
            rel = f"{CAPTION_TASK}/{rid}.png"
            data = self._render(ex.scene)
            self.train_hashes.add(png_hash(data))
            self._image(rel, data)
            recs.append(make_record(rid, CAPTION_TASK, ex.instruction, ex.answer, rel))
            self.advance(CAPTION_TASK)
        return recs

    def heldout_task(self, t: TaskType) -> list[dict]:
        """A held-out task type (MNIST digits of the held-out pool)."""
        ctx = TaskContext(mnist_pool=self.heldout_pool, mnist_labels=self.labels)
        return self._unseen_task(t, t.task_name, ctx, self.p.heldout_per_task, t.task_name)

    def heldin_task(self, t: TaskType) -> list[dict]:
        """A training task type on unseen images, from a stream of its own (the training split's
        records and images are unchanged by it)."""
        key = f"heldin/{t.task_name}"
        return self._unseen_task(t, key, TaskContext(), self.p.heldin_per_task, f"{t.task_name}_heldin")

    def _unseen_task(self, t: TaskType, stream_key: str, ctx: TaskContext, count: int, id_prefix: str) -> list[dict]:
        """`count` records of task `t`, answers balanced over its outcomes, each on an image no other
        split holds; the random stream is keyed by `stream_key`."""
        rng = stream(self.p.seed, stream_key)
        recs = []
        for i, target in enumerate(balanced_targets(rng, t.outcomes, count)):
            rid = f"{id_prefix}_{i:05d}"

            def draw(target=target):
                ex = make_example(t, rng, target, ctx)
                return ex.scene, ex

            ex, data = self._unseen(draw, rid)
            rel = f"{t.task_name}/{rid}.png"
            self._image(rel, data)
            recs.append(make_record(rid, t.task_name, ex.instruction, ex.answer, rel))
            self.advance(stream_key)
        return recs

    def mme_subtask(self, subtask: str) -> int:
        rng = stream(self.p.seed, f"mme/{subtask}")
        for i in range(self.p.mme_images_per_subtask):
            questions, data = self._unseen(lambda: mme_example(subtask, rng), f"mme/{subtask}/{i:04d}")
            write_mme_item(self.stage / MME_ROOT, subtask, MMEItem(name=f"{i:04d}", image=data, questions=questions))
            self.advance(f"mme/{subtask}")
        return self.p.mme_images_per_subtask

    def text_type(self, t: TaskType) -> list[dict]:
        rng = stream(self.p.seed, f"text/{t.name}")
        ctx = TaskContext(mnist_pool=np.arange(len(self.labels)), mnist_labels=self.labels)
        recs = []
        for i, target in enumerate(balanced_targets(rng, t.outcomes, self.p.text_per_type)):
            ex = make_example(t, rng, target, ctx)
            rid = f"{t.text_task_name}_{i:05d}"
            recs.append(make_record(rid, t.text_task_name, text_instruction(ex.scene, ex.instruction), ex.answer))
            self.advance(t.text_task_name)
        return recs


def _embedded_total(p: DataParams, with_mme: bool) -> int:
    return (
        p.train_per_task * len(TRAIN_TYPES)
        + p.align_size
        + p.heldout_per_task * len(HELDOUT_TYPES)
        + p.heldin_per_task * len(TRAIN_TYPES)
        + (p.mme_images_per_subtask * len(MME_SUBTASKS) if with_mme else 0)
        + p.text_per_type * len(ALL_TYPES)
    )


def _mme_counts(rows: list[Row]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for task in sorted({r.task for r in rows}):
        mine = [r for r in rows if r.task == task]
        counts[task] = {"images": len({r.image for r in mine}), "questions": len(mine)}
    return counts


def _write_embedded(p: DataParams, stage: Path, progress: bool) -> dict:
    real_mme = Path(p.mme_root).resolve() if p.mme_root else None
    if real_mme is not None and not real_mme.is_dir():
        raise DataError([RecordError(str(real_mme), "", "data.mme_root", "MME folder not found")])
    records: dict[str, list[dict]] = {s: [] for s in SPLIT_FILES}
    mme_counts: dict[str, dict[str, int]] = {}
    with _progress(progress, _embedded_total(p, real_mme is None), f"writing {DATASET_NAME}") as advance:
        w = _EmbeddedWriter(p, stage, advance)
        # Training images first: held-out and MME images are then checked against all of them.
        for t in TRAIN_TYPES:
            records["train"] += w.train_task(t)
        records["align"] = w.align()
        for t in HELDOUT_TYPES:
            records["heldout"] += w.heldout_task(t)
        for t in TRAIN_TYPES:
            records["heldin"] += w.heldin_task(t)
        if real_mme is None:
            for subtask in MME_SUBTASKS:
                n = w.mme_subtask(subtask)
                mme_counts[subtask] = {"images": n, "questions": 2 * n}
        for t in ALL_TYPES:
            records["text"] += w.text_type(t)
    if real_mme is not None:
        mme_rows, _ = read_mme(real_mme)  # its record errors are validation's to report
        mme_counts = _mme_counts(mme_rows)
    for split, name in SPLIT_FILES.items():
        write_visionflan(records[split], stage / name)

    return {
        "name": DATASET_NAME,
        "format_version": FORMAT_VERSION,
        "source": "embedded",
        "seed": p.seed,
        "image_size": p.image_size,
        "image_root": IMAGE_ROOT,
        "files": dict(SPLIT_FILES),
        "mme_root": str(real_mme) if real_mme is not None else MME_ROOT,
        "tasks": {
            t.task_name: {
                "split": t.split,
                "type": t.name,
                "answer_kind": t.answer_kind,
                "real_images": t.real_images,
                "phrasings": list(t.phrasings),
            }
            for t in ALL_TYPES
        },
        "text_tasks": {
            t.text_task_name: {"type": t.name, "for_task": t.task_name, "answer_kind": t.answer_kind}
            for t in ALL_TYPES
        },
        "caption_task": {"name": CAPTION_TASK, "phrasings": list(CAPTION_PHRASINGS)},
        "mme_subtasks": mme_counts,
        "counts": {
            **{split: len(recs) for split, recs in records.items()},
            "mme_images": sum(c["images"] for c in mme_counts.values()),
            "mme": sum(c["questions"] for c in mme_counts.values()),
        },
    }


# ---------------------------------------------------------------------------------------------
# real Vision-Flan
# ---------------------------------------------------------------------------------------------
_LETTER = re.compile(r"^\(?[A-Za-z]\)?\.?$")


def infer_answer_kind(answers: list[str]) -> str:
    """The narrowest answer kind all answers fit; real Vision-Flan tasks are mostly "text"."""
    if answers and all(a.strip().lower() in ("yes", "no") for a in answers):
        return "yesno"
    if answers and all(a.strip().isdigit() for a in answers):
        return "number"
    if answers and all(_LETTER.match(a.strip()) for a in answers):
        return "letter"
    if answers and all(len(a.split()) == 1 for a in answers):
        return "word"
    return "text"


def _write_visionflan(p: DataParams, stage: Path, progress: bool) -> dict:
    annotation = Path(p.visionflan_annotation).resolve()
    images = Path(p.visionflan_images).resolve()
    if not images.is_dir():
        raise DataError([RecordError(str(images), "", "data.visionflan_images", "image folder not found")])
    if not p.heldout_tasks:
        raise DataError(
            [RecordError(str(annotation), "", "data.heldout_tasks", "source 'visionflan' needs held-out task names")]
        )
    with _progress(progress, 3, "reading Vision-Flan") as advance:
        rows, errors = read_visionflan(annotation, images, "train")
        advance("splitting tasks")
        if not rows:
            raise DataError(errors[:MAX_LISTED_ERRORS] or [RecordError(str(annotation), "", "", "no records")])
        by_task: dict[str, list[Row]] = {}
        for r in rows:
            by_task.setdefault(r.task, []).append(r)
        unknown = sorted(set(p.heldout_tasks) - set(by_task))
        if unknown:
            raise DataError(
                [RecordError(str(annotation), "", "data.heldout_tasks", f"no such task(s) in the annotation: {unknown}")]
            )
        heldout = set(p.heldout_tasks)
        split_rows = {
            "train": [r for r in rows if r.task not in heldout],
            "heldout": [r for r in rows if r.task in heldout],
        }
        files = {s: SPLIT_FILES[s] for s in split_rows}
        for split, rs in split_rows.items():
            write_visionflan([row_to_record(r) for r in rs], stage / files[split])
        advance("MME")
        mme_counts: dict[str, dict[str, int]] = {}
        mme_root = None
        if p.mme_root:
            mme_root = Path(p.mme_root).resolve()
            mme_rows, mme_errors = read_mme(mme_root)
            errors += mme_errors
            mme_counts = _mme_counts(mme_rows)
        advance("done")
    return {
        "name": annotation.stem,
        "format_version": FORMAT_VERSION,
        "source": "visionflan",
        "seed": p.seed,
        "image_size": None,  # real images keep their size; the model's processor resizes them
        "image_root": str(images),
        "files": files,
        "mme_root": str(mme_root) if mme_root else None,
        "tasks": {
            task: {
                "split": "heldout" if task in heldout else "train",
                "type": task,
                "answer_kind": infer_answer_kind([r.answer for r in rs]),
                "real_images": True,
            }
            for task, rs in sorted(by_task.items())
        },
        "mme_subtasks": mme_counts,
        "counts": {
            **{split: len(rs) for split, rs in split_rows.items()},
            "mme_images": sum(c["images"] for c in mme_counts.values()),
            "mme": sum(c["questions"] for c in mme_counts.values()),
            "read_errors": len(errors),
        },
        # The written files hold only the good records; what was dropped, and why, is kept here.
        "read_errors": [str(e) for e in errors[:MAX_LISTED_ERRORS]],
    }


def write_dataset(p: DataParams, *, progress: bool = True) -> Path:
    """Write the data directory `p.out_dir` (see the module docstring); returns its manifest path."""
    out_dir = Path(p.out_dir)
    with replace_folder(out_dir) as stage:
        writer = _write_embedded if p.source == "embedded" else _write_visionflan
        manifest = writer(p, stage, progress)
        write_text(stage / MANIFEST, dumps_json(manifest))
    return out_dir / MANIFEST
