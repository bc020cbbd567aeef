"""Reading section images of any size: pyramids, tiles, reduced-scale JPEG, explicit limits.

`read_image(path, downsample=N)` returns the image reduced N times per side, reading no
more than it needs:

* TIFF and OME-TIFF (tifffile, the `wsi` extra): the pyramid level closest below N is
  read (a scanner's sub-resolution IFDs or OME SubIFDs); tiled pages are decoded tile by
  tile and each tile reduced at once, so memory holds the output and one tile, not the
  page. Compressed tiles need the codecs tifffile uses (JPEG-compressed slides:
  `imagecodecs`).
* Other whole-slide formats (.svs, .ndpi, .mrxs, .scn, .vms, .bif) through openslide
  where `openslide-python` is installed (a clear error names the package otherwise).
* JPEG: Pillow's reduced-scale DCT decoding (`draft`: 1/2, 1/4 or 1/8 straight from the
  coefficients), then the remaining integer reduction.
* Anything else Pillow reads (PNG, BMP, plain TIFF): decoded whole, then reduced.

Pillow's decompression-bomb limit (a guard against hostile files) is replaced by an
explicit `max_pixels` on what is *decoded* (after any reduced-scale read), so a
16000x12000 scan read at N=4 decodes 12 MP without a warning, and one read whole must be
allowed for by raising `max_pixels` (`bin/extract --max_pixels`).

`image_info(path)` gives width, height, the pyramid's levels and, where the file says,
micrometres per pixel (TIFF resolution tags or OME PhysicalSizeX), from the header only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ish_tf import fs

DEFAULT_MAX_PIXELS = 400_000_000
TIFF_EXTENSIONS = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
JPEG_EXTENSIONS = (".jpg", ".jpeg")


class ImageReadError(ValueError):
    """An image that cannot be read as asked (format, missing reader, size beyond the limit)."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What a file's header says.

    Attributes:
      width, height: full-resolution size in pixels.
      levels: (width, height) of each pyramid level, full resolution first.
      um_per_pixel: micrometres per full-resolution pixel, None where not recorded.
      reader: "tiff", "openslide" or "pillow".
    """

    width: int
    height: int
    levels: tuple[tuple[int, int], ...]
    um_per_pixel: float | None
    reader: str


# Pillow's limit is a process-wide setting; readers lift it while any of them is active
# (threads of bin/ingest read headers at once) and the last one restores it.
_LIMIT_LOCK = threading.Lock()
_LIMIT_USERS = 0
_SAVED_LIMIT: int | None = None


@contextlib.contextmanager
def pillow_unlimited() -> Iterator[None]:
    """Lifts Pillow's decompression-bomb limit (and so its warnings) inside the block;
    callers check `max_pixels` themselves."""
    global _LIMIT_USERS, _SAVED_LIMIT
    with _LIMIT_LOCK:
        if _LIMIT_USERS == 0:
            _SAVED_LIMIT = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _LIMIT_USERS += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_USERS -= 1
            if _LIMIT_USERS == 0:
                Image.MAX_IMAGE_PIXELS = _SAVED_LIMIT


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(OPENSLIDE_EXTENSIONS):
        return "openslide"
    if low.endswith(TIFF_EXTENSIONS):
        return "tiff"
    return "pillow"


def _remote_kind(path: str) -> str:
    """`_kind`, refusing whole-slide formats at a URL (their readers want a local file).

    Raises:
      ImageReadError: a TIFF or OpenSlide file given as a URL.
    """
    kind = _kind(path)
    if kind != "pillow" and fs.is_url(path):
        raise ImageReadError(f"{path}: {kind} images are read from local paths only (a URL "
                             "works for JPEG, PNG and the other Pillow formats); copy it to "
                             "a local disk or a shared mount")
    return kind


def _tiff_um_per_pixel(tif, page) -> float | None:
    """µm per pixel from OME PhysicalSizeX or the TIFF resolution tags, else None."""
    import xml.etree.ElementTree as ET

    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
                    unit = el.get("PhysicalSizeXUnit", "µm")
                    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
                    if scale:
                        return float(el.get("PhysicalSizeX")) * scale
        except ET.ParseError:
            pass
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if not num or not den or unit not in (2, 3):
        return None
    per_unit = num / den  # pixels per inch (2) or per centimetre (3)
    if per_unit <= 1.0:  # the default 1 pixel per inch of files that record nothing
        return None
    return (25400.0 if unit == 2 else 10000.0) / per_unit


def image_info(path: str) -> ImageInfo:
    """Size, pyramid levels and scale of an image from its header (no pixel decoding).

    Raises:
      FileNotFoundError: no such file.
      ImageReadError: not a readable image, or a whole-slide format without its reader.
    """
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    kind = _remote_kind(path)
    if kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                levels = tuple((int(lv.shape[_axis(lv, "X")]), int(lv.shape[_axis(lv, "Y")]))
                               for lv in series.levels)
                um = _tiff_um_per_pixel(tif, series.levels[0].pages[0])
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError) as e:
            raise ImageReadError(f"{path}: not a readable TIFF ({e})") from e
        return ImageInfo(levels[0][0], levels[0][1], levels, um, "tiff")
    if kind == "openslide":
        slide = _open_slide(path)
        try:
            levels = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
            mpp = slide.properties.get("openslide.mpp-x")
        finally:
            slide.close()
        return ImageInfo(levels[0][0], levels[0][1], levels,
                         float(mpp) if mpp else None, "openslide")
    try:
        with pillow_unlimited(), Image.open(fs.readable(path)) as im:
            w, h = im.size
            um = None
            dpi = im.info.get("dpi")
            if dpi and float(dpi[0]) > 1.0:
                um = 25400.0 / float(dpi[0])
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from e
    return ImageInfo(int(w), int(h), ((int(w), int(h)),), um, "pillow")


def _axis(level, name: str) -> int:
    return level.axes.index(name)


def _open_slide(path: str):
    try:
        import openslide
    except ImportError as e:
        raise ImageReadError(f"{path}: reading this whole-slide format needs openslide "
                             "(pip install openslide-python openslide-bin); TIFF and OME-TIFF "
                             "slides are read without it") from e
    try:
        return openslide.OpenSlide(path)
    except Exception as e:  # openslide raises its own error types
        raise ImageReadError(f"{path}: openslide cannot read it ({e})") from e


def reduced_size(width: int, height: int, downsample: int) -> tuple[int, int]:
    """Size of an image reduced `downsample` times per side (ceil, as Pillow's `reduce`)."""
    return max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample))


def preview_factor(longest: int, target: int) -> int:
    """The smallest power of two that brings `longest` pixels to at most `target`: a
    reduction every reader does cheaply (JPEG DCT scaling, pyramid levels, tile sums)."""
    factor = 1
    while longest / factor > target:
        factor *= 2
    return factor


def _check_pixels(path: str, width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            f"{path}: decoding {what} means {width}x{height} = {width * height:,} pixels, "
            f"beyond --max_pixels={max_pixels:,}; read it at a reduced level (bin/ingest "
            "--downsample=N) or raise --max_pixels if the memory is there")


def _reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).reduce(factor))


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from grey, RGB or RGBA of any integer/float dtype."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer):
            a = (a >> (8 * (a.dtype.itemsize - 1))).astype(np.uint8)
        else:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def read_image(path: str, downsample: int = 1,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image reduced `downsample` times per side, as uint8 (H, W, 3).

    The result is `reduced_size(width, height, downsample)` for every reader (box
    averaging of downsample x downsample blocks, as Pillow's `reduce`, up to the
    rounding of a JPEG's reduced-scale decoding).

    Args:
      path: image file.
      downsample: integer reduction per side (1 = full resolution).
      max_pixels: most pixels decoded at once (after any reduced-scale reading).

    Raises:
      FileNotFoundError: no such file.
      ImageReadError: bad downsample, unknown format, missing reader, beyond max_pixels.
      OSError: corrupt or truncated data (Pillow's and tifffile's own errors).
    """
    downsample = int(downsample)
    if downsample < 1:
        raise ImageReadError(f"{path}: downsample must be >= 1, got {downsample}")
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    kind = _remote_kind(path)
    if kind == "tiff":
        return _read_tiff(path, downsample, max_pixels)
    if kind == "openslide":
        return _read_openslide(path, downsample, max_pixels)
    with pillow_unlimited(), Image.open(fs.readable(path)) as im:
        w, h = im.size
        scale = math.gcd(downsample, 8)  # the DCT scale that divides the reduction
        if im.format == "JPEG" and scale > 1:
            # DCT scaling: 1/2, 1/4 or 1/8 decoded straight from the coefficients.
            im.draft("RGB", reduced_size(w, h, scale))
        dw, dh = im.size
        _check_pixels(path, dw, dh, max_pixels, "the image" if (dw, dh) == (w, h)
                      else f"it at 1/{round(w / dw)} scale")
        im.load()
        rgb = np.asarray(im.convert("RGB"))
    done = max(1, round(w / dw))
    rest = downsample // done
    out = _reduce(rgb, rest)
    tw, th = reduced_size(w, h, downsample)
    if out.shape[:2] != (th, tw):  # draft's rounding: match the size of a plain reduce
        out = np.asarray(Image.fromarray(out).resize((tw, th), Image.BILINEAR))
    return out


def _read_tiff(path: str, downsample: int, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError as e:
        raise OSError(f"not a readable TIFF ({e})") from e
    with tif:
        series = tif.series[0]
        full = series.levels[0]
        w, h = int(full.shape[_axis(full, "X")]), int(full.shape[_axis(full, "Y")])
        # The smallest level that is still at least as fine as the requested scale.
        best, best_factor = full, 1
        for lv in series.levels[1:]:
            lw = int(lv.shape[_axis(lv, "X")])
            factor = w / lw
            # Levels whose factor divides the reduction (the rest is then a box reduce).
            whole = round(factor)
            if (abs(factor - whole) < 0.01 * whole and downsample % whole == 0
                    and factor > best_factor):
                best, best_factor = lv, factor
        page = best.pages[0] if hasattr(best, "pages") else best
        lw, lh = int(best.shape[_axis(best, "X")]), int(best.shape[_axis(best, "Y")])
        rest = max(1, int(round(downsample / best_factor)))
        tw, th = reduced_size(w, h, downsample)
        _check_pixels(path, *reduced_size(lw, lh, rest), max_pixels, "the reduced image")
        if getattr(page, "is_tiled", False) and rest > 1:
            out = _read_tiled_reduced(page, lw, lh, rest)
        else:
            _check_pixels(path, lw, lh, max_pixels,
                          "this level" if best is not full else "the full image")
            out = _reduce(_to_rgb(best.asarray()), rest)
    if out.shape[:2] != (th, tw):  # a level not an exact power: rescale to the plan
        out = np.asarray(Image.fromarray(out).resize((tw, th), Image.BILINEAR))
    return out


def _read_tiled_reduced(page, width: int, height: int, factor: int) -> np.ndarray:
    """A tiled TIFF page reduced `factor` times, decoding one tile at a time.

    Tiles are reduced as they come (box averages within the tile); a tile side that is not
    a multiple of `factor` puts its last partial block's average at the tile's edge, which
    differs from a whole-image reduce only along tile borders by that rounding.
    """
    ow, oh = reduced_size(width, height, factor)
    out = np.zeros((oh, ow, 3), np.float32)
    weight = np.zeros((oh, ow, 1), np.float32)
    for segment, index, shape in page.segments():
        if segment is None:
            continue
        y0, x0 = int(index[-3]), int(index[-2])
        tile = _to_rgb(np.asarray(segment).reshape(shape[-3], shape[-2], -1))
        tile = tile[:max(0, min(tile.shape[0], height - y0)), :max(0, min(tile.shape[1], width - x0))]
        if tile.size == 0:
            continue
        th, tw = tile.shape[:2]
        if y0 % factor == 0 and x0 % factor == 0:
            # Tiles aligned with the blocks (tile sides multiples of the factor, as with
            # power-of-two tiles and factors): block sums by reshaping.
            ph, pw = -(-th // factor) * factor, -(-tw // factor) * factor
            buf = np.zeros((ph, pw, 3), np.float32)
            buf[:th, :tw] = tile
            cnt = np.zeros((ph, pw, 1), np.float32)
            cnt[:th, :tw] = 1.0
            by, bx = y0 // factor, x0 // factor
            shape = (ph // factor, factor, pw // factor, factor)
            out[by:by + shape[0], bx:bx + shape[2]] += buf.reshape(*shape, 3).sum(axis=(1, 3))
            weight[by:by + shape[0], bx:bx + shape[2]] += cnt.reshape(*shape, 1).sum(axis=(1, 3))
            continue
        # Otherwise sum the tile's pixels into the output blocks they fall in.
        ys = (y0 + np.arange(th)) // factor
        xs = (x0 + np.arange(tw)) // factor
        uy, iy = np.unique(ys, return_inverse=True)
        ux, ix = np.unique(xs, return_inverse=True)
        sums = np.zeros((len(uy), len(ux), 3), np.float64)
        counts = np.zeros((len(uy), len(ux), 1), np.float64)
        np.add.at(sums, (iy[:, None], ix[None, :]), tile.astype(np.float64))
        np.add.at(counts, (iy[:, None], ix[None, :]), 1.0)
        out[uy[0]:uy[-1] + 1, ux[0]:ux[-1] + 1] += sums.astype(np.float32)
        weight[uy[0]:uy[-1] + 1, ux[0]:ux[-1] + 1] += counts.astype(np.float32)
    return np.clip(out / np.maximum(weight, 1) + 0.5, 0, 255).astype(np.uint8)


def _read_openslide(path: str, downsample: int, max_pixels: int) -> np.ndarray:
    slide = _open_slide(path)
    try:
        w, h = slide.level_dimensions[0]
        level = slide.get_best_level_for_downsample(downsample + 1e-6)
        lw, lh = slide.level_dimensions[level]
        _check_pixels(path, lw, lh, max_pixels, f"level {level}")
        rgba = np.asarray(slide.read_region((0, 0), level, (lw, lh)))
    finally:
        slide.close()
    # Transparent (unscanned) areas become white slide.
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = (rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    factor = max(1, int(round(downsample * lw / w)))
    out = _reduce(rgb, factor)
    tw, th = reduced_size(w, h, downsample)
    if out.shape[:2] != (th, tw):
        out = np.asarray(Image.fromarray(out).resize((tw, th), Image.BILINEAR))
    return out
