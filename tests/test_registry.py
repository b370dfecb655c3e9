"""The promotion gate (pure), the pyfunc editor model through the registry, `mrt promote` and
`mrt predict --model`, each against a private SQLite store."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from promotion_helpers import promote_params, registered_versions

from components.track import registry, store_init, tracking
from components.core.config import PromoteParams

# The champion rule on its own (the noise guard is exercised in test_promotion_gate.py).
RULES = PromoteParams(margin=0.01, max_task_drop=0.05, enforce_baselines=False)


def scores(**tasks: float) -> dict[str, float]:
    m = {f"heldout/{t}": v for t, v in tasks.items()}
    m["heldout/mean"] = sum(tasks.values()) / len(tasks)
    return m


CHAMP = scores(a=0.50, b=0.50, c=0.50)


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------
def test_first_validated_model_becomes_champion():
    d = registry.gate(scores(a=0.1, b=0.2), None, True, RULES)
    assert d.promote and "no champion yet" in d.reasons[0]
    assert d.candidate_heldout_mean == pytest.approx(0.15) and d.champion_heldout_mean is None


def test_worse_candidate_is_not_promoted():
    d = registry.gate(scores(a=0.49, b=0.49, c=0.49), CHAMP, True, RULES)
    assert not d.promote
    assert any("delta -0.0100 does not beat" in r for r in d.reasons)


def test_better_candidate_is_promoted_with_its_numbers():
    d = registry.gate(scores(a=0.60, b=0.55, c=0.48), CHAMP, True, RULES)
    assert d.promote, d.reasons
    assert d.mean_delta == pytest.approx(0.0433, abs=1e-4)
    assert d.task_deltas == pytest.approx({"a": 0.10, "b": 0.05, "c": -0.02})
    assert any("worst delta -0.0200" in r for r in d.reasons)


def test_a_drop_on_one_task_blocks_a_better_mean():
    d = registry.gate(scores(a=0.90, b=0.90, c=0.40), CHAMP, True, RULES)
    assert d.mean_delta > RULES.margin and not d.promote
    assert any("heldout/c drops by 0.1000 (0.5000 → 0.4000) > max_task_drop 0.05" in r for r in d.reasons)


def test_drop_exactly_at_the_tolerance_is_allowed():
    d = registry.gate(scores(a=0.70, b=0.70, c=0.45), CHAMP, True, RULES)
    assert d.promote, d.reasons


def test_margin_must_be_met_and_an_equal_model_never_wins():
    assert not registry.gate(scores(a=0.505, b=0.505, c=0.505), CHAMP, True, RULES).promote  # +0.005 < 0.01
    zero = PromoteParams(margin=0.0, max_task_drop=0.05, enforce_baselines=False)
    assert not registry.gate(CHAMP, CHAMP, True, zero).promote
    assert registry.gate(scores(a=0.51, b=0.5, c=0.5), CHAMP, True, zero).promote


def test_failed_validation_blocks_even_the_first_model():
    for champ in (None, CHAMP):
        d = registry.gate(scores(a=0.99, b=0.99, c=0.99), champ, False, RULES)
        assert not d.promote and "validation failed" in d.reasons[0]


def test_candidate_missing_a_champion_task_or_any_scores_is_blocked():
    d = registry.gate(scores(a=0.9, b=0.9), CHAMP, True, RULES)
    assert not d.promote and any("task(s) c scored for the champion" in r for r in d.reasons)
    assert not registry.gate({"mme/total": 100.0}, None, True, RULES).promote


def test_decision_table_and_dict():
    d = registry.gate(scores(a=0.90, b=0.90, c=0.40), CHAMP, True, RULES)
    d.candidate_version, d.champion_version_before, d.champion_version_after = 3, 2, 2
    md = d.markdown()
    assert "**not promoted**" in md and "candidate v3; champion before v2, after v2" in md
    assert "| heldout/c | | | -0.1000 | drop ≤ 0.05 | blocks |" in md
    assert "| heldout/mean | 0.7333 | 0.5000 | +0.2333 |" in md
    assert json.loads(json.dumps(d.to_dict()))["mean_delta"] == pytest.approx(0.2333, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# the registry and the pyfunc model
# ---------------------------------------------------------------------------------------------
def test_registry_round_trip_answers_like_inference(store, tiny_artifacts, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from components.evaluation.inference import predict

    base, editors, image = tiny_artifacts
    tracking.configure(store)
    run_id = tracking.start_run(store, "train")
    uri = registry.log_editor_model(run_id, store, str(base), str(editors))
    assert uri.startswith("models:/m-")
    from mlflow.tracking import MlflowClient

    logged = MlflowClient().get_logged_model(uri.split("/")[-1])
    assert logged.experiment_id == tracking.experiment_id(store)  # the run's experiment, not Default
    assert logged.artifact_location.startswith(str(tmp_path))
    version = registry.register_candidate(store, uri, run_id, {"heldout/mean": 0.5, "mrt.data_hash": "d1"})
    registry.set_alias(store, registry.CHAMPION, version)
    champ = registry.champion(store)
    assert champ["version"] == version and champ["run_id"] == run_id
    assert champ["metrics"] == {"heldout/mean": 0.5} and champ["lineage"] == {"mrt.data_hash": "d1"}
    assert champ["tags"][registry.STATE_TAG] == "complete"

    model = mlflow.pyfunc.load_model("models:/mrt-editors@champion")
    prompts = ["What color is the image?", "What color is the image?", "Describe it."]
    b64 = base64.b64encode(image.read_bytes()).decode()
    got = model.predict(pd.DataFrame({"prompt": prompts, "image": [b64, f"data:image/png;base64,{b64}", None]}))
    want = predict(base, editors, [image, image, None], prompts)
    assert list(got) == want
    assert len(set(want)) > 1  # the check would be empty if every answer were the same

    found = registry.resolve_version("models:/mrt-editors@champion", cache_dir=str(tmp_path / "cache"))
    base_dir, adapter_dir = found["base_dir"], found["adapter_dir"]
    assert (tmp_path / "cache" / "mrt-editors" / f"v{version}" / ".complete").is_file()
    assert not (Path(adapter_dir) / "checkpoints").exists()  # resumable state did not travel
    assert predict(base_dir, adapter_dir, [image], prompts[:1]) == want[:1]


def test_pyfunc_rejects_bad_rows_by_row_and_column(store, tiny_artifacts):
    import mlflow.pyfunc
    import pandas as pd

    from components.track.pyfunc_model import ModelInputError

    base, editors, _ = tiny_artifacts
    tracking.configure(store)
    run_id = tracking.start_run(store, "train")
    uri = registry.log_editor_model(run_id, store, str(base), None)  # the bare base is a model too
    model = mlflow.pyfunc.load_model(uri)
    assert len(model.predict(pd.DataFrame({"prompt": ["Hello"]}))) == 1
    with pytest.raises(Exception, match="row 1, column 'image'"):
        model.predict(pd.DataFrame({"prompt": ["a", "b"], "image": ["", "not-an-image-or-base64!"]}))
    with pytest.raises(ModelInputError, match="row 0, column 'image': bytes are not a readable image"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"prompt": ["a"], "image": [base64.b64encode(b"junk").decode()]}))


def test_failed_registration_leaves_no_version(store, tiny_artifacts, monkeypatch):
    base, editors, _ = tiny_artifacts
    tracking.configure(store)
    run_id = tracking.start_run(store, "train")
    uri = registry.log_editor_model(run_id, store, str(base), str(editors))

    def boom(*a, **k):
        raise tracking.TrackingError("MLflow at x: set alias failed")

    monkeypatch.setattr(registry, "set_alias", boom)
    with pytest.raises(tracking.TrackingError):
        registry.register_candidate(store, uri, run_id, {"heldout/mean": 0.5})
    assert registered_versions(store) == []


def test_cleanup_deletes_only_pending_versions_without_aliases(store, tiny_artifacts):
    base, editors, _ = tiny_artifacts
    tracking.configure(store)
    run_id = tracking.start_run(store, "train")
    uri = registry.log_editor_model(run_id, store, str(base), str(editors))
    good = registry.register_candidate(store, uri, run_id, {})
    orphan = registry._create_version(store, uri, run_id, {registry.STATE_TAG: "pending", registry.PROMOTION_ID_TAG: "p"})
    assert registry.cleanup_pending(store) == [orphan]
    assert [int(v.version) for v in registered_versions(store)] == [good]


def test_cleanup_deletes_a_pending_version_holding_only_candidate(store, tiny_artifacts):
    """A promotion cut off after setting `candidate` but before marking its version complete: the next
    promotion's cleanup removes it (not one promotion later); a pending champion is kept."""
    base, editors, _ = tiny_artifacts
    tracking.configure(store)
    run_id = tracking.start_run(store, "train")
    uri = registry.log_editor_model(run_id, store, str(base), str(editors))
    champ = registry._create_version(store, uri, run_id, {registry.STATE_TAG: "pending", registry.PROMOTION_ID_TAG: "a"})
    registry.set_alias(store, registry.CHAMPION, champ)
    cut = registry._create_version(store, uri, run_id, {registry.STATE_TAG: "pending", registry.PROMOTION_ID_TAG: "b"})
    registry.set_alias(store, registry.CANDIDATE, cut)
    assert registry.cleanup_pending(store) == [cut]
    assert [int(v.version) for v in registered_versions(store)] == [champ]
    assert registry.aliases(store) == {registry.CHAMPION: champ}


# ---------------------------------------------------------------------------------------------
# the whole step and the CLI doors
# ---------------------------------------------------------------------------------------------
def test_promote_first_then_worse_then_better(store, tiny_artifacts, tmp_path):
    from mlflow.tracking import MlflowClient

    first = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.5}, "r1"))
    assert first.promote and first.candidate_version == 1 and first.champion_version_after == 1
    report = json.loads((tmp_path / "r1" / "promotion.json").read_text())
    assert report["promote"] is True and report["candidate_version"] == 1

    worse = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.45, "b": 0.5}, "r2"))
    assert not worse.promote and worse.champion_version_before == 1 and worse.champion_version_after == 1
    assert registry.alias_version(store, registry.CANDIDATE)["version"] == 2

    better = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.6, "b": 0.52}, "r3"))
    assert better.promote and registry.champion(store)["version"] == 3

    champ = registry.champion(store)
    assert champ["metrics"]["heldout/a"] == pytest.approx(0.6)
    for key in ("mrt.data_hash", "mrt.params_hash", "mrt.base_fingerprint", "mrt.mrt_version"):
        assert champ["lineage"][key], key
    assert champ["lineage"]["mrt.base_fingerprint"].startswith("sha256:")
    run = MlflowClient().get_run(better.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mrt.promoted"] == "true"
    assert run.data.tags["mrt.data_hash"] == champ["lineage"]["mrt.data_hash"]
    assert run.data.metrics["promotion/promoted"] == 1.0
    assert {a.path for a in MlflowClient().list_artifacts(better.run_id, "promotion")} == {
        "promotion/promotion.json", "promotion/promotion.md"}
    tags = {int(v.version): v.tags for v in registered_versions(store)}
    assert [tags[v][registry.DECISION_TAG] for v in (1, 2, 3)] == ["promoted", "rejected", "promoted"]


def test_promote_logs_into_a_given_run_and_blocks_failed_validation(store, tiny_artifacts, tmp_path):
    tracking.configure(store)
    run_id = tracking.start_run(store, "pipeline")
    d = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.9}, "r1", validation=False), run_id=run_id)
    assert not d.promote and d.run_id == run_id and registry.champion(store) is None
    assert "validation failed (2 check(s) failed)" in d.reasons[0]
    from mlflow.tracking import MlflowClient

    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # the caller's run: the caller ends it

    missing = registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.9}, "r2", validation=None))
    assert not missing.promote and "validation report not found" in missing.reasons[0]


def test_mrt_promote_and_predict_model_cli(store, tiny_artifacts, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from components.evaluation.inference import predict

    params = promote_params(tmp_path, tiny_artifacts, {"a": 0.5, "b": 0.6}, "cli")
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.to_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["promote", "-p", str(pfile)])
    assert res.exit_code == 0, res.output
    assert "**promoted**" in res.output and "| heldout/mean | 0.5500 |" in res.output
    res = runner.invoke(app, ["promote", "-p", str(pfile)])  # same scores again: not better, still exit 0
    assert res.exit_code == 0 and "**not promoted**" in res.output

    base, editors, image = tiny_artifacts
    res = runner.invoke(app, ["predict", "-p", str(pfile), "--model", "models:/mrt-editors@champion",
                              "--prompt", "What color is the image?", "--image", str(image)])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.output.strip().splitlines()[-1])["answer"]
    assert answer == predict(base, editors, [image], ["What color is the image?"])[0]

    res = runner.invoke(app, ["predict", "-p", str(pfile), "--model", "models:/mrt-editors@champion",
                              "--editors", str(editors), "--prompt", "hi"])
    assert res.exit_code == 1 and "without --base/--editors" in res.output
    res = runner.invoke(app, ["predict", "-p", str(pfile), "--model", "models:/mrt-editors@nope", "--prompt", "hi"])
    assert res.exit_code == 1 and "models:/mrt-editors@nope" in res.output

    pfile.write_text(yaml.safe_dump({**params.to_dict(), "promote": {**params.to_dict()["promote"],
                                                                       "benchmark_report": str(tmp_path / "no.json")}}))
    res = runner.invoke(app, ["promote", "-p", str(pfile)])
    assert res.exit_code == 1 and "benchmark report not found" in res.output


def test_parse_model_uri():
    assert registry.parse_model_uri("models:/mrt-editors@champion") == ("mrt-editors", None, "champion")
    assert registry.parse_model_uri("models:/mrt-editors/3") == ("mrt-editors", "3", None)
    for bad in ("runs:/x/y", "models:/mrt-editors", "models:/@a", "models:/m/x"):
        with pytest.raises(ValueError, match="expected models:/<name>@<alias>"):
            registry.parse_model_uri(bad)


def test_file_lock_serialises_threads_of_one_process(store):
    """Prefect runs tasks in threads: two promotions in one process must not overlap either."""
    import threading
    import time

    spans = []

    def worker():
        with registry.promotion_lock(store) as kind:
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((t0, time.monotonic(), kind))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    (a0, a1, kind), (b0, b1, _) = sorted(spans)
    assert kind == "file" and a1 <= b0


def test_lease_takeover_rules():
    import time

    own_dead = f"dead{registry._owner()}"
    assert registry._stale(None, "me")
    assert registry._stale({"token": "x@other:1", "expires": time.time() - 1}, "me")  # expired
    assert not registry._stale({"token": "x@other:1", "expires": time.time() + 60}, "me")  # live, elsewhere
    assert registry._stale({"token": own_dead, "expires": time.time() + 60}, "me")  # our leftover
    registry._held_tokens.add(own_dead)
    try:
        assert not registry._stale({"token": own_dead, "expires": time.time() + 60}, "me")  # another thread's
    finally:
        registry._held_tokens.discard(own_dead)
    assert store_init.local_store_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert store_init.local_store_path("sqlite:///rel.db") == Path("rel.db")
    assert store_init.local_store_path("http://127.0.0.1:5000") is None
    assert store_init.local_store_path("postgresql://u@h/db") is None


def test_champion_update_with_a_lost_response_is_rolled_back(store, tiny_artifacts, tmp_path, monkeypatch):
    """The server applied champion → v2 but the reply never came: v1 must be champion again and v2 gone,
    never "no champion" and never a champion the caller thinks failed."""
    assert registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.5}, "r1")).promote
    real = registry.set_alias
    failed = []

    def applied_then_lost(track, alias, version):
        real(track, alias, version)
        if alias == registry.CHAMPION and version == 2 and not failed:
            failed.append(version)
            raise tracking.TrackingError("MLflow at x: set champion failed (connection reset)")

    monkeypatch.setattr(registry, "set_alias", applied_then_lost)
    with pytest.raises(tracking.TrackingError):
        registry.promote(promote_params(tmp_path, tiny_artifacts, {"a": 0.9}, "r2"))
    assert failed == [2]
    assert registry.champion(store)["version"] == 1
    assert [int(v.version) for v in registered_versions(store)] == [1]
    assert not (tmp_path / "r2" / "promotion.json").exists()
