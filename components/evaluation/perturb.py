"""Image perturbations for the robustness passes of `mrt benchmark`: noise, blur, colour jitter.

Why these three: they are the cheap, label-preserving corruptions a deployed model meets (sensor
noise, defocus/resampling, lighting and white balance), and the paper leaves open whether editing a
handful of representation dimensions makes a frozen model more or less brittle under them than LoRA
or full fine-tuning. Strengths are moderate on purpose: a person still answers every held-out
question correctly, so a score drop measures the model, not a destroyed image.

Determinism: every random draw comes from a generator seeded by (perturb_seed, kind, record id)
through SHA-256, so a record gets the same perturbed image in every run, in any batch order, in
any process — and the three kinds draw independently of each other. Only PIL and numpy are used
(no torchvision: it does not work beside torch 2.13 here), and images stay PIL, so the perturbed
image goes through exactly the processor path a clean one does. Size and mode are kept.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

PERTURBATIONS = ("noise", "blur", "jitter")

# Gaussian pixel noise: standard deviation in 8-bit grey levels (≈ 6% of the range), added per pixel
# and channel independently, then clipped to 0..255.
NOISE_STD = 16.0

# Gaussian blur: radius (PIL's sigma) as a share of the image's shorter side, so a 64-px and a 336-px
# image are blurred alike relative to their content; never below BLUR_MIN_RADIUS pixels.
BLUR_RADIUS_FRACTION = 0.02
BLUR_MIN_RADIUS = 1.0

# Colour jitter, applied in this fixed order with factors drawn uniformly per record:
# brightness, contrast, saturation in [1 - J, 1 + J]; hue rotated by up to ±HUE_SHIFT of the circle.
BRIGHTNESS = 0.25
CONTRAST = 0.25
SATURATION = 0.25
HUE_SHIFT = 0.05  # ±18°: shades move, but red stays red-ish and no colour turns into another name


def rng_for(seed: int, kind: str, record_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, kind, record id) — not on call order or process."""
    digest = hashlib.sha256(f"{int(seed)}\x00{kind}\x00{record_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def add_noise(image: Image.Image, rng: np.random.Generator, std: float = NOISE_STD) -> Image.Image:
    """Additive Gaussian noise on every pixel and channel (mode and size kept).

    8-bit modes whose array is the pixel values (L, RGB, RGBA) are noised directly; any other mode
    (palette, CMYK, 16-bit) goes through RGB and back, since noising palette indices is meaningless.
    """
    work = image if image.mode in ("L", "RGB", "RGBA") else image.convert("RGB")
    arr = np.asarray(work)
    noisy = arr.astype(np.float32) + rng.normal(0.0, std, size=arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return out if work is image else out.convert(image.mode)


def blur_radius(image: Image.Image) -> float:
    return max(BLUR_MIN_RADIUS, BLUR_RADIUS_FRACTION * min(image.size))


def gaussian_blur(image: Image.Image, radius: float | None = None) -> Image.Image:
    """PIL's Gaussian blur (no randomness: the radius follows the image size)."""
    return image.filter(ImageFilter.GaussianBlur(radius=blur_radius(image) if radius is None else radius))


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of an RGB image by `shift` of the circle (−0.5..0.5) through PIL's HSV mode."""
    h, s, v = image.convert("HSV").split()
    delta = int(round(shift * 256))
    hue = ((np.asarray(h, dtype=np.int16) + delta) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation (ImageEnhance) and hue (HSV rotation), in that order."""
    mode = image.mode
    out = image.convert("RGB")
    b, c, s = (rng.uniform(1 - j, 1 + j) for j in (BRIGHTNESS, CONTRAST, SATURATION))
    hue = rng.uniform(-HUE_SHIFT, HUE_SHIFT)
    out = ImageEnhance.Brightness(out).enhance(b)
    out = ImageEnhance.Contrast(out).enhance(c)
    out = ImageEnhance.Color(out).enhance(s)
    out = shift_hue(out, hue)
    return out if mode == "RGB" else out.convert(mode)


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "noise": add_noise,
    "blur": lambda image, _rng: gaussian_blur(image),
    "jitter": color_jitter,
}


def perturb_image(image: Image.Image, kind: str, seed: int, record_id: str) -> Image.Image:
    """`image` under perturbation `kind` (one of PERTURBATIONS), deterministic in (seed, kind, record id).

    Returns a new image of the same size and mode; the input is not modified.
    """
    if kind not in _APPLY:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")
    if not isinstance(image, Image.Image):
        raise TypeError(f"record {record_id}: perturb_image needs a PIL image, got {type(image).__name__}")
    return _APPLY[kind](image, rng_for(seed, kind, record_id))
