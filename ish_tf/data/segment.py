"""Foreground (tissue) masks of ISH section images: a fast classical segmenter and a U-Net.

The classical segmenter scores each pixel by how much darker than the bare slide it is
in its most-absorbing channel: tissue only absorbs light, so whatever the hue of the
stain (purple/blue ISH precipitate, pale pink-grey unstained tissue) at least one
channel drops below the slide's colour, while a grey-level threshold loses faint
sections. The slide's colour is modelled locally (scanner shading and yellowish
mounting medium shift it as much as faint tissue does). Everything runs at a reduced
working resolution (longest side `work_size`, 512 by default) because masks only need
to be as fine as the patch windows they gate; the result is upsampled smoothly.

Steps at working resolution: box-downsample, Gaussian smoothing, slide detection (the
brightest populated mode of the brightness histogram), a block-wise slide colour
model, the darkening score, an automatic threshold a few noise levels above the
slide (so a blank slide gives an empty mask instead of half its noise), one
refinement of the slide estimate, closing then opening, removal of small objects and
filling of enclosed holes up to `max_hole_fraction` of the image. Morphology uses
separable O(H·W) NumPy filters and connected components a vectorised
run-propagation labelling (scipy is not a dependency). Fluorescence sections (tissue
emitting light on a black background, `MaskConfig(background="dark")`) are segmented as
their negative. `MaskConfig(method="od")` scores optical density against the local slide
colour instead of grey levels (exposure and gamma cancel out), and `threshold_mode`
chooses the automatic threshold ("auto", Otsu, triangle) or a fixed one; `sensitivity`
moves it towards or away from the slide.

`UNetSegmenter` runs a trained U-Net (`ish_tf.families.unet.model`) on the downsampled
image instead; `compute_mask(rgb, cfg)` dispatches on `MaskConfig.segmenter`, and
`load_or_compute_mask` caches masks as `OUT/masks/{image_id}.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ish_tf import fs
from ish_tf.io_utils import atomic_open

SEGMENTERS: tuple[str, ...] = ("classical", "unet")
BACKGROUNDS: tuple[str, ...] = ("bright", "dark")
# Scores of the classical segmenter: "od" (optical density relative to the local slide;
# the default) or "deficit" (grey levels below the slide in the darkest channel, what
# record sets extracted before issue 21 used); bench/bench_masks.py measures both under
# exposure, stain and encoding changes.
MASK_METHODS: tuple[str, ...] = ("od", "deficit")
# How the classical threshold is chosen: "auto" (a few noise levels above the slide, at
# least a fraction of the way to the stain), Otsu's or the triangle method on the score
# histogram, or "fixed" (`MaskConfig.threshold`).
THRESHOLD_MODES: tuple[str, ...] = ("auto", "otsu", "triangle", "fixed")


class SegmentError(ValueError):
    """A segmenter that cannot run (bad configuration, unreadable U-Net file, bad input)."""


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How foreground masks are computed.

    Attributes:
      segmenter: "classical" or "unet".
      unet_path: trained U-Net `.keras` file (required for "unet").
      background: "bright" for brightfield sections on a white slide (ISH, the default);
        "dark" for fluorescence sections on a black background, where tissue emits light
        in at least one channel instead of absorbing it (classical segmenter only: a U-Net
        learns its background from its training masks).
      work_size: longest side, in pixels, of the working resolution.
      method: the classical score, "od" (optical density relative to the local slide
        colour in the most absorbing channel: invariant to exposure and gamma, little
        moved by saturation and hue; a saturated slide is handled apart) or "deficit" (grey levels below the local slide in the
        darkest channel, the older score).
      threshold_mode: "auto", "otsu", "triangle" or "fixed" (see `THRESHOLD_MODES`).
      sensitivity: > 1 lowers the automatic threshold towards the slide (fainter tissue
        kept), < 1 raises it; the distance between slide level and threshold is divided
        by it (not used with "fixed").
      threshold: fixed threshold on the score ("deficit": grey levels 0-255 darker than
        the local slide; "od": optical density); given alone it implies mode "fixed".
      min_contrast: least score that can count as tissue (automatic threshold; "deficit"
        grey levels, scaled to optical density for "od").
      rel_threshold: the automatic threshold lies at least this fraction of the way
        from the slide level to the median of stained pixels (for "od" in absorbed
        light); None = the method's own (0.1 "deficit", 0.05 "od").
      smooth: Gaussian radius (working pixels) applied to the score before thresholding.
      close_size: side of the closing filter (odd, working pixels; 1 disables).
      open_size: side of the opening filter (odd, working pixels; 1 disables).
      min_object_fraction: connected tissue pieces smaller than this fraction of the
        image are dropped (dust, debris).
      max_hole_fraction: enclosed background holes up to this fraction of the image are
        filled (vessels, tears); larger ones (ventricles) stay background.
    """

    segmenter: str = "classical"
    unet_path: str | None = None
    background: str = "bright"
    work_size: int = 512
    method: str = "od"
    threshold_mode: str = "auto"
    sensitivity: float = 1.0
    threshold: float | None = None
    min_contrast: float = 10.0
    rel_threshold: float | None = None
    smooth: float = 1.0
    close_size: int = 5
    open_size: int = 3
    min_object_fraction: float = 5e-4
    max_hole_fraction: float = 2e-3

    def __post_init__(self) -> None:
        if self.segmenter not in SEGMENTERS:
            raise SegmentError(f"segmenter must be one of {SEGMENTERS}, got {self.segmenter!r}")
        if self.segmenter == "unet" and not self.unet_path:
            raise SegmentError("segmenter 'unet' needs unet_path (a trained U-Net .keras file)")
        if self.background not in BACKGROUNDS:
            raise SegmentError(f"background must be one of {BACKGROUNDS}, got "
                               f"{self.background!r}")
        if self.segmenter == "unet" and self.background != "bright":
            raise SegmentError("background 'dark' applies to the classical segmenter; a U-Net "
                               "learns its background from its training masks")
        if self.work_size < 16:
            raise SegmentError(f"work_size must be >= 16, got {self.work_size}")
        if self.method not in MASK_METHODS:
            raise SegmentError(f"method must be one of {MASK_METHODS}, got {self.method!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise SegmentError(f"threshold_mode must be one of {THRESHOLD_MODES}, got "
                               f"{self.threshold_mode!r}")
        if self.threshold_mode == "fixed" and self.threshold is None:
            raise SegmentError("threshold_mode 'fixed' needs a threshold value")
        if not self.sensitivity > 0:
            raise SegmentError(f"sensitivity must be > 0, got {self.sensitivity}")
        if not 0 <= self.min_object_fraction < 1:
            raise SegmentError(f"min_object_fraction must lie in [0, 1), got "
                               f"{self.min_object_fraction}")
        for name in ("close_size", "open_size"):
            v = getattr(self, name)
            if v < 1 or v % 2 == 0:
                raise SegmentError(f"{name} must be a positive odd integer, got {v}")


# --------------------------------------------------------------------------- helpers
def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise SegmentError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise SegmentError(f"expected a uint8 image, got {rgb.dtype}")
    return rgb[..., :3]


def downsample(rgb: np.ndarray, work_size: int) -> tuple[np.ndarray, int]:
    """Box-downsamples an image by an integer factor so its longest side is ≤ work_size.

    Args:
      rgb: uint8 (H, W, 3).
      work_size: target longest side.

    Returns:
      (uint8 (h, w, 3), factor) with h = ceil(H / factor).
    """
    factor = max(1, math.ceil(max(rgb.shape[:2]) / work_size))
    if factor == 1:
        return rgb, 1
    # Image.reduce averages factor×factor blocks (antialiased) and is much faster than resize.
    return np.asarray(Image.fromarray(rgb).reduce(factor)), factor


def stain_score(rgb: np.ndarray) -> np.ndarray:
    """The tissue score `255 - min(R, G, B)`: ~0 on white slide, high on stain.

    Args:
      rgb: uint8 (H, W, 3).

    Returns:
      uint8 (H, W).
    """
    return 255 - rgb.min(axis=2)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises between-class variance).

    Args:
      values: uint8 array of any shape.

    Returns:
      t such that `values > t` is the upper class.
    """
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def _dilate_axis(mask: np.ndarray, size: int, axis: int) -> np.ndarray:
    """1-D binary dilation with a centred window of `size` pixels, O(N) via a cumulative sum."""
    r = size // 2
    m = np.moveaxis(mask, axis, 0).astype(np.int32)
    c = np.zeros((m.shape[0] + 2 * r + 1,) + m.shape[1:], dtype=np.int32)
    c[r + 1:r + 1 + m.shape[0]] = m
    np.cumsum(c, axis=0, out=c)
    out = (c[size:size + m.shape[0]] - c[:m.shape[0]]) > 0
    return np.moveaxis(out, 0, axis)


def binary_dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Dilation with a size×size square (separable, any size in O(H·W)); bool (H, W)."""
    if size <= 1:
        return np.asarray(mask, dtype=bool)
    return _dilate_axis(_dilate_axis(np.asarray(mask, dtype=bool), size, 0), size, 1)


def binary_erode(mask: np.ndarray, size: int) -> np.ndarray:
    """Erosion with a size×size square; pixels beyond the border count as foreground."""
    return ~binary_dilate(~np.asarray(mask, dtype=bool), size)


def binary_close(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing (dilate then erode) with a size×size square; bool (H, W)."""
    return binary_erode(binary_dilate(mask, size), size)


def binary_open(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological opening (erode then dilate) with a size×size square; bool (H, W)."""
    return binary_dilate(binary_erode(mask, size), size)


def _run_min_pass(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Within every horizontal run of `mask`, replaces labels by the run's minimum."""
    h, w = mask.shape
    flat = mask.ravel()
    if not flat.any():
        return labels
    starts = flat.copy()
    starts[1:] &= ~flat[:-1]
    starts[::w] = flat[::w]  # a run never continues across a row boundary
    vals = labels.ravel()[flat]
    run_starts = np.flatnonzero(starts[flat])
    run_min = np.minimum.reduceat(vals, run_starts)
    run_id = np.cumsum(starts[flat]) - 1
    out = labels.ravel().copy()
    out[flat] = run_min[run_id]
    return out.reshape(h, w)


def label_components(mask: np.ndarray, max_iter: int = 10_000) -> tuple[np.ndarray, int]:
    """Labels 4-connected components of a boolean image.

    Labels propagate as run minima, alternating row and column passes until stable;
    the number of passes grows with the number of turns a component's paths take, not
    with its area, so typical masks converge in a few dozen passes.

    Args:
      mask: bool (H, W).
      max_iter: safety cap on the number of pass pairs.

    Returns:
      (labels int32 (H, W) with 0 = background and components 1..n, n).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), 0)
    mask_t = np.ascontiguousarray(mask.T)
    for _ in range(max_iter):
        new = _run_min_pass(labels, mask)
        new = np.ascontiguousarray(_run_min_pass(np.ascontiguousarray(new.T), mask_t).T)
        if np.array_equal(new, labels):
            break
        labels = new
    # Each component ends labelled with (its first pixel's flat index + 1), so its root is
    # the one pixel whose label is its own; renumber roots 1..n in raster order (O(N)).
    flat = labels.ravel()
    roots = np.flatnonzero(flat == np.arange(1, h * w + 1))
    lut = np.zeros(h * w + 1, dtype=np.int32)
    lut[roots + 1] = np.arange(1, len(roots) + 1, dtype=np.int32)
    return lut[labels], int(len(roots))


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drops 4-connected components with fewer than `min_size` pixels; bool (H, W)."""
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = label_components(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray, max_size: int | None = None) -> np.ndarray:
    """Fills background regions that do not touch the image border.

    Args:
      mask: bool (H, W).
      max_size: fill only holes of at most this many pixels (None: all holes).

    Returns:
      bool (H, W).
    """
    background = ~mask
    if not background.any():
        return mask
    labels, n = label_components(background)
    border = np.unique(np.concatenate(
        [labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[0] = False
    is_hole[border] = False
    if max_size is not None:
        is_hole &= sizes <= max_size
    return mask | is_hole[labels]


def upsample_mask(small: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Smoothly upsamples a working-resolution mask to the full image.

    The low-resolution mask is interpolated bilinearly and thresholded at one half,
    which gives edges that follow the low-resolution boundary without block steps.

    Args:
      small: bool (h, w), the mask of the box-downsampled image (h = ceil(H / factor)).
      shape: (H, W) of the full image.
      factor: the downsampling factor.

    Returns:
      bool (H, W).
    """
    h_full, w_full = shape
    if factor == 1 and small.shape == (h_full, w_full):
        return small
    h, w = small.shape
    img = Image.fromarray(small.astype(np.uint8) * 255)
    # The working image covers (w*factor, h*factor) source pixels (the last block may be
    # partial): resize to that extent and crop so pixel centres line up.
    big = img.resize((w * factor, h * factor), Image.BILINEAR)
    return np.asarray(big)[:h_full, :w_full] > 127


def guess_background(rgb: np.ndarray) -> str:
    """"bright" or "dark": the kind of slide an image most likely shows.

    Brightfield sections lie on a white slide, so most of the image is bright; fluorescence
    sections lie on black and are mostly dark. The median brightness of a subsample
    (every 4th pixel along each axis) against the middle of the grey scale decides; a hint
    for a warning, not a segmentation.

    Args:
      rgb: uint8 (H, W, 3) (or (H, W) grey).
    """
    rgb = _check_rgb(rgb)
    return "dark" if float(np.median(rgb[::4, ::4].mean(axis=2))) < 96 else "bright"


# --------------------------------------------------------------------------- classical
# A saturated slide (its brightness mode reaching 254-255: an exposure that clips) has no
# noise and shows no shading, while pale tissue is partly clipped to white with it: the
# optical-density segmenter then takes the slide as the pixels within 1 grey level of
# the peak and lowers the automatic threshold's floor and its share of the stain by this
# factor (bench/bench_masks.py: brightness x1.25 on the Allen section).
SATURATED_SCALE = 1 / 8
_SCORE_OFFSET = 32  # keeps slightly-brighter-than-background pixels (negative deficits) in uint8


def slide_level(brightness: np.ndarray, min_mass: float = 0.01) -> tuple[int, int, int]:
    """The brightest well-populated mode of a brightness histogram: the bare slide.

    Sections never cover the whole slide, and the slide is brighter than any tissue,
    so the slide is the brightest histogram peak holding at least `min_mass` of the
    pixels (within ±3 grey levels); its half-maximum width gives the slide's range.

    Args:
      brightness: uint8 (h, w) smoothed mean of the channels.
      min_mass: least fraction of pixels around a peak for it to count.

    Returns:
      (peak, low, high) grey levels; (255, 250, 255) if no peak qualifies.
    """
    hist = np.bincount(brightness.ravel(), minlength=256).astype(np.float64)
    smooth = np.convolve(hist, np.ones(5) / 5, mode="same")
    need = min_mass * brightness.size
    for v in range(255, -1, -1):
        if (smooth[v] > 0 and smooth[v] >= smooth[max(v - 1, 0):v + 2].max()
                and hist[max(v - 3, 0):v + 4].sum() >= need):
            lo = v
            while lo > 0 and smooth[lo - 1] >= smooth[v] / 2:
                lo -= 1
            hi = v
            while hi < 255 and smooth[hi + 1] >= smooth[v] / 2:
                hi += 1
            return v, lo, hi
    return 255, 250, 255


def slide_background(rgb: np.ndarray, background: np.ndarray, grid: int = 8,
                     min_coverage: float = 0.1) -> np.ndarray:
    """Per-channel colour of the bare slide at every pixel, interpolated from blocks.

    Slides are rarely uniformly white: scanner shading and yellowish mounting medium
    shift the background by as much as faint tissue differs from it. The image is cut
    into about `grid` blocks along its longer side; each block with enough background
    pixels contributes their median colour, blocks without are filled ring by ring from
    known neighbours (so the model never extrapolates beyond observed slide colours,
    unlike a fitted surface), and the block grid is upsampled bilinearly.

    Args:
      rgb: uint8 (h, w, 3), the working-resolution image.
      background: bool (h, w), pixels known to be bare slide.
      grid: blocks along the longer side.
      min_coverage: least fraction of a block that must be background to use it.

    Returns:
      float32 (h, w, 3) slide colour. Without any usable block, a constant colour (the
      99th percentile of each channel).
    """
    h, w = background.shape
    gy = max(1, round(grid * h / max(h, w)))
    gx = max(1, round(grid * w / max(h, w)))
    ys = np.linspace(0, h, gy + 1).astype(int)
    xs = np.linspace(0, w, gx + 1).astype(int)
    vals = np.zeros((gy, gx, 3), np.float32)
    known = np.zeros((gy, gx), bool)
    for i in range(gy):
        for j in range(gx):
            block = background[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            if block.size and block.sum() >= max(4, min_coverage * block.size):
                pixels = rgb[ys[i]:ys[i + 1], xs[j]:xs[j + 1]][block]
                vals[i, j] = np.median(pixels, axis=0)
                known[i, j] = True
    if not known.any():
        level = np.percentile(rgb.reshape(-1, 3), 99, axis=0).astype(np.float32)
        return np.broadcast_to(level, (h, w, 3)).copy()
    while not known.all():
        pad_v = np.pad(vals * known[..., None], ((1, 1), (1, 1), (0, 0)))
        pad_k = np.pad(known.astype(np.float32), 1)
        total = sum(pad_v[1 + dy:1 + dy + gy, 1 + dx:1 + dx + gx]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        count = sum(pad_k[1 + dy:1 + dy + gy, 1 + dx:1 + dx + gx]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        new = ~known & (count > 0)
        vals[new] = total[new] / count[new][:, None]
        known |= new
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(vals[..., c]), mode="F")
                                .resize((w, h), Image.BILINEAR)) for c in range(3)], axis=-1)


def tissue_score(rgb: np.ndarray, bg: np.ndarray, method: str = "od") -> np.ndarray:
    """How much a pixel absorbs relative to the local slide colour.

    "od": optical density against the slide in the most absorbing channel,
    `max_c log10((bg_c + 1) / (I_c + 1))`. A change of exposure multiplies slide and
    tissue alike and cancels in the ratio; a gamma scales every density by the same
    factor, which the noise-relative threshold absorbs; the most absorbing channel keeps
    any stain's hue (as the deficit score does), while a grey shading of the slide moves
    every channel by the same small density and stays below the floor.
    "deficit": `max_c (bg_c - I_c)` grey levels, offset by `_SCORE_OFFSET` into uint8
    (the older score, whose threshold is in grey levels).

    Args:
      rgb: uint8 (h, w, 3) working-resolution image.
      bg: float32 (h, w, 3) slide colour (`slide_background`).
      method: "od" or "deficit".

    Returns:
      float32 (h, w) for "od"; uint8 (h, w) for "deficit".
    """
    f = rgb.astype(np.float32)
    if method == "deficit":
        deficit = (bg - f).max(axis=2)
        return np.clip(deficit + _SCORE_OFFSET, 0, 255).astype(np.uint8)
    return np.log10((bg + 1.0) / (f + 1.0)).max(axis=2).astype(np.float32)


def triangle_threshold(values: np.ndarray, bins: int = 256,
                       peak_value: float | None = None) -> float:
    """The triangle method's threshold (Zack et al. 1977) for a dominant low mode.

    A line joins the histogram's peak to its last non-empty bin on the high side; the
    threshold is the bin farthest below that line. It suits a large background mode with
    a long tail of foreground, the shape of a score histogram of a section on a slide.

    Args:
      values: array of any shape (any real dtype).
      bins: histogram bins between the minimum and the maximum.
      peak_value: start the line at this value's bin instead of the highest bin (the
        slide's level, where tissue covers more of the image than the slide).

    Returns:
      t such that `values > t` is the foreground.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    if peak_value is None:
        peak = int(np.argmax(hist))
    else:
        peak = int(np.clip((peak_value - lo) / (hi - lo) * bins, 0, bins - 1))
    last = int(np.flatnonzero(hist)[-1])
    if last <= peak:
        return float(edges[peak + 1])
    x = np.arange(peak, last + 1, dtype=np.float64)
    y = hist[peak:last + 1].astype(np.float64)
    # Distance (up to a constant) of each bin below the line from (peak, max) to (last, h).
    x0, y0, x1, y1 = peak, y[0], last, y[-1]
    dist = (y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0
    return float(edges[peak + int(np.argmax(dist)) + 1])


def _otsu_float(values: np.ndarray, bins: int = 256, absorbed: bool = False) -> float:
    """Otsu's threshold of real values, on a `bins`-bin histogram of their range.

    With `absorbed`, the values are optical densities and the split is made in absorbed
    light `1 - 10^-v` (linear in grey levels), where the darkest stain does not dominate.
    """
    if absorbed:
        a = 1.0 - np.power(10.0, -np.asarray(values, dtype=np.float64))
        t = _otsu_float(a, bins)
        return -math.log10(max(1.0 - t, 1e-6))
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    q = np.clip((v - lo) / (hi - lo) * (bins - 1), 0, bins - 1).astype(np.uint8)
    return lo + (otsu_threshold(q) + 1) * (hi - lo) / (bins - 1)


def choose_threshold(score: np.ndarray, slide: np.ndarray, cfg: MaskConfig,
                     floor_scale: float = 1.0) -> float:
    """The classical segmenter's threshold on `tissue_score` (tissue: score > t).

    "auto": `slide + max(floor, 4 sigma, rel_threshold * (stained - slide)) / sensitivity`
    (slide, sigma: median and MAD of the slide pixels' scores; stained: the median score
    above Otsu's threshold; floor: `min_contrast`, in optical density for "od"). "otsu"
    and "triangle": those methods on the score histogram, moved towards the slide level
    by `sensitivity` (Otsu separates two classes: where pale tissue and a dark stain are
    two, it may split them instead of tissue from slide; triangle suits a slide mode with
    a tail of tissue). "fixed" (or a `threshold` given): that value.

    Args:
      score: (h, w) from `tissue_score`.
      slide: bool (h, w), pixels believed to be bare slide.
      cfg: mask settings.
      floor_scale: multiplies the "auto" floor (`min_contrast`) and `rel_threshold`; the
        optical-density segmenter lowers them where the slide is saturated (no noise, no
        visible shading, and pale tissue partly clipped to white).
    """
    od = cfg.method == "od"
    offset = 0.0 if od else float(_SCORE_OFFSET)
    if cfg.threshold is not None or cfg.threshold_mode == "fixed":
        return float(cfg.threshold) + offset
    ref = score[slide] if slide.any() else score.ravel()
    level = float(np.median(ref))
    if cfg.threshold_mode == "otsu":
        t = _otsu_float(score, absorbed=True) if od else otsu_threshold(score)
        return level + (t - level) / cfg.sensitivity
    if cfg.threshold_mode == "triangle":
        # From the slide's mode (not the highest one: tissue may cover most of the image);
        # in absorbed light for "od", as Otsu.
        if od:
            a = triangle_threshold(1.0 - np.power(10.0, -score.astype(np.float64)),
                                   peak_value=1.0 - 10.0 ** -level)
            t = -math.log10(max(1.0 - a, 1e-6))
        else:
            t = triangle_threshold(score, peak_value=level)
        return level + (t - level) / cfg.sensitivity
    floor = (math.log10(255.0 / (255.0 - min(cfg.min_contrast, 254.0)))
             if od else cfg.min_contrast) * floor_scale
    sigma = 1.4826 * float(np.median(np.abs(ref - level)))
    contrast = max(floor, 4 * sigma)
    otsu = _otsu_float(score) if od else otsu_threshold(score)
    stained = score > max(otsu, level + floor)
    rel = cfg.rel_threshold if cfg.rel_threshold is not None else (0.05 if od else 0.1)
    rel *= floor_scale
    if stained.any():
        stain = float(np.median(score[stained]))
        if od:
            # The fraction of the way to the stain is taken in absorbed light (linear, as
            # the deficit score is), not in density, which the darkest stain dominates.
            a_level, a_stain = 1 - 10 ** -level, 1 - 10 ** -stain
            a_t = min(a_level + rel * (a_stain - a_level), 0.999)
            contrast = max(contrast, -math.log10(1 - a_t) - level)
        else:
            contrast = max(contrast, rel * (stain - level))
    if od or cfg.sensitivity != 1.0:
        return level + contrast / cfg.sensitivity
    return level + contrast


def classical_mask(rgb: np.ndarray, *, cfg: MaskConfig | None = None,
                   return_small: bool = False) -> Any:
    """Tissue mask of a section on a (near-)white slide, or on black; NumPy + Pillow only.

    At working resolution: the slide is found as the brightest well-populated mode of
    the brightness histogram (`slide_level`); its local colour is modelled block-wise
    (`slide_background`); each pixel is scored by how much darker than the local slide
    it is in its most-absorbing channel (tissue only absorbs light, whatever the stain's
    hue); the score is thresholded at `slide + max(min_contrast, 4 sigma,
    rel_threshold * (stained - slide))` (slide, sigma: median and MAD of the slide's
    scores; stained: median above Otsu's threshold). The slide estimate is refined once
    from the first mask. Then closing, opening, small-object removal, filling of small
    holes and a smooth upsampling to full size.

    Fluorescence sections (`cfg.background == "dark"`) are inverted first: on a black
    background tissue emits light in at least one channel, so in the negative it darkens
    at least one channel of a bright background, and every step above applies unchanged.

    Args:
      rgb: uint8 (H, W, 3) (or (H, W) grey, or RGBA: alpha ignored).
      cfg: mask settings (default `MaskConfig()`).
      return_small: also return the working-resolution mask and the factor.

    Returns:
      bool (H, W), True on tissue; with `return_small`, (mask, small (h, w), factor).

    Raises:
      SegmentError: the input is not a uint8 image.
    """
    cfg = cfg or MaskConfig()
    rgb = _check_rgb(rgb)
    small_rgb, factor = downsample(rgb, cfg.work_size)
    if cfg.background == "dark":
        small_rgb = 255 - small_rgb
    h, w = small_rgb.shape[:2]
    if cfg.smooth > 0:
        small_rgb = np.asarray(Image.fromarray(small_rgb).filter(
            ImageFilter.GaussianBlur(cfg.smooth)))
    brightness = (small_rgb.astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)
    peak, lo, hi = slide_level(brightness)
    floor_scale = 1.0
    if cfg.method == "od" and hi >= 254:
        # A saturated slide: clipped pale tissue merges into its mode (see SATURATED_SCALE).
        floor_scale = SATURATED_SCALE
        lo = max(lo, peak - 1)
    slide = (brightness >= lo) & (brightness <= hi)
    margin = 2 * max(1, round(0.01 * max(h, w))) + 1  # keeps the pale rim out of the slide
    for _ in range(2):
        bg = slide_background(small_rgb, slide)
        score = tissue_score(small_rgb, bg, cfg.method)
        t = choose_threshold(score, slide, cfg, floor_scale)
        small = score > t
        slide = ~binary_dilate(small, margin)
    small = binary_close(small, cfg.close_size)
    small = binary_open(small, cfg.open_size)
    area = small.size
    small = remove_small_objects(small, int(math.ceil(cfg.min_object_fraction * area)))
    small = fill_holes(small, int(cfg.max_hole_fraction * area))
    mask = upsample_mask(small, rgb.shape[:2], factor)
    if return_small:
        return mask, small, factor
    return mask


# --------------------------------------------------------------------------- U-Net
class UNetSegmenter:
    """Runs a trained U-Net (`ish_tf.families.unet.model.build_unet`) on a downsampled image.

    The image is resized to the model's square input (as in `mask_pair_dataset`, so
    training and inference see the same distortion), the sigmoid output is resized
    back to the image and thresholded.
    """

    def __init__(self, model: Any, threshold: float = 0.5):
        self.model = model
        self.threshold = threshold
        shape = model.input_shape
        self.input_size = int(shape[1]) if shape[1] is not None else 256

    @classmethod
    def load(cls, path: str, threshold: float = 0.5) -> UNetSegmenter:
        """Loads a `.keras` U-Net saved by `ish_tf.families.unet.model.train_unet`.

        Raises:
          SegmentError: the file is missing or not a loadable Keras model.
        """
        if not os.path.exists(path):
            raise SegmentError(f"{path}: U-Net model file not found")
        import keras

        # Plain Keras layers only (the U-Net's loss is not needed with compile=False),
        # so this data module need not import the family.
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:  # keras raises several types for bad files
            raise SegmentError(f"{path}: cannot load the U-Net: {e}") from e
        return cls(model, threshold)

    def predict_proba(self, rgb: np.ndarray) -> np.ndarray:
        """Tissue probability at full resolution, float32 (H, W)."""
        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        small = np.asarray(Image.fromarray(rgb).resize(
            (self.input_size, self.input_size), Image.BILINEAR, reducing_gap=2.0))
        prob = self.model.predict(small[None].astype(np.float32), verbose=0)[0, ..., 0]
        prob_img = Image.fromarray(np.asarray(prob, dtype=np.float32), mode="F")
        return np.asarray(prob_img.resize((w, h), Image.BILINEAR), dtype=np.float32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """bool (H, W) mask."""
        return self.predict_proba(rgb) > self.threshold


_UNETS: dict[str, UNetSegmenter] = {}


def compute_mask(rgb: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Foreground mask with the segmenter `cfg.segmenter`; bool (H, W).

    Raises:
      SegmentError: bad input or U-Net that cannot be loaded.
    """
    if cfg.segmenter == "classical":
        return classical_mask(rgb, cfg=cfg)
    seg = _UNETS.get(cfg.unet_path)  # loaded once per process
    if seg is None:
        seg = _UNETS[cfg.unet_path] = UNetSegmenter.load(cfg.unet_path)
    return seg(rgb)


# --------------------------------------------------------------------------- cache, overlay
def mask_path(mask_dir: str, image_id: int) -> str:
    """`mask_dir/{image_id}.png`."""
    return os.path.join(mask_dir, f"{int(image_id)}.png")


def save_mask(mask: np.ndarray, path: str) -> None:
    """Writes a bool (H, W) mask as a 1-bit PNG, atomically."""
    with atomic_open(path, "wb") as f:  # a file object: OUT may be a URL (ish_tf.fs)
        Image.fromarray(np.asarray(mask, dtype=bool)).save(f, format="PNG")


def load_mask(path: str) -> np.ndarray:
    """Reads a mask PNG (any mode; non-zero = foreground) as bool (H, W).

    Raises:
      SegmentError: the file cannot be read as an image.
    """
    from ish_tf.data.image_io import pillow_unlimited

    try:  # masks are as large as the images read (no bomb check: we wrote them)
        with pillow_unlimited(), Image.open(fs.readable(path)) as im:
            return np.asarray(im.convert("L")) > 0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SegmentError(f"{path}: cannot read mask: {e}") from e


def load_or_compute_mask(rgb: np.ndarray, image_id: int, cfg: MaskConfig,
                         mask_dir: str | None) -> tuple[np.ndarray, bool]:
    """The cached mask of an image if valid, else a freshly computed (and cached) one.

    Args:
      rgb: uint8 (H, W, 3).
      image_id: the image's id (cache key).
      cfg: mask settings.
      mask_dir: cache directory; None disables caching.

    Returns:
      (bool (H, W) mask, True if it came from the cache).
    """
    path = mask_path(mask_dir, image_id) if mask_dir else None
    if path and fs.exists(path):
        try:
            mask = load_mask(path)
            if mask.shape == rgb.shape[:2]:
                return mask, True
        except SegmentError:
            pass  # unreadable cache entry: recompute and overwrite it
    mask = compute_mask(rgb, cfg)
    if path:
        save_mask(mask, path)
    return mask, False


def save_overlay(rgb: np.ndarray, mask: np.ndarray, path: str, max_size: int = 1200,
                 color: tuple[int, int, int] = (0, 200, 0), alpha: float = 0.35) -> None:
    """Saves a PNG of the image with the mask tinted and its outline drawn, for eyeballing.

    Args:
      rgb: uint8 (H, W, 3).
      mask: bool (H, W).
      path: output PNG (written atomically).
      max_size: longest side of the overlay.
      color: tint of tissue pixels.
      alpha: tint strength.
    """
    rgb = _check_rgb(rgb)
    img = Image.fromarray(rgb)
    m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    scale = min(1.0, max_size / max(img.size))
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR, reducing_gap=2.0)
        m = m.resize(size, Image.NEAREST)
    a = np.asarray(img).astype(np.float32)
    mm = np.asarray(m) > 127
    tint = np.asarray(color, dtype=np.float32)
    a[mm] = (1 - alpha) * a[mm] + alpha * tint
    edge = mm ^ (np.asarray(Image.fromarray(mm.astype(np.uint8) * 255)
                            .filter(ImageFilter.MinFilter(3))) > 127)
    a[edge] = (255, 0, 0)
    with atomic_open(path, "wb") as f:
        Image.fromarray(a.astype(np.uint8)).save(f, format="PNG")
