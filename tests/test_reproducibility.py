"""Reproducibility on CPU: the same seed gives identical editors, training report and benchmark metrics
twice; another seed gives different editors (so the comparison can fail).

Through the real CLI (`mrt train`, `mrt benchmark`) on the tiny workspace. Wall-clock fields are the
only ones allowed to differ. Across processes the same holds: test_faults.py compares the editors of
two separate `mrt train` processes byte for byte.
"""

from __future__ import annotations

import json

import pytest

from reliability_env import run_cli, workspace

WALL = ("wall_s", "train_wall_s", "throughput")  # timings, not results


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _train(ws, out: str, seed: int) -> dict:
    result = run_cli(ws, "train", "-S", f"train.seed={seed}", "-S", "train.steps=4",
                     "-S", f"train.out_dir={ws.models / out}", "-S", f"train.report={ws.reports / out}.json",
                     "-S", f"train.curve={ws.reports / out}.csv")
    assert result.exit_code == 0, result.output
    report = json.loads((ws.reports / f"{out}.json").read_text())
    return {k: v for k, v in report.items() if k not in WALL}


def _benchmark(ws, out: str) -> tuple[dict, str]:
    result = run_cli(ws, "benchmark", "--model-dir", str(ws.models / out), "-S", f"benchmark.report={ws.reports / out}-bench.json",
                     "-S", f"benchmark.predictions={ws.reports / out}-pred.jsonl",
                     "-S", f"benchmark.mme_results_dir={ws.reports / out}-mme", "-S", "benchmark.perturbations=[noise]")
    assert result.exit_code == 0, result.output
    from components.track.benchmark_runs import flat_metrics

    report = json.loads((ws.reports / f"{out}-bench.json").read_text())
    return flat_metrics(report), (ws.reports / f"{out}-pred.jsonl").read_text()


@pytest.mark.reliability(area="reproducibility", case="`mrt train` + `mrt benchmark` twice with the same seed (CPU)",
                         outcome="byte-identical editors, identical loss curve, training report and benchmark "
                                 "metrics/predictions; another seed gives other editors")
def test_same_seed_gives_identical_editors_and_metrics(tmp_path_factory, tmp_path):
    ws = workspace(tmp_path_factory, tmp_path)
    first, second = _train(ws, "first", 0), _train(ws, "second", 0)
    for key in ("base_dir", "heldout_examples"):
        assert first[key] == second[key]
    assert first == second
    assert (ws.models / "first" / "editors.safetensors").read_bytes() == (ws.models / "second" / "editors.safetensors").read_bytes()
    assert (ws.models / "first" / "editor_config.json").read_text() == (ws.models / "second" / "editor_config.json").read_text()
    assert (ws.reports / "first.csv").read_text() == (ws.reports / "second.csv").read_text()

    metrics_1, preds_1 = _benchmark(ws, "first")
    metrics_2, preds_2 = _benchmark(ws, "second")
    assert metrics_1 and metrics_1 == metrics_2
    assert preds_1 == preds_2

    _train(ws, "other-seed", 1)
    assert (ws.models / "other-seed" / "editors.safetensors").read_bytes() != \
        (ws.models / "first" / "editors.safetensors").read_bytes(), "the seed has no effect: the test cannot fail"
