"""Pixels for a `Scene`: PIL drawing on a supersampled canvas, box-filtered down to `size`.

Why supersample: PIL draws polygons without anti-aliasing, and at 64 px a small star would be a
handful of jagged pixels. Drawing at 4x and averaging gives smooth edges that survive resizing by
the model's image processor. All jitter comes from `scene.render_seed`, so one spec renders to the
same bytes every time (PNG output included: no metadata, fixed compression).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scenes import CELLS, Scene

SUPERSAMPLE = 4

COLOR_RGB = {
    "red": (220, 35, 35),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND_RGB = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (238, 238, 238)}
COLOR_JITTER = 14  # per channel, object/text colours
BACKGROUND_JITTER = 14
# Half-extent of an object as a fraction of its grid cell's side; small and large never overlap.
SIZE_RANGE = {"small": (0.15, 0.20), "large": (0.30, 0.37)}
SHAPE_REACH = 1.15  # how far (x half-extent) the widest shape (the star) reaches from its centre
CELL_MARGIN = 0.05
TEXT_HEIGHT = {"digit": (0.50, 0.62), "word": (0.30, 0.38)}  # glyph height / image side
TEXT_MAX_WIDTH = 0.86


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(np.clip(c + x, 0, 255)) for c, x in zip(rgb, d))


def _polygon(cx: float, cy: float, r: float, n: int, inner: float | None = None, start: float = -90.0):
    """Regular polygon (or star when `inner` is given) with its first vertex pointing up."""
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        radius = r if (not inner or k % 2 == 0) else r * inner
        a = math.radians(start + 360.0 * k / steps)
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.9
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        # Centroid-centred equilateral triangle, nudged down so its box is centred on (cx, cy).
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.1, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy + r * 0.08, r * SHAPE_REACH, 5, inner=0.45), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 bundles a scalable font (Aileron); no font file or network needed.
    return ImageFont.load_default(size=size)


def _draw_text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, scene: Scene, side: int, fill) -> None:
    lo, hi = TEXT_HEIGHT[scene.kind]
    target_h = side * rng.uniform(lo, hi)
    font = _font(max(4, int(round(target_h / 0.72))))  # cap height ≈ 0.72 em for this font
    x0, y0, x1, y1 = font.getbbox(scene.text)
    w, h = x1 - x0, y1 - y0
    if w > side * TEXT_MAX_WIDTH:  # long words: shrink to fit
        font = _font(max(4, int(font.size * side * TEXT_MAX_WIDTH / w)))
        x0, y0, x1, y1 = font.getbbox(scene.text)
        w, h = x1 - x0, y1 - y0
    slack_x, slack_y = max(0.0, (side - w) / 2 - side * 0.04), max(0.0, (side - h) / 2 - side * 0.04)
    ox = (side - w) / 2 + rng.uniform(-slack_x, slack_x) * 0.6
    oy = (side - h) / 2 + rng.uniform(-slack_y, slack_y) * 0.6
    draw.text((ox - x0, oy - y0), scene.text, font=font, fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    """An RGB image of `size`x`size` pixels showing `scene`."""
    if scene.kind == "mnist":
        from .mnist import mnist_image

        return mnist_image(scene.mnist_index, size)
    rng = np.random.default_rng(scene.render_seed)
    side = size * SUPERSAMPLE
    # Backgrounds vary in brightness, barely in hue, so "gray" and "white" stay neutral.
    shade = int(rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))
    bg = _jitter_rgb(rng, tuple(c + shade for c in BACKGROUND_RGB[scene.background]), 4)
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    if scene.kind == "objects":
        cell = side / 2
        for o in scene.objects:
            r_lo, r_hi = SIZE_RANGE[o.size]
            r = cell * rng.uniform(r_lo, r_hi)
            reach = r * SHAPE_REACH + cell * CELL_MARGIN
            row, col = CELLS.index(o.cell) // 2, CELLS.index(o.cell) % 2
            cx = col * cell + rng.uniform(reach, max(reach, cell - reach))
            cy = row * cell + rng.uniform(reach, max(reach, cell - reach))
            _draw_shape(draw, o.shape, cx, cy, r, _jitter_rgb(rng, COLOR_RGB[o.color], COLOR_JITTER))
    elif scene.kind in ("digit", "word"):
        _draw_text(draw, rng, scene, side, _jitter_rgb(rng, COLOR_RGB[scene.text_color], COLOR_JITTER))
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return img.resize((size, size), Image.Resampling.BOX)


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression level)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def png_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
