"""Question types of the embedded set: phrasings, scene constraints and answers.

Each `TaskType` is one Vision-Flan-style task: several expert-style instruction phrasings and a
maker that samples a scene satisfying the question's preconditions ("the star" must be unique,
"which shape is largest" needs exactly one large object) and computes the answer from the scene
spec. Training types (`vf_…`) and held-out types (`hx_…`) are different *instruction types*, so a
held-out score measures transfer to instructions never tuned on — the paper's zero-shot setting.

Yes/no and multiple-choice makers take a *target* outcome so that the generator can balance
answers exactly (a model that always says "yes" or "A" should score at chance, not above it).
The MME-format subtasks at the bottom ask two questions per image, one true and one false.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .scenes import (
    CELLS,
    COLORS,
    COLS,
    DIGITS,
    ROWS,
    SHAPE_PLURALS,
    SHAPES,
    WORDS,
    Scene,
    describe,
    mnist_scene,
    objects_scene,
    random_objects_scene,
    sample_cells,
    sample_obj,
    text_scene,
)

YES, NO = "yes", "no"
LETTERS = ("A", "B", "C", "D")

CAPTION_TASK = "caption"
CAPTION_PHRASINGS = (
    "Describe the image.",
    "Write a short description of this image.",
    "What does this picture show? Describe it in one sentence.",
    "Give a caption for the image.",
)
TEXT_TEMPLATE = "Image description: {description}\n{instruction}"


@dataclass
class TaskContext:
    """What makers need beyond their rng: the MNIST indices a task may draw from.

    Draws go through a shuffled pool without replacement (wrapping around when exhausted), so a
    held-out MNIST task repeats a digit image only when it asks for more than the pool holds.
    """

    mnist_pool: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    mnist_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _order: np.ndarray | None = None
    _next: int = 0

    def next_mnist(self, rng: np.random.Generator) -> tuple[int, int]:
        if len(self.mnist_pool) == 0:
            raise ValueError("this task needs MNIST digits but the context holds none")
        if self._order is None or self._next >= len(self._order):
            self._order = rng.permutation(self.mnist_pool)
            self._next = 0
        index = int(self._order[self._next])
        self._next += 1
        return index, int(self.mnist_labels[index])


Maker = Callable[[np.random.Generator, "str | None", TaskContext], tuple[Scene, dict, str]]


@dataclass(frozen=True)
class TaskType:
    name: str  # the question type, e.g. "count_shape"
    split: str  # "train" | "heldout"
    answer_kind: str  # word | number | yesno | letter (the benchmark scores each kind its own way)
    phrasings: tuple[str, ...]
    make: Maker
    outcomes: tuple[str, ...] | None = None  # balanced targets; None = answers follow the scene sampler
    real_images: bool = False

    @property
    def task_name(self) -> str:
        return ("vf_" if self.split == "train" else "hx_") + self.name

    @property
    def text_task_name(self) -> str:
        return "text_" + self.name


@dataclass(frozen=True)
class Example:
    scene: Scene
    slots: dict
    instruction: str
    answer: str


def make_example(task: TaskType, rng: np.random.Generator, target: str | None, ctx: TaskContext) -> Example:
    scene, slots, answer = task.make(rng, target, ctx)
    phrasing = task.phrasings[int(rng.integers(len(task.phrasings)))]
    return Example(scene=scene, slots=slots, instruction=phrasing.format(**slots), answer=answer)


def balanced_targets(rng: np.random.Generator, outcomes: tuple[str, ...] | None, n: int) -> list[str | None]:
    """n targets, each outcome floor(n/k) or ceil(n/k) times, in random order."""
    if not outcomes:
        return [None] * n
    k = len(outcomes)
    targets = list(outcomes) * (n // k) + [outcomes[i] for i in rng.permutation(k)[: n % k]]
    return [targets[i] for i in rng.permutation(n)]


def text_instruction(scene: Scene, instruction: str) -> str:
    """The human turn of a text-only record: the scene in words, then the question."""
    return TEXT_TEMPLATE.format(description=describe(scene), instruction=instruction)


# ---------------------------------------------------------------------------------------------
# helpers for makers
# ---------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _n(rng: np.random.Generator, lo: int = 1, hi: int = 4) -> int:
    return int(rng.integers(lo, hi + 1))


def _options(rng: np.random.Generator, correct: str, pool, k: int, target: str) -> tuple[str, str]:
    """("(A) x (B) y (C) z", letter of `correct`), `correct` placed at the target letter."""
    distractors = [pool[i] for i in rng.permutation(len(pool)) if pool[i] != correct][: k - 1]
    pos = LETTERS.index(target)
    opts = distractors[:pos] + [correct] + distractors[pos:]
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts)), target


def _unique_target_scene(
    rng: np.random.Generator,
    *,
    by: str,
    n: int | None = None,
    cells: list[tuple[str, str]] | None = None,
    **target_kwargs,
):
    """A scene whose target object is the only one with its shape (by="shape") or colour (by="color")."""
    n = _n(rng) if n is None else n
    cells = cells or sample_cells(rng, n)
    target = sample_obj(rng, cells[0], **target_kwargs)
    if by == "shape":
        others = [sample_obj(rng, c, not_shapes=(target.shape,)) for c in cells[1:]]
    else:
        others = [sample_obj(rng, c, not_colors=(target.color,)) for c in cells[1:]]
    return objects_scene(rng, [target] + others), target


def _one_large_scene(rng: np.random.Generator):
    n = _n(rng, 2, 4)
    cells = sample_cells(rng, n)
    big = sample_obj(rng, cells[0], size="large")
    return objects_scene(rng, [big] + [sample_obj(rng, c, size="small") for c in cells[1:]]), big


def _with_counts(rng: np.random.Generator, fixed: list[dict], extra: int, **extra_kwargs) -> Scene:
    """Objects with fixed attributes (`fixed`, one dict per object) plus `extra` free ones."""
    cells = sample_cells(rng, len(fixed) + extra)
    objs = [sample_obj(rng, c, **kw) for c, kw in zip(cells, fixed)]
    objs += [sample_obj(rng, c, **extra_kwargs) for c in cells[len(fixed) :]]
    return objects_scene(rng, objs)


# ---------------------------------------------------------------------------------------------
# training makers
# ---------------------------------------------------------------------------------------------
def _shape_single(rng, target, ctx):
    s = random_objects_scene(rng, 1)
    return s, {}, s.objects[0].shape


def _color_single(rng, target, ctx):
    s = random_objects_scene(rng, 1)
    return s, {}, s.objects[0].color


def _size_single(rng, target, ctx):
    s = random_objects_scene(rng, 1)
    return s, {}, s.objects[0].size


def _count_all(rng, target, ctx):
    s = random_objects_scene(rng)
    return s, {}, str(len(s.objects))


def _count_shape(rng, target, ctx):
    shape = _pick(rng, SHAPES)
    n = _n(rng)
    k = int(rng.integers(0, n + 1))
    s = _with_counts(rng, [{"shape": shape}] * k, n - k, not_shapes=(shape,))
    return s, {"shapes": SHAPE_PLURALS[shape]}, str(k)


def _count_color(rng, target, ctx):
    color = _pick(rng, COLORS)
    n = _n(rng)
    k = int(rng.integers(0, n + 1))
    s = _with_counts(rng, [{"color": color}] * k, n - k, not_colors=(color,))
    return s, {"color": color}, str(k)


def _exists_shape(rng, target, ctx):
    shape = _pick(rng, SHAPES)
    n = _n(rng)
    k = _n(rng, 1, n) if target == YES else 0
    s = _with_counts(rng, [{"shape": shape}] * k, n - k, not_shapes=(shape,))
    return s, {"shape": shape}, target


def _exists_color(rng, target, ctx):
    color = _pick(rng, COLORS)
    n = _n(rng)
    k = _n(rng, 1, n) if target == YES else 0
    s = _with_counts(rng, [{"color": color}] * k, n - k, not_colors=(color,))
    return s, {"color": color}, target


def _color_of_shape(rng, target, ctx):
    s, t = _unique_target_scene(rng, by="shape")
    return s, {"shape": t.shape}, t.color


def _shape_of_color(rng, target, ctx):
    s, t = _unique_target_scene(rng, by="color")
    return s, {"color": t.color}, t.shape


def _shape_left_right(rng, target, ctx):
    s, t = _unique_target_scene(rng, by="shape")
    return s, {"shape": t.shape}, t.col


def _shape_top_bottom(rng, target, ctx):
    s, t = _unique_target_scene(rng, by="shape")
    return s, {"shape": t.shape}, t.row


def _what_shape_on_side(rng, target, ctx):
    side = _pick(rng, COLS)
    other = COLS[1 - COLS.index(side)]
    row = _pick(rng, ROWS)
    others = [c for c in CELLS if c[1] == other]
    extra = int(rng.integers(0, len(others) + 1))
    cells = [(row, side)] + [others[i] for i in rng.permutation(len(others))[:extra]]
    s = objects_scene(rng, [sample_obj(rng, c) for c in cells])
    (on_side,) = [o for o in s.objects if o.col == side]
    return s, {"side": side}, on_side.shape


def _read_digit(rng, target, ctx):
    s = text_scene(rng, "digit")
    return s, {}, s.text


def _read_word(rng, target, ctx):
    s = text_scene(rng, "word")
    return s, {}, s.text


def _text_color(rng, target, ctx):
    s = text_scene(rng, "digit" if rng.random() < 0.5 else "word")
    return s, {}, s.text_color


def _choice_shape(rng, target, ctx):
    s = random_objects_scene(rng, 1)
    options, letter = _options(rng, s.objects[0].shape, SHAPES, 3, target)
    return s, {"options": options}, letter


def _choice_color(rng, target, ctx):
    s = random_objects_scene(rng, 1)
    options, letter = _options(rng, s.objects[0].color, COLORS, 3, target)
    return s, {"options": options}, letter


def _largest_shape(rng, target, ctx):
    s, big = _one_large_scene(rng)
    return s, {}, big.shape


def _background(rng, target, ctx):
    s = random_objects_scene(rng)
    return s, {}, s.background


def _more_shape(rng, target, ctx):
    a, b = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    pairs = [(x, y) for x in range(5) for y in range(5) if 1 <= x + y <= 4 and ((x > y) == (target == YES))]
    ca, cb = pairs[int(rng.integers(len(pairs)))]
    extra = int(rng.integers(0, 4 - ca - cb + 1))
    s = _with_counts(rng, [{"shape": a}] * ca + [{"shape": b}] * cb, extra, not_shapes=(a, b))
    return s, {"shape1s": SHAPE_PLURALS[a], "shape2s": SHAPE_PLURALS[b]}, target


def _same_color(rng, target, ctx):
    n = _n(rng, 2, 4)
    if target == YES:
        color = _pick(rng, COLORS)
        colors = [color] * n
    else:
        while True:
            colors = [_pick(rng, COLORS) for _ in range(n)]
            if len(set(colors)) > 1:
                break
    s = _with_counts(rng, [{"color": c} for c in colors], 0)
    return s, {}, target


# ---------------------------------------------------------------------------------------------
# held-out makers
# ---------------------------------------------------------------------------------------------
def _shape_is_color(rng, target, ctx):
    s, t = _unique_target_scene(rng, by="shape")
    color = t.color if target == YES else _pick(rng, COLORS, (t.color,))
    return s, {"shape": t.shape, "color": color}, target


def _count_exact(rng, target, ctx):
    s = random_objects_scene(rng)
    n = len(s.objects)
    number = n if target == YES else int(_pick(rng, [str(i) for i in range(1, 5)], (str(n),)))
    return s, {"number": number, "objects": "object" if number == 1 else "objects"}, target


def _choice_count(rng, target, ctx):
    s = random_objects_scene(rng)
    options, letter = _options(rng, str(len(s.objects)), [str(i) for i in range(1, 5)], 3, target)
    return s, {"options": options}, letter


def _digit_parity(rng, target, ctx):
    s = text_scene(rng, "digit")
    return s, {}, "even" if int(s.text) % 2 == 0 else "odd"


def _color_largest(rng, target, ctx):
    s, big = _one_large_scene(rng)
    return s, {}, big.color


_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _is_shape_at(rng, target, ctx):
    side = _pick(rng, tuple(_WHERE))
    matching = [c for c in CELLS if side in c]
    pool = matching if target == YES else [c for c in CELLS if c not in matching]
    first = pool[int(rng.integers(len(pool)))]
    rest = [c for c in CELLS if c != first]
    n = _n(rng)
    cells = [first] + [rest[i] for i in rng.permutation(len(rest))[: n - 1]]
    s, t = _unique_target_scene(rng, by="shape", cells=cells)
    return s, {"shape": t.shape, "where": _WHERE[side]}, target


def _mnist_choice_digit(rng, target, ctx):
    index, label = ctx.next_mnist(rng)
    options, letter = _options(rng, str(label), DIGITS, 2, target)
    return mnist_scene(index, label), {"options": options}, letter


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
def _t(name, split, kind, make, phrasings, outcomes=None, real_images=False) -> TaskType:
    if outcomes is None and kind == "yesno":
        outcomes = (YES, NO)
    return TaskType(name, split, kind, tuple(phrasings), make, outcomes, real_images)


TRAIN_TYPES: tuple[TaskType, ...] = (
    _t("shape_single", "train", "word", _shape_single, [
        "What shape is the object in the image?",
        "Identify the shape of the object shown in the picture. Answer with one word.",
        "Look at the image and name the geometric shape you see.",
        "Which shape is drawn in this image: a circle, a square, a triangle or a star?",
    ]),
    _t("color_single", "train", "word", _color_single, [
        "What color is the object in the image?",
        "Name the color of the shape shown in the picture.",
        "Look at the image. Which color does the object have? Answer with one word.",
        "Identify the color of the single object in this image.",
    ]),
    _t("size_single", "train", "word", _size_single, [
        "Is the object in the image small or large?",
        "Look at the shape in the picture and tell whether it is small or large.",
        "What size is the object shown in this image? Answer small or large.",
    ]),
    _t("count_all", "train", "number", _count_all, [
        "How many objects are there in the image?",
        "Count the shapes in this picture. Answer with a number.",
        "In this task you are given an image with a few shapes. Count all of them and give the total.",
        "What is the total number of objects shown in the image?",
    ]),
    _t("count_shape", "train", "number", _count_shape, [
        "How many {shapes} are there in the image?",
        "Count the {shapes} in this picture. Answer with a number.",
        "In the image, how many of the objects are {shapes}?",
        "What is the number of {shapes} shown in the image?",
    ]),
    _t("count_color", "train", "number", _count_color, [
        "How many {color} objects are there in the image?",
        "Count the {color} shapes in this picture. Answer with a number.",
        "How many of the objects in the image are {color}?",
    ]),
    _t("exists_shape", "train", "yesno", _exists_shape, [
        "Is there a {shape} in the image?",
        "Does this picture contain a {shape}? Answer yes or no.",
        "Look at the image and tell whether any of the objects is a {shape}.",
        "Can you see a {shape} in this image?",
    ]),
    _t("exists_color", "train", "yesno", _exists_color, [
        "Is there anything {color} in the image?",
        "Does the picture contain a {color} object? Answer yes or no.",
        "Look at the image. Is any of the shapes {color}?",
    ]),
    _t("color_of_shape", "train", "word", _color_of_shape, [
        "What color is the {shape} in the image?",
        "Name the color of the {shape} shown in the picture.",
        "There is one {shape} in this image. Which color does it have?",
    ]),
    _t("shape_of_color", "train", "word", _shape_of_color, [
        "What shape is the {color} object in the image?",
        "Name the shape of the {color} object shown in the picture.",
        "There is one {color} object in this image. What shape is it?",
    ]),
    _t("shape_left_right", "train", "word", _shape_left_right, [
        "Is the {shape} on the left or on the right side of the image?",
        "Look at the picture and tell whether the {shape} is on the left or the right.",
        "On which side of the image is the {shape}, left or right?",
    ]),
    _t("shape_top_bottom", "train", "word", _shape_top_bottom, [
        "Is the {shape} at the top or at the bottom of the image?",
        "Look at the picture and tell whether the {shape} is at the top or the bottom.",
        "In which half of the image is the {shape}, top or bottom?",
    ]),
    _t("what_shape_on_side", "train", "word", _what_shape_on_side, [
        "What shape is on the {side} side of the image?",
        "Only one object is on the {side} of this picture. Name its shape.",
        "Look at the {side} half of the image. Which shape do you see there?",
    ]),
    _t("read_digit", "train", "number", _read_digit, [
        "What digit is shown in the image?",
        "Read the number written in this picture.",
        "Which digit from 0 to 9 appears in the image? Answer with the digit.",
        "Look at the image and write down the digit you see.",
    ]),
    _t("read_word", "train", "word", _read_word, [
        "What word is written in the image?",
        "Read the text in this picture and write it down.",
        "Which word appears in the image?",
        "Transcribe the word shown in the picture.",
    ]),
    _t("text_color", "train", "word", _text_color, [
        "What color is the text in the image?",
        "In which color is the writing in this picture?",
        "Name the color of the characters shown in the image.",
    ]),
    _t("choice_shape", "train", "letter", _choice_shape, [
        "What shape is the object in the image? Options: {options}",
        "Choose the shape shown in the picture. {options} Answer with the letter of the correct option.",
        "{options} Which of these options names the shape in the image?",
    ], outcomes=LETTERS[:3]),
    _t("choice_color", "train", "letter", _choice_color, [
        "What color is the object in the image? Options: {options}",
        "Choose the color of the shape in the picture. {options} Answer with the letter of the correct option.",
        "{options} Which of these options names the color of the object in the image?",
    ], outcomes=LETTERS[:3]),
    _t("largest_shape", "train", "word", _largest_shape, [
        "Which shape is the largest in the image?",
        "One object in this picture is bigger than the others. What shape is it?",
        "Name the shape of the biggest object in the image.",
    ]),
    _t("background", "train", "word", _background, [
        "What color is the background of the image?",
        "Is the background of this picture black, gray or white?",
        "Name the background color of the image.",
    ]),
    _t("more_shape", "train", "yesno", _more_shape, [
        "Are there more {shape1s} than {shape2s} in the image?",
        "Compare the number of {shape1s} and {shape2s} in this picture. Are there more {shape1s}? Answer yes or no.",
        "Does the image contain more {shape1s} than {shape2s}?",
    ]),
    _t("same_color", "train", "yesno", _same_color, [
        "Do all objects in the image have the same color?",
        "Look at the shapes in this picture. Are they all the same color? Answer yes or no.",
        "Is every object in the image the same color?",
    ]),
)

HELDOUT_TYPES: tuple[TaskType, ...] = (
    _t("shape_is_color", "heldout", "yesno", _shape_is_color, [
        "Is the {shape} in the image {color}?",
        "Look at the {shape} in this picture. Is it {color}? Answer yes or no.",
        "Does the {shape} shown in the image have the color {color}?",
    ]),
    _t("count_exact", "heldout", "yesno", _count_exact, [
        "Does the image contain exactly {number} {objects}?",
        "Count the shapes in this picture. Is their number exactly {number}? Answer yes or no.",
        "Is the number of objects in the image equal to {number}?",
    ]),
    _t("choice_count", "heldout", "letter", _choice_count, [
        "How many objects are in the image? Options: {options}",
        "Count the shapes in this picture and choose the right number. {options} Answer with the letter.",
        "{options} Which option gives the number of objects in the image?",
    ], outcomes=LETTERS[:3]),
    _t("digit_parity", "heldout", "word", _digit_parity, [
        "Is the digit in the image odd or even?",
        "Look at the number in this picture. Is it an odd or an even number?",
        "Tell whether the digit shown in the image is even or odd.",
    ]),
    _t("color_largest", "heldout", "word", _color_largest, [
        "What color is the largest object in the image?",
        "One object in this picture is bigger than the others. What color is it?",
        "Name the color of the biggest shape in the image.",
    ]),
    _t("is_shape_at", "heldout", "yesno", _is_shape_at, [
        "Is the {shape} {where} of the image?",
        "Look at the {shape} in this picture. Is it {where}? Answer yes or no.",
        "Tell whether the {shape} shown in the image is located {where}.",
    ]),
    _t("mnist_choice_digit", "heldout", "letter", _mnist_choice_digit, [
        "Which digit is handwritten here? {options}",
        "This image shows a handwritten digit. Which one is it? {options} Answer with the letter.",
        "{options} Which option is the digit written by hand in the image?",
    ], outcomes=LETTERS[:2], real_images=True),
)

ALL_TYPES: tuple[TaskType, ...] = TRAIN_TYPES + HELDOUT_TYPES


# ---------------------------------------------------------------------------------------------
# align: image → caption
# ---------------------------------------------------------------------------------------------
# Captions cover every kind of image the tasks show, MNIST included (from a pool disjoint from the
# held-out MNIST task), so the base can *see* handwritten digits; the held-out task still asks an
# instruction type it was never tuned on.
ALIGN_KIND_WEIGHTS = {"objects": 0.7, "digit": 0.1, "word": 0.1, "mnist": 0.1}


def caption_example(rng: np.random.Generator, ctx: TaskContext) -> Example:
    kinds = tuple(ALIGN_KIND_WEIGHTS)
    kind = kinds[int(rng.choice(len(kinds), p=list(ALIGN_KIND_WEIGHTS.values())))]
    if kind == "mnist" and len(ctx.mnist_pool) == 0:
        kind = "objects"
    if kind == "objects":
        scene = random_objects_scene(rng)
    elif kind == "mnist":
        scene = mnist_scene(*ctx.next_mnist(rng))
    else:
        scene = text_scene(rng, kind)
    phrasing = CAPTION_PHRASINGS[int(rng.integers(len(CAPTION_PHRASINGS)))]
    return Example(scene=scene, slots={}, instruction=phrasing, answer=describe(scene))


# ---------------------------------------------------------------------------------------------
# MME-format subtasks: one image, one true and one false statement
# ---------------------------------------------------------------------------------------------
MME_SUFFIX = " Please answer yes or no."


def _mme_existence(rng):
    present = _pick(rng, SHAPES)
    absent = _pick(rng, SHAPES, (present,))
    n = _n(rng)
    s = _with_counts(rng, [{"shape": present}], n - 1, not_shapes=(absent,))
    return s, f"Is there a {present} in this image?", f"Is there a {absent} in this image?"


def _mme_count(rng):
    s = random_objects_scene(rng)
    n = len(s.objects)
    m = int(_pick(rng, [str(i) for i in range(1, 5)], (str(n),)))

    def q(k: int) -> str:
        return f"Is there {k} object in this image?" if k == 1 else f"Are there {k} objects in this image?"

    return s, q(n), q(m)


def _mme_position(rng):
    s, t = _unique_target_scene(rng, by="shape")
    if rng.random() < 0.5:
        true, false = t.col, COLS[1 - COLS.index(t.col)]
    else:
        true, false = t.row, ROWS[1 - ROWS.index(t.row)]
    return s, f"Is the {t.shape} {_WHERE[true]} of this image?", f"Is the {t.shape} {_WHERE[false]} of this image?"


def _mme_color(rng):
    s = random_objects_scene(rng)
    t = s.objects[int(rng.integers(len(s.objects)))]
    taken = {o.color for o in s.objects if o.shape == t.shape}
    wrong = _pick(rng, COLORS, taken)
    return s, f"Is there a {t.color} {t.shape} in this image?", f"Is there a {wrong} {t.shape} in this image?"


def _mme_ocr(rng):
    kind = "digit" if rng.random() < 0.4 else "word"
    s = text_scene(rng, kind)
    wrong = _pick(rng, DIGITS if kind == "digit" else WORDS, (s.text,))
    noun = "digit" if kind == "digit" else "word"
    return s, f'Is the {noun} in this image "{s.text}"?', f'Is the {noun} in this image "{wrong}"?'


MME_SUBTASKS: dict[str, Callable[[np.random.Generator], tuple[Scene, str, str]]] = {
    "existence": _mme_existence,
    "count": _mme_count,
    "position": _mme_position,
    "color": _mme_color,
    "OCR": _mme_ocr,
}


def mme_example(subtask: str, rng: np.random.Generator) -> tuple[Scene, list[tuple[str, str]]]:
    """(scene, [(question, "Yes"), (question, "No")]) in MME's wording."""
    scene, yes_q, no_q = MME_SUBTASKS[subtask](rng)
    return scene, [(yes_q + MME_SUFFIX, "Yes"), (no_q + MME_SUFFIX, "No")]
