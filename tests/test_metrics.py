"""Metrics: answer normalisation, option letters, the MME yes/no reading and the MME scorer.

The MME numbers are computed by hand in the comments, from the official tool's rules (docs/method.md, "Evaluation"):
acc = % questions right, acc+ = % images with both right, score = acc + acc+, perception/cognition =
sums over the subtasks present.
"""

from __future__ import annotations

import pytest

from components.data.records import Row
from components.evaluation.metrics import METRIC_NAMES, load_metric, metric_path
from components.evaluation.metrics.mme import (
    MMEAnswer,
    score_mme,
    score_mme_results,
    write_mme_results,
)
from components.evaluation.metrics.text import (
    exact_match,
    letter_match,
    mme_yes_no,
    normalize_answer,
    option_letter,
    parse_options,
)


# ---------------------------------------------------------------------------------------------
# normalisation and exact match
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Three", "3"),
        ("The Three cats!", "3 cats"),
        ("an apple.", "apple"),
        ("A dog", "dog"),
        ("the", "the"),  # an answer that is nothing but an article keeps it
        ("A", "a"),  # the option letter A is not the article a
        ("(A)", "a"),
        ("", ""),
        ("   \t\n ", ""),
        ("Hello,   WORLD", "hello world"),
        ("red,blue", "red blue"),  # punctuation separates words, never glues them
        ("don't", "dont"),
        ("3.5", "3.5"),  # a decimal point is part of the number
        ("1,000 apples", "1000 apples"),
        ("1,2,3", "1 2 3"),  # not a thousands separator
        ("U.S.A.", "usa"),  # the acronym's letters are not articles
        ("zero twenty twenty-one", "0 20 20 1"),
        ("“Quoted”", "quoted"),
        ("theater another", "theater another"),  # articles only as whole words
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("pred", "ref", "hit"),
    [
        ("Three cats.", "3 cats", True),
        ("the red one", "Red one!", True),
        ("", "", False),  # an empty prediction matches nothing
        ("The", "", False),
        ("", "A", False),  # the option letter A is not dropped as an article
        ("a", "A", True),
        ("(A)", "A", True),
        ("B", "A", False),
        ("", "yes", False),
        ("3.5", "35", False),
        ("cat", "cats", False),
        ("no", "0", False),  # "no" is not a number word
    ],
)
def test_exact_match(pred, ref, hit):
    assert exact_match(pred, ref) is hit


def test_exact_match_rejects_non_strings():
    with pytest.raises(TypeError, match="prediction must be a str"):
        exact_match(None, "x")


# ---------------------------------------------------------------------------------------------
# option letters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("A", "A"),
        ("a", "A"),
        ("(a)", "A"),
        ("A.", "A"),
        ("A) circle", "A"),
        ("b. square", "B"),
        ("[C]", "C"),
        ("option B", "B"),
        ("Option: c", "C"),
        ("The answer is (d).", "D"),
        ("The answer is B because it has four sides", "B"),
        ("a circle", None),  # the article, not option A
        ("the answer is a circle", None),
        ("square", None),  # no options text: nothing to map it to
        ("", None),
    ],
)
def test_option_letter_without_options(pred, letter):
    assert option_letter(pred) == letter


OPTS = "(A) circle (B) square (C) red triangle"


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("square", "B"),
        ("A square.", "B"),
        ("It is a red triangle", "C"),
        ("(b) square", "B"),
        ("c", "C"),
        ("E", None),  # not one of the options
        ("circle or square", None),  # names two options
        ("hexagon", None),
    ],
)
def test_option_letter_with_options(pred, letter):
    assert option_letter(pred, OPTS) == letter


def test_parse_options_formats():
    expected = {"A": "circle", "B": "square"}
    assert parse_options("(A) circle (B) square") == expected
    assert parse_options("Options:\nA. circle\nB. square") == expected
    assert parse_options("A) circle; B) square") == expected
    assert parse_options(["circle", "square"]) == expected
    assert parse_options({"(a)": "circle", "B": " square "}) == expected


def test_letter_match():
    assert letter_match("(b)", "B")
    assert letter_match("square", "B", OPTS)
    assert letter_match("B) square", "(B) square")
    assert letter_match("square", "square", OPTS)  # the reference may spell the option out too
    assert not letter_match("A", "B")
    assert not letter_match("hexagon", "B", OPTS)
    with pytest.raises(ValueError, match="names no option letter"):
        letter_match("A", "a circle")


# ---------------------------------------------------------------------------------------------
# MME yes/no, exactly as the official tool: lowercase; exact yes/no; else "yes", then "no", in the
# first 4 characters; else other.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "label"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("YES", "yes"),
        ("Yes.", "yes"),
        ("yes, it is", "yes"),
        ("nope", "no"),
        ("No, there is not", "no"),
        ("the answer is yes", "other"),  # "the " holds neither
        ("  yes", "other"),  # no stripping: "  ye"
        (" yes", "yes"),  # " yes" still fits in 4 characters
        ("Not sure", "no"),  # "not " contains "no"
        ("snow", "no"),
        ("Yesterday", "yes"),
        ("I don't know", "other"),
        ("y", "other"),
        ("", "other"),
    ],
)
def test_mme_yes_no(pred, label):
    assert mme_yes_no(pred) == label


# ---------------------------------------------------------------------------------------------
# the MME scorer on a hand-computed results folder
# ---------------------------------------------------------------------------------------------
EXISTENCE = [
    # image, question, gt, prediction                       reading  right?
    ("e1.jpg", "Is there a dog?", "Yes", "Yes"),  # yes      ✓
    ("e1.jpg", "Is there a cat?", "No", "No"),  # no        ✓   → image e1 both right
    ("e2.jpg", "Is there a car?", "Yes", "yes, there is"),  # yes  ✓
    ("e2.jpg", "Is there a bus?", "No", "Yes"),  # yes       ✗
    ("e3.jpg", "Is there a tree?", "Yes", "the answer is yes"),  # other ✗
    ("e3.jpg", "Is there a boat?", "No", "nope"),  # no      ✓
]
# existence: 4 of 6 questions right → acc = 66.667; 1 of 3 images both right → acc+ = 33.333;
# score = 100.000
COUNT = [
    ("c1.jpg", "Are there two dogs?", "Yes", "No"),  # no     ✗
    ("c1.jpg", "Are there three dogs?", "No", "Yes"),  # yes  ✗
    ("c2.jpg", "Are there two cars?", "Yes", "  yes"),  # other ✗
    ("c2.jpg", "Are there five cars?", "No", "No."),  # no    ✓
    ("c3.jpg", "Is there one sun?", "Yes", "YES"),  # yes     ✓
    ("c3.jpg", "Are there two suns?", "No", "no"),  # no      ✓   → image c3 both right
]
# count: 3 of 6 right → acc = 50.000; 1 of 3 images → acc+ = 33.333; score = 83.333
# perception = 100 + 83.333 = 183.333; cognition = 0 (no cognition file); total = 183.333


def _write_raw(folder, name, rows, newline="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    text = newline.join("\t".join(r) for r in rows) + newline
    (folder / f"{name}.txt").write_bytes(text.encode("utf-8"))


def test_score_mme_results_hand_computed(tmp_path):
    _write_raw(tmp_path, "existence", EXISTENCE)
    _write_raw(tmp_path, "count", COUNT)
    result = score_mme_results(tmp_path)

    ex, co = result["subtasks"]["existence"], result["subtasks"]["count"]
    assert ex["acc"] == pytest.approx(400 / 6)
    assert ex["acc_plus"] == pytest.approx(100 / 3)
    assert ex["score"] == pytest.approx(100.0)
    assert (ex["questions"], ex["images"], ex["other"]) == (6, 3, 1)
    assert co["acc"] == pytest.approx(50.0)
    assert co["acc_plus"] == pytest.approx(100 / 3)
    assert co["score"] == pytest.approx(250 / 3)
    assert co["other"] == 1
    assert result["perception"] == pytest.approx(100 + 250 / 3)
    assert result["cognition"] == 0.0
    assert result["total"] == pytest.approx(100 + 250 / 3)
    assert list(result["subtasks"]) == ["existence", "count"]  # the official tool's order


def test_score_mme_results_line_endings_do_not_matter(tmp_path):
    _write_raw(tmp_path / "lf", "count", COUNT)
    _write_raw(tmp_path / "crlf", "count", COUNT, newline="\r\n")
    no_final = tmp_path / "nofinal"
    no_final.mkdir()
    (no_final / "count.txt").write_text("\n".join("\t".join(r) for r in COUNT), encoding="utf-8")
    scores = {d: score_mme_results(tmp_path / d)["total"] for d in ("lf", "crlf", "nofinal")}
    assert scores["lf"] == scores["crlf"] == scores["nofinal"] == pytest.approx(250 / 3)


def test_cognition_subtasks_sum_separately():
    # OCR (perception): both right → 100 + 100 = 200. code_reasoning (cognition): one of two right,
    # no image both right → 50 + 0 = 50. total = 250.
    result = score_mme(
        predictions=["Yes", "no", "yes", "yes"],
        references=["Yes", "No", "Yes", "No"],
        subtasks=["OCR", "OCR", "code_reasoning", "code_reasoning"],
        images=["o.png", "o.png", "k.png", "k.png"],
    )
    assert (result["perception"], result["cognition"], result["total"]) == (200.0, 50.0, 250.0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.jpg\tQ?\tYes\tyes\na.jpg\tQ?\tNo\n", r"count\.txt, line 2: expected 4 tab-separated fields"),
        ("a.jpg\tQ?\tYes\tyes\na.jpg\tQ?\tNo\tno\tmore\n", r"line 2: expected 4 tab-separated fields.*got 5"),
        ("a.jpg\tQ?\tYes\tyes\na.jpg\tQ?\tMaybe\tno\n", r"line 2, field 'gt'.*Yes or No"),
        ("a.jpg\tQ?\tYes\tyes\n", r"count\.txt: 1 lines, an odd number"),
        ("a.jpg\tQ?\tYes\tyes\nb.jpg\tQ?\tNo\tno\n", r"lines 1-2: .*different images"),
        ("", r"count\.txt: empty results file"),
    ],
)
def test_malformed_results_name_file_and_line(tmp_path, content, message):
    (tmp_path / "count.txt").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        score_mme_results(tmp_path)


def test_results_folder_problems(tmp_path):
    with pytest.raises(ValueError, match="results folder not found"):
        score_mme_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="no MME results files"):
        score_mme_results(tmp_path)
    _write_raw(tmp_path, "count", COUNT)
    (tmp_path / "ocr.txt").write_text("", encoding="utf-8")  # misspelt: the subtask is "OCR"
    with pytest.raises(ValueError, match=r"not MME subtasks: ocr\.txt"):
        score_mme_results(tmp_path)
    assert score_mme_results(tmp_path, subtasks=["count"])["total"] == pytest.approx(250 / 3)
    with pytest.raises(ValueError, match=r"existence\.txt: results file not found"):
        score_mme_results(tmp_path, subtasks=["existence"])


# ---------------------------------------------------------------------------------------------
# writing the official layout
# ---------------------------------------------------------------------------------------------
def _items(rows, subtask):
    return [MMEAnswer(subtask, f"{subtask}/images/{img}", q, gt, pred) for img, q, gt, pred in rows]


def test_write_then_score_round_trip(tmp_path):
    # Questions interleaved across images and subtasks: the writer must regroup them in pairs.
    items = _items(EXISTENCE, "existence") + _items(COUNT, "count")
    shuffled = items[::2] + items[1::2]
    written = write_mme_results(shuffled, tmp_path)
    assert set(written) == {"existence", "count"}
    lines = (tmp_path / "existence.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "e1.jpg\tIs there a dog?\tYes\tYes"  # file name only, as in the release
    assert [ln.split("\t")[0] for ln in lines] == ["e1.jpg", "e1.jpg", "e2.jpg", "e2.jpg", "e3.jpg", "e3.jpg"]

    from_files = score_mme_results(tmp_path)
    in_memory = score_mme(
        [i.prediction for i in shuffled],
        [i.answer for i in shuffled],
        [i.subtask for i in shuffled],
        [i.image for i in shuffled],
    )
    assert from_files == in_memory
    assert from_files["perception"] == pytest.approx(100 + 250 / 3)


def test_write_cleans_predictions_and_accepts_rows(tmp_path):
    rows = [
        Row("m1", "OCR", "mme", "Is the word\t'cat'?", "Yes", "OCR/sign.png", "mme.json", 0),
        Row("m2", "OCR", "mme", "Is the word 'dog'?", "no", "OCR/sign.png", "mme.json", 1),
    ]
    preds = ["yes\tindeed\nreally", "\r\nno"]  # "\r\nno" → "  no": still "no" in 4 characters
    write_mme_results(list(zip(rows, preds)), tmp_path)
    lines = (tmp_path / "OCR.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:2] == [
        "sign.png\tIs the word 'cat'?\tYes\tyes indeed really",
        "sign.png\tIs the word 'dog'?\tNo\t  no",
    ]
    assert score_mme_results(tmp_path)["subtasks"]["OCR"]["score"] == 200.0
    # mappings (Row.to_dict() plus a prediction) work the same way
    write_mme_results([{**r.to_dict(), "prediction": p} for r, p in zip(rows, preds)], tmp_path / "d")
    assert (tmp_path / "d" / "OCR.txt").read_bytes() == (tmp_path / "OCR.txt").read_bytes()


def test_write_removes_stale_subtasks_and_validates_first(tmp_path):
    write_mme_results(_items(EXISTENCE, "existence") + _items(COUNT, "count"), tmp_path)
    write_mme_results(_items(COUNT, "count"), tmp_path)
    assert not (tmp_path / "existence.txt").exists()
    assert list(score_mme_results(tmp_path)["subtasks"]) == ["count"]

    before = (tmp_path / "count.txt").read_text(encoding="utf-8")
    three = _items(COUNT, "count") + [MMEAnswer("count", "count/images/c1.jpg", "Extra?", "Yes", "yes")]
    with pytest.raises(ValueError, match=r"image 'count/images/c1.jpg': expected 2 questions per image, got 3"):
        write_mme_results(three, tmp_path)
    with pytest.raises(ValueError, match=r"#0 .*field 'answer'.*Yes or No"):
        write_mme_results([MMEAnswer("count", "x.jpg", "Q?", "maybe", "yes")] * 2, tmp_path)
    with pytest.raises(ValueError, match="unknown MME subtask 'counting'"):
        write_mme_results([MMEAnswer("counting", "x.jpg", "Q?", "Yes", "yes")] * 2, tmp_path)
    with pytest.raises(ValueError, match=r"#0: missing field 'prediction'"):
        write_mme_results([{"task": "count", "image": "x.jpg", "instruction": "Q?", "answer": "Yes"}], tmp_path)
    assert (tmp_path / "count.txt").read_text(encoding="utf-8") == before  # nothing half-written


def test_score_mme_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        score_mme(["yes"], ["Yes", "No"], ["count"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score_mme([], [], [], [])
    with pytest.raises(ValueError, match="expected 2 questions per image, got 1"):
        score_mme(["yes"], ["Yes"], ["count"], ["a"])


# ---------------------------------------------------------------------------------------------
# the evaluate modules, loaded by path, agree with the pure functions
# ---------------------------------------------------------------------------------------------
def test_metric_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        metric_path("accuracy")
    assert all((metric_path(n) / f"{n}.py").is_file() for n in METRIC_NAMES)


def test_vf_exact_match_module_matches_pure_function():
    preds = ["Three cats.", "a dog", "red", "", "A"]
    refs = ["3 cats", "Dog!", "blue", "A", "a"]
    result = load_metric("vf_exact_match").compute(predictions=preds, references=refs)
    assert result == {"exact_match": sum(map(exact_match, preds, refs)) / len(preds)}
    assert result["exact_match"] == 0.6  # the empty prediction does not match the option letter "A"


def test_vf_option_letter_module_matches_pure_function():
    preds = ["(b)", "square", "hexagon", "A"]
    refs = ["B", "B", "A", "C"]
    opts = [OPTS] * 4
    metric = load_metric("vf_option_letter")
    result = metric.compute(predictions=preds, references=refs, options=opts)
    expected = sum(letter_match(p, r, o) for p, r, o in zip(preds, refs, opts)) / 4
    assert result == {"letter_match": expected, "unparsed": 0.25}
    assert expected == 0.5
    assert metric.compute(predictions=["B"], references=["B"]) == {"letter_match": 1.0, "unparsed": 0.0}


def test_mme_score_module_matches_folder_scorer(tmp_path):
    _write_raw(tmp_path, "existence", EXISTENCE)
    _write_raw(tmp_path, "count", COUNT)
    rows = [("existence", r) for r in EXISTENCE] + [("count", r) for r in COUNT]
    result = load_metric("mme_score").compute(
        predictions=[r[3] for _, r in rows],
        references=[r[2] for _, r in rows],
        subtasks=[s for s, _ in rows],
        images=[r[0] for _, r in rows],
    )
    assert result == score_mme_results(tmp_path)


def test_release_folder_rows_round_trip(tmp_path):
    """Release folder (both layouts) → Rows → official results layout → score.

    The data reader's Rows feed the writer directly."""
    from components.data.mme import MMEItem as ReleaseItem
    from components.data.mme import read_mme, write_mme_item

    release = tmp_path / "MME_Benchmark_release_version"
    for sub, layout in (("existence", "flat"), ("artwork", "split"), ("code_reasoning", "flat")):
        for i in range(3):
            qs = [(f"Is this picture {i} of {sub}? Please answer yes or no.", "Yes"), (f"Is it not {i}?", "No")]
            write_mme_item(release, sub, ReleaseItem(name=f"{i:04d}", image=b"\x89PNG", questions=qs), layout)
    rows, errors = read_mme(release)
    assert not errors and len(rows) == 18
    # A model that answers "Yes" to everything: one of two right on every image.
    write_mme_results([(r, "Yes") for r in rows], tmp_path / "results")
    result = score_mme_results(tmp_path / "results")
    assert {s: v["score"] for s, v in result["subtasks"].items()} == {
        "existence": 50.0,  # acc 3/6 = 50, acc+ 0/3 = 0
        "artwork": 50.0,
        "code_reasoning": 50.0,
    }
    assert (result["perception"], result["cognition"], result["total"]) == (100.0, 50.0, 150.0)
    first = (tmp_path / "results" / "artwork.txt").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("0000.png\t")  # the file name only, as in the release templates


def test_write_rejects_non_string_fields(tmp_path):
    with pytest.raises(ValueError, match=r"#1, field 'prediction': expected a str, got NoneType"):
        write_mme_results(
            [MMEAnswer("count", "x.jpg", "Q?", "Yes", "yes"), MMEAnswer("count", "x.jpg", "Q?", "No", None)], tmp_path
        )
    assert not list(tmp_path.iterdir())
