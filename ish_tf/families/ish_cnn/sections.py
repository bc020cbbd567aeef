"""Reading a section for the ISH CNN: its image, its spot table and its tissue mask.

A section image may be a TIFF/PNG of any bit depth (read as 8-bit grey); its size is
checked against `max_pixels` from the header, before decoding. Spot tables are CSVs of
x, y, gene (scaled to image pixels); masks are PNGs or computed with the classical
segmenter (`ish_tf.data.segment`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from absl import logging
from PIL import Image

SPOT_COLUMNS: tuple[str, str, str] = ("x", "y", "gene")

#: Largest section read by default (pixels): 400 MP is a 20000 x 20000 scan, 400 MB as
#: 8-bit grey. Checked against the size the file declares, before anything is decoded, so
#: a small file declaring a huge image (a decompression bomb) is refused, not allocated.
DEFAULT_MAX_PIXELS = 400_000_000
_PILLOW_GUARD = threading.Lock()


class SpatialError(ValueError):
    """A section, spot table or mask that cannot be used; the message names the file/row."""


@dataclasses.dataclass
class Section:
    """One section ready for labelling.

    Attributes:
      name: identifier (used in records and reports).
      image: uint8 (H, W) grey image.
      spots: DataFrame with float columns x, y and str column gene (pixel coordinates).
      mask: bool (H, W) tissue mask.
      image_path: where the image came from ("" for in-memory sections).
      dropped_spots: spots outside the image that were dropped on loading.
    """

    name: str
    image: np.ndarray
    spots: pd.DataFrame
    mask: np.ndarray
    image_path: str = ""
    dropped_spots: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.image.shape[:2])


# --------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Pillow's own bomb guard handed to our check while one section is opened, and put
    back after: the limit is never lifted for the whole process. `read_section_image`
    refuses anything above `max_pixels` from the header, before decoding."""
    with _PILLOW_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow would refuse at twice its limit with a message that names no size;
        # opening reads the header only, and our check comes before `load`.
        Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1) * 4
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_section_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Reads a section image (TIFF, PNG, ...) as uint8 grey (H, W).

    16-bit and float images are scaled linearly from [0, max] to [0, 255]; colour
    images are converted to luminance.

    Args:
      path: the image file.
      max_pixels: largest image (width x height, as the file declares it) to decode.

    Raises:
      SpatialError: missing or unreadable file, or an image above `max_pixels`, naming it.
    """
    try:
        with _pillow_limit(max_pixels), Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise SpatialError(
                    f"{path}: declares {width}x{height} = {width * height:,} pixels, above "
                    f"--max_pixels={max_pixels:,}; raise --max_pixels if the image is "
                    "genuine (it needs about 1 byte per pixel), or downsample it first")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                top = float(a.max()) if a.size else 0.0
                return (np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8) if top > 0 \
                    else np.zeros(a.shape, np.uint8)
            return np.asarray(im.convert("L"))
    except SpatialError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SpatialError(f"{path}: cannot read the section image: {e}") from e


def read_spot_table(path: str, scale: float = 1.0,
                    columns: Sequence[str] = SPOT_COLUMNS) -> pd.DataFrame:
    """Reads a spot table CSV into columns x, y (float pixels, times `scale`) and gene.

    Args:
      path: CSV file with a header.
      scale: factor from the table's units to image pixels (e.g. 0.5 when the image
        was downsampled twice).
      columns: names of the x, y and gene columns in the file.

    Returns:
      DataFrame (N, 3) with columns x, y, gene.

    Raises:
      SpatialError: unreadable file, missing column, empty table, or a row whose
        coordinate is not a finite number (names the file, line and column).
    """
    if scale <= 0 or not math.isfinite(scale):
        raise SpatialError(f"{path}: spot scale must be a positive number, got {scale}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise SpatialError(f"{path}: cannot read the spot table: {e}") from e
    xc, yc, gc = columns
    missing = [c for c in (xc, yc, gc) if c not in df.columns]
    if missing:
        raise SpatialError(f"{path}: spot table lacks column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise SpatialError(f"{path}: spot table has no rows")
    return spots_frame(df[xc], df[yc], df[gc], scale=scale, source=path,
                       column_names=(xc, yc, gc))


def spots_frame(x, y, gene, scale: float = 1.0, source: str = "<spots>",
                column_names: Sequence[str] = SPOT_COLUMNS) -> pd.DataFrame:
    """Validates raw spot columns into the canonical x, y, gene frame.

    Args:
      x, y: sequences of numbers (or numeric strings), table units.
      gene: sequence of gene names.
      scale: table units -> pixels.
      source: name used in error messages.
      column_names: the source's column names (for messages).

    Returns:
      DataFrame with float64 x, y (pixels) and str gene.

    Raises:
      SpatialError: empty input, or a non-numeric/non-finite coordinate or empty gene
        (naming the line: header = line 1).
    """
    df = pd.DataFrame({"x": pd.Series(x, dtype=object).to_numpy(),
                       "y": pd.Series(y, dtype=object).to_numpy(),
                       "gene": pd.Series(gene, dtype=object).astype(str).str.strip().to_numpy()})
    if df.empty:
        raise SpatialError(f"{source}: spot table has no rows")
    for col, name in (("x", column_names[0]), ("y", column_names[1])):
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SpatialError(f"{source}: line {i + 2}, column '{name}': "
                               f"{df[col].iloc[i]!r} is not a finite number")
        df[col] = values * scale
    empty = (df["gene"] == "") | (df["gene"].str.lower() == "nan")
    if empty.any():
        i = int(np.flatnonzero(empty.to_numpy())[0])
        raise SpatialError(f"{source}: line {i + 2}, column '{column_names[2]}': empty gene name")
    return df.reset_index(drop=True)


def check_spots(spots: pd.DataFrame, shape: tuple[int, int], genes: Sequence[str] = (),
                outside: str = "error", source: str = "<spots>") -> tuple[pd.DataFrame, int]:
    """Checks spots against the image size and the chosen genes.

    Args:
      spots: canonical frame (x, y, gene) in pixels.
      shape: image (H, W).
      genes: chosen genes; each must have at least one spot.
      outside: "error" (raise on the first spot outside the image) or "drop".
      source: name used in messages.

    Returns:
      (spots inside the image, number of dropped spots).

    Raises:
      SpatialError: a spot outside [0, W) x [0, H) with outside="error", a chosen gene
        without spots, or an unknown `outside` policy.
    """
    if outside not in ("error", "drop"):
        raise SpatialError(f"outside policy must be 'error' or 'drop', got {outside!r}")
    h, w = shape
    x, y = spots["x"].to_numpy(), spots["y"].to_numpy()
    # Rounded centres must be valid pixel indices.
    inside = (x > -0.5) & (x < w - 0.5) & (y > -0.5) & (y < h - 0.5)
    if not inside.all() and outside == "error":
        i = int(np.flatnonzero(~inside)[0])
        raise SpatialError(
            f"{source}: line {i + 2}: spot ({x[i]:g}, {y[i]:g}) of gene '{spots['gene'].iloc[i]}' "
            f"is outside the {w} x {h} image (wrong --spot_scale? or pass --outside_spots=drop); "
            f"{int((~inside).sum())} spot(s) are outside")
    kept = spots[inside].reset_index(drop=True)
    present = set(kept["gene"])
    unknown = [g for g in genes if g not in present]
    if unknown:
        have = sorted(present)
        shown = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "")
        raise SpatialError(f"{source}: gene(s) {unknown} have no spots in the image; "
                           f"genes in the table: {shown}")
    return kept, int((~inside).sum())


def load_section(image_path: str, spots_path: str, mask_path: str = "", *, name: str = "",
                 scale: float = 1.0, genes: Sequence[str] = (), outside: str = "error",
                 mask_config=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Section:
    """Reads a section image, its spot table and its mask (or computes the mask).

    Args:
      image_path: the section image.
      spots_path: the spot table CSV.
      mask_path: tissue mask PNG (non-zero = tissue); "" computes it with
        `ish_tf.data.segment.compute_mask(mask_config)`.
      name: section name (default: the image file's stem).
      scale: spot table units -> image pixels.
      genes: chosen genes (checked to have spots).
      outside: policy for spots outside the image ("error" or "drop").
      mask_config: `segment.MaskConfig` for a computed mask (default classical).

    Returns:
      Section.

    Raises:
      SpatialError: unreadable inputs, bad spots, or a mask whose size differs from the image.
    """
    image = read_section_image(image_path, max_pixels)
    spots = read_spot_table(spots_path, scale=scale)
    spots, n_out = check_spots(spots, image.shape, genes, outside, spots_path)
    from ish_tf.data import segment

    if mask_path:
        try:
            mask = segment.load_mask(mask_path)
        except segment.SegmentError as e:
            raise SpatialError(str(e)) from e
        if mask.shape != image.shape:
            raise SpatialError(f"{mask_path}: mask is {mask.shape[1]} x {mask.shape[0]} but the "
                               f"image {image_path} is {image.shape[1]} x {image.shape[0]}")
    else:
        mask_config = mask_config or segment.MaskConfig()
        kind = (segment.guess_background(image) if mask_config.segmenter == "classical"
                else mask_config.background)
        if kind != mask_config.background:
            logging.warning("%s looks like a section on a %s background but the mask assumes a "
                            "%s one, so it would be wrong (give a mask file, or "
                            "--mask_background=%s)", image_path, kind, mask_config.background,
                            kind)
        mask = segment.compute_mask(image, mask_config)
    name = name or os.path.splitext(os.path.basename(image_path))[0]
    return Section(name=name, image=image, spots=spots, mask=mask, image_path=image_path,
                   dropped_spots=n_out)


