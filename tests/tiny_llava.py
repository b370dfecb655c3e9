"""Hand-made rows, images and a very small LLaVA for the backbone/training/inference tests.

Shapes are far below the embedded default (16 px images → 4 image tokens, 2-layer towers) so every
test builds its model in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from components.config import TinyModelParams
from components.data.records import Row

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
TINY = TinyModelParams(
    patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2,
    lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64, vocab_size=300,
)
IMAGE_SIZE = 16


def write_images(root: Path, size: int = IMAGE_SIZE) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rgb in COLORS.items():
        rel = f"{name}.png"
        Image.new("RGB", (size, size), rgb).save(root / rel)
        paths[name] = rel
    return paths


def make_rows(image_root: Path, n: int = 24) -> list[Row]:
    """Colour questions on images (train), captions (align) and text-only questions (text)."""
    paths = write_images(image_root)
    names = list(COLORS)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        rows.append(Row(f"t{i}", "vf_color", "train", "What color is the image?", c, paths[c], "hand", i))
        rows.append(Row(f"a{i}", "caption", "align", "Describe the image.", f"a plain {c} picture", paths[c], "hand", i))
        rows.append(
            Row(f"x{i}", "text_color", "text", f"Image description: a plain {c} picture\nWhat color is it?", c, None, "hand", i)
        )
    return rows


def tiny_model(tmp_path: Path, seed: int = 0):
    """(model, processor, rows, image_root) for a freshly initialised tiny LLaVA."""
    from components.backbone import build_tiny_model, build_tiny_processor, tiny_corpus

    root = tmp_path / "images"
    rows = make_rows(root)
    processor = build_tiny_processor(tiny_corpus(rows), IMAGE_SIZE, TINY)
    model = build_tiny_model(processor, TINY, IMAGE_SIZE, max_length=64, seed=seed)
    return model, processor, rows, root
