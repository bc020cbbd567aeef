"""Patch sampling from one section image: summed-area tables, seeded windows, crop and encode.

A patch is an S×S window of the original image (S = `source_size`, 1024 by default)
whose tissue fraction, read from the image's foreground mask, is at least F
(`min_fraction`, 0.9). Candidates are drawn uniformly at random; up to N patches
(`patches_per_image`, 50) are kept out of at most T candidates (`max_tries`, 500).

With a summed-area table (integral image) of the mask, the foreground count of any
window is four lookups, so all T candidates are scored at once in O(T) after a
table build (for large windows, a table of 8×8 block counts that bounds every
window's count, see `sample_patches`); the naive alternative (`naive_sample_patches`, kept as the
benchmark baseline) re-counts S² mask pixels per candidate. Both draw the same
candidates from the same generator and return identical patches.

Randomness comes only from `np.random.default_rng([seed, image_id])`, so an image's
patches do not depend on which worker processes it or in which order.

`extract_image_patches` does it for one image file (decode, mask, sample, crop, resize,
encode) and reports the outcome in `ImageResult.status`; the sharded run over a manifest
is `ish_tf.data.patches.run_extract`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ish_tf.data.segment import load_or_compute_mask

if TYPE_CHECKING:
    from ish_tf.data.patches import ExtractConfig

# Outcome of one image (`ImageResult.status`).
OK = "ok"
FEW_PATCHES = "few_patches"
TOO_SMALL = "too_small"
NO_TISSUE = "no_tissue"
UNREADABLE = "unreadable"
STATUSES: tuple[str, ...] = (OK, FEW_PATCHES, TOO_SMALL, NO_TISSUE, UNREADABLE)
# Reads of an image that fail with an I/O error (errno set: EIO, EACCES, a stale mount)
# are tried this many times, waiting IO_RETRY_DELAY, 2x, 4x... seconds in between.
IO_ATTEMPTS = 3
IO_RETRY_DELAY = 0.2


class ImageIOError(OSError):
    """An image could not be read for a reason of the input's storage, not of its bytes.

    Raised (not recorded as an `UNREADABLE` image) so that a passing fault of the disk
    or mount cannot become a permanent loss of the image's patches in a resumed run.
    """


# --------------------------------------------------------------------------- sampling
def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a mask, zero-padded on top and left.

    Args:
      mask: bool or 0/1 array (H, W).

    Returns:
      (H+1, W+1) table with `sat[y, x] = mask[:y, :x].sum()`; int32 when H·W < 2^31,
      else int64.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h, w = mask.shape
    dtype = np.int32 if h * w < 2**31 - 1 else np.int64
    sat = np.zeros((h + 1, w + 1), dtype=dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    return sat


def window_sums(sat: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """Foreground counts of size×size windows with top-left corners (ys, xs); O(1) each.

    Args:
      sat: (H+1, W+1) table from `integral_image`.
      ys, xs: int arrays (K,) of top-left corners with `y + size <= H`, `x + size <= W`.
      size: window side.

    Returns:
      int64 (K,) counts.
    """
    ys = np.asarray(ys, dtype=np.int64)
    xs = np.asarray(xs, dtype=np.int64)
    y1, x1 = ys + size, xs + size
    return (sat[y1, x1].astype(np.int64) - sat[ys, x1] - sat[y1, xs] + sat[ys, xs])


def draw_candidates(rng: np.random.Generator, height: int, width: int, size: int,
                    count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uniformly random top-left corners of size×size windows inside the image.

    Returns:
      (ys, xs), int64 (count,) each; empty when the image is smaller than the window.
    """
    if height < size or width < size or count <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ys = rng.integers(0, height - size + 1, size=count, dtype=np.int64)
    xs = rng.integers(0, width - size + 1, size=count, dtype=np.int64)
    return ys, xs


def _required_count(size: int, min_fraction: float) -> int:
    # Integer form of `count / size² >= min_fraction`, robust to float rounding.
    return int(math.ceil(min_fraction * size * size - 1e-9))


BLOCK = 8  # side of the blocks of `block_counts` (the uint64 byte-sum trick needs 8)


def block_counts(mask: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Foreground count of every full block×block tile of a mask.

    Rows are summed 8 pixels at a time by viewing 8 bool bytes as one uint64 and
    adding its bytes with one multiplication, so the pass over the mask costs about an
    eighth of an element-wise sum (the full-resolution integral image is the single
    largest cost of sampling otherwise).

    Args:
      mask: bool (H, W).
      block: tile side (must be 8).

    Returns:
      int32 (H // block, W // block) counts; the last H % block rows and W % block
      columns are not covered.
    """
    if block != 8:
        raise ValueError(f"block must be 8, got {block}")
    h, w = mask.shape
    hc, wc = h // block * block, w // block * block
    if hc == 0 or wc == 0:
        return np.zeros((hc // block, wc // block), np.int32)
    sub = np.ascontiguousarray(np.asarray(mask[:hc, :wc], dtype=bool)).view(np.uint8)
    words = sub.view(np.uint64).reshape(hc, wc // 8)
    # Each byte is 0 or 1; multiplying by 0x0101...01 accumulates all eight into the top byte.
    row_sums = ((words * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int32)
    return row_sums.reshape(hc // block, block, wc // block).sum(axis=1, dtype=np.int32)


def _window_bounds(bsat: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int,
                   block: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of the foreground count of size×size windows, from block counts.

    Lower: the count in the blocks lying wholly inside the window. Upper: the count in
    every block the window touches plus the window's pixels outside the block grid.
    """
    nby, nbx = bsat.shape[0] - 1, bsat.shape[1] - 1
    y1, x1 = ys + size, xs + size

    def rect(i0, i1, j0, j1):
        i1, j1 = np.maximum(i1, i0), np.maximum(j1, j0)
        return (bsat[i1, j1].astype(np.int64) - bsat[i0, j1] - bsat[i1, j0] + bsat[i0, j0])

    # Interior blocks: rows ceil(y/b) .. floor(y1/b), clipped to the grid.
    lo = rect(np.minimum(-(-ys // block), nby), np.minimum(y1 // block, nby),
              np.minimum(-(-xs // block), nbx), np.minimum(x1 // block, nbx))
    hi = rect(np.minimum(ys // block, nby), np.minimum(-(-y1 // block), nby),
              np.minimum(xs // block, nbx), np.minimum(-(-x1 // block), nbx))
    # Window pixels beyond the block grid (last H % b rows, W % b columns) may all be tissue.
    inside_h = np.clip(np.minimum(y1, nby * block) - ys, 0, size)
    inside_w = np.clip(np.minimum(x1, nbx * block) - xs, 0, size)
    hi = hi + size * size - inside_h * inside_w
    return lo, hi


def sample_patches(mask: np.ndarray, *, n: int, size: int, min_fraction: float,
                   max_tries: int, rng: np.random.Generator,
                   sat: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Top-left corners of up to `n` distinct size×size windows with tissue ≥ min_fraction.

    All `max_tries` candidates are drawn at once and scored in O(1) each; the first `n`
    distinct ones that pass are kept, in draw order (the same result as trying them
    one by one, and as `naive_sample_patches`).

    Scoring: for small windows (or when `sat` is given) exactly, with the integral image
    of the mask. For large windows (S ≥ 128), the integral image of 8×8 block counts
    gives, in O(1), bounds of each window's count that differ by at most the ~4·8·S
    pixels along its border; a candidate is accepted or rejected from its bounds alone,
    and counted exactly only when the bounds straddle the threshold (rare, and only
    until n are found). Building the block table reads the mask once at 1/8 of the cost
    of a full-resolution integral image, which would otherwise dominate.

    Args:
      mask: bool (H, W) foreground mask.
      n: most windows to return.
      size: window side S.
      min_fraction: least foreground fraction F of a window.
      max_tries: candidates drawn T.
      rng: seeded generator (advanced by exactly one draw of T corners).
      sat: precomputed `integral_image(mask)`, optional (forces exact scoring).

    Returns:
      [(x, y), ...] top-left corners, at most n.
    """
    mask = np.asarray(mask)
    h, w = mask.shape
    ys, xs = draw_candidates(rng, h, w, size, max_tries)
    if len(ys) == 0:
        return []
    need = _required_count(size, min_fraction)
    if sat is not None or size < 16 * BLOCK:
        if sat is None:
            sat = integral_image(mask)
        # 1 = accept, 0 = reject.
        state = (window_sums(sat, ys, xs, size) >= need).astype(np.int8)
    else:
        counts = block_counts(mask)
        bsat = integral_image(counts)
        lo, hi = _window_bounds(bsat, ys, xs, size, BLOCK)
        # 1 = accept, 0 = reject, -1 = count exactly.
        state = np.where(lo >= need, 1, np.where(hi < need, 0, -1)).astype(np.int8)
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i in np.flatnonzero(state != 0).tolist():
        x, y = int(xs[i]), int(ys[i])
        if (x, y) in seen:
            continue
        if state[i] < 0 and np.count_nonzero(mask[y:y + size, x:x + size]) < need:
            continue
        out.append((x, y))
        seen.add((x, y))
        if len(out) >= n:
            break
    return out


def naive_sample_patches(mask: np.ndarray, *, n: int, size: int, min_fraction: float,
                         max_tries: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Baseline of `sample_patches`: re-counts each candidate's S×S mask window.

    Draws the same candidates from `rng` and returns the same windows; kept for the
    benchmark (`bench/bench_patches.py`) and as a test oracle.
    """
    h, w = np.shape(mask)
    ys, xs = draw_candidates(rng, h, w, size, max_tries)
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        if len(out) >= n:
            break
        if (x, y) in seen:
            continue
        if mask[y:y + size, x:x + size].mean() >= min_fraction:
            out.append((x, y))
            seen.add((x, y))
    return out


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The generator of one image's sampling: a function of (seed, image_id) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF])


# --------------------------------------------------------------------------- per image
@dataclasses.dataclass
class Patch:
    """One extracted patch: top-left (x, y) of its source window and the encoded R×R image."""

    x: int
    y: int
    encoded: bytes


@dataclasses.dataclass
class ImageResult:
    """Outcome of extracting one image.

    Attributes:
      image_id: the image.
      status: one of `STATUSES`.
      reason: human-readable detail (empty for ok).
      patches: extracted patches, in patch_index order.
      width, height: image size (0 if unreadable).
      tissue_fraction: fraction of the image in the mask.
      mask_cached: the mask came from `OUT/masks`.
    """

    image_id: int
    status: str
    reason: str = ""
    patches: list[Patch] = dataclasses.field(default_factory=list)
    width: int = 0
    height: int = 0
    tissue_fraction: float = 0.0
    mask_cached: bool = False

    @property
    def n_patches(self) -> int:
        return len(self.patches)


def read_rgb(path: str, downsample: int = 1, max_pixels: int | None = None) -> np.ndarray:
    """Decodes an image file to uint8 (H, W, 3), reduced `downsample` times per side.

    Pyramidal/tiled TIFF, whole-slide files, reduced-scale JPEG decoding and the
    `max_pixels` limit are `ish_tf.data.image_io.read_image`'s.

    Raises:
      OSError: missing, corrupt or truncated file (Pillow refuses truncated data).
      ImageReadError (a ValueError): beyond `max_pixels`, or a format without its reader.
    """
    from ish_tf.data import image_io

    return image_io.read_image(path, downsample,
                               max_pixels or image_io.DEFAULT_MAX_PIXELS)


def read_rgb_retrying(path: str, attempts: int = IO_ATTEMPTS,
                      delay: float = IO_RETRY_DELAY, downsample: int = 1,
                      max_pixels: int | None = None) -> np.ndarray:
    """`read_rgb`, with I/O errors retried; bad bytes and missing files are not retried.

    Pillow's decode errors (truncated, not an image) carry no errno; the operating
    system's do, and those are worth another try.

    Raises:
      FileNotFoundError: the file does not exist.
      ImageIOError: an I/O error that persisted over `attempts` reads.
      OSError, ValueError, Image.DecompressionBombError: the bytes do not decode.
    """
    return retry_io(lambda: read_rgb(path, downsample, max_pixels), path, attempts, delay)


def retry_io(read: Callable, path: str, attempts: int = IO_ATTEMPTS,
             delay: float = IO_RETRY_DELAY):
    """`read()`, retried with backoff while it fails with an operating-system I/O error.

    Errors without an errno (bad bytes) and a missing file are raised at once; an I/O
    error that persists over `attempts` tries becomes an `ImageIOError` naming `path`.
    """
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno is None:
                raise
            if attempt + 1 == attempts:
                raise ImageIOError(
                    f"{path}: cannot read the image ({e.strerror or e}; {attempts} attempts): "
                    "an I/O error, not a bad image; fix the disk, mount or permissions and "
                    "rerun to resume") from e
            time.sleep(delay * 2 ** attempt)
    raise AssertionError("unreachable")


def encode_patch(patch: Image.Image, image_format: str, jpeg_quality: int = 90) -> bytes:
    """Encodes a patch as JPEG or PNG bytes."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        patch.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        patch.save(buf, format="PNG")
    return buf.getvalue()


def crop_and_resize(image: Image.Image, x: int, y: int, size: int, out_size: int) -> Image.Image:
    """The size×size window at (x, y), resized to out_size×out_size with antialiasing.

    Lanczos with `reducing_gap` first box-reduces by an integer factor (itself an
    antialiasing filter) and then resamples, which is both fast and alias-free.
    """
    if out_size == size:
        return image.crop((x, y, x + size, y + size))
    # `box` resamples straight from the source region (no intermediate crop copy).
    return image.resize((out_size, out_size), Image.LANCZOS, box=(x, y, x + size, y + size),
                        reducing_gap=2.0)


def extract_image_patches(image_path: str, image_id: int, cfg: ExtractConfig,
                          mask_dir: str | None = None,
                          overlay_dir: str | None = None) -> ImageResult:
    """Reads one image, gets its mask, samples windows and encodes the patches.

    Never raises for a bad image: the outcome is in `status` / `reason`. An I/O error of
    the input's storage is retried and, if it persists, raised (`ImageIOError`).

    Args:
      image_path: the image file.
      image_id: its id (seeds the sampling, names the cached mask).
      cfg: extraction settings.
      mask_dir: mask cache directory (`OUT/masks`), or None for no cache.
      overlay_dir: where to save a mask overlay PNG, or None.

    Returns:
      The `ImageResult`: ok (N patches), few_patches (fewer, count in `reason`),
      too_small (image smaller than S), no_tissue (empty mask) or unreadable
      (exception text in `reason`).

    Raises:
      ImageIOError: reading the file failed with an I/O error, `IO_ATTEMPTS` times.
    """
    try:
        rgb = read_rgb_retrying(image_path, downsample=cfg.read_downsample,
                                max_pixels=cfg.max_pixels)
    except FileNotFoundError:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: file not found")
    except ImageIOError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: cannot decode image: {e}")
    h, w = rgb.shape[:2]
    base = dict(width=w, height=h)
    small = too_small_result(image_path, image_id, cfg, w, h, base)
    if small is not None:
        return small
    corners = masked_windows(
        rgb, image_path, image_id, cfg, mask_dir, overlay_dir, base,
        lambda mask, rng: sample_patches(mask, n=cfg.patches_per_image, size=cfg.source_size,
                                         min_fraction=cfg.min_fraction,
                                         max_tries=cfg.max_tries, rng=rng))
    if isinstance(corners, ImageResult):
        return corners
    image = Image.fromarray(rgb)
    patches = [Patch(x, y, encode_patch(crop_and_resize(image, x, y, cfg.source_size,
                                                        cfg.patch_size),
                                        cfg.image_format, cfg.jpeg_quality))
               for x, y in corners]
    return patches_result(image_id, cfg, patches, base)


def too_small_result(image_path: str, image_id: int, cfg: ExtractConfig, w: int, h: int,
                     base: dict) -> ImageResult | None:
    """The too_small outcome of a w x h image (with the size it would need), else None."""
    if h >= cfg.source_size and w >= cfg.source_size:
        return None
    scale = (f" ({cfg.source_um:g} um at {cfg.source_um / cfg.source_size:.4g} um/px)"
             if cfg.source_um else "")
    read = f" read at 1/{cfg.read_downsample}" if cfg.read_downsample > 1 else ""
    return ImageResult(image_id, TOO_SMALL,
                       f"{image_path}: image{read} is {w}x{h}, smaller than source_size "
                       f"{cfg.source_size}{scale}; it needs at least "
                       f"{cfg.source_size}x{cfg.source_size} px", **base)


def masked_windows(rgb: np.ndarray, image_path: str, image_id: int, cfg: ExtractConfig,
                   mask_dir: str | None, overlay_dir: str | None, base: dict,
                   sample: Callable[[np.ndarray, np.random.Generator], list]):
    """Masks `rgb` (cached in `mask_dir`), saves its overlay, and samples the windows.

    Shared by the full-resolution and the reduced-scale (`ish_tf.data.fast_decode`) paths:
    `sample(mask, rng)` returns the window corners in source coordinates. Adds the tissue
    fraction and the cache hit to `base`.

    Returns:
      The corners, or the `ImageResult` of a failed mask (unreadable) or an empty one
      (no_tissue).
    """
    try:
        mask, cached = load_or_compute_mask(rgb, image_id, cfg.mask, mask_dir)
    except Exception as e:  # a segmenter failure must not stop the stage
        return ImageResult(image_id, UNREADABLE, f"{image_path}: mask failed: {e}", **base)
    if overlay_dir:
        from ish_tf.data.segment import save_overlay

        save_overlay(rgb, mask, os.path.join(overlay_dir, f"{int(image_id)}.png"))
    base.update(tissue_fraction=float(mask.mean()), mask_cached=cached)
    if not mask.any():
        return ImageResult(image_id, NO_TISSUE, f"{image_path}: no tissue found "
                           f"({cfg.mask.segmenter} segmenter)", **base)
    return sample(mask, image_rng(cfg.seed, image_id))


def patches_result(image_id: int, cfg: ExtractConfig, patches: list, base: dict) -> ImageResult:
    """ok, or few_patches when fewer windows than asked held enough tissue."""
    if len(patches) < cfg.patches_per_image:
        return ImageResult(image_id, FEW_PATCHES,
                           f"{len(patches)} of {cfg.patches_per_image} windows with tissue >= "
                           f"{cfg.min_fraction:g} in {cfg.max_tries} tries "
                           f"(tissue fraction {base['tissue_fraction']:.2f})", patches, **base)
    return ImageResult(image_id, OK, "", patches, **base)

