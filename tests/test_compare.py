"""`mrt compare` and the README results writer: runs per method x seed, mean ± std, tables, markers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from components.experiments.compare import compare_runs, run_compare, summarize
from components.core.config import CompareParams
from components.experiments.report import RESULTS_END, RESULTS_START, comparison_markdown, write_results
from components.core.markdown import ReportError


def _summary(mean: float, collapsed: tuple[str, ...], tasks: dict[str, float]) -> dict:
    """A benchmark `*_summary` block: chance 0.5 and best constant 0.6 ("yes") on every task."""
    entry = {"chance": 0.5, "majority": 0.6, "majority_answer": "yes", "train_majority": 0.4,
             "train_majority_answer": "no"}
    return {"tasks": {t: {**entry, "accuracy": a, "collapsed": t in collapsed} for t, a in tasks.items()},
            "mean": mean, "chance_mean": 0.5, "majority_mean": 0.6, "train_majority_mean": 0.4,
            "chance_corrected_mean": (mean - 0.5) / 0.5, "majority_chance_corrected_mean": 0.2,
            "collapsed_tasks": list(collapsed)}


def _result(heldout: float | None, mme: float | None, trainable: int, wall: float, status: str = "ok",
            collapsed: tuple[str, ...] = ()) -> dict:
    if status != "ok":
        return {"status": "failed", "error": "RuntimeError: no\ntrace", "train": None, "benchmark": None,
                "wall_s": None}
    tasks, heldin = {"t1": heldout, "t2": heldout / 2}, {"h1": heldout + 0.1}
    return {
        "status": "ok", "error": "", "wall_s": wall,
        "train": {"trainable_params": trainable, "trainable_pct": trainable / 1000, "train_wall_s": wall / 2},
        "benchmark": {"heldout_mean": heldout, "mme_total": mme, "mme_perception": mme, "heldout": tasks,
                      "heldout_summary": _summary(heldout * 0.75, collapsed, tasks),
                      "heldin": heldin, "heldin_mean": heldout + 0.1, "heldin_summary": _summary(heldout + 0.1, (), heldin),
                      "mme_baselines": {"existence": {"chance_score": 75.0, "majority_score": 50.0}},
                      "mme_chance_total": 75.0, "mme_majority_total": 50.0, "mme_collapsed": ["existence"]},
    }


def test_runs_are_methods_by_seeds_with_one_frozen_run():
    cmp = CompareParams(methods=["frozen", "mrt", "lora"], seeds=[3, 4])
    assert compare_runs(cmp) == [("frozen", 3), ("mrt", 3), ("mrt", 4), ("lora", 3), ("lora", 4)]


def test_summary_gives_mean_and_sample_std_over_successful_seeds(tmp_path):
    cmp = CompareParams(methods=["frozen", "mrt", "lora"], seeds=[0, 1, 2], out_dir=str(tmp_path))
    runs = compare_runs(cmp)
    results = [_result(0.1, 50.0, 0, 5.0),
               _result(0.2, 100.0, 700, 10.0, collapsed=("t1", "t2")), _result(0.4, 120.0, 700, 12.0),
               _result(0.6, 140.0, 700, 14.0, collapsed=("t2",)),
               _result(0.3, 90.0, 9000, 8.0), _result(None, None, 0, 0, status="failed"),
               _result(0.5, 110.0, 9000, 9.0)]
    s = summarize(runs, results, cmp)
    mrt = s["methods"]["mrt"]
    assert mrt["heldout_mean"]["values"] == [0.2, 0.4, 0.6]
    assert math.isclose(mrt["heldout_mean"]["mean"], 0.4) and math.isclose(mrt["heldout_mean"]["std"], 0.2)
    assert math.isclose(mrt["mme_total"]["std"], 20.0) and math.isclose(mrt["wall_s"]["mean"], 12.0)
    assert math.isclose(mrt["per_task"]["t2"]["mean"], 0.2) and mrt["trainable_params"] == 700
    lora = s["methods"]["lora"]
    assert lora["status"] == "partial" and lora["heldout_mean"]["values"] == [0.3, 0.5]
    assert [r["status"] for r in lora["runs"]] == ["ok", "failed", "ok"]
    assert lora["runs"][1]["out_dir"] == str(tmp_path / "lora" / "seed-1")
    frozen = s["methods"]["frozen"]
    assert frozen["seeds"] == [0] and frozen["heldout_mean"]["std"] == 0.0 and frozen["trainable_params"] == 0
    assert s["seeds"] == [0, 1, 2] and s["steps"] == cmp.steps and s["produced_by"] == "mrt compare"
    md = comparison_markdown(s)
    row = next(line for line in md.splitlines() if line.startswith("| MRT |"))
    assert "0.400 ± 0.200" in row and "120.0 ± 20.0" in row and "700 (0.70%)" in row and "3/3" in row
    assert "| 0.500 ± 0.200 |" in row  # held-in mean: held-out + 0.1 per seed
    assert "-0.400 ± 0.300" in row  # chance-corrected: (0.75 · held-out − 0.5) / 0.5 per seed
    assert "| 1 · 0 · 1 |" in row  # collapsed tasks, mean over seeds: held-out (2, 0, 1) · held-in · MME
    assert mrt["collapsed"] == {"heldout": {"t1": 1, "t2": 2}, "heldin": {}, "mme": {"existence": 3}}
    t1 = next(line for line in md.splitlines() if line.startswith("| t1 |"))
    assert t1 == "| t1 | 0.500 | 0.600 (yes) | 0.100 | 0.400 ± 0.200 †1/3 | 0.400 ± 0.141 |"
    chance = next(line for line in md.splitlines() if line.startswith("| chance (uniform guess) |"))
    assert chance == "| chance (uniform guess) | — | 0.500 | 0.000 | 0.500 | 75.0 | — | — | — |"
    majority = next(line for line in md.splitlines() if line.startswith("| majority answer"))
    assert majority == "| majority answer (best constant, test set) | — | 0.600 | 0.200 | 0.600 | 50.0 | all | — | — |"
    assert "| most common training answer | — | 0.400 |" in md
    assert "| h1 | 0.500 | 0.600 (yes) |" in md  # the held-in table
    assert s["baselines"]["heldout"]["majority_mean"] == 0.6 and s["baselines"]["mme"]["majority_total"] == 50.0
    assert "| LoRA |" in md and "2/3" in md and "`lora/seed-1`: RuntimeError: no" in md and "| t1 |" in md


def test_produced_by_names_dvc_when_dvc_runs_the_stage(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_STAGE", "compare")
    cmp = CompareParams(methods=["frozen"], seeds=[0])
    assert summarize([("frozen", 0)], [_result(0.1, 1.0, 0, 1.0)], cmp)["produced_by"] == "dvc repro (stage compare)"


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------
def _comparison_file(tmp_path: Path) -> Path:
    cmp = CompareParams(methods=["frozen", "mrt"], seeds=[0, 1])
    s = summarize(compare_runs(cmp), [_result(0.1, 50.0, 0, 5.0), _result(0.3, 80.0, 700, 9.0),
                                      _result(0.5, 100.0, 700, 11.0)], cmp)
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(s))
    return path


def test_readme_block_is_replaced_between_markers_only(tmp_path):
    from components.experiments.report import write_ablation_csv

    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n\n", "\n\n## Next\n\ntext\n"
    readme.write_text(before + RESULTS_START + "\nold table\n" + RESULTS_END + after)
    csv_path = write_ablation_csv(tmp_path / "ablation.csv", [
        {"arm": "all", "seed": 0, "groups": "visual", "trainable_params": 10, "heldout_mean": 0.5, "status": "ok"},
        {"arm": "no-visual", "seed": 0, "groups": "prefix", "trainable_params": 4, "heldout_mean": 0.25,
         "status": "ok"}])
    block, _ = write_results(tmp_path / "results.md", _comparison_file(tmp_path), csv_path, readme)
    assert (tmp_path / "results.md").read_text() == block + "\n"
    text = readme.read_text()
    assert text.startswith(before + RESULTS_START + "\n") and text.endswith(RESULTS_END + after)
    assert "old table" not in text and block in text
    assert "Produced by `mrt compare`" in block and "| MRT | 700" in block and "0.400 ± 0.141" in block
    assert "| no-visual | prefix | 4 | 0.250 | -0.250 |" in block
    write_results(tmp_path / "results.md", _comparison_file(tmp_path), csv_path, readme)
    assert readme.read_text().count(RESULTS_START) == 1  # idempotent: one block, still between the markers


@pytest.mark.parametrize(
    "content, expect",
    [
        ("no markers here\n", f"'{RESULTS_START}' found 0 times"),
        (f"{RESULTS_START}\n{RESULTS_START}\n{RESULTS_END}\n", f"'{RESULTS_START}' found 2 times"),
        (f"{RESULTS_END}\nx\n{RESULTS_START}\n", "comes before"),
    ],
)
def test_readme_marker_problems_are_clear_and_change_nothing(tmp_path, content, expect):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(ReportError) as err:
        write_results(tmp_path / "results.md", _comparison_file(tmp_path), readme_path=readme)
    assert expect in str(err.value) and str(readme) in str(err.value)
    assert readme.read_text() == content and not (tmp_path / "results.md").exists()


def test_readme_writer_names_a_bad_comparison_report(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{RESULTS_START}\n{RESULTS_END}\n")
    bad = tmp_path / "comparison.json"
    bad.write_text(json.dumps({"methods": {"mrt": {"heldout_mean": {}}}}))
    with pytest.raises(ReportError, match=r"comparison.json: methods.mrt: field 'mme_total' missing"):
        write_results(tmp_path / "results.md", bad, readme_path=readme)
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_results(tmp_path / "results.md", bad, readme_path=readme)
    with pytest.raises(ReportError, match="not found"):
        write_results(tmp_path / "results.md", tmp_path / "missing.json", readme_path=readme)


# ---------------------------------------------------------------------------------------------
# smoke: two methods x two seeds on a tiny base
# ---------------------------------------------------------------------------------------------
def test_compare_two_methods_two_seeds_end_to_end(tiny_setup, tmp_path):
    from tiny_sweep import bench_params, compare_params, train_params

    data, base = tiny_setup
    cmp = compare_params(tmp_path, methods=["mrt", "lora"], seeds=[0, 1])
    train = train_params(tmp_path, data, base, steps=3, lr={"mrt": 1e-3, "lora": 4e-3})
    s = run_compare(cmp, train, bench_params(tmp_path, data, base), report=None)
    saved = json.loads(Path(cmp.report).read_text())
    assert saved["methods"].keys() == {"mrt", "lora"} and saved["seeds"] == [0, 1] and saved["steps"] == 2
    for name, m in saved["methods"].items():
        assert m["status"] == "ok", [r["error"] for r in m["runs"]]
        assert len(m["heldout_mean"]["values"]) == 2 and m["heldout_mean"]["std"] is not None
        assert len(m["mme_total"]["values"]) == 2 and m["trainable_params"] > 0 and m["per_task"]
        assert m["wall_s"]["mean"] > 0
    assert saved["methods"]["lora"]["trainable_params"] != saved["methods"]["mrt"]["trainable_params"]
    curves = [(Path(cmp.out_dir) / "mrt" / f"seed-{k}" / "train_curve.csv").read_text() for k in (0, 1)]
    assert curves[0] != curves[1]  # the seeds really differ
    assert (Path(cmp.out_dir) / "lora" / "seed-1" / "adapter_config.json").is_file()
    lora_run = json.loads((Path(cmp.out_dir) / "lora" / "seed-1" / "train.json").read_text())
    assert lora_run["steps"] == cmp.steps and lora_run["lr"] == 4e-3
    assert "| MRT |" in Path(cmp.table).read_text() and Path(cmp.plot).read_bytes()[:4] == b"\x89PNG"
    assert s["methods"]["mrt"]["heldout_mean"] == saved["methods"]["mrt"]["heldout_mean"]
    # each method trains at its own learning rate, and the report says which
    assert saved["methods"]["mrt"]["lr"] == 1e-3 and saved["methods"]["lora"]["lr"] == 4e-3
    peak = {m: max(float(r["lr"]) for r in csv.DictReader((Path(cmp.out_dir) / m / "seed-0" / "train_curve.csv").open()))
            for m in ("mrt", "lora")}
    assert peak["lora"] == pytest.approx(4 * peak["mrt"]) and 0 < peak["mrt"] <= 1e-3
    assert "at learning rates MRT 0.001, LoRA 0.004" in Path(cmp.table).read_text()


def test_the_comparison_plot_draws_each_scores_floors(tmp_path):
    from components.experiments.report import _floors, write_comparison_plot

    summary = {"steps": 10, "seeds": [0, 1],
               "methods": {"frozen": {"heldout_mean": {"mean": 0.5, "std": 0.0, "values": [0.5]},
                                      "mme_total": {"mean": 300.0, "std": 0.0, "values": [300.0]}},
                           "mrt": {"heldout_mean": {"mean": 0.6, "std": 0.01, "values": [0.59, 0.61]},
                                   "heldin_mean": {"mean": 0.7, "std": 0.0, "values": [0.7, 0.7]},
                                   "mme_total": {"mean": 320.0, "std": 5.0, "values": [315.0, 325.0]}}},
               "baselines": {"heldout": {"chance_mean": 0.43, "majority_mean": 0.46},
                             "heldin": {"chance_mean": 0.31},
                             "mme": {"chance_total": 375.0, "majority_total": 250.0}}}
    assert _floors(summary, "heldout_mean") == [("chance", 0.43, ":"), ("best constant answer", 0.46, "--")]
    assert _floors(summary, "heldin_mean") == [("chance", 0.31, ":")]  # a floor that was not measured is not drawn
    assert [v for _, v, _ in _floors(summary, "mme_total")] == [375.0, 250.0]
    out = write_comparison_plot(tmp_path / "c.png", summary)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
