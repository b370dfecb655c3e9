"""One input guard for every door that takes an image: validate, train, predict, benchmark and the
served pyfunc model.

Every door decodes the same way (`to_rgb` below: 16-bit scaled to 8 bits, mode F
refused) and applies the same limits — the `validate` section's `max_image_bytes` and
`max_image_side` (so at most max_image_side² pixels) — read from the image *header*, before a
single pixel is decompressed: a 200 KB PNG that claims 13000×13000 pixels is refused without costing
gigabytes. The CLI sets the limits from the params file it loaded (`configure`); the pyfunc model
takes them from its model_config.

Paths from a request (the pyfunc `image` column) are refused unless the model was logged with
`allow_image_paths: true` and an `image_root`; then they must lie inside that root (symlinks
resolved). The message for a refused path is the same whether or not such a file exists, so a
request cannot probe the server's file system.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ImageRefused(ValueError):
    """An image breaks the guard's rules; the message says which rule (and names the file)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20_000_000
    max_side: int = 4096

    @classmethod
    def from_validate(cls, vp: Any) -> "ImageLimits":
        return cls(max_bytes=int(vp.max_image_bytes), max_side=int(vp.max_image_side))

    @classmethod
    def from_config(cls, cfg: dict | None) -> "ImageLimits":
        cfg = dict(cfg or {})
        d = cls()
        return cls(max_bytes=int(cfg.get("max_image_bytes", d.max_bytes)),
                   max_side=int(cfg.get("max_image_side", d.max_side)))


_LIMITS = ImageLimits()


@dataclass(frozen=True)
class AnswerLimits:
    """`validate`'s answer-length rule, applied by `mrt train` too: training must not learn from an
    answer that `mrt validate` would refuse."""

    min_chars: int = 1
    max_chars: int = 64

    @classmethod
    def from_validate(cls, vp: Any) -> "AnswerLimits":
        return cls(min_chars=int(vp.min_answer_chars), max_chars=int(vp.max_answer_chars))


_ANSWER_LIMITS = AnswerLimits()


def configure_answers(limits: AnswerLimits) -> None:
    """The answer-length rule of this process (the CLI sets it from the params' validate section)."""
    global _ANSWER_LIMITS
    _ANSWER_LIMITS = limits


def answer_limits() -> AnswerLimits:
    return _ANSWER_LIMITS


def configure(limits: ImageLimits) -> None:
    """The limits every door of this process applies (the CLI calls it with the params' validate section)."""
    global _LIMITS
    _LIMITS = limits


def _check_opened(im, n_bytes: int, limits: ImageLimits) -> None:
    if n_bytes > limits.max_bytes:
        raise ImageRefused(f"image has {n_bytes} bytes, more than max_image_bytes={limits.max_bytes}")
    w, h = im.size
    if max(w, h) > limits.max_side:  # min_image_side is a data-quality rule of `mrt validate` only
        raise ImageRefused(f"image is too large ({w}x{h}); each side must be at most {limits.max_side} "
                           "(validate.max_image_side)")
    why = unsupported_image_mode(im.mode)
    if why:
        raise ImageRefused(why)


def check_file(path: str | os.PathLike, limits: ImageLimits | None = None) -> None:
    """Size, header dimensions and mode of an image file, without decoding its pixels (ImageRefused /
    ValueError naming the file)."""
    from PIL import Image

    limits = limits or _LIMITS
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:  # refused before the file is even opened
            raise ImageRefused(f"{path}: image has {size} bytes, more than max_image_bytes={limits.max_bytes}")
        with Image.open(path) as im:
            _check_opened(im, size, limits)
    except ImageRefused as exc:
        msg = str(exc)
        raise ImageRefused(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as exc:  # its header claims far more pixels than any limit
        raise ImageRefused(f"{path}: image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def decode_bytes(data: bytes, limits: ImageLimits | None = None):
    """RGB PIL image from encoded bytes, checked (size, header, mode) before decoding."""
    from PIL import Image

    limits = limits or _LIMITS
    if len(data) > limits.max_bytes:
        raise ImageRefused(f"image has {len(data)} bytes, more than max_image_bytes={limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_opened(im, len(data), limits)
            im.load()
            return to_rgb(im)
    except ImageRefused:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRefused(f"bytes are not a readable image ({type(exc).__name__}: {exc})") from None


def decode_file(path: str | os.PathLike, limits: ImageLimits | None = None):
    """RGB PIL image from a file, checked before decoding; errors name the file."""
    path = Path(path)
    check_file(path, limits)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    try:
        return decode_bytes(data, limits)
    except ImageRefused as exc:
        raise ImageRefused(f"{path}: {exc}") from None


def request_path(text: str, image_root: str | os.PathLike | None, allow_paths: bool) -> Path:
    """The file a request's path names, inside `image_root`; one message for every refusal, whether
    or not a file exists there, so a request learns nothing about files outside the root."""
    from components.data.paths import resolve_image

    refused = ImageRefused("a file path is not accepted here; send the image as base64-encoded bytes"
                           if not (allow_paths and image_root) else
                           "no readable image at that path under the model's image root")
    if not (allow_paths and image_root):
        raise refused
    try:
        path = resolve_image(Path(image_root), text)
    except ValueError:
        raise refused from None
    if not path.is_file():
        raise refused
    return path


# ---------------------------------------------------------------------------------------------
# decoding to RGB
# ---------------------------------------------------------------------------------------------
# 16- and 32-bit integer greyscale (16-bit PNG/TIFF scans, medical and astronomy images).
WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def unsupported_image_mode(mode: str) -> str | None:
    """Why images of this PIL mode are refused, or None. Validation asks the same question as
    `to_rgb`, so a data set that passes validation never fails later on an image mode."""
    if mode == "F":
        return ("32-bit floating-point images (PIL mode F) are not supported: their value range is "
                "undefined; save them as 8- or 16-bit")
    return None


def to_rgb(im):
    """The one rule by which every stage (validate, train, predict, benchmark) turns an image into RGB.

    PIL's own `convert("RGB")` clips 16-bit samples at 255, which turns almost every 16-bit
    greyscale image white. Here 16-bit samples are scaled to 8 bits (v // 257, so 65535 → 255) and
    then replicated to three channels; mode `I` (32-bit int, as which PIL opens some 16-bit files) is
    read as 16-bit samples clipped to 0..65535. Mode F is refused (see `unsupported_image_mode`).
    Every other mode (L, P, RGBA, CMYK, YCbCr, …) goes through `convert("RGB")`, alpha dropped, as
    LLaVA's own loader does.
    """
    import numpy as np
    from PIL import Image

    why = unsupported_image_mode(im.mode)
    if why:
        raise ValueError(why)
    if im.mode in WIDE_INT_MODES:
        wide = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8), mode="L").convert("RGB")
    return im.convert("RGB")  # a copy even for RGB: callers may perturb it in place


def load_image(image: Any):
    """Path or PIL image → RGB PIL image (by `to_rgb`); a clear error names the file. Files pass the
    one input guard (components.data.images: byte, side and mode limits read from the header first)."""
    from PIL import Image

    if image is None:
        return None
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return decode_file(image)

