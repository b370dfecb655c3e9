"""Question types: answers agree with an independent oracle, pixels agree with the scene spec."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from components.data.mnist import load_mnist
from components.data.render import BACKGROUND_RGB, COLOR_RGB, png_bytes, render
from components.data.scenes import COLORS, SHAPE_PLURALS, SHAPES, describe
from components.data.tasks import (
    ALL_TYPES,
    HELDOUT_TYPES,
    MME_SUBTASKS,
    TRAIN_TYPES,
    TaskContext,
    balanced_targets,
    caption_example,
    make_example,
    mme_example,
)

PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}
N_PER_TYPE = 60


def _task(task_name: str):
    return next(t for t in ALL_TYPES if t.task_name == task_name)


def _letter(options: str, truth: str) -> str:
    pairs = re.findall(r"\(([A-D])\) (\S+)", options)
    matches = [letter for letter, text in pairs if text == truth]
    assert len(matches) == 1, (options, truth)
    return matches[0]


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def oracle(name: str, scene, slots: dict) -> str:
    """The answer recomputed from the scene spec with code independent of the makers."""
    objs = scene.objects
    by_shape = lambda s: [o for o in objs if o.shape == s]  # noqa: E731
    by_color = lambda c: [o for o in objs if o.color == c]  # noqa: E731

    def unique(items):
        assert len(items) == 1, "question presupposes a unique object"
        return items[0]

    def largest():
        large = [o for o in objs if o.size == "large"]
        assert len(large) == 1 and len(objs) >= 2
        return large[0]

    if name in ("shape_single", "color_single", "size_single"):
        assert len(objs) == 1
        return {"shape_single": objs[0].shape, "color_single": objs[0].color, "size_single": objs[0].size}[name]
    if name == "count_all":
        return str(len(objs))
    if name == "count_shape":
        return str(len(by_shape(PLURAL_TO_SHAPE[slots["shapes"]])))
    if name == "count_color":
        return str(len(by_color(slots["color"])))
    if name == "exists_shape":
        return _yn(bool(by_shape(slots["shape"])))
    if name == "exists_color":
        return _yn(bool(by_color(slots["color"])))
    if name == "color_of_shape":
        return unique(by_shape(slots["shape"])).color
    if name == "shape_of_color":
        return unique(by_color(slots["color"])).shape
    if name == "shape_left_right":
        return unique(by_shape(slots["shape"])).col
    if name == "shape_top_bottom":
        return unique(by_shape(slots["shape"])).row
    if name == "what_shape_on_side":
        return unique([o for o in objs if o.col == slots["side"]]).shape
    if name in ("read_digit", "read_word"):
        assert scene.kind == name.split("_")[1]
        return scene.text
    if name == "text_color":
        assert scene.kind in ("digit", "word")
        return scene.text_color
    if name == "choice_shape":
        assert len(objs) == 1
        return _letter(slots["options"], objs[0].shape)
    if name == "choice_color":
        assert len(objs) == 1
        return _letter(slots["options"], objs[0].color)
    if name == "largest_shape":
        return largest().shape
    if name == "background":
        return scene.background
    if name == "more_shape":
        a, b = PLURAL_TO_SHAPE[slots["shape1s"]], PLURAL_TO_SHAPE[slots["shape2s"]]
        return _yn(len(by_shape(a)) > len(by_shape(b)))
    if name == "same_color":
        assert len(objs) >= 2
        return _yn(len({o.color for o in objs}) == 1)
    if name == "shape_is_color":
        return _yn(unique(by_shape(slots["shape"])).color == slots["color"])
    if name == "count_exact":
        assert slots["objects"] == ("object" if slots["number"] == 1 else "objects")
        return _yn(len(objs) == slots["number"])
    if name == "choice_count":
        return _letter(slots["options"], str(len(objs)))
    if name == "digit_parity":
        assert scene.kind == "digit"
        return "odd" if int(scene.text) % 2 else "even"
    if name == "color_largest":
        return largest().color
    if name == "is_shape_at":
        o = unique(by_shape(slots["shape"]))
        side = slots["where"].split()[-1]
        return _yn(side in (o.row, o.col))
    if name == "mnist_choice_digit":
        _, labels = load_mnist()
        assert scene.kind == "mnist" and str(labels[scene.mnist_index]) == scene.text
        return _letter(slots["options"], scene.text)
    raise AssertionError(f"no oracle for {name}")


@pytest.fixture(scope="module")
def ctx_factory():
    _, labels = load_mnist()
    return lambda: TaskContext(mnist_pool=np.arange(len(labels)), mnist_labels=labels)


def test_enough_disjoint_types():
    assert len(TRAIN_TYPES) >= 20 and len(HELDOUT_TYPES) >= 6
    train_names = {t.name for t in TRAIN_TYPES}
    assert not train_names & {t.name for t in HELDOUT_TYPES}
    train_phrasings = {p for t in TRAIN_TYPES for p in t.phrasings}
    assert not train_phrasings & {p for t in HELDOUT_TYPES for p in t.phrasings}
    assert all(3 <= len(t.phrasings) <= 5 for t in ALL_TYPES)
    assert any(t.real_images for t in HELDOUT_TYPES)
    assert all(t.task_name.startswith("vf_") for t in TRAIN_TYPES)
    assert all(t.task_name.startswith("hx_") for t in HELDOUT_TYPES)
    assert _task("hx_mnist_choice_digit").real_images


@pytest.mark.parametrize("task", ALL_TYPES, ids=lambda t: t.task_name)
def test_answers_match_oracle(task, ctx_factory):
    rng = np.random.default_rng(7)
    ctx = ctx_factory()
    targets = balanced_targets(rng, task.outcomes, N_PER_TYPE)
    answers = Counter()
    for target in targets:
        ex = make_example(task, rng, target, ctx)
        assert ex.answer == oracle(task.name, ex.scene, ex.slots), (task.name, ex)
        assert ex.instruction in {p.format(**ex.slots) for p in task.phrasings}
        assert ex.answer == ex.answer.strip() and ex.answer
        if task.answer_kind in ("word", "yesno"):
            assert ex.answer == ex.answer.lower()
        if task.answer_kind == "number":
            assert ex.answer.isdigit()
        if target is not None:
            assert ex.answer == target
        answers[ex.answer] += 1
    assert len(answers) >= 2, f"{task.name} always answers {answers}"
    if task.outcomes:
        assert max(answers.values()) - min(answers.values()) <= 1  # exactly balanced


def test_balanced_targets_exact_counts():
    rng = np.random.default_rng(0)
    t = balanced_targets(rng, ("yes", "no"), 11)
    assert len(t) == 11 and abs(t.count("yes") - t.count("no")) == 1
    assert balanced_targets(rng, None, 3) == [None, None, None]


@pytest.mark.parametrize("subtask", list(MME_SUBTASKS))
def test_mme_examples_one_true_one_false(subtask):
    rng = np.random.default_rng(3)
    for _ in range(40):
        scene, qs = mme_example(subtask, rng)
        assert [a for _, a in qs] == ["Yes", "No"]
        assert all(q.endswith(" Please answer yes or no.") for q, _ in qs)
        (yes_q, _), (no_q, _) = qs
        assert yes_q != no_q
        objs = scene.objects
        if subtask == "existence":
            s_yes, s_no = (re.search(r"Is there a (\w+) in", q).group(1) for q in (yes_q, no_q))
            assert any(o.shape == s_yes for o in objs) and not any(o.shape == s_no for o in objs)
        elif subtask == "count":
            n_yes, n_no = (int(re.search(r" (\d) object", q).group(1)) for q in (yes_q, no_q))
            assert n_yes == len(objs) != n_no
        elif subtask == "color":
            (c1, s1), (c2, s2) = (re.search(r"a (\w+) (\w+) in", q).groups() for q in (yes_q, no_q))
            assert any((o.color, o.shape) == (c1, s1) for o in objs)
            assert not any((o.color, o.shape) == (c2, s2) for o in objs)
        elif subtask == "position":
            shape = re.search(r"Is the (\w+) ", yes_q).group(1)
            (o,) = [o for o in objs if o.shape == shape]
            w_yes, w_no = (re.search(r"(left|right|top|bottom) of", q).group(1) for q in (yes_q, no_q))
            assert w_yes in (o.row, o.col) and w_no not in (o.row, o.col)
        else:
            t_yes, t_no = (re.search(r'"(\w+)"', q).group(1) for q in (yes_q, no_q))
            assert t_yes == scene.text != t_no


# ---------------------------------------------------------------------------------------------
# pixels agree with the spec (renderer checked from the outside, per grid quadrant)
# ---------------------------------------------------------------------------------------------
def _nearest(rgb, table) -> str:
    return min(table, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, table[k])))


def test_rendered_objects_match_spec(ctx_factory):
    rng = np.random.default_rng(11)
    ctx = ctx_factory()
    task = _task("vf_count_all")
    size = 64
    fg_area = {"small": [], "large": []}
    for _ in range(60):
        scene = make_example(task, rng, None, ctx).scene
        px = np.asarray(render(scene, size), dtype=np.int64)
        assert px.shape == (size, size, 3)
        corner = px[0, 0]
        assert _nearest(corner, BACKGROUND_RGB) == scene.background
        fg = np.abs(px - corner).sum(axis=2) > 60
        occupied = {o.cell: o for o in scene.objects}
        for r, row in enumerate(("top", "bottom")):
            for c, col in enumerate(("left", "right")):
                quad = fg[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
                if (row, col) not in occupied:
                    assert quad.sum() == 0, f"empty cell {row} {col} has pixels: {describe(scene)}"
                    continue
                o = occupied[(row, col)]
                # The object's colour = its least blended pixels (edges are anti-aliased into the background).
                qpx = px[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].reshape(-1, 3)
                dist = np.abs(qpx - corner).sum(axis=1)
                mean = qpx[np.argsort(dist)[-6:]].mean(axis=0)
                assert _nearest(mean, {k: COLOR_RGB[k] for k in COLORS}) == o.color, describe(scene)
                fg_area[o.size].append(int(quad.sum()))
    assert max(fg_area["small"]) < min(fg_area["large"]), "small and large objects must not overlap in area"


def test_text_scenes_render_in_their_color(ctx_factory):
    rng = np.random.default_rng(5)
    ctx = ctx_factory()
    for name in ("vf_read_digit", "vf_read_word"):
        for _ in range(20):
            scene = make_example(_task(name), rng, None, ctx).scene
            px = np.asarray(render(scene, 64), dtype=np.int64)
            corner = px[0, 0]
            core = np.abs(px - corner).sum(axis=2) > 120
            assert core.sum() > 20, "text too small to read"
            assert not core[:, :2].any() and not core[:, -2:].any(), "text must not touch the borders"
            mean = px[core].mean(axis=0)
            assert _nearest(mean, {k: COLOR_RGB[k] for k in COLORS}) == scene.text_color


def test_render_is_deterministic_and_jittered(ctx_factory):
    rng = np.random.default_rng(1)
    scene = caption_example(rng, ctx_factory()).scene
    assert png_bytes(render(scene, 64)) == png_bytes(render(scene, 64))
    from dataclasses import replace

    assert png_bytes(render(replace(scene, render_seed=scene.render_seed + 1), 64)) != png_bytes(render(scene, 64))


def test_descriptions():
    from components.data.scenes import Obj, Scene

    s = Scene(
        kind="objects",
        background="black",
        objects=(Obj("circle", "red", "small", "top", "left"), Obj("square", "blue", "large", "bottom", "right")),
    )
    assert describe(s) == (
        "a small red circle at the top left and a large blue square at the bottom right on a black background"
    )
    assert describe(Scene(kind="digit", background="black", text="7", text_color="red")) == (
        "the digit 7 in red on a black background"
    )
    assert set(SHAPES) == set(PLURAL_TO_SHAPE.values())
