"""Vision-Flan / LLaVA JSON: every bad record reported (file, record, field), good ones still read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from components.data.records import DataError
from components.data.visionflan import make_record, read_visionflan, row_to_record, write_visionflan


def _good(i: int, task: str = "vqa", image: bool = True) -> dict:
    return make_record(f"r{i}", task, f"question {i}?", f"answer {i}", f"{task}/{i}.jpg" if image else None)


def _write(tmp_path: Path, records: list, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _read(tmp_path, records, split="train"):
    path = _write(tmp_path, records)
    rows, errors = read_visionflan(path, tmp_path / "images", split)
    return path, rows, errors


def test_reads_vision_flan_records(tmp_path):
    real_style = {
        "id": "VQA-E+image_question_answer_0",
        "task_name": "VQA-E+image_question_answer",
        "image": "VQA-E+image_question_answer/COCO_train2014_000000000009.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the plate?"},
            {"from": "gpt", "value": "broccoli"},
        ],
    }
    _, rows, errors = _read(tmp_path, [real_style])
    assert errors == []
    (row,) = rows
    assert row.id == "VQA-E+image_question_answer_0"
    assert row.task == "VQA-E+image_question_answer"
    assert row.instruction == "What is on the plate?" and row.answer == "broccoli"
    assert row.image == "VQA-E+image_question_answer/COCO_train2014_000000000009.jpg"
    assert row.split == "train" and row.index == 0


def test_task_from_image_folder_when_no_task_name(tmp_path):
    rec = _good(0, "textvqa")
    del rec["task_name"]
    _, rows, errors = _read(tmp_path, [rec])
    assert errors == [] and rows[0].task == "textvqa"


@pytest.mark.parametrize(
    "mutate, record, field, message",
    [
        (lambda r: r.pop("conversations"), "r1", "conversations", "missing conversations"),
        (lambda r: r.update(conversations="hi"), "r1", "conversations", "expected a list of turns"),
        (lambda r: r["conversations"].pop(), "r1", "conversations[1]", "missing gpt turn"),
        (lambda r: r["conversations"][1].update(value="  "), "r1", "conversations[1].value", "empty answer"),
        (lambda r: r["conversations"][0].update(value="<image>\n"), "r1", "conversations[0].value", "empty instruction"),
        (lambda r: r["conversations"][1].update({"from": "human"}), "r1", "conversations[1].from", "expected 'gpt'"),
        (lambda r: r.pop("id"), "#1", "id", "missing id"),
        (lambda r: r.update(id=17), "#1", "id", "id must be a non-empty string, got 17"),
        (lambda r: r.update(id="r0"), "r0", "id", "duplicate id (first at #0, again at #1)"),
        (lambda r: r.pop("image"), "r1", "image", "missing image"),
        (lambda r: r.update(image="../../etc/passwd"), "r1", "image", "escapes the image root"),
        (lambda r: r.update(image="/etc/passwd"), "r1", "image", "is absolute"),
        (lambda r: r.update(image=5), "r1", "image", "expected a string path"),
        (lambda r: r.update(task_name=""), "r1", "task_name", "task_name must be a non-empty string"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_bad_record_is_reported_and_good_ones_kept(tmp_path, mutate, record, field, message):
    records = [_good(0), _good(1), _good(2)]
    mutate(records[1])
    path, rows, errors = _read(tmp_path, records)
    assert [r.id for r in rows] == ["r0", "r2"]  # the good records are still loaded
    assert len(errors) == 1, errors
    (err,) = errors
    assert (err.file, err.record, err.field) == (str(path), record, field)
    assert message in err.message
    text = str(err)
    assert str(path) in text and f"field '{field}'" in text and f"record {record}" in text


def test_all_problems_of_all_records_are_listed(tmp_path):
    bad1 = _good(1)
    bad1["conversations"][1]["value"] = ""
    bad1.pop("image")
    bad2 = "not a record"
    _, rows, errors = _read(tmp_path, [_good(0), bad1, bad2, _good(3)])
    assert [r.id for r in rows] == ["r0", "r3"]
    assert {(e.record, e.field) for e in errors} == {("r1", "conversations[1].value"), ("r1", "image"), ("#2", "")}


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "ann.json"
    text = json.dumps([_good(0), _good(1)], indent=1)
    path.write_text(text[: len(text) // 2], encoding="utf-8")  # truncated download
    with pytest.raises(DataError) as info:
        read_visionflan(path, tmp_path, "train")
    (err,) = info.value.errors
    assert err.file == str(path) and err.record.startswith("line ") and " col " in err.record
    assert "malformed JSON" in err.message
    line, col = (int(x) for x in err.record.removeprefix("line ").split(" col "))
    assert line > 1 and col >= 1


def test_whole_file_problems_raise(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_visionflan(tmp_path / "missing.json", tmp_path, "train")
    path = _write(tmp_path, {"id": "x"})
    with pytest.raises(DataError, match="expected a JSON list of records, got a dict"):
        read_visionflan(path, tmp_path, "train")


def test_text_only_records_only_in_text_split(tmp_path):
    text_rec = _good(0, "text_count", image=False)
    assert "image" not in text_rec and "<image>" not in text_rec["conversations"][0]["value"]
    _, rows, errors = _read(tmp_path, [text_rec], split="text")
    assert errors == [] and rows[0].image is None and rows[0].split == "text"
    _, rows, errors = _read(tmp_path, [text_rec], split="train")
    assert rows == [] and errors[0].field == "image" and "only the text split" in errors[0].message
    # and the text split refuses images and the <image> marker
    _, rows, errors = _read(tmp_path, [_good(1), {**text_rec, "id": "t2"}], split="text")
    assert [r.id for r in rows] == ["t2"]
    assert [(e.record, e.field) for e in errors] == [("r1", "image"), ("r1", "conversations[0].value")]
    marked = _good(3, "text_x", image=False)
    marked["conversations"][0]["value"] = "<image>\nwhat?"
    _, rows, errors = _read(tmp_path, [marked], split="text")
    assert rows == [] and errors[0].field == "conversations[0].value" and "<image>" in errors[0].message


def test_multi_turn_llava_records_become_one_row_per_turn(tmp_path):
    rec = {
        "id": "llava1",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    }
    _, rows, errors = _read(tmp_path, [rec])
    assert errors == []
    assert [(r.id, r.task, r.instruction, r.answer) for r in rows] == [
        ("llava1#turn0", "coco", "What is this?", "A cat."),
        ("llava1#turn1", "coco", "What colour?", "Black."),
    ]


def test_round_trip(tmp_path):
    records = [_good(0), _good(1, "other"), make_record("ü-1", "vqa", "Qué es «esto»?", "un gato", "vqa/ü.png")]
    first = write_visionflan(records, tmp_path / "a.json")
    rows, errors = read_visionflan(first, tmp_path, "train")
    assert errors == []
    second = write_visionflan([row_to_record(r) for r in rows], tmp_path / "b.json")
    again, errors = read_visionflan(second, tmp_path, "train")
    assert errors == []
    assert [replace(r, source="") for r in again] == [replace(r, source="") for r in rows]
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text(encoding="utf-8")
    assert "«esto»" in text and text.endswith("]\n") and text.startswith('[\n {\n  "id"')
    # fixed key order regardless of the input's order
    shuffled = {"conversations": records[0]["conversations"], "image": "vqa/0.jpg", "task_name": "vqa", "id": "r0"}
    write_visionflan([shuffled], tmp_path / "c.json")
    assert list(json.loads((tmp_path / "c.json").read_text())[0]) == ["id", "task_name", "image", "conversations"]
