"""Held-in and held-out accuracy of a trained model, each beside its chance and majority baselines.

Held-in = the *training* task types asked about freshly drawn images (never in any split of the data
dir); held-out = the data dir's held-out split. Together they tell "does not perceive / does not do
the trained tasks" apart from "does not transfer". Scoring is the benchmark's (`is_correct`: exact
match after normalisation, option letters for multiple choice).

    python benchmarks/heldin_probe.py --base models/base --model-dir models/editors [--per-task 20]
    python benchmarks/heldin_probe.py --base models/base --model-dir none      # the bare base

Chance per task = 1 / number of distinct reference answers the task can give (its options for
multiple choice, yes/no, the vocabulary for words and numbers); majority = the share of the most
common reference answer among the scored rows. Chance-corrected mean = mean of (acc − chance)/(1 − chance).
Prints one JSON object (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Distinct answers per training/held-out type (chance = 1/k); letters: the options offered.
ANSWER_SPACE = {
    "shape_single": 4, "color_single": 6, "size_single": 2, "count_all": 4, "count_shape": 4, "count_color": 4,
    "exists_shape": 2, "exists_color": 2, "color_of_shape": 6, "shape_of_color": 4, "shape_left_right": 2,
    "shape_top_bottom": 2, "what_shape_on_side": 4, "read_digit": 10, "read_word": 20, "text_color": 6,
    "choice_shape": 3, "choice_color": 3, "largest_shape": 4, "background": 3, "more_shape": 2, "same_color": 2,
    "shape_is_color": 2, "count_exact": 2, "choice_count": 3, "digit_parity": 2, "color_largest": 6,
    "is_shape_at": 2, "mnist_choice_digit": 2,
}


def heldin_rows(per_task: int, seed: int, image_size: int):
    """(task_name, kind, Row-like, PIL image) for every training type on fresh images."""
    import numpy as np
    from PIL import Image

    from components.data.records import Row
    from components.data.tasks import TRAIN_TYPES, TaskContext, balanced_targets, make_example
    from components.align.staged import _stream, image_array

    out = []
    for t in TRAIN_TYPES:
        rng = _stream(seed, f"heldin-probe/{t.name}")
        for i, target in enumerate(balanced_targets(rng, t.outcomes, per_task)):
            ex = make_example(t, rng, target, TaskContext())
            row = Row(f"{t.task_name}_probe_{i}", t.task_name, "heldin", ex.instruction, ex.answer, None, "probe", i)
            out.append((t, row, Image.fromarray(image_array(ex.scene, image_size))))
    _ = np
    return out


def summarise(rows, preds, kinds) -> dict:
    from components.evaluation.benchmark import is_correct

    hits, answers = defaultdict(list), defaultdict(list)
    for r, p in zip(rows, preds):
        hits[r.task].append(is_correct(kinds[r.task], p, r))
        answers[r.task].append(r.answer)
    per = {}
    for task in sorted(hits):
        name = task.split("_", 1)[1]
        acc = sum(hits[task]) / len(hits[task])
        chance = 1.0 / ANSWER_SPACE[name]
        majority = Counter(answers[task]).most_common(1)[0][1] / len(answers[task])
        per[task] = {"acc": round(acc, 4), "chance": round(chance, 4), "majority": round(majority, 4),
                     "collapsed": len(set(p for r, p in zip(rows, preds) if r.task == task)) == 1}
    mean = sum(v["acc"] for v in per.values()) / len(per)
    cc = sum((v["acc"] - v["chance"]) / (1 - v["chance"]) for v in per.values()) / len(per)
    return {"mean": round(mean, 4), "chance_mean": round(sum(v["chance"] for v in per.values()) / len(per), 4),
            "majority_mean": round(sum(v["majority"] for v in per.values()) / len(per), 4),
            "chance_corrected_mean": round(cc, 4), "collapsed": sorted(t for t, v in per.items() if v["collapsed"]),
            "per_task": per}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--model-dir", default="models/editors", help="editors/LoRA/full output, or 'none'")
    ap.add_argument("--data-dir", default="data/visionflan-mini")
    ap.add_argument("--per-task", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from components.data.load import load_dataset_dir
    from components.data.tasks import ALL_TYPES
    from components.evaluation.inference import generate, load_model, pick_per_task, resolve_row_image
    from components.core.threads import set_threads

    set_threads()
    t0 = time.time()
    loaded = load_model(a.base, None if a.model_dir == "none" else a.model_dir)
    kinds = {t.task_name: t.answer_kind for t in ALL_TYPES}
    hi = heldin_rows(a.per_task, a.seed, a.image_size)
    hi_rows = [r for _, r, _ in hi]
    hi_preds = generate(loaded.model, loaded.processor, [im for _, _, im in hi], [r.instruction for r in hi_rows], 8, 32)
    data = load_dataset_dir(a.data_dir, splits=("heldout",))
    ho_rows = pick_per_task([r for r in data.rows if r.split == "heldout"], a.per_task)
    ho_imgs = [resolve_row_image(data.image_root, r) for r in ho_rows]
    ho_preds = generate(loaded.model, loaded.processor, ho_imgs, [r.instruction for r in ho_rows], 8, 32)
    out = {"base": a.base, "model_dir": a.model_dir, "per_task": a.per_task,
           "held_in": summarise(hi_rows, hi_preds, kinds), "held_out": summarise(ho_rows, ho_preds, kinds),
           "wall_s": round(time.time() - t0, 1)}
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "per_task"})
                      for k, v in out.items()}, indent=1))
    return out


if __name__ == "__main__":
    main()
