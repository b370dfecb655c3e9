"""MME release folders: both layouts read, bad lines reported with file/line/field, round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest

from components.data.mme import MMEItem, read_mme, write_mme_item
from components.data.records import DataError

JPEG_STUB = b"\xff\xd8\xff\xe0fake"  # the reader never decodes images


def _item(name: str, what: str = "dog") -> MMEItem:
    return MMEItem(
        name=name,
        image=JPEG_STUB,
        questions=[(f"Is there a {what} in this image? Please answer yes or no.", "Yes"),
                   ("Is there a cat in this image? Please answer yes or no.", "No")],
        ext=".jpg",
    )


def _write_subtask(root, subtask: str, items: list[MMEItem], layout: str = "flat") -> None:
    for item in items:
        write_mme_item(root, subtask, item, layout)


def test_flat_and_split_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _write_subtask(root, "existence", [_item("000000006040"), _item("000000007281", "car")], layout="flat")
    _write_subtask(root, "artwork", [_item("10002", "painting")], layout="split")
    (root / "eval_tool").mkdir()  # not a subtask: no question files
    (root / "eval_tool" / "calculation.py").write_text("print()\n")
    assert (root / "existence" / "000000006040.jpg").is_file()
    assert (root / "artwork" / "images" / "10002.jpg").is_file()
    assert (root / "artwork" / "questions_answer_YES_NO" / "10002.txt").is_file()

    rows, errors = read_mme(root)
    assert errors == []
    assert [(r.id, r.task, r.answer, r.image) for r in rows] == [
        ("artwork/10002#0", "artwork", "Yes", "artwork/images/10002.jpg"),
        ("artwork/10002#1", "artwork", "No", "artwork/images/10002.jpg"),
        ("existence/000000006040#0", "existence", "Yes", "existence/000000006040.jpg"),
        ("existence/000000006040#1", "existence", "No", "existence/000000006040.jpg"),
        ("existence/000000007281#0", "existence", "Yes", "existence/000000007281.jpg"),
        ("existence/000000007281#1", "existence", "No", "existence/000000007281.jpg"),
    ]
    assert all(r.split == "mme" for r in rows)
    assert rows[0].instruction == "Is there a painting in this image? Please answer yes or no."


def test_txt_format_is_the_release_format(tmp_path):
    _, txt = write_mme_item(tmp_path, "count", _item("0001"))
    assert txt.read_text(encoding="utf-8") == (
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n"
    )


def test_round_trip(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_subtask(a, "OCR", [_item("x1"), _item("x2", "fox")])
    rows, errors = read_mme(a)
    assert errors == [] and len(rows) == 4
    # rebuild the items from the rows and write them again
    items = {}
    for r in rows:
        name = r.id.split("/")[1].split("#")[0]
        items.setdefault(name, []).append((r.instruction, r.answer))
    _write_subtask(b, "OCR", [MMEItem(n, JPEG_STUB, qs, ".jpg") for n, qs in items.items()])
    again, errors = read_mme(b)
    assert errors == []
    assert [replace(r, source="") for r in again] == [replace(r, source="") for r in rows]


@pytest.mark.parametrize(
    "line, field, message",
    [
        ("Is there a dog? Please answer yes or no. Yes", "answer", "no tab"),
        ("Is there a dog? Please answer yes or no.\tyes", "answer", "exactly Yes or No, got 'yes'"),
        ("Is there a dog? Please answer yes or no.\tMaybe", "answer", "exactly Yes or No, got 'Maybe'"),
        ("\tNo", "question", "empty question"),
    ],
)
def test_bad_lines_are_reported_and_good_ones_kept(tmp_path, line, field, message):
    root = tmp_path / "mme"
    _write_subtask(root, "color", [_item("good")])
    sub = root / "color"
    (sub / "bad.jpg").write_bytes(JPEG_STUB)
    (sub / "bad.txt").write_text(f"Is the dog brown? Please answer yes or no.\tYes\n{line}\n", encoding="utf-8")
    rows, errors = read_mme(root)
    assert [r.id for r in rows] == ["color/bad#0", "color/good#0", "color/good#1"]
    line_errors = [e for e in errors if e.record]
    assert len(line_errors) == 1
    (err,) = line_errors
    assert (err.file, err.record, err.field) == (str(sub / "bad.txt"), "line 2", field)
    assert message in err.message
    assert errors == line_errors  # one problem, one error


def test_images_need_exactly_two_questions(tmp_path):
    root = tmp_path / "mme"
    _write_subtask(root, "position", [_item("ok"), MMEItem("one", JPEG_STUB, [("Is it up?", "Yes")], ".jpg")])
    rows, errors = read_mme(root)
    assert len(rows) == 3  # the questions themselves are fine
    (err,) = errors
    assert err.file.endswith("one.txt") and "expected 2 questions per image (one Yes, one No), found 1" in err.message


def test_missing_image_and_missing_root(tmp_path):
    root = tmp_path / "mme"
    _write_subtask(root, "scene", [_item("a"), _item("b")], layout="split")
    (root / "scene" / "images" / "b.jpg").unlink()
    rows, errors = read_mme(root)
    assert {r.id.split("#")[0] for r in rows} == {"scene/a"}
    (err,) = errors
    assert err.field == "image" and err.record == "b" and err.file.endswith("b.txt")
    with pytest.raises(DataError, match="MME folder not found"):
        read_mme(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MME subtask folders"):
        read_mme(tmp_path / "empty")


def test_writer_refuses_bad_items(tmp_path):
    with pytest.raises(ValueError, match="not Yes or No"):
        write_mme_item(tmp_path, "count", MMEItem("a", b"", [("q?", "yes")]))
    with pytest.raises(ValueError, match="plain file stem"):
        write_mme_item(tmp_path, "count", MMEItem("../a", b"", [("q?", "Yes")]))
    with pytest.raises(ValueError, match="tab/newline"):
        write_mme_item(tmp_path, "count", MMEItem("a", b"", [("q\t?", "Yes")]))
