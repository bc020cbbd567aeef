"""Scanner and stain perturbations of brightfield section images, for robustness checks.

Each function maps a uint8 (H, W, 3) image to another of the same shape, as a different
scanner, exposure, stain batch or file encoding would: `brightness` (all channels times a
factor, clipped at 255 as a sensor saturates), `saturation` (Pillow's colour enhance),
`hue` (rotation of the HSV hue), `gamma` (255 (I/255)^g) and `jpeg` (re-encoding).
`PERTURBATIONS` lists the set the mask benchmark and tests use (`bench/bench_masks.py`).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance


def brightness(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Every channel times `factor`, clipped to 0..255 (saturating as a sensor does)."""
    return np.clip(rgb.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)


def saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's colour enhancement: 0 = grey, 1 = unchanged, > 1 more saturated."""
    return np.asarray(ImageEnhance.Color(Image.fromarray(rgb)).enhance(factor))


def hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates the hue by `degrees` (HSV, 8-bit hue)."""
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(degrees * 256 / 360)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    """255 (I / 255)^g: g < 1 brightens the mid-tones, g > 1 darkens them."""
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)
    return lut[rgb]


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Re-encodes as JPEG at `quality` and decodes again."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


PERTURBATIONS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("brightness x0.8", lambda a: brightness(a, 0.8)),
    ("brightness x1.15", lambda a: brightness(a, 1.15)),
    ("brightness x1.25", lambda a: brightness(a, 1.25)),
    ("saturation x0.6", lambda a: saturation(a, 0.6)),
    ("saturation x1.2", lambda a: saturation(a, 1.2)),
    ("hue +30", lambda a: hue(a, 30)),
    ("hue -30", lambda a: hue(a, -30)),
    ("gamma 0.7", lambda a: gamma(a, 0.7)),
    ("gamma 1.4", lambda a: gamma(a, 1.4)),
    ("jpeg q30", lambda a: jpeg(a, 30)),
    ("brightness x1.15 + saturation x0.8", lambda a: saturation(brightness(a, 1.15), 0.8)),
)
