"""Data validation: a hand-built valid data dir passes; each kind of bad input fails with a message
that names the file, the record and the field, the report file lists it, and good records still count.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.config import ValidateParams
from components.data.validation import CHECKS, validate_dataset

IMAGE_SIDE = 16


# ---------------------------------------------------------------------------------------------
# a small valid data dir, written by hand in the on-disk format the generator uses
# ---------------------------------------------------------------------------------------------
def _png(path: Path, seed: int, side: int = IMAGE_SIDE, mode: str = "RGB") -> None:
    """A tiny PNG whose pixels depend on `seed`, so no two fixture images share bytes or pixels."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).convert(mode).save(path)


def _record(rid: str, task: str, question: str, answer: str, image: str | None) -> dict:
    rec = {"id": rid, "task_name": task}
    if image is not None:
        rec["image"] = image
    human = f"<image>\n{question}" if image is not None else question
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return rec


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


MME_REL = "mme/MME_Benchmark_release_version"


def make_data_dir(root: Path) -> Path:
    """train (2 tasks × 3), heldout (1 task × 2), align (2), text (2), MME existence (2 images × 2 q)."""
    root.mkdir(parents=True, exist_ok=True)
    seed = iter(range(1000))
    splits: dict[str, list[dict]] = {"train": [], "heldout": [], "align": [], "text": []}
    for task, answers in (("vf_shape", ["circle", "square", "star"]), ("vf_color", ["red", "blue", "green"])):
        for i, ans in enumerate(answers):
            rel = f"{task}/{task}-{i}.png"
            _png(root / "images" / rel, next(seed))
            splits["train"].append(_record(f"{task}-{i}", task, f"What is in the image? ({i})", ans, rel))
    for i, ans in enumerate(["odd", "even"]):
        rel = f"hx_parity/hx_parity-{i}.png"
        _png(root / "images" / rel, next(seed))
        splits["heldout"].append(_record(f"hx_parity-{i}", "hx_parity", "Is the digit odd or even?", ans, rel))
    for i in range(2):
        rel = f"caption/caption-{i}.png"
        _png(root / "images" / rel, next(seed))
        splits["align"].append(_record(f"caption-{i}", "caption", "Describe the image.", f"a red circle {i}", rel))
    for i, task in enumerate(("text_shape", "text_parity")):
        splits["text"].append(_record(f"text-{i}", task, f"Image description: a star\nWhat shape? ({i})", "star", None))
    for split, recs in splits.items():
        _write_json(root / f"annotation_{split}.json", recs)

    mme = root / MME_REL / "existence"
    for i in range(2):
        _png(mme / f"{i:03d}.png", next(seed))
        (mme / f"{i:03d}.txt").write_text(
            f"Is there a circle in this image? Please answer yes or no.\tYes\n"
            f"Is there a star in this image? Please answer yes or no.\tNo\n", encoding="utf-8")

    manifest = {
        "name": "fixture", "format_version": 1, "source": "embedded", "seed": 0, "image_size": IMAGE_SIDE,
        "image_root": "images",
        "files": {s: f"annotation_{s}.json" for s in splits},
        "mme_root": MME_REL,
        "tasks": {
            "vf_shape": {"split": "train", "type": "shape", "answer_kind": "word", "real_images": False},
            "vf_color": {"split": "train", "type": "color", "answer_kind": "word", "real_images": False},
            "hx_parity": {"split": "heldout", "type": "parity", "answer_kind": "word", "real_images": False},
        },
        "text_tasks": {
            "text_shape": {"type": "shape", "for_task": "vf_shape", "answer_kind": "word"},
            "text_parity": {"type": "parity", "for_task": "hx_parity", "answer_kind": "word"},
        },
        "caption_task": {"name": "caption"},
    }
    _write_json(root / "manifest.json", manifest)
    return root


GOOD_ROWS = {"train": 6, "heldout": 2, "align": 2, "text": 2, "mme": 4}


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data")


def _params(data_dir: Path, tmp_path: Path, **kw) -> ValidateParams:
    return ValidateParams(data_dir=str(data_dir), report=str(tmp_path / "reports" / "validation.json"), **kw)


def _edit(path: Path, fn) -> None:
    recs = json.loads(path.read_text(encoding="utf-8"))
    fn(recs)
    _write_json(path, recs)


def _run(data_dir: Path, tmp_path: Path, **kw):
    p = _params(data_dir, tmp_path, **kw)
    report = validate_dataset(p, progress=False)
    on_disk = json.loads(Path(p.report).read_text(encoding="utf-8"))
    return report, on_disk


def _failed(report, on_disk, check: str) -> list[dict]:
    """The failures of `check`, asserting the in-memory report and the file agree."""
    assert not report.success
    assert on_disk["success"] is False
    got = next(c for c in on_disk["checks"] if c["name"] == check)
    assert got["success"] is False, f"{check} passed; failing: {[c['name'] for c in on_disk['checks'] if not c['success']]}"
    assert got["failed"] == report.check(check).failed == len(got["failures"]) + got["more"]
    return got["failures"]


def _only_failing(on_disk) -> set[str]:
    return {c["name"] for c in on_disk["checks"] if not c["success"]}


# ---------------------------------------------------------------------------------------------
# the valid set
# ---------------------------------------------------------------------------------------------
def test_valid_data_dir_passes_and_writes_report(data_dir, tmp_path):
    report, on_disk = _run(data_dir, tmp_path)
    assert report.success, report.summary()
    assert on_disk["success"] is True
    assert [c["name"] for c in on_disk["checks"]] == list(CHECKS)  # every check always present
    assert all(c["failed"] == 0 and c["failures"] == [] for c in on_disk["checks"])
    assert on_disk["stats"]["rows_per_split"] == GOOD_ROWS
    assert on_disk["stats"]["rows_per_task"]["train"] == {"vf_color": 3, "vf_shape": 3}
    assert on_disk["stats"]["images"]["modes"] == {"RGB": 12}
    assert on_disk["stats"]["images"]["distinct"] == 12
    assert "PASSED" in report.summary()
    # written atomically: no temp files left beside the report
    assert sorted(x.name for x in (tmp_path / "reports").iterdir()) == ["validation.json"]


def test_rerun_gives_identical_report(data_dir, tmp_path):
    _, first = _run(data_dir, tmp_path)
    _, second = _run(data_dir, tmp_path)
    assert first == second


def test_non_rgb_and_16bit_images_pass_and_are_noted(data_dir, tmp_path):
    _png(data_dir / "images/vf_shape/vf_shape-0.png", 900, mode="I;16")
    _png(data_dir / "images/vf_shape/vf_shape-1.png", 901, mode="L")
    report, on_disk = _run(data_dir, tmp_path)
    assert report.success, report.summary()
    modes = on_disk["stats"]["images"]["modes"]
    assert modes["RGB"] == 10 and modes["L"] == 1 and sum(modes.values()) == 12
    assert set(modes) - {"RGB", "L"} <= {"I;16", "I"}  # PIL reports 16-bit greyscale PNGs as I;16 or I


# ---------------------------------------------------------------------------------------------
# each bad input: its own check, a message naming the record and field, good records still counted
# ---------------------------------------------------------------------------------------------
def test_missing_image(data_dir, tmp_path):
    (data_dir / "images/vf_color/vf_color-1.png").unlink()
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "image_exists")
    assert f["record"] == "vf_color-1" and f["field"] == "image"
    assert f["file"].endswith("annotation_train.json")
    assert "not found" in f["message"] and "vf_color-1.png" in f["message"]
    assert _only_failing(on_disk) == {"image_exists"}
    assert on_disk["stats"]["rows_per_split"] == GOOD_ROWS
    assert "vf_color-1" in report.summary() and "image_exists" in report.summary()


def test_corrupt_image(data_dir, tmp_path):
    path = data_dir / "images/vf_shape/vf_shape-2.png"
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG: header fine, data cut off
    (data_dir / "images/caption/caption-1.png").write_bytes(b"this is not an image")
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "image_decodes")
    assert {(f["record"], f["field"]) for f in failures} == {("vf_shape-2", "image"), ("caption-1", "image")}
    assert all("cannot be decoded" in f["message"] for f in failures)
    assert _only_failing(on_disk) == {"image_decodes"}
    assert on_disk["stats"]["rows_per_split"] == GOOD_ROWS


def test_empty_image_file_and_size_limits(data_dir, tmp_path):
    (data_dir / "images/vf_shape/vf_shape-0.png").write_bytes(b"")
    _png(data_dir / "images/vf_shape/vf_shape-1.png", 77, side=4)
    report, on_disk = _run(data_dir, tmp_path, min_image_side=8)
    (empty,) = _failed(report, on_disk, "image_bytes")
    assert empty["record"] == "vf_shape-0" and "empty" in empty["message"]
    (small,) = _failed(report, on_disk, "image_dimensions")
    assert small["record"] == "vf_shape-1" and "4x4" in small["message"]

    report, on_disk = _run(data_dir, tmp_path, max_image_bytes=50)
    too_big = _failed(report, on_disk, "image_bytes")
    assert any("more than max_image_bytes=50" in f["message"] for f in too_big)


def test_empty_answer(data_dir, tmp_path):
    _edit(data_dir / "annotation_train.json", lambda recs: recs[1]["conversations"][1].update(value=""))
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "record_structure")
    assert f["record"] == "vf_shape-1" and f["field"] == "conversations[1].value"
    assert "empty answer" in f["message"] and f["file"].endswith("annotation_train.json")
    assert _only_failing(on_disk) == {"record_structure"}
    assert on_disk["stats"]["rows_per_split"] == {**GOOD_ROWS, "train": 5}
    assert on_disk["stats"]["reader_errors"] == 1


def test_answer_too_long(data_dir, tmp_path):
    _edit(data_dir / "annotation_train.json", lambda recs: recs[4]["conversations"][1].update(value="x" * 70))
    report, on_disk = _run(data_dir, tmp_path, max_answer_chars=64)
    (f,) = _failed(report, on_disk, "answer_length")
    assert f["record"] == "vf_color-1" and f["field"] == "conversations[1].value"
    assert "70 characters" in f["message"] and "1–64" in f["message"]
    assert _only_failing(on_disk) == {"answer_length"}


def test_missing_conversation_turn(data_dir, tmp_path):
    _edit(data_dir / "annotation_train.json", lambda recs: recs[2]["conversations"].pop())
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "record_structure")
    assert f["record"] == "vf_shape-2" and f["field"].startswith("conversations")
    assert f["file"].endswith("annotation_train.json")
    assert "missing gpt turn" in f["message"]
    assert _only_failing(on_disk) == {"record_structure"}
    assert on_disk["stats"]["rows_per_split"] == {**GOOD_ROWS, "train": 5}  # the other records still count


def test_duplicate_id_within_a_file(data_dir, tmp_path):
    _edit(data_dir / "annotation_train.json", lambda recs: recs[3].update(id="vf_shape-0"))
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "record_structure")
    assert f["record"] == "vf_shape-0" and f["field"] == "id" and "duplicate id" in f["message"]
    assert _only_failing(on_disk) == {"record_structure"}
    assert on_disk["stats"]["rows_per_split"] == {**GOOD_ROWS, "train": 5}


def test_duplicate_id_across_splits(data_dir, tmp_path):
    _edit(data_dir / "annotation_heldout.json", lambda recs: recs[0].update(id="vf_color-0"))
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "unique_id")
    assert {f["record"] for f in failures} == {"vf_color-0"}
    assert {Path(f["file"]).name for f in failures} == {"annotation_train.json", "annotation_heldout.json"}
    assert all(f["field"] == "id" and "duplicate id 'vf_color-0'" in f["message"] for f in failures)
    assert _only_failing(on_disk) == {"unique_id"}


@pytest.mark.parametrize("bad", ["../outside.png", "../../outside.png", "ABSOLUTE"])
def test_image_path_escaping_the_root_is_never_opened(data_dir, tmp_path, bad):
    outside = data_dir / "outside.png"  # a perfectly good image, but outside images/
    _png(outside, 555)
    shutil.copy(outside, tmp_path / "outside.png")
    rel = str(outside.resolve()) if bad == "ABSOLUTE" else bad
    _edit(data_dir / "annotation_train.json", lambda recs: recs[0].update(image=rel))
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "image_path")
    assert f["record"] == "vf_shape-0" and f["field"] == "image"
    assert "escapes" in f["message"] or "absolute" in f["message"]
    assert rel in f["message"]
    assert _only_failing(on_disk) == {"image_path"}  # not opened: no exists/decode/leakage finding
    assert on_disk["stats"]["images"]["distinct"] == 11
    assert on_disk["stats"]["rows_per_split"] == {**GOOD_ROWS, "train": 5}  # the others still count


def test_heldout_image_reused_in_training(data_dir, tmp_path):
    shutil.copy(data_dir / "images/vf_color/vf_color-2.png", data_dir / "images/hx_parity/hx_parity-1.png")
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "leakage_image")
    assert f["record"] == "hx_parity-1" and f["field"] == "image"
    assert "vf_color-2" in f["message"] and "same bytes" in f["message"]
    assert f["file"].endswith("annotation_heldout.json")
    assert _only_failing(on_disk) == {"leakage_image"}
    assert "hx_parity-1" in report.summary()


def test_heldout_image_reencoded_is_caught_by_pixels(data_dir, tmp_path):
    src = data_dir / "images/caption/caption-0.png"
    dst = data_dir / "images/hx_parity/hx_parity-0.png"
    with Image.open(src) as im:
        im.save(dst, compress_level=0)  # same pixels, different bytes
    assert src.read_bytes() != dst.read_bytes()
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "leakage_image")
    assert f["record"] == "hx_parity-0" and "caption-0" in f["message"] and "same pixels" in f["message"]


def test_mme_image_reused_in_training(data_dir, tmp_path):
    shutil.copy(data_dir / "images/vf_shape/vf_shape-0.png", data_dir / MME_REL / "existence/001.png")
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "leakage_image")
    assert len(failures) == 2  # both questions of that MME image
    assert all("vf_shape-0" in f["message"] and f["field"] == "image" for f in failures)


def test_heldout_example_copied_from_training(data_dir, tmp_path):
    train = json.loads((data_dir / "annotation_train.json").read_text())
    shutil.copy(data_dir / "images/vf_shape/vf_shape-1.png", data_dir / "images/hx_parity/hx_parity-0.png")

    def copy_example(recs):
        recs[0]["conversations"] = train[1]["conversations"]

    _edit(data_dir / "annotation_heldout.json", copy_example)
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "leakage_example")
    assert f["record"] == "hx_parity-0" and "vf_shape-1" in f["message"]


def _add_heldin(data_dir: Path) -> None:
    """A held-in split: a training task (vf_shape) asked about two images of its own."""
    recs = []
    for i, ans in enumerate(["star", "circle"]):
        rel = f"vf_shape/vf_shape_heldin-{i}.png"
        _png(data_dir / "images" / rel, 500 + i)
        recs.append(_record(f"vf_shape_heldin-{i}", "vf_shape", f"What is in the image? ({i})", ans, rel))
    _write_json(data_dir / "annotation_heldin.json", recs)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["files"]["heldin"] = "annotation_heldin.json"
    _write_json(data_dir / "manifest.json", manifest)


def test_heldin_split_of_training_tasks_on_unseen_images_passes(data_dir, tmp_path):
    _add_heldin(data_dir)
    report, on_disk = _run(data_dir, tmp_path)
    assert report.success, report.summary()
    assert on_disk["stats"]["rows_per_split"] == {**GOOD_ROWS, "heldin": 2}


def test_heldin_image_seen_in_training_is_leakage(data_dir, tmp_path):
    _add_heldin(data_dir)
    shutil.copy(data_dir / "images/vf_shape/vf_shape-0.png", data_dir / "images/vf_shape/vf_shape_heldin-1.png")
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "leakage_image")
    assert f["record"] == "vf_shape_heldin-1" and f["field"] == "image" and "vf_shape-0" in f["message"]
    assert f["file"].endswith("annotation_heldin.json") and "heldin image" in f["message"]
    assert _only_failing(on_disk) == {"leakage_image"}


def test_heldin_split_holds_only_training_tasks(data_dir, tmp_path):
    _add_heldin(data_dir)

    def retask(recs):
        recs[0]["task_name"] = "hx_parity"  # a held-out task is not a held-in one

    _edit(data_dir / "annotation_heldin.json", retask)
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "known_task")
    assert f["record"] == "vf_shape_heldin-0" and "'heldin'" in f["message"]
    assert _only_failing(on_disk) == {"known_task"}


def test_unknown_task_and_heldout_task_in_train(data_dir, tmp_path):
    def retask(recs):
        recs[0]["task_name"] = "vf_typo"
        recs[1]["task_name"] = "hx_parity"  # a held-out task must never be trained on

    _edit(data_dir / "annotation_train.json", retask)
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "known_task")
    assert {(f["record"], f["field"]) for f in failures} == {("vf_shape-0", "task_name"), ("vf_shape-1", "task_name")}
    assert any("'vf_typo'" in f["message"] and "'train'" in f["message"] for f in failures)
    assert _only_failing(on_disk) == {"known_task"}


def test_malformed_json_names_line_and_column(data_dir, tmp_path):
    path = data_dir / "annotation_heldout.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")  # truncated mid-file
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "json_syntax")
    assert len(failures) == 1
    f = failures[0]
    assert f["file"].endswith("annotation_heldout.json")

    assert re.fullmatch(r"line \d+ col \d+", f["record"]), f
    assert "json_syntax" in report.summary() and "annotation_heldout.json" in report.summary()
    assert _only_failing(on_disk) == {"json_syntax"}
    # every other split is still validated
    assert on_disk["stats"]["rows_per_split"] == {k: v for k, v in GOOD_ROWS.items() if k != "heldout"}


def test_missing_manifest_is_a_failure_not_a_crash(data_dir, tmp_path):
    (data_dir / "manifest.json").unlink()
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "manifest")
    assert any(f["file"].endswith("manifest.json") for f in failures)
    assert on_disk["stats"]["rows"] == 0


def test_missing_data_dir_is_a_failure_not_a_crash(tmp_path):
    report, on_disk = _run(tmp_path / "nowhere", tmp_path)
    assert not report.success and on_disk["success"] is False
    assert report.check("manifest").failed >= 1


def test_report_caps_listed_failures(data_dir, tmp_path, monkeypatch):
    import components.data.validation as v

    monkeypatch.setattr(v, "MAX_FAILURES_LISTED", 2)
    for png in (data_dir / "images/vf_shape").glob("*.png"):
        png.unlink()
    report, on_disk = _run(data_dir, tmp_path)
    check = next(c for c in on_disk["checks"] if c["name"] == "image_exists")
    assert check["failed"] == 3 and len(check["failures"]) == 2 and check["more"] == 1
    assert "… and" not in report.summary(per_check=3)
    assert "and 1 more" in report.summary(per_check=2)


def test_missing_split_file(data_dir, tmp_path):
    (data_dir / "annotation_align.json").unlink()
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "file_readable")
    assert f["file"].endswith("annotation_align.json") and "not found" in f["message"]
    assert _only_failing(on_disk) == {"file_readable"}
    assert on_disk["stats"]["rows_per_split"] == {k: v for k, v in GOOD_ROWS.items() if k != "align"}


def test_empty_split_file(data_dir, tmp_path):
    _write_json(data_dir / "annotation_heldout.json", [])
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "split_nonempty")
    assert f["file"].endswith("annotation_heldout.json") and "'heldout'" in f["message"]


def test_bad_mme_line(data_dir, tmp_path):
    txt = data_dir / MME_REL / "existence/001.txt"
    txt.write_text("Is there a circle in this image?\tYes\nIs there a star in this image?\tMaybe\n", encoding="utf-8")
    report, on_disk = _run(data_dir, tmp_path)
    failures = _failed(report, on_disk, "record_structure")
    assert any(f["file"].endswith("existence/001.txt") and f["record"] == "line 2" and f["field"] == "answer"
               and "'Maybe'" in f["message"] for f in failures)
    assert on_disk["stats"]["rows_per_split"]["mme"] == 3


def test_caption_length_is_checked_separately_from_answers(data_dir, tmp_path):
    long_caption = "a small red circle at the top left and a large blue square at the bottom right"  # 79 chars
    _edit(data_dir / "annotation_align.json", lambda recs: recs[0]["conversations"][1].update(value=long_caption))
    report, _ = _run(data_dir, tmp_path, max_answer_chars=16)
    assert report.success, report.summary()  # captions are not held to the short-answer bound

    _edit(data_dir / "annotation_align.json", lambda recs: recs[1]["conversations"][1].update(value="x" * 600))
    report, on_disk = _run(data_dir, tmp_path)
    (f,) = _failed(report, on_disk, "caption_length")
    assert f["record"] == "caption-1" and "600 characters" in f["message"]
    assert _only_failing(on_disk) == {"caption_length"}


def test_known_task_pairs_without_text_task_table():
    from components.data.validation import known_task_pairs

    pairs = set(known_task_pairs({"tasks": {"vf_a": {"split": "train", "type": "a"},
                                            "hx_b": {"split": "heldout", "type": "b"}}}))
    assert {("train", "vf_a"), ("heldout", "hx_b"), ("align", "caption"), ("text", "a"), ("text", "hx_b"),
            ("mme", "OCR"), ("mme", "code_reasoning")} <= pairs
    assert ("train", "hx_b") not in pairs and ("heldout", "vf_a") not in pairs


def test_expectation_engine_failure_fails_visibly(data_dir, tmp_path, monkeypatch):
    import components.data.validation as v

    def broken(*a, **k):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(v, "_build_suite", broken)
    report, on_disk = _run(data_dir, tmp_path)
    assert not report.success and on_disk["success"] is False
    errs = [c for c in on_disk["checks"] if c["kind"] == "expectation"]
    assert errs and all("engine exploded" in c["error"] and not c["success"] for c in errs)
    assert "engine exploded" in report.summary()
    assert all(c["success"] for c in on_disk["checks"] if c["kind"] != "expectation")


def test_generated_dataset_passes(tmp_path):
    """The real generator's output must pass validation (guards the two sides of the format)."""
    from components.core.config import DataParams
    from components.data.generate import write_dataset

    out = tmp_path / "gen"
    write_dataset(DataParams(out_dir=str(out), train_per_task=2, heldout_per_task=2, heldin_per_task=1, align_size=6,
                             text_per_type=1, mme_images_per_subtask=1), progress=False)
    report, on_disk = _run(out, tmp_path)
    assert report.success, report.summary()
    assert set(on_disk["stats"]["rows_per_split"]) == {"train", "heldout", "heldin", "align", "text", "mme"}
    assert on_disk["stats"]["rows_per_split"]["mme"] == 10  # 5 subtasks × 1 image × 2 questions


def test_records_dropped_by_the_real_source_conversion_fail_validation(tmp_path):
    """`mrt data` on real Vision-Flan keeps only good records and lists the rest in the manifest."""
    import json

    from components.core.config import ValidateParams
    from components.core.config import DataParams
    from components.data.generate import write_dataset
    from components.data.validation import validate_dataset

    data = tmp_path / "d"
    write_dataset(DataParams(out_dir=str(data), train_per_task=2, heldout_per_task=2, heldin_per_task=1, align_size=10,
                             text_per_type=1, mme_images_per_subtask=1), progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["counts"]["read_errors"] = 3
    manifest["read_errors"] = ["annotation.json: record vf_9, field 'conversations[1]': missing gpt turn"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    report = validate_dataset(ValidateParams(data_dir=str(data), report=str(tmp_path / "r.json")), progress=False)
    assert not report.success
    msgs = [str(f) for f in report.check("manifest").failures]
    assert any("vf_9" in m and "dropped by `mrt data`" in m for m in msgs)
    assert any("2 more records" in m for m in msgs)
