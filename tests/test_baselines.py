"""Chance levels, best-constant ("majority") baselines, chance correction and collapse flags
(components.evaluation.metrics.baselines), on hand-made predictions whose numbers are worked out by hand."""

from __future__ import annotations

import pytest

from components.data.records import Row
from components.evaluation.metrics import baselines as B

YESNO_REFS = ["yes", "yes", "yes", "no"]
# A three-option counting task: the right count is "2" on three records, at a different letter each
# time, so the constant "2" (an option text) beats every constant letter.
COUNT_OPTIONS = ["(A) 2 (B) 3 (C) 4", "(A) 3 (B) 2 (C) 4", "(A) 4 (B) 3 (C) 2", "(A) 3 (B) 4 (C) 1"]
COUNT_REFS = ["A", "B", "C", "C"]


def test_chance_levels_by_answer_kind():
    assert B.chance_level("yesno", YESNO_REFS) == 0.5
    assert B.chance_level("letter", COUNT_REFS, COUNT_OPTIONS) == pytest.approx(1 / 3)
    assert B.chance_level("letter", ["A", "B"], ["(A) x (B) y", "(A) x (B) y (C) z (D) w"]) == pytest.approx(0.375)
    # free text: one over the distinct answers, after normalisation ("Red." is "red")
    assert B.chance_level("word", ["red", "Red.", "blue", "green", "red"]) == pytest.approx(1 / 3)


def test_best_constant_is_the_strongest_single_answer_on_the_test_references():
    assert B.best_constant("yesno", YESNO_REFS) == ("yes", 0.75)
    assert B.best_constant("word", ["red", "Red.", "blue", "green", "red"]) == ("red", pytest.approx(0.6))
    # letters alone would give 0.5 (constant "C"); the option text "2" is right three times in four
    answer, acc = B.best_constant("letter", COUNT_REFS, COUNT_OPTIONS)
    assert (answer, acc) == ("2", 0.75)
    assert B.accuracy("letter", ["C"] * 4, COUNT_REFS, COUNT_OPTIONS) == 0.5


def test_chance_corrected_accuracy():
    assert B.chance_corrected(0.75, 0.5) == 0.5
    assert B.chance_corrected(0.5, 0.5) == 0.0
    assert B.chance_corrected(0.25, 0.5) == -0.5  # below chance is negative, not clipped
    assert B.chance_corrected(1.0, 1 / 3) == pytest.approx(1.0)
    assert B.chance_corrected(1.0, 1.0) is None and B.chance_corrected(None, 0.5) is None


def test_collapse_flag_reads_normalised_answers():
    assert B.collapsed(["Yes", "yes.", "YES"])
    assert not B.collapsed(["yes", "no", "yes"])
    assert not B.collapsed(["yes"])  # one record says nothing about collapse
    assert B.answer_spread(["no", "No", "yes", "no"]) == ("no", 0.75)


def test_a_constant_model_scores_the_majority_and_is_flagged():
    e = B.task_entry("yesno", ["Yes"] * 4, YESNO_REFS, train_answers=["no", "no", "yes"])
    assert e["accuracy"] == 0.75 == e["majority"] and e["majority_answer"] == "yes"
    assert e["chance"] == 0.5 and e["chance_corrected"] == 0.5  # above chance, yet only the answer prior
    assert e["collapsed"] and e["top_answer"] == "yes" and e["top_share"] == 1.0
    # the training prior says "no", which is right once in four on this test set
    assert e["train_majority_answer"] == "no" and e["train_majority"] == 0.25
    seeing = B.task_entry("yesno", ["yes", "yes", "yes", "no"], YESNO_REFS)
    assert seeing["accuracy"] == 1.0 and not seeing["collapsed"] and seeing["train_majority"] is None


def test_split_summary_means_and_collapsed_tasks():
    a = B.task_entry("yesno", ["yes"] * 4, YESNO_REFS, train_answers=["yes"])
    b = B.task_entry("letter", ["B", "B", "C", "C"], COUNT_REFS, COUNT_OPTIONS, train_answers=["A"])
    s = B.split_summary({"b": b, "a": a})
    assert list(s["tasks"]) == ["a", "b"]
    assert s["mean"] == pytest.approx((0.75 + 0.75) / 2)  # b: records 2, 3, 4 right
    assert s["chance_mean"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert s["majority_mean"] == pytest.approx(0.75)
    assert s["train_majority_mean"] == pytest.approx((0.75 + 0.25) / 2)
    assert s["chance_corrected_mean"] == pytest.approx((0.5 + (0.75 - 1 / 3) / (2 / 3)) / 2)
    assert s["majority_chance_corrected_mean"] == s["chance_corrected_mean"]  # both tasks sit at the constant
    assert s["collapsed_tasks"] == ["a"]
    no_train = B.split_summary({"a": a, "c": B.task_entry("yesno", ["no"] * 4, YESNO_REFS)})
    assert no_train["train_majority_mean"] is None  # not a mean over a subset of the tasks


def test_mme_baselines_random_guess_and_constant_answer():
    refs, images = ["Yes", "No", "Yes", "No"], ["1.png", "1.png", "2.png", "2.png"]
    b = B.mme_subtask_baselines(refs, images)
    assert (b["chance_acc"], b["chance_acc_plus"], b["chance_score"]) == (50.0, 25.0, 75.0)
    assert (b["majority_answer"], b["majority_acc"], b["majority_acc_plus"], b["majority_score"]) == ("yes", 50.0, 0.0, 50.0)
    both_yes = B.mme_subtask_baselines(["Yes", "Yes", "Yes", "No"], images)
    assert (both_yes["majority_acc"], both_yes["majority_acc_plus"], both_yes["majority_score"]) == (75.0, 50.0, 125.0)
    assert B.mme_collapse(["No", "no", "nope", "no."]) == ("no", 1.0, True)  # the official reading
    assert B.mme_collapse(["yes", "no"])[2] is False


def test_benchmark_summaries_on_rows():
    from components.evaluation.benchmark import summarize_mme, summarize_split

    rows = [Row(f"c{i}", "count", "heldin", f"How many? {o}", r, f"c{i}.png", "annotation_heldin.json", i)
            for i, (o, r) in enumerate(zip(COUNT_OPTIONS, COUNT_REFS))]
    s = summarize_split(rows, ["2"] * 4, {"count": "letter"}, {"count": ["A", "A", "B"]})
    e = s["tasks"]["count"]
    assert e["accuracy"] == 0.75 == e["majority"] and e["collapsed"] and e["train_majority"] == 0.25
    mme = [Row(f"m{i}", "existence", "mme", "Is there a star?", a, img, "mme", i)
           for i, (a, img) in enumerate(zip(["Yes", "No", "Yes", "No"], ["1.png", "1.png", "2.png", "2.png"]))]
    m = summarize_mme(mme, ["no"] * 4)
    assert m["chance_total"] == 75.0 and m["majority_total"] == 50.0 and m["collapsed_subtasks"] == ["existence"]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 predictions for 4 references"):
        B.accuracy("yesno", ["yes"] * 3, YESNO_REFS)
    with pytest.raises(ValueError, match="at least one reference"):
        B.chance_level("word", [])
    with pytest.raises(ValueError, match="'maybe' names no option letter"):
        B.best_constant("letter", ["A", "maybe"], ["(A) x (B) y", "(A) x (B) y"])
