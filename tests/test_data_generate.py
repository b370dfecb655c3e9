"""The embedded visionflan-mini writer: determinism, counts, coverage, balance, no leakage, real MNIST."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from components.core.config import DataParams
from components.data import generate
from components.data.generate import MME_ROOT, SPLIT_FILES, write_dataset
from components.data.load import load_dataset_dir
from components.data.mnist import load_mnist, mnist_image
from components.data.render import png_bytes, png_hash, render
from components.data.scenes import random_objects_scene
from components.data.tasks import ALL_TYPES, HELDOUT_TYPES, MME_SUBTASKS, TRAIN_TYPES

SMALL = dict(train_per_task=6, heldout_per_task=6, heldin_per_task=4, align_size=40, text_per_type=6, mme_images_per_subtask=3)


def _params(out: Path, **kw) -> DataParams:
    return DataParams(out_dir=str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    a = write_dataset(_params(base / "a"), progress=False).parent
    b = write_dataset(_params(base / "b"), progress=False).parent
    c = write_dataset(_params(base / "c", seed=1), progress=False).parent
    return a, b, c


def _tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def _records(d: Path, split: str) -> list[dict]:
    return json.loads((d / SPLIT_FILES[split]).read_text(encoding="utf-8"))


def _hashes(d: Path, records: list[dict]) -> set[str]:
    return {png_hash((d / "images" / r["image"]).read_bytes()) for r in records}


def test_same_seed_byte_identical_other_seed_differs(written):
    a, b, c = written
    tree_a, tree_b = _tree(a), _tree(b)
    assert tree_a == tree_b  # annotations, manifest, every PNG and MME file
    for name in [*SPLIT_FILES.values(), "manifest.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for name in SPLIT_FILES.values():
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert not list(a.parent.glob(".*.partial")) and not list(a.parent.glob(".*.old"))


def test_manifest_and_counts(written):
    d = written[0]
    m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    assert list(m)[:9] == [
        "name", "format_version", "source", "seed", "image_size", "image_root", "files", "mme_root", "tasks"
    ]
    assert (m["name"], m["format_version"], m["source"], m["seed"], m["image_size"]) == (
        "visionflan-mini", 1, "embedded", 0, 64,
    )
    assert m["image_root"] == "images" and m["mme_root"] == MME_ROOT and m["files"] == SPLIT_FILES
    n_train, n_held = len(TRAIN_TYPES), len(HELDOUT_TYPES)
    expected = {
        "train": n_train * SMALL["train_per_task"],
        "heldout": n_held * SMALL["heldout_per_task"],
        "heldin": n_train * SMALL["heldin_per_task"],
        "align": SMALL["align_size"],
        "text": (n_train + n_held) * SMALL["text_per_type"],
        "mme_images": len(MME_SUBTASKS) * SMALL["mme_images_per_subtask"],
        "mme": 2 * len(MME_SUBTASKS) * SMALL["mme_images_per_subtask"],
    }
    assert m["counts"] == expected
    for split in SPLIT_FILES:
        assert len(_records(d, split)) == expected[split]
    for name, info in m["tasks"].items():
        assert info["split"] == ("train" if name.startswith("vf_") else "heldout")
        assert info["answer_kind"] in ("word", "number", "yesno", "letter")
    assert m["tasks"]["hx_mnist_choice_digit"]["real_images"] is True
    text = (d / "manifest.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n "name"')


def test_tasks_splits_and_text_coverage(written):
    d = written[0]
    train_tasks = Counter(r["task_name"] for r in _records(d, "train"))
    held_tasks = Counter(r["task_name"] for r in _records(d, "heldout"))
    assert len(train_tasks) >= 20 and len(held_tasks) >= 6
    assert all(t.startswith("vf_") for t in train_tasks) and all(t.startswith("hx_") for t in held_tasks)
    assert set(train_tasks.values()) == {SMALL["train_per_task"]}
    assert {t.name for t in TRAIN_TYPES}.isdisjoint(t.name for t in HELDOUT_TYPES)
    text = _records(d, "text")
    per_type = Counter(r["task_name"] for r in text)
    assert set(per_type) == {t.text_task_name for t in ALL_TYPES}  # every held-out type too
    assert set(per_type.values()) == {SMALL["text_per_type"]}
    for r in text:
        assert "image" not in r and "<image>" not in r["conversations"][0]["value"]
        assert r["conversations"][0]["value"].startswith("Image description: ")
    for split in ("train", "heldout", "align"):
        for r in _records(d, split):
            assert r["conversations"][0]["value"].startswith("<image>\n")
            assert r["image"] == f"{r['task_name']}/{r['id']}.png" and (d / "images" / r["image"]).is_file()
    captions = _records(d, "align")
    assert {r["task_name"] for r in captions} == {"caption"}
    assert all(r["conversations"][1]["value"].endswith(" background") for r in captions)


def test_text_split_answers_follow_the_description(written):
    """Spot-check the written text split by parsing descriptions (the full oracle is in test_data_tasks)."""
    for r in _records(written[0], "text"):
        human, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        desc, question = human.removeprefix("Image description: ").split("\n", 1)
        task = r["task_name"]
        if task == "text_count_all":
            assert answer == str(desc.count(" at the "))
        elif task == "text_background":
            assert desc.endswith(f"on a {answer} background")
        elif task == "text_read_digit":
            assert desc.startswith(f"the digit {answer} in ")
        elif task == "text_digit_parity":
            digit = int(re.match(r"the digit (\d)", desc).group(1))
            assert answer == ("even" if digit % 2 == 0 else "odd")
        elif task == "text_exists_shape":
            shape = re.search(r"an? (circle|square|triangle|star)\b", question).group(1)
            assert answer == ("yes" if f" {shape} at the " in desc else "no")


def test_yes_no_and_letters_balanced(written):
    d = written[0]
    for split in ("train", "heldout", "text"):
        by_task: dict[str, Counter] = {}
        for r in _records(d, split):
            by_task.setdefault(r["task_name"], Counter())[r["conversations"][1]["value"]] += 1
        for task, counts in by_task.items():
            if set(counts) <= {"yes", "no"}:
                assert abs(counts["yes"] - counts["no"]) <= 1, (task, counts)
    loaded = load_dataset_dir(d)
    mme = Counter(r.answer for r in loaded.split("mme"))
    assert mme["Yes"] == mme["No"] == SMALL["mme_images_per_subtask"] * len(MME_SUBTASKS)


def test_no_heldout_or_mme_image_in_training(written):
    d = written[0]
    train = _hashes(d, _records(d, "train")) | _hashes(d, _records(d, "align"))
    held = _hashes(d, _records(d, "heldout"))
    mme = {png_hash(p.read_bytes()) for p in (d / MME_ROOT).rglob("*.png")}
    assert len(mme) == SMALL["mme_images_per_subtask"] * len(MME_SUBTASKS)
    assert train.isdisjoint(held) and train.isdisjoint(mme)


def test_heldin_split_asks_training_task_types_on_unseen_images(written):
    d = written[0]
    heldin, train = _records(d, "heldin"), _records(d, "train")
    per_task = Counter(r["task_name"] for r in heldin)
    assert set(per_task) == {t.task_name for t in TRAIN_TYPES}  # every training type, no held-out type
    assert set(per_task.values()) == {SMALL["heldin_per_task"]}
    train_ids = {r["id"] for r in train} | {r["id"] for r in _records(d, "heldout")}
    assert train_ids.isdisjoint(r["id"] for r in heldin)
    for r in heldin:
        assert r["image"] == f"{r['task_name']}/{r['id']}.png" and (d / "images" / r["image"]).is_file()
    phrasings = {t.task_name: t for t in TRAIN_TYPES}
    for r in heldin:  # the training task's own phrasings (the options/slots filled in)
        t = phrasings[r["task_name"]]
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert any(re.fullmatch(re.escape(ph).replace(r"\{", "{").replace(r"\}", "}")
                                .replace("{options}", ".+").replace("{shape}", r"\w+").replace("{color}", r"\w+")
                                .replace("{shapes}", r"\w+").replace("{shape1s}", r"\w+").replace("{shape2s}", r"\w+")
                                .replace("{side}", r"\w+"), question) for ph in t.phrasings), (r["id"], question)
    seen = _hashes(d, train) | _hashes(d, _records(d, "align"))
    assert _hashes(d, heldin).isdisjoint(seen)
    assert len(_hashes(d, heldin)) == len(heldin)  # and no two held-in records share a picture
    counts = Counter((r["task_name"], r["conversations"][1]["value"]) for r in heldin)
    for t in TRAIN_TYPES:  # balanced like the training split: a constant answer cannot do well
        if t.outcomes:
            got = [counts[(t.task_name, o)] for o in t.outcomes]
            assert max(got) - min(got) <= 1, (t.task_name, got)


def test_heldin_split_leaves_the_other_splits_unchanged(written, tmp_path):
    d = written[0]
    other = write_dataset(_params(tmp_path / "more", heldin_per_task=7), progress=False).parent
    for split in ("train", "heldout", "align", "text"):
        assert (d / SPLIT_FILES[split]).read_bytes() == (other / SPLIT_FILES[split]).read_bytes()
    assert len(_records(other, "heldin")) == 7 * len(TRAIN_TYPES)


def test_heldin_per_task_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="heldin_per_task"):
        DataParams(heldin_per_task=0)


def test_colliding_heldout_draw_is_redrawn(tmp_path):
    w = generate._EmbeddedWriter(_params(tmp_path), tmp_path, lambda desc: None)
    rng = np.random.default_rng(0)
    seen, fresh = random_objects_scene(rng), random_objects_scene(rng)
    w.train_hashes.add(png_hash(png_bytes(render(seen, 64))))
    draws = iter([(seen, "first"), (seen, "second"), (fresh, "third")])
    payload, data = w._unseen(lambda: next(draws), "test")
    assert payload == "third" and data == png_bytes(render(fresh, 64))
    with pytest.raises(RuntimeError, match="collided"):
        w._unseen(lambda: (seen, "again"), "test")


def test_mnist_task_uses_real_digits(written):
    d = written[0]
    images, labels = load_mnist()
    by_bytes = {png_bytes(mnist_image(i, 64)): i for i in range(len(labels))}
    recs = [r for r in _records(d, "heldout") if r["task_name"] == "hx_mnist_choice_digit"]
    assert len(recs) == SMALL["heldout_per_task"]
    for r in recs:
        index = by_bytes.get((d / "images" / r["image"]).read_bytes())
        assert index is not None, "held-out MNIST image is not an MNIST sample"
        options = dict(re.findall(r"\(([AB])\) (\d)", r["conversations"][0]["value"]))
        assert options[r["conversations"][1]["value"]] == str(labels[index])
    # captions show other real digits (disjoint pool), described by their true label
    mnist_caps = [r for r in _records(d, "align") if "handwritten" in r["conversations"][1]["value"]]
    for r in mnist_caps:
        index = by_bytes[(d / "images" / r["image"]).read_bytes()]
        assert r["conversations"][1]["value"].startswith(f"the handwritten digit {labels[index]} ")


def test_failed_write_keeps_the_previous_data_set(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    write_dataset(_params(out, train_per_task=1, heldout_per_task=1, align_size=1, text_per_type=1,
                          mme_images_per_subtask=1), progress=False)
    before = _tree(out)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(generate, "write_visionflan", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(_params(out), progress=False)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.slow
def test_default_size_is_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    write_dataset(DataParams(out_dir=str(tmp_path / "full")), progress=False)
    assert time.perf_counter() - t0 < 60
