"""Patch extraction at JPEG decode speed: reduced-scale decoding, masks and crops.

A patch is an S×S source window stored at R×R. When S / R is an integer k ≥ 2, most of
the full-resolution decode is wasted: libjpeg can decode at 1/2, 1/4 or 1/8 scale by
dropping DCT coefficients (Pillow's `Image.draft`), which is 2-4× faster than a full
decode. `extract_image_patches_fast` computes the mask and samples at scale 1/d (d the
largest of 8, 4, 2 dividing k, `decode_scale`), but cuts the patches from a decode one
DCT level finer, 1/c with k / c ≥ 2 (`crop_decode_scale`), with an antialiased Lanczos
reduce of each window (`WindowCropper`; its horizontal passes are shared by all windows
of one phase). The mask's 1/d image is a box reduce of the 1/c decode, so there is one
decode. Cropping straight from the 1/d decode was faster but not faithful: that decode
is close to a box filter, not to the full path's Lanczos, and a window off the d-grid
needs a sub-pixel resample on top; sharp content lost up to ~8 dB (bench/RESULTS.md).

Sampling is the full-resolution sampling, exactly: candidates are drawn in source
coordinates from the same generator (`patch_sampling.draw_candidates`), and each one's
foreground count is the count it has on the full-resolution mask that the reduced mask
stands for (each reduced pixel covering its d×d source block), computed in O(1) from a
summed-area table of the reduced mask with fractional edge weights
(`scaled_window_sums`). So for the same mask and seed the same windows are chosen as by
`patch_sampling.sample_patches` on the full-resolution mask (tested); the mask itself,
computed from the reduced image, may differ slightly at tissue edges.

Other formats (PNG, TIFF), non-integer S / R and JPEGs that refuse the draft keep the
full-resolution antialiased path (`patch_sampling.extract_image_patches`). For k = 2 the crop
decode is the full one (c = 1): only the mask and sampling are at 1/2. The patches stay faithful: PSNR against the
Lanczos patches of the same windows is measured by `bench/bench_extract.py` (≥ 35 dB for
every window is the bar).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ish_tf.data.patch_sampling import (
    IO_ATTEMPTS,
    IO_RETRY_DELAY,
    UNREADABLE,
    ImageIOError,
    ImageResult,
    Patch,
    _required_count,
    draw_candidates,
    encode_patch,
    extract_image_patches,
    integral_image,
    masked_windows,
    patches_result,
    retry_io,
    too_small_result,
)

if TYPE_CHECKING:
    from ish_tf.data.patches import ExtractConfig

DCT_SCALES: tuple[int, ...] = (8, 4, 2)  # libjpeg's reduced decodes (1/8, 1/4, 1/2)


def decode_scale(source_size: int, patch_size: int) -> int:
    """The reduction d (1, 2, 4 or 8) to decode at for S×S windows stored at R×R.

    d is the largest DCT scale dividing k = S / R, so a window is k / d reduced pixels per
    patch pixel; 1 (full decode) when S / R is not an integer ≥ 2.
    """
    if patch_size <= 0 or source_size % patch_size:
        return 1
    k = source_size // patch_size
    return next((d for d in DCT_SCALES if k % d == 0), 1)


# --------------------------------------------------------------------------- sampling
def scaled_window_sums(sat: np.ndarray, scale: int, ys: np.ndarray, xs: np.ndarray,
                       size: int) -> np.ndarray:
    """Full-resolution foreground counts of size×size source windows, from a reduced mask.

    The reduced mask m (h, w) stands for the full mask M[y, x] = m[y // d, x // d]. A
    window's rows fall into a first reduced row (weight d - y0 % d), whole rows (weight d)
    and a last one; likewise columns; the weighted sum is nine rectangle sums of m.

    Args:
      sat: (h+1, w+1) `integral_image` of the reduced mask.
      scale: d.
      ys, xs: int (K,) top-left corners in source pixels.
      size: window side S in source pixels (≥ d).

    Returns:
      int64 (K,) counts on M.
    """
    d = int(scale)
    ys = np.asarray(ys, np.int64)
    xs = np.asarray(xs, np.int64)

    def parts(v0):
        last = v0 + size - 1
        i0, i1 = v0 // d, last // d
        w0 = np.where(i1 > i0, d - v0 % d, size)  # weight of the first reduced row
        w1 = np.where(i1 > i0, last % d + 1, 0)   # of the last one (none if the same)
        return i0, i1, w0, w1

    r0, r1, a, b = parts(ys)
    c0, c1, c, e = parts(xs)

    def rect(i0, i1, j0, j1):  # sum of m[i0:i1, j0:j1], empty when i1 <= i0 or j1 <= j0
        i1, j1 = np.maximum(i1, i0), np.maximum(j1, j0)
        return sat[i1, j1].astype(np.int64) - sat[i0, j1] - sat[i1, j0] + sat[i0, j0]

    rows = [(r0, r0 + 1, a), (r0 + 1, r1, d), (r1, r1 + 1, b)]
    cols = [(c0, c0 + 1, c), (c0 + 1, c1, d), (c1, c1 + 1, e)]
    total = np.zeros(len(ys), np.int64)
    for i0, i1, wy in rows:
        for j0, j1, wx in cols:
            total += np.asarray(wy, np.int64) * wx * rect(i0, i1, j0, j1)
    return total


def sample_patches_scaled(mask: np.ndarray, scale: int, height: int, width: int, *, n: int,
                          size: int, min_fraction: float, max_tries: int,
                          rng: np.random.Generator) -> list[tuple[int, int]]:
    """`patch_sampling.sample_patches` on the full-resolution mask a reduced mask stands for.

    Args:
      mask: bool (ceil(H / d), ceil(W / d)) mask at scale 1/d.
      scale: d.
      height, width: H, W of the full-resolution image.
      n, size, min_fraction, max_tries, rng: as `sample_patches` (size in source pixels).

    Returns:
      [(x, y), ...] top-left corners in source pixels, at most n, in draw order: the same
      as `sample_patches(M, ...)` with M[y, x] = mask[y // d, x // d].
    """
    mask = np.asarray(mask, dtype=bool)
    ys, xs = draw_candidates(rng, height, width, size, max_tries)
    if len(ys) == 0:
        return []
    need = _required_count(size, min_fraction)
    ok = scaled_window_sums(integral_image(mask), scale, ys, xs, size) >= need
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i in np.flatnonzero(ok).tolist():
        x, y = int(xs[i]), int(ys[i])
        if (x, y) in seen:
            continue
        out.append((x, y))
        seen.add((x, y))
        if len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------- decode, crop
def open_scaled(path: str, scale: int) -> tuple[Image.Image, int, int] | None:
    """Decodes a JPEG at 1/scale with libjpeg's DCT scaling.

    Returns:
      (RGB image of ceil(W / scale) × ceil(H / scale), W, H), or None when the file is not
      a JPEG or the decoder would not reduce by exactly `scale` (the caller then takes the
      full-resolution path).

    Raises:
      OSError, ValueError, Image.DecompressionBombError: the bytes do not decode.
    """
    from ish_tf import fs
    from ish_tf.data.image_io import pillow_unlimited

    # Pillow's bomb check is on the full size; what is decoded here is 1/scale of it.
    with pillow_unlimited(), Image.open(fs.readable(path)) as im:
        if im.format != "JPEG":
            return None
        width, height = im.size
        want = (math.ceil(width / scale), math.ceil(height / scale))
        # Pillow picks the largest DCT scale whose output is at least the size asked for,
        # computed by floor division: asking for the floor sizes selects exactly 1/scale.
        im.draft("RGB", (max(1, width // scale), max(1, height // scale)))
        if im.size != want:
            return None
        im.load()
        rgb = im.convert("RGB")
    return rgb, width, height


def open_scaled_retrying(path: str, scale: int, attempts: int = IO_ATTEMPTS,
                         delay: float = IO_RETRY_DELAY) -> tuple[Image.Image, int, int] | None:
    """`open_scaled`, with I/O errors (errno set) retried as `read_rgb_retrying` does.

    Raises:
      FileNotFoundError: no such file.
      ImageIOError: an I/O error that persisted over `attempts` reads.
      OSError, ValueError, Image.DecompressionBombError: the bytes do not decode.
    """
    return retry_io(lambda: open_scaled(path, scale), path, attempts, delay)


def crop_decode_scale(source_size: int, patch_size: int) -> int:
    """The reduction c to decode at for cropping: one DCT level under `decode_scale`.

    The windows are cut from a decode at 1/c with c the largest DCT scale (or 1) that
    divides k = S / R and leaves a factor f = k / c ≥ 2 for an antialiased Lanczos reduce:
    a DCT-scaled decode by the whole factor is close to a box filter, not to the Lanczos
    of the full-resolution path, and loses up to ~8 dB on sharp content (bench/RESULTS.md).
    """
    d = decode_scale(source_size, patch_size)
    if d == 1:
        return 1
    k = source_size // patch_size
    return next((c for c in DCT_SCALES if k % c == 0 and k // c >= 2), 1)


class WindowCropper:
    """Source windows as Lanczos-reduced patches, from an image decoded at 1/scale.

    A window (x, y, S) is S / c pixels at scale 1/c, reduced by f = S / (c·R) ≥ 2 with
    Lanczos, i.e. `image.resize((R, R), LANCZOS, box=(x/c, y/c, (x+S)/c, (y+S)/c))`. The
    resize is separable: its horizontal pass depends on x only through the phase x mod
    (c·f), so it is computed once per phase for the whole image (lazily; ≤ c·f of them)
    and each window then takes only its vertical pass, on its own columns. Pillow's
    coefficients do not depend on where the box starts, so this is the per-window resize
    (up to the rounding of the box position; tested).
    """

    def __init__(self, image: Image.Image, scale: int, source_size: int, patch_size: int):
        self.image, self.c, self.size, self.out = image, int(scale), source_size, patch_size
        span = source_size / self.c              # window side at scale 1/c
        self.f = span / patch_size               # remaining reduction, ≥ 2
        self.period = source_size // patch_size  # x mod period sets the phase
        self.margin = int(math.ceil(3 * self.f)) + 2  # Lanczos support (a = 3) + rounding
        self._phases: dict[int, Image.Image] = {}

    def _phase(self, r: int) -> Image.Image:
        """The horizontal Lanczos pass of the whole image for windows with x mod period = r."""
        im = self._phases.get(r)
        if im is None:
            w, h = self.image.size
            x0 = r / self.c
            n = int((w - x0) // self.f)
            im = self._phases[r] = self.image.resize(
                (n, h), Image.LANCZOS, box=(x0, 0, x0 + n * self.f, h))
        return im

    def crop(self, x: int, y: int) -> Image.Image:
        """The source window at (x, y) as an R×R patch."""
        q, r = divmod(int(x), self.period)
        cols = self._phase(r)
        y0, y1 = y / self.c, (y + self.size) / self.c
        lo = max(0, int(y0) - self.margin)
        hi = min(cols.height, int(math.ceil(y1)) + self.margin)
        strip = cols.crop((q, lo, q + self.out, hi))  # whole rows of the kernel support
        return strip.resize((self.out, self.out), Image.LANCZOS,
                            box=(0, y0 - lo, self.out, y1 - lo))


# --------------------------------------------------------------------------- per image
def extract_image_patches_fast(image_path: str, image_id: int, cfg: ExtractConfig,
                               mask_dir: str | None = None,
                               overlay_dir: str | None = None) -> ImageResult:
    """`patch_sampling.extract_image_patches` at the decode scale where it applies.

    JPEG sources with S / R an integer ≥ 2 are decoded at 1/d (`decode_scale`), masked
    there (the cached mask in `mask_dir` is then at 1/d too), sampled in source
    coordinates and cropped without resampling the full image; anything else goes to
    the full-resolution path. Statuses, reasons and `width`/`height` (the full size) are
    as in the full-resolution path.

    Raises:
      ImageIOError: reading the file failed with an I/O error, `IO_ATTEMPTS` times.
    """
    d = decode_scale(cfg.source_size, cfg.patch_size)
    if d == 1:
        return extract_image_patches(image_path, image_id, cfg, mask_dir, overlay_dir)
    c = crop_decode_scale(cfg.source_size, cfg.patch_size)
    try:
        opened = open_scaled_retrying(image_path, c)
    except FileNotFoundError:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: file not found")
    except ImageIOError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: cannot decode image: {e}")
    if opened is None:
        return extract_image_patches(image_path, image_id, cfg, mask_dir, overlay_dir)
    image, w, h = opened
    base = dict(width=w, height=h)
    small = too_small_result(image_path, image_id, cfg, w, h, base)
    if small is not None:
        return small
    # The mask (and the sampling) stay at 1/d: a box reduce of the 1/c decode stands in
    # for the 1/d one.
    rgb = np.asarray(image.reduce(d // c) if d > c else image)
    corners = masked_windows(
        rgb, image_path, image_id, cfg, mask_dir, overlay_dir, base,
        lambda mask, rng: sample_patches_scaled(mask, d, h, w, n=cfg.patches_per_image,
                                                size=cfg.source_size,
                                                min_fraction=cfg.min_fraction,
                                                max_tries=cfg.max_tries, rng=rng))
    if isinstance(corners, ImageResult):
        return corners
    cropper = WindowCropper(image, c, cfg.source_size, cfg.patch_size)
    patches = [Patch(x, y, encode_patch(cropper.crop(x, y), cfg.image_format,
                                        cfg.jpeg_quality))
               for x, y in corners]
    return patches_result(image_id, cfg, patches, base)


def extract_patches(image_path: str, image_id: int, cfg: ExtractConfig,
                    mask_dir: str | None = None, overlay_dir: str | None = None) -> ImageResult:
    """One image's patches by the path `cfg.fast_decode` selects."""
    # An image read at a recorded level (bin/ingest --downsample) takes the general reader.
    fast = getattr(cfg, "fast_decode", False) and getattr(cfg, "read_downsample", 1) == 1
    fn = extract_image_patches_fast if fast else extract_image_patches
    return fn(image_path, image_id, cfg, mask_dir, overlay_dir)
