"""The promotion gate's noise guard: a candidate must beat the best constant answer and the frozen base
by more than the seed spread, and the decision says which condition held or failed, with its numbers."""

from __future__ import annotations

import json

import pytest
from promotion_helpers import promote_params

from components.track import registry
from components.core.config import PromoteParams
from components.track.registry import Reference

GUARD = PromoteParams(baseline_margin=0.02, spread_factor=2.0, min_seeds=2)
THREE_SEEDS = Reference(frozen_heldout_mean=0.10, seed_std=0.01, seeds=3, method="mrt", source="comparison.json")


def scores(majority: float | None, **tasks: float) -> dict[str, float]:
    """Flat metrics as `benchmark_runs.flat_metrics` names them, baselines included."""
    m = {f"heldout/{t}": v for t, v in tasks.items()}
    m["heldout/mean"] = sum(tasks.values()) / len(tasks)
    if majority is not None:
        m["heldout/majority_mean"] = majority
        m.update({f"heldout/{t}/majority": majority for t in tasks})  # never read as tasks
    m["heldout/chance_mean"] = 0.4
    m["heldout/chance_corrected_mean"] = (m["heldout/mean"] - 0.4) / 0.6
    return m


def test_a_candidate_equal_to_the_majority_baseline_is_refused_and_the_decision_says_why():
    d = registry.gate(scores(0.5, a=0.5, b=0.5), None, True, GUARD, THREE_SEEDS)
    assert not d.promote
    c = d.condition("beats_majority")
    assert not c.held and c.enforced and c.value == 0.0 and c.threshold == pytest.approx(0.02)
    assert d.majority_heldout_mean == 0.5 and d.required_margin == pytest.approx(0.02)
    assert d.to_dict()["failed_conditions"] == ["beats_majority"]
    assert any("vs the best constant answer 0.5000: delta +0.0000 does not reach the required margin" in r
               for r in d.reasons)
    assert "| heldout/mean vs best constant answer | 0.5000 | 0.5000 | +0.0000 | > 0 and ≥ 0.02 | blocks |" in d.markdown()
    assert d.condition("beats_frozen_base").held and d.condition("seed_spread").held


def test_a_candidate_within_the_seed_spread_of_the_frozen_base_is_refused():
    near_base = Reference(frozen_heldout_mean=0.55, seed_std=0.03, seeds=3, method="mrt", source="comparison.json")
    d = registry.gate(scores(0.4, a=0.6, b=0.6), None, True, GUARD, near_base)
    assert not d.promote
    assert d.required_margin == pytest.approx(0.06)  # 2 × std 0.03 beats baseline_margin 0.02
    assert d.condition("beats_majority").held  # +0.20 over the constant answer
    c = d.condition("beats_frozen_base")
    assert not c.held and c.value == pytest.approx(0.05) and c.threshold == pytest.approx(0.06)
    assert any("vs the frozen base 0.5500: delta +0.0500 does not reach the required margin max(baseline_margin "
               "0.02, 2 × seed std 0.0300) = 0.0600" in r for r in d.reasons)
    assert d.to_dict()["failed_conditions"] == ["beats_frozen_base"]


def test_a_candidate_clear_of_both_baselines_by_more_than_the_spread_is_promoted():
    ref = Reference(frozen_heldout_mean=0.55, seed_std=0.03, seeds=3, method="mrt")
    d = registry.gate(scores(0.4, a=0.62, b=0.62), None, True, GUARD, ref)
    assert d.promote, d.reasons
    assert all(c.held for c in d.conditions) and "no champion yet" in d.reasons[0]
    assert d.condition("beats_frozen_base").value == pytest.approx(0.07)


def test_without_a_measured_spread_nothing_is_promoted():
    one_seed = Reference(frozen_heldout_mean=0.1, seed_std=0.0, seeds=1, method="mrt")
    d = registry.gate(scores(0.4, a=0.9, b=0.9), None, True, GUARD, one_seed)
    assert not d.promote and d.to_dict()["failed_conditions"] == ["seed_spread"]
    assert any("over 1 seed(s)" in r and "min_seeds 2" in r for r in d.reasons)
    no_comparison = registry.gate(scores(0.4, a=0.9, b=0.9), None, True, GUARD, None)
    assert not no_comparison.promote
    assert set(no_comparison.to_dict()["failed_conditions"]) == {"seed_spread", "beats_frozen_base"}
    no_baseline = registry.gate(scores(None, a=0.9, b=0.9), None, True, GUARD, THREE_SEEDS)
    assert not no_baseline.promote and no_baseline.to_dict()["failed_conditions"] == ["beats_majority"]


def test_not_enforced_the_conditions_are_recorded_but_do_not_block():
    lax = GUARD.model_copy(update={"enforce_baselines": False})
    d = registry.gate(scores(0.5, a=0.5, b=0.5), None, True, lax, None)
    assert d.promote
    failed = [c for c in d.conditions if not c.held]
    assert {c.name for c in failed} == {"beats_majority", "beats_frozen_base", "seed_spread"}
    assert not any(c.enforced for c in failed)
    assert any("(recorded, not enforced: enforce_baselines false)" in r for r in d.reasons)


def test_the_seed_spread_also_raises_the_margin_over_the_champion():
    champion = scores(0.4, a=0.60, b=0.60)
    ref = Reference(frozen_heldout_mean=0.1, seed_std=0.03, seeds=3, method="mrt")
    d = registry.gate(scores(0.4, a=0.65, b=0.65), champion, True, GUARD, ref)  # +0.05 < 2 × 0.03
    assert not d.promote and d.to_dict()["failed_conditions"] == ["beats_champion"]
    assert d.condition("beats_champion").threshold == pytest.approx(0.06)
    assert d.task_deltas == pytest.approx({"a": 0.05, "b": 0.05})  # baseline keys are not tasks
    assert registry.gate(scores(0.4, a=0.67, b=0.67), champion, True, GUARD, ref).promote


def test_reference_is_read_from_the_comparison_report(tmp_path):
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({"methods": {
        "frozen": {"heldout_mean": {"mean": 0.11, "std": 0.0, "values": [0.11]}},
        "mrt": {"heldout_mean": {"mean": 0.44, "std": 0.015, "values": [0.43, 0.44, 0.46]}}}}))
    ref = registry.reference_from_comparison(path, "mrt")
    assert ref == Reference(frozen_heldout_mean=0.11, seed_std=0.015, seeds=3, method="mrt", source=str(path))
    lora = registry.reference_from_comparison(path, "lora")  # the candidate's method was not compared
    assert lora.seed_std is None and lora.seeds == 0 and lora.frozen_heldout_mean == 0.11
    assert registry.reference_from_comparison(tmp_path / "missing.json", "mrt") is None
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="comparison.json: field 'methods'"):
        registry.reference_from_comparison(path, "mrt")


def test_promote_refuses_noise_end_to_end_and_records_the_conditions(store, tiny_artifacts, tmp_path):
    from mlflow.tracking import MlflowClient

    comparison = tmp_path / "comparison.json"
    comparison.write_text(json.dumps({"methods": {
        "frozen": {"heldout_mean": {"mean": 0.114, "std": 0.0, "values": [0.114]}},
        "mrt": {"heldout_mean": {"mean": 0.444, "std": 0.015, "values": [0.43, 0.44, 0.46]}}}}))
    guard = dict(comparison_report=str(comparison), enforce_baselines=True)
    # at the best constant answer (0.5 on these tasks): refused, though far above the frozen base
    noise = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.5}, "noise",
                                            majority=0.5, **guard))
    assert not noise.promote and registry.champion(store) is None
    report = json.loads((tmp_path / "noise" / "promotion.json").read_text())
    assert report["failed_conditions"] == ["beats_majority"] and report["required_margin"] == pytest.approx(0.03)
    by_name = {c["name"]: c for c in report["conditions"]}
    assert by_name["beats_frozen_base"]["held"] and by_name["beats_frozen_base"]["value"] == pytest.approx(0.386)
    assert by_name["seed_spread"]["held"] and by_name["beats_majority"]["value"] == pytest.approx(0.0)
    metrics = MlflowClient().get_run(noise.run_id).data.metrics
    assert metrics["promotion/beats_majority"] == 0.0 and metrics["promotion/beats_frozen_base"] == 1.0
    # clear of the constant answer by more than 2 × 0.015: promoted
    real = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.6, "b": 0.6}, "real",
                                           majority=0.5, **guard))
    assert real.promote and registry.champion(store)["version"] == real.candidate_version
