"""A tiny data set and an untrained tiny base for the ablation/compare smoke tests.

The base is built, not aligned: the sweep machinery (grid → train → benchmark → reports) is under
test, not the scores, so a randomly initialised tiny LLaVA with a tokenizer learned from the data
is enough and costs about a second.
"""

from __future__ import annotations

from pathlib import Path

from components.core.config import AblateParams, BenchmarkParams, CompareParams, DataParams, EditorParams, TrainParams
from tiny_llava import TINY

SMALL_EDITORS = EditorParams.model_validate(
    {"visual": {"layers": "all", "rank": 2}, "projector": {"rank": 2},
     "prefix": {"layers": "all", "rank": 2, "length": 2}, "suffix": {"layers": "all", "rank": 2, "length": 2}}
)


def build_tiny_setup(root: Path) -> tuple[Path, Path]:
    """(data_dir, base_dir) under root: a small generated set and a freshly built tiny base."""
    from components.model.backbone import build_tiny_model, build_tiny_processor, save_base, tiny_corpus
    from components.data.generate import write_dataset
    from components.data.load import load_dataset_dir

    data, base = root / "data", root / "base"
    write_dataset(DataParams(out_dir=str(data), image_size=32, train_per_task=4, heldout_per_task=2, heldin_per_task=1, align_size=8,
                             text_per_type=2, mme_images_per_subtask=1), progress=False)
    rows = load_dataset_dir(data).rows
    processor = build_tiny_processor(tiny_corpus(rows), 32, TINY)
    model = build_tiny_model(processor, TINY, 32, max_length=256, seed=0)
    save_base(model, processor, base)
    return data, base


def train_params(root: Path, data: Path, base: Path, **kw) -> TrainParams:
    params = dict(base_dir=str(base), data_dir=str(data), out_dir=str(root / "unused"),
                  report=str(root / "unused.json"), curve=str(root / "unused.csv"), steps=2, batch_size=4,
                  save_every=100, eval_per_task=1, eval_batch_size=16, max_length=256, editors=SMALL_EDITORS)
    params.update(kw)
    return TrainParams(**params)


def bench_params(root: Path, data: Path, base: Path) -> BenchmarkParams:
    return BenchmarkParams(data_dir=str(data), base_dir=str(base), model_dir=None, report=str(root / "b.json"),
                           predictions=str(root / "p.jsonl"), mme_results_dir=str(root / "mme"), batch_size=32,
                           max_new_tokens=4, perturbations=["noise"])


def ablate_params(root: Path, **kw) -> AblateParams:
    base = dict(steps=2, seeds=[0], workers=1, threads_per_worker=1, out_dir=str(root / "arms"), per_task=2,
                report_csv=str(root / "reports" / "ablation.csv"), report_md=str(root / "reports" / "ablation.md"),
                plot=str(root / "reports" / "ablation.png"))
    base.update(kw)
    return AblateParams(**base)


def compare_params(root: Path, **kw) -> CompareParams:
    base = dict(steps=2, workers=1, threads_per_worker=1, out_dir=str(root / "runs"), per_task=2,
                report=str(root / "reports" / "comparison.json"), table=str(root / "reports" / "comparison.md"),
                plot=str(root / "reports" / "comparison.png"))
    base.update(kw)
    return CompareParams(**base)
