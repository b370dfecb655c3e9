"""`mrt benchmark` (components.evaluation.benchmark) and the robustness perturbations (components.evaluation.perturb).

One tiny generated data set (held-out tasks of every answer kind, a real-image task, MME) and one
tiny untrained base, built once per module; every run uses them with small batches.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.config import BenchmarkParams
from components.data.records import DataError, Row
from components.evaluation.metrics.text import normalize_answer
from components.evaluation.perturb import PERTURBATIONS, gaussian_blur, perturb_image

PASSES = ["noise", "blur", "jitter"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a tiny model gains nothing from two, and on a shared 2-core runner two
    spinning threads made these runs ~25x slower. The global thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MRT_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, data_dir, base_dir): a generated data set and a saved tiny base nudged off its init."""
    from tiny_llava import save_tiny_base, write_tiny_data

    root = tmp_path_factory.mktemp("bench")
    data = write_tiny_data(root / "data", train_per_task=2, heldout_per_task=3, heldin_per_task=2, align_size=4,
                           text_per_type=2, mme_images_per_subtask=2)
    save_tiny_base(data, root / "base", seed=3, nudge_seed=3)
    return root, data, root / "base"


def _params(setup, out: Path, **kw) -> BenchmarkParams:
    root, data, base = setup
    kw.setdefault("model_dir", None)
    kw.setdefault("perturbations", [])  # the clean pass only, unless a test asks for more
    return BenchmarkParams(data_dir=str(data), base_dir=str(base), report=str(out / "bench.json"),
                           predictions=str(out / "pred.jsonl"), mme_results_dir=str(out / "mme"),
                           batch_size=8, max_new_tokens=4, **kw)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def two_runs(setup):
    from components.evaluation.benchmark import run_benchmark

    root = setup[0]
    runs = []
    for k in range(2):
        p = _params(setup, root / f"run{k}", perturbations=PASSES, perturb_seed=7)
        runs.append((p, run_benchmark(p, label="tiny")))
    return runs


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def test_report_structure(two_runs, setup):
    p, report = two_runs[0]
    manifest = json.loads((setup[1] / "manifest.json").read_text())
    heldout_tasks = sorted(t for t, i in manifest["tasks"].items() if i["split"] == "heldout")
    assert list(report) == ["model", "heldout", "heldout_mean", "heldout_n", "heldout_summary", "heldin",
                            "heldin_mean", "heldin_n", "heldin_summary", "mme", "mme_perception",
                            "mme_cognition", "mme_total", "mme_n", "mme_baselines", "mme_chance_total",
                            "mme_majority_total", "mme_collapsed", "robustness", "real_image_tasks",
                            "real_image_mean", "wall_s"]
    assert report["model"]["method"] == "base" and report["model"]["trainable_params"] == 0
    assert report["model"]["label"] == "tiny" and report["model"]["model_dir"] is None
    assert list(report["heldout"]) == heldout_tasks
    assert report["heldout_n"] == 3 * len(heldout_tasks)
    assert report["heldout_mean"] == pytest.approx(sum(report["heldout"].values()) / len(heldout_tasks))
    train_tasks = sorted(t for t, i in manifest["tasks"].items() if i["split"] == "train")
    assert list(report["heldin"]) == train_tasks and report["heldin_n"] == 2 * len(train_tasks)
    assert report["heldin_mean"] == pytest.approx(sum(report["heldin"].values()) / len(train_tasks))
    for split in ("heldout", "heldin"):
        summary = report[f"{split}_summary"]
        assert list(summary["tasks"]) == list(report[split]) and summary["mean"] == pytest.approx(report[f"{split}_mean"])
        for task, e in summary["tasks"].items():
            assert e["accuracy"] == pytest.approx(report[split][task])  # one code path, two routes
            assert 0 < e["chance"] <= e["majority"] <= 1 and e["train_majority"] is not None
        assert summary["collapsed_tasks"] == [t for t, e in summary["tasks"].items() if e["collapsed"]]
    assert set(report["mme_baselines"]) == set(report["mme"])
    assert report["mme_chance_total"] == 75.0 * len(report["mme"])
    assert report["mme_majority_total"] == 50.0 * len(report["mme"])  # one yes, one no per image
    assert list(report["robustness"]) == PASSES
    for r in report["robustness"].values():
        assert list(r["heldout"]) == heldout_tasks
        assert r["heldout_mean_delta"] == pytest.approx(r["heldout_mean"] - report["heldout_mean"])
    real = sorted(t for t in heldout_tasks if manifest["tasks"][t]["real_images"])
    assert real and list(report["real_image_tasks"]) == real
    assert set(report["mme"]) == set(manifest["mme_subtasks"]) and report["mme_n"] == 20
    assert all(set(s) == {"acc", "acc_plus", "score"} for s in report["mme"].values())
    assert json.loads(Path(p.report).read_text()) == report  # what was returned is what was written


def test_two_runs_are_identical_apart_from_wall_time(two_runs):
    (p0, r0), (p1, r1) = two_runs
    a, b = dict(r0), dict(r1)
    assert a.pop("wall_s") > 0 and b.pop("wall_s") > 0
    assert a == b
    assert Path(p0.predictions).read_text() == Path(p1.predictions).read_text()
    lines = _lines(p0.predictions)  # not vacuous: answers differ across records and across passes
    assert len({x["prediction"] for x in lines}) > 5
    by_id: dict[str, set] = {}
    for x in lines:
        by_id.setdefault(x["id"], set()).add(x["prediction"])
    assert any(len(v) > 1 for v in by_id.values())


def test_predictions_one_line_per_record_per_pass(two_runs):
    p, report = two_runs[0]
    lines = _lines(p.predictions)
    n_h, n_i, n_m = report["heldout_n"], report["heldin_n"], report["mme_n"]
    assert len(lines) == n_h + n_i + n_m + len(PASSES) * n_h
    assert Counter(x["perturbation"] for x in lines) == {"none": n_h + n_i + n_m, **{k: n_h for k in PASSES}}
    assert Counter(x["split"] for x in lines if x["perturbation"] == "none") == {"heldout": n_h, "heldin": n_i,
                                                                                 "mme": n_m}
    assert len({(x["id"], x["perturbation"]) for x in lines}) == len(lines)
    assert {x["split"] for x in lines if x["perturbation"] != "none"} == {"heldout"}  # MME only in the clean pass
    assert set(lines[0]) == {"id", "task", "split", "perturbation", "instruction", "reference", "prediction", "correct"}
    for kind in ["none", *PASSES]:  # the per-task scores are the per-record hits, averaged
        scores = report["heldout"] if kind == "none" else report["robustness"][kind]["heldout"]
        for task, score in scores.items():
            hits = [x["correct"] for x in lines if x["perturbation"] == kind and x["task"] == task]
            assert score == pytest.approx(sum(hits) / len(hits))
    for split in ("heldout", "heldin"):  # the collapse flag is what the predictions say
        for task, e in report[f"{split}_summary"]["tasks"].items():
            preds = {normalize_answer(x["prediction"]) for x in lines
                     if x["perturbation"] == "none" and x["split"] == split and x["task"] == task}
            assert e["collapsed"] == (len(preds) == 1)


def test_mme_part_equals_the_official_results_folder(two_runs):
    from components.evaluation.metrics.mme import score_mme_results

    p, report = two_runs[0]
    official = score_mme_results(p.mme_results_dir)
    assert report["mme_perception"] == official["perception"]
    assert report["mme_total"] == official["total"]
    for name, s in report["mme"].items():
        assert s == {k: official["subtasks"][name][k] for k in ("acc", "acc_plus", "score")}


def test_flat_metrics_for_mlflow(two_runs):
    from components.track.benchmark_runs import flat_metrics

    _, report = two_runs[0]
    flat = flat_metrics(report)
    assert flat["heldout/mean"] == report["heldout_mean"] and flat["mme/total"] == report["mme_total"]
    assert flat["trainable_params"] == 0.0 and "robustness/blur/mean" in flat
    assert flat["heldin/mean"] == report["heldin_mean"]
    hs = report["heldout_summary"]
    assert flat["heldout/chance_corrected_mean"] == hs["chance_corrected_mean"]
    assert flat["heldout/majority_mean"] == hs["majority_mean"] and flat["heldout/chance_mean"] == hs["chance_mean"]
    assert flat["heldout/collapsed_tasks"] == len(hs["collapsed_tasks"])
    task = next(iter(hs["tasks"]))
    assert flat[f"heldout/{task}/majority"] == hs["tasks"][task]["majority"]
    assert flat[f"heldout/{task}/collapsed"] in (0.0, 1.0)
    assert flat["mme/majority_total"] == report["mme_majority_total"] and "mme/existence/chance" in flat
    assert all(isinstance(v, float) for v in flat.values())


# ---------------------------------------------------------------------------------------------
# metric choice
# ---------------------------------------------------------------------------------------------
def _row(task, instruction, answer, i=0):
    return Row(f"{task}_{i}", task, "heldout", instruction, answer, None, "annotation_heldout.json", i)


def test_letter_task_is_scored_by_option_letter_and_others_by_normalised_exact_match():
    from components.evaluation.benchmark import score_heldout

    q = "How many objects are in the image? Options: (A) 4 (B) 3 (C) 1"
    rows = [_row("choice", q, "B", 0), _row("choice", q, "B", 1), _row("choice", q, "A", 2), _row("choice", q, "C", 3),
            _row("word", "Odd or even?", "even", 0), _row("word", "Odd or even?", "odd", 1)]
    preds = ["3", "(b)", "option A", "B", "The Even.", "B"]
    out = score_heldout(rows, preds, {"choice": "letter", "word": "word"})
    # "3" is option B's text, "(b)" and "option A" name letters; exact match would score 0 on all three
    assert out["per_task"] == {"choice": 0.75, "word": 0.5}
    assert out["correct"] == [True, True, True, False, True, False]
    assert out["mean"] == 0.625 and out["n"] == 6


def test_run_benchmark_uses_the_kind_metric_end_to_end(setup, tmp_path, monkeypatch):
    """With answers a letter metric accepts but exact match does not, letter tasks still score 1."""
    import components.evaluation.inference as inf
    from components.evaluation.benchmark import run_benchmark
    from components.data.load import load_dataset_dir

    data = load_dataset_dir(setup[1])
    kinds = {t: i["answer_kind"] for t, i in data.manifest["tasks"].items()}
    assert "letter" in {kinds[r.task] for r in data.split("heldout")}
    queue = [(f"({r.answer.lower()})" if kinds[r.task] == "letter" else f"{r.answer.upper()}.")
             for r in data.split("heldout") + data.split("heldin")] + [r.answer.lower() for r in data.split("mme")]
    it = iter(queue)
    monkeypatch.setattr(inf, "generate", lambda model, proc, images, prompts, **kw: [next(it) for _ in prompts])
    report = run_benchmark(_params(setup, tmp_path))
    assert set(report["heldout"].values()) == {1.0} and set(report["heldin"].values()) == {1.0}
    assert {s["score"] for s in report["mme"].values()} == {200.0}
    assert report["heldout_summary"]["chance_corrected_mean"] == 1.0 and report["mme_collapsed"] == []


def test_unknown_answer_kind_names_the_manifest_field():
    from components.evaluation.benchmark import task_kinds

    with pytest.raises(DataError, match=r"manifest.json, field 'tasks.t.answer_kind'.*'essay'"):
        task_kinds({"tasks": {"t": {"answer_kind": "essay"}}}, ["t"], "manifest.json")
    with pytest.raises(DataError, match="field 'tasks.u'"):
        task_kinds({"tasks": {}}, ["u"], "manifest.json")


def test_letter_reference_naming_no_option_is_a_data_error():
    from components.evaluation.benchmark import check_references

    bad = _row("choice", "Which? (A) 4 (B) 3", "maybe", 5)
    with pytest.raises(DataError, match=r"annotation_heldout.json: record choice_5, field 'answer'"):
        check_references([bad], {"choice": "letter"})


def test_per_task_caps_heldout_and_keeps_mme_images_whole(setup, tmp_path):
    from components.evaluation.benchmark import cap_mme, run_benchmark
    from components.data.load import load_dataset_dir

    mme = load_dataset_dir(setup[1], splits=("mme",)).split("mme")
    capped = cap_mme(mme, 3)  # 3 questions → 1 whole image per subtask
    assert Counter(r.task for r in capped) == {t: 2 for t in {r.task for r in mme}}
    report = run_benchmark(_params(setup, tmp_path, per_task=1))
    assert report["heldout_n"] == len(report["heldout"]) and report["mme_n"] == 10
    assert report["heldin_n"] == len(report["heldin"])


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def test_bad_model_dir_names_the_path(setup, tmp_path):
    from components.evaluation.benchmark import run_benchmark

    missing = tmp_path / "no_such_editors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run_benchmark(_params(setup, tmp_path, model_dir=str(missing)))
    junk = tmp_path / "junk"
    junk.mkdir()
    with pytest.raises(ValueError, match=f"{junk}: none of editor_config.json"):
        run_benchmark(_params(setup, tmp_path, model_dir=str(junk)))
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "pred.jsonl").exists()


def test_editors_from_disk_and_preloaded_model_give_one_report(setup, tmp_path):
    """An MRT folder is detected and counted; passing the loaded model skips reloading, same numbers."""
    from components.model.backbone import load_base
    from components.evaluation.benchmark import run_benchmark
    from components.core.config import EditorParams
    from components.editors import attach, model_fingerprint, save_editors
    from components.evaluation.inference import load_model

    _, _, base = setup
    model, _ = load_base(base)
    editors = attach(model, EditorParams.model_validate(
        {"visual": {"rank": 2}, "projector": {"rank": 2}, "prefix": {"rank": 2, "length": 2},
         "suffix": {"rank": 2, "length": 2}}))
    save_editors(editors, tmp_path / "mrt", str(base), model_fingerprint(model))
    n_editor = sum(p.numel() for p in editors.parameters())

    from_disk = run_benchmark(_params(setup, tmp_path / "a", model_dir=str(tmp_path / "mrt"), perturbations=["blur"]))
    assert from_disk["model"]["method"] == "mrt" and from_disk["model"]["trainable_params"] == n_editor
    loaded = load_model(base, tmp_path / "mrt")
    preloaded = run_benchmark(_params(setup, tmp_path / "b", model_dir=str(tmp_path / "mrt"), perturbations=["blur"]),
                              model=loaded)
    for r in (from_disk, preloaded):
        r.pop("wall_s")
    assert preloaded == from_disk


# ---------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------
def _picture(mode="RGB", size=(40, 32)) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_are_deterministic_and_change_pixels(kind):
    im = _picture()
    before = np.asarray(im).copy()
    a = perturb_image(im, kind, seed=1, record_id="r1")
    b = perturb_image(im, kind, seed=1, record_id="r1")
    assert np.array_equal(np.asarray(im), before)  # the input is left alone
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), before)
    assert a.size == im.size and a.mode == im.mode


@pytest.mark.parametrize("kind", ["noise", "jitter"])
def test_random_perturbations_depend_on_seed_and_record(kind):
    im = _picture()
    ref = np.asarray(perturb_image(im, kind, 1, "r1"))
    assert not np.array_equal(ref, np.asarray(perturb_image(im, kind, 2, "r1")))
    assert not np.array_equal(ref, np.asarray(perturb_image(im, kind, 1, "r2")))


def test_noise_is_moderate():
    from components.evaluation.perturb import NOISE_STD

    im = Image.new("RGB", (64, 64), (128, 128, 128))
    diff = np.asarray(perturb_image(im, "noise", 0, "x")).astype(float) - 128
    assert abs(diff.std() - NOISE_STD) < 1.0 and abs(diff.mean()) < 1.0


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_blur_keeps_size_and_mode_and_smooths(mode):
    im = _picture(mode)
    out = gaussian_blur(im)
    assert out.size == im.size and out.mode == im.mode
    grad = lambda x: np.abs(np.diff(np.asarray(x).astype(float), axis=1)).mean()  # noqa: E731
    assert grad(out) < 0.6 * grad(im)
    assert perturb_image(im, "noise", 0, "x").mode == mode


def test_unknown_perturbation_is_refused():
    with pytest.raises(ValueError, match="unknown perturbation 'fog'"):
        perturb_image(_picture(), "fog", 0, "x")
