"""Whole-section records: one downsampled grayscale section per record (CDAE input).

`bin/extract --whole_images` reads a manifest (`bin/fetch --study=mouse`, `bin/synth`,
`bin/ingest`, any study), computes or reuses each image's tissue mask
(`ish_tf.data.segment`, cached in OUT/masks), crops the image to the mask's bounding
box (plus a margin), pads it to the target aspect ratio with the slide's background
grey level (the median of the non-tissue pixels), converts it to grayscale and resizes
it (Lanczos, antialiased) to `size x round(size * aspect)`. Records use the patch
schema of `ish_tf.data.records` (one record per image, patch_index 0; x, y = the
crop's top-left corner in the original image; source_size = the padded crop's height
in original pixels), in whole-gene shards with the same gene split, index, genes.csv
and resume rules as patch extraction, so `patch_dataset`, `bin/embed` and
`bin/evaluate` read them as is.

Outputs in OUT: shards, index.json, genes.csv, masks/, whole_report.csv (one row per
image: status ok | no_tissue | unreadable, and why), extract_flags.cfg.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from ish_tf.data.patch_sampling import NO_TISSUE, OK, UNREADABLE, encode_patch, read_rgb
from ish_tf.data.patches import (
    ExtractError,
    RecordSetConfig,
    ShardedStage,
    check_background,
    exclusive_out_dir,
    plan_extraction,
    prepare_out_dir,
    select_images,
    write_shards,
)
from ish_tf.data.segment import load_or_compute_mask

REPORT_NAME = "whole_report.csv"
REPORT_COLUMNS: tuple[str, ...] = ("image_id", "gene_symbol", "donor_id", "split", "shard",
                                   "status", "x0", "y0", "x1", "y1", "tissue_fraction", "reason")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WholeConfig(RecordSetConfig):
    """Settings of whole-section extraction: `patches.RecordSetConfig` (manifest, out_dir,
    format, sharding, splits, workers, seed, genes, mask) and the section's size.

    Attributes:
      size: height H of the stored sections.
      aspect: width / height; W = round(H * aspect).
      margin: margin around the tissue's bounding box, fraction of its longer side.
      image_format: "png" (lossless, preferred) or "jpeg".
    """

    size: int = 128
    aspect: float = 1.0
    margin: float = 0.02
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ExtractError(f"whole_size must be >= 8, got {self.size}")
        if self.aspect <= 0:
            raise ExtractError(f"whole_aspect must be > 0, got {self.aspect}")
        if not 0.0 <= self.margin <= 1.0:
            raise ExtractError(f"whole_margin must lie in [0, 1], got {self.margin}")
        super().__post_init__()

    @property
    def width(self) -> int:
        """W = round(size * aspect)."""
        return max(int(round(self.size * self.aspect)), 1)

    def sampling_key(self) -> dict:
        """The settings that determine the records; a resumed run must match them."""
        return {"mode": "whole", "size": self.size, "width": self.width, "margin": self.margin,
                **self.sharing_key()}

    def record_sizes(self) -> tuple[int, int]:
        # S_h x S_w sections of no single source window; a non-square size has no single
        # patch_size (readers then take the shape from the images).
        return 0, (self.size if self.width == self.size else 0)


# --------------------------------------------------------------------------- per image
def tissue_box(mask: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Bounding box of the mask's foreground, grown by a margin, clipped to the image.

    Args:
      mask: bool (H, W), at least one True.
      margin: fraction of the box's longer side added on every side.

    Returns:
      (x0, y0, x1, y1), exclusive ends.

    Raises:
      ValueError: the mask is empty.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask: no tissue bounding box")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = int(round(margin * max(y1 - y0, x1 - x0)))
    h, w = mask.shape
    return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h)


def background_level(gray: np.ndarray, mask: np.ndarray) -> int:
    """The slide's grey level: median of the pixels outside the mask (255 if none)."""
    outside = gray[~mask]
    return int(np.median(outside)) if outside.size else 255


def whole_section(rgb: np.ndarray, mask: np.ndarray, size: int, aspect: float = 1.0,
                  margin: float = 0.02) -> tuple[np.ndarray, tuple[int, int, int, int], int]:
    """Crops a section to its tissue, pads it to the aspect ratio and downsamples it.

    Args:
      rgb: uint8 (H, W, 3).
      mask: bool (H, W) tissue mask with at least one True.
      size: output height S_h.
      aspect: output width / height; S_w = round(S_h * aspect).
      margin: margin around the bounding box (fraction of its longer side).

    Returns:
      (uint8 (S_h, S_w) grayscale section, crop box (x0, y0, x1, y1) in the image,
       side of the padded crop's height in original pixels).

    Raises:
      ValueError: the mask is empty or its shape differs from the image's.
    """
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    x0, y0, x1, y1 = tissue_box(mask, margin)
    bg = background_level(gray, mask)
    crop = gray[y0:y1, x0:x1]
    h, w = crop.shape
    width = max(int(round(size * aspect)), 1)
    target = width / size
    # Pad the short dimension (centred) so the crop has the output's aspect ratio.
    ch, cw = (h, int(np.ceil(h * target))) if w / h < target else (int(np.ceil(w / target)), w)
    canvas = np.full((max(ch, h), max(cw, w)), bg, dtype=np.uint8)
    top, left = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
    canvas[top:top + h, left:left + w] = crop
    out = Image.fromarray(canvas).resize((width, size), Image.LANCZOS, reducing_gap=2.0)
    return np.asarray(out), (x0, y0, x1, y1), int(canvas.shape[0])


@dataclasses.dataclass
class WholeResult:
    """Outcome of one image: status (ok | no_tissue | unreadable), the encoded section."""

    image_id: int
    status: str
    reason: str = ""
    encoded: bytes = b""
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    source_size: int = 0
    tissue_fraction: float = 0.0


def extract_whole_image(image_path: str, image_id: int, cfg: WholeConfig,
                        mask_dir: str | None = None) -> WholeResult:
    """Reads one image, gets its mask and encodes its whole section; never raises for bad images.

    Returns:
      WholeResult with status ok, no_tissue (empty mask) or unreadable (reason says why).
    """
    try:
        rgb = read_rgb(image_path)
    except FileNotFoundError:
        return WholeResult(image_id, UNREADABLE, f"{image_path}: file not found")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return WholeResult(image_id, UNREADABLE, f"{image_path}: cannot decode image: {e}")
    try:
        mask, _ = load_or_compute_mask(rgb, image_id, cfg.mask, mask_dir)
    except Exception as e:  # a segmenter failure must not stop the stage
        return WholeResult(image_id, UNREADABLE, f"{image_path}: mask failed: {e}")
    fraction = float(mask.mean())
    if not mask.any():
        return WholeResult(image_id, NO_TISSUE, f"{image_path}: no tissue found "
                           f"({cfg.mask.segmenter} segmenter)")
    section, box, side = whole_section(rgb, mask, cfg.size, cfg.aspect, cfg.margin)
    encoded = encode_patch(Image.fromarray(section), cfg.image_format, cfg.jpeg_quality)
    return WholeResult(image_id, OK, "", encoded, box, side, fraction)


def _whole_task(args: tuple) -> WholeResult:
    """Worker entry point (top level so it pickles)."""
    image_path, image_id, cfg, mask_dir = args
    try:
        return extract_whole_image(image_path, image_id, cfg, mask_dir)
    except Exception as e:  # never lose the whole shard to one image
        return WholeResult(image_id, UNREADABLE, f"{image_path}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- whole stage
def run_whole(cfg: WholeConfig, progress_enabled: bool | None = None) -> dict:
    """Writes one whole-section record per manifest image into sharded TFRecords (resumable).

    Args:
      cfg: settings.
      progress_enabled: force the progress bar on/off (default: when stderr is a tty).

    Returns:
      Summary dict in the shape of `ish_tf.data.patches.run_extract`'s (so
      `patches.format_summary` prints it): out_dir, report, index, removed_tmp,
      shards_written, shards_resumed, splits {split: images, patches (= records),
      shards, status}, skipped {status: count}.

    Raises:
      ManifestError: unreadable manifest. ExtractError: nothing to extract, OUT holds
      records of other settings, another run is writing OUT, or OUT cannot be written.
    """
    with exclusive_out_dir(cfg.out_dir):
        return _run_whole(cfg, progress_enabled)


def _run_whole(cfg: WholeConfig, progress_enabled: bool | None) -> dict:
    from ish_tf.data import records

    # The same manifest selection, resume rules and summary as patch extraction.
    from ish_tf.data.patches import extract_summary

    df = select_images(cfg)
    check_background(df, cfg)
    info, plans, _ = plan_extraction(df, cfg)
    info.extra["whole"] = {"height": cfg.size, "width": cfg.width, "channels": 1}
    out = cfg.out_dir
    mask_dir = os.path.join(out, "masks")
    removed = prepare_out_dir(out, info, mask_dir)

    def examples(common: dict, row, res: WholeResult) -> list:
        if res.status != OK:
            return []
        return [records.make_example(
            image_encoded=res.encoded, image_format=cfg.image_format, image_height=cfg.size,
            image_width=cfg.width, patch_index=0, x=res.box[0], y=res.box[1],
            source_size=res.source_size, **common)]

    stage = ShardedStage(
        name="whole", worker=_whole_task,
        task=lambda path, row: (path, int(row.image_id), cfg, mask_dir),
        examples=examples,
        report_fields=lambda res: {"x0": res.box[0], "y0": res.box[1], "x1": res.box[2],
                                   "y1": res.box[3],
                                   "tissue_fraction": round(res.tissue_fraction, 4),
                                   "reason": res.reason},
        report_name=REPORT_NAME, report_columns=REPORT_COLUMNS)
    report, written, resumed = write_shards(
        stage, out, cfg.manifest, info, plans, workers=cfg.workers,
        compression=cfg.compression, progress_enabled=progress_enabled)
    return extract_summary(out, report, plans, removed, written, resumed,
                    os.path.join(out, REPORT_NAME))
