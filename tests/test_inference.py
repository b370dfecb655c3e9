"""Inference: batched left-padded greedy generation, output detection, exact match."""

from __future__ import annotations

import json

import pytest
import torch

from components.model.backbone import save_base
from components.evaluation.inference import (
    evaluate_exact_match,
    generate,
    load_model,
    pick_per_task,
    predict,
)
from components.evaluation.metrics.text import exact_match, normalize_answer
from components.evaluation.outputs import KINDS, detect_kind
from tiny_llava import tiny_model


def _trained_a_little(tmp_path):
    """A tiny model nudged off its init so its greedy outputs vary with the input."""
    model, processor, rows, root = tiny_model(tmp_path, seed=1, nudge_seed=1)
    model.eval()
    return model, processor, rows, root


def test_batched_left_padded_equals_one_by_one(tmp_path):
    model, processor, rows, root = _trained_a_little(tmp_path)
    images = [root / "red.png", None, root / "blue.png", None, root / "green.png"]
    prompts = [
        "What color?",
        "Image description: a plain red picture\nWhat color is it? Answer in one word please.",
        "Describe the image in a few words.",
        "Hi",
        "What color is the image?",
    ]
    batched = generate(model, processor, images, prompts, max_new_tokens=6, batch_size=5)
    alone = [generate(model, processor, [im], [q], max_new_tokens=6, batch_size=1)[0] for im, q in zip(images, prompts)]
    assert batched == alone
    assert len(set(batched)) > 1  # the check is not vacuous: outputs differ across prompts


def test_generate_rejects_mismatched_lengths(tmp_path):
    model, processor, _, _ = tiny_model(tmp_path)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        generate(model, processor, [None, None], ["x"])


@pytest.mark.parametrize(
    "pred,ref,hit",
    [("Red.", "red", True), ("the cat", "Cat", True), ("An apple!", "apple", True), ("red car", "red", False),
     ("  yes ", "Yes", True), ("3", "three", True), ("4", "three", False)],
)
def test_exact_match_normalisation(pred, ref, hit):
    assert exact_match(pred, ref) is hit


def test_normalize_answer_keeps_words_inside_others():
    assert normalize_answer("Theater, a THEME") == "theater theme"


def test_pick_per_task_is_stable(tmp_path):
    _, _, rows, _ = tiny_model(tmp_path)
    picked = pick_per_task(rows, 2)
    assert [r.id for r in picked] == ["t0", "a0", "x0", "t1", "a1", "x1"]


def test_evaluate_exact_match_counts_per_task(tmp_path, monkeypatch):
    model, processor, rows, root = tiny_model(tmp_path)
    import components.evaluation.inference as inf

    sel = [r for r in rows if r.split in ("train", "text")][:6]
    monkeypatch.setattr(inf, "generate", lambda m, p, imgs, prompts, *a, **k: [r.answer if r.task == "vf_color" else "nope" for r in sel])
    ev = evaluate_exact_match(model, processor, sel, root)
    assert ev["per_task"] == {"text_color": 0.0, "vf_color": 1.0}
    assert ev["mean"] == 0.5 and ev["n"] == 6


def test_quick_heldout_check_does_not_count_an_empty_answer_as_option_letter_a(tmp_path, monkeypatch):
    """`mrt train`'s held-out check: an empty prediction against the reference "A" is a miss
    (normalisation used to drop "a" as an article, scoring 0.5 where the benchmark gives 0.0)."""
    from components.data.records import Row

    model, processor, _, _ = tiny_model(tmp_path)
    import components.evaluation.inference as inf

    rows = [Row("q0", "vf_letter", "heldout", "Which option? (A) red (B) blue", "A", None, "hand", 0),
            Row("q1", "vf_letter", "heldout", "Which option? (A) red (B) blue", "B", None, "hand", 1)]
    monkeypatch.setattr(inf, "generate", lambda *a, **k: ["", "(b)"])
    ev = evaluate_exact_match(model, processor, rows, None)
    assert ev["per_task"] == {"vf_letter": 0.5}  # only the "(b)" answer counts


def test_detect_kind_and_load(tmp_path):
    model, processor, _, root = _trained_a_little(tmp_path)
    base = tmp_path / "base"
    save_base(model, processor, base)
    assert detect_kind(None) == "base"
    with pytest.raises(FileNotFoundError, match="mrt train"):
        detect_kind(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a training output"):
        detect_kind(tmp_path / "junk")

    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / KINDS["frozen"].marker).write_text(json.dumps({"method": "frozen", "base_dir": str(base)}))
    loaded = load_model(base, frozen)
    assert loaded.kind == "frozen" and loaded.info["method"] == "frozen"
    want = generate(model, processor, [root / "red.png"], ["What color?"], max_new_tokens=4)
    from components.core.config import PredictParams

    assert predict(base, frozen, [str(root / "red.png")], ["What color?"], PredictParams(max_new_tokens=4)) == want

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q|v)_proj"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.eval()
    lora_want = generate(lora, processor, [root / "red.png", None], ["What color?", "Hello"], max_new_tokens=4)
    lora.save_pretrained(str(tmp_path / "lora"))
    got = load_model(base, tmp_path / "lora")
    assert got.kind == "lora"
    assert generate(got.model, got.processor, [root / "red.png", None], ["What color?", "Hello"], max_new_tokens=4) == lora_want

    full_dir = tmp_path / "full"
    save_base(model, processor, full_dir)
    assert detect_kind(full_dir) == "full" and load_model(base, full_dir).kind == "full"
