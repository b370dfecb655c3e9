"""Params and editors for the ablation/compare/stage-run smoke tests on the `tiny_setup` fixture
(tests/conftest.py: a small generated data set and an untrained tiny base).

The sweep machinery (grid → train → benchmark → reports) is under test, not the scores, so every
size here is the smallest that still exercises it.
"""

from __future__ import annotations

from pathlib import Path

from components.core.config import AblateParams, BenchmarkParams, CompareParams, EditorParams, TrainParams

SMALL_EDITORS = EditorParams.model_validate(
    {"visual": {"layers": "all", "rank": 2}, "projector": {"rank": 2},
     "prefix": {"layers": "all", "rank": 2, "length": 2}, "suffix": {"layers": "all", "rank": 2, "length": 2}}
)


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
    base = dict(steps=2, seeds=[0], group_seeds=[], workers=1, threads_per_worker=1, out_dir=str(root / "arms"), per_task=2,
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
