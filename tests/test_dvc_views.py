"""DVC's views read well: `dvc metrics` shows small headline files (no wall times), the full reports are
plain outputs, and every plot has its axes the way its template draws them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.experiments import headline
from components.experiments.report import _FLOAT_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _entries(spec: dict, key: str) -> list[tuple[str, dict]]:
    out = []
    for e in spec.get(key) or []:
        out += list(e.items()) if isinstance(e, dict) else [(e, {})]
    return out


def test_metrics_are_the_headline_files_not_the_full_reports():
    for name, spec in _stages().items():
        metrics = [path for path, _ in _entries(spec, "metrics")]
        assert all(p.endswith(".metrics}") for p in metrics), (name, metrics)
        if name not in ("data", "report"):
            assert metrics, f"stage {name} has no headline metrics file"


def test_bar_horizontal_plots_put_the_number_on_x_and_the_category_on_y():
    bars = [(p, o) for spec in _stages().values() for p, o in _entries(spec, "plots")
            if (o or {}).get("template") == "bar_horizontal"]
    assert bars
    for path, opts in bars:
        assert opts["x"] in _FLOAT_FIELDS, (path, opts)  # a number: bar length
        assert opts["y"] == "arm", (path, opts)  # the category


def test_headline_files_hold_no_timing_and_keep_chance_beside_accuracy(tmp_path):
    report = {"heldout_mean": 0.46, "heldout_n": 280, "heldout_chance_mean": 0.31, "heldout_majority_mean": 0.37,
              "mme_total": 250.0, "mme_perception": 250.0, "wall_s": 5.2, "heldout": {"t": 0.5},
              "model": {"trainable_params": 13240, "wall_s": 1.0}}
    h = headline.benchmark_headline(report)
    assert h == {"heldout_mean": 0.46, "heldout_chance_mean": 0.31, "heldout_majority_mean": 0.37,
                 "mme_total": 250.0, "trainable_params": 13240}
    nested = {"heldout_mean": 0.46, "heldout_summary": {"chance_mean": 0.3, "majority_mean": 0.4,
                                                         "chance_corrected_mean": 0.2, "per_task": {}},
              "heldin_mean": 0.5, "mme_total": 250.0, "mme_chance_total": 300.0, "wall_s": 1.0}
    assert headline.benchmark_headline(nested) == {
        "heldout_mean": 0.46, "heldout_chance_corrected_mean": 0.2, "heldout_chance_mean": 0.3,
        "heldout_majority_mean": 0.4, "heldin_mean": 0.5, "mme_total": 250.0, "mme_chance_total": 300.0}
    cmp = {"methods": {"mrt": {"heldout_mean": {"mean": 0.44, "std": 0.01}, "mme_total": {"mean": 255.0},
                               "trainable_params": 13240, "wall_s": {"mean": 22.7}, "per_task": {}}}}
    assert headline.compare_headline(cmp) == {"mrt": {"heldout_mean": 0.44, "mme_total": 255.0,
                                                      "trainable_params": 13240}}
    assert headline.train_headline({"loss_final": 0.7, "heldout_mean": 0.46, "train_wall_s": 14.8, "steps": 300}) == \
        {"loss_final": 0.7, "quick_eval_mean": 0.46}
    out = headline.write_headline(tmp_path / "m" / "x.json", h)
    assert json.loads(out.read_text()) == h and out.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("kind", ["validate", "align", "train", "benchmark", "compare", "promote", "ablate"])
def test_headline_of_the_committed_reports_is_small(kind, tmp_path):
    from components.core.config import load_params

    p = load_params(ROOT / "params.yaml")
    report = {"validate": p.validate_.report, "align": p.align.report, "train": p.train.report,
              "benchmark": p.benchmark.report, "compare": p.compare.report, "promote": p.promote.report,
              "ablate": p.ablate.report_csv}[kind]
    if not (ROOT / report).is_file():
        pytest.skip(f"{report} not committed")
    text = headline.write_from_report(kind, ROOT / report, tmp_path / "h.json").read_text()
    full = (ROOT / report).stat().st_size
    assert "wall" not in text and len(text) < min(1200, full), (kind, len(text), full)


def test_mrt_report_writes_the_results_file_and_the_readme_block_only_when_asked(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from components.experiments.report import RESULTS_END, RESULTS_START
    from test_compare import _comparison_file

    cmp = _comparison_file(tmp_path)
    results = tmp_path / "out" / "results.md"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{RESULTS_START}\nOLD-BLOCK\n{RESULTS_END}\ntail\n")
    base = ["report", "-S", f"compare.report={cmp}", "-S", f"ablate.report_csv={tmp_path / 'none.csv'}",
            "-S", f"report.results={results}"]

    res = CliRunner().invoke(app, base + ["-S", "report.readme=null"])  # the smoke profile's setting
    assert res.exit_code == 0, res.output
    block = results.read_text()
    assert "| MRT" in block or "MRT" in block
    assert "OLD-BLOCK" in readme.read_text()  # untouched

    res = CliRunner().invoke(app, base + ["-S", f"report.readme={readme}"])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert "OLD-BLOCK" not in text and block.strip() in text and text.endswith(f"{RESULTS_END}\ntail\n")

    results.unlink()
    readme.write_text("# no markers\n")
    res = CliRunner().invoke(app, base + ["-S", f"report.readme={readme}"])
    assert res.exit_code == 1 and "marker" in res.output
    assert not results.exists() and readme.read_text() == "# no markers\n"  # nothing half-written
