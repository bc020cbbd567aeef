"""Mask quality control for `bin/extract`: outlying tissue fractions and a contact sheet.

A tissue mask that fails does so quietly: a paler scan gives a mask of the darkest
structures only, its image yields few patches and only a count in the report shows it.
After extraction, `find_outliers` compares each masked image's tissue fraction with the
typical value of its donor (median and spread of the donor's images; the collection's
where the donor has fewer than `MIN_GROUP` masked images) and names those far from it;
`write_contact_sheet` writes `OUT/mask_qc.html` with overlays (mask tinted over the image,
thumbnails in `OUT/mask_qc/`) of the sections with the lowest and the highest tissue
fractions and of every outlier, so a glance shows whether the masks hold.
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ish_tf import fs
from ish_tf.io_utils import atomic_open

SHEET_NAME = "mask_qc.html"
THUMB_DIR = "mask_qc"
MIN_GROUP = 3  # masked images a donor needs for its own typical value
# An image is an outlier when its fraction lies further from the typical value than
# `SPREADS` robust standard deviations and at least `MIN_GAP` in absolute terms (so that a
# donor of near-identical sections does not flag a 0.02 difference).
SPREADS = 3.0
MIN_GAP = 0.2
MASKED_STATUSES = ("ok", "few_patches", "no_tissue")


@dataclasses.dataclass(frozen=True)
class Outlier:
    """An image whose tissue fraction is far from its group's typical value."""

    image_id: int
    donor_id: str
    tissue_fraction: float
    typical: float
    spread: float
    group: str  # "donor" or "collection"

    def describe(self) -> str:
        return (f"image {self.image_id} (donor {self.donor_id}): tissue fraction "
                f"{self.tissue_fraction:.2f}, its {self.group}'s typical "
                f"{self.typical:.2f} ± {self.spread:.2f}")


def _typical(values: np.ndarray) -> tuple[float, float]:
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def find_outliers(report: pd.DataFrame) -> list[Outlier]:
    """Images whose tissue fraction is far from their donor's (or the collection's) typical.

    Args:
      report: rows with image_id, donor_id, status, tissue_fraction (the extract report).

    Returns:
      Outliers, furthest first.
    """
    masked = report[report["status"].astype(str).isin(MASKED_STATUSES)].copy()
    if len(masked) < MIN_GROUP:
        return []
    masked["tissue_fraction"] = pd.to_numeric(masked["tissue_fraction"], errors="coerce")
    masked = masked.dropna(subset=["tissue_fraction"])
    all_typical = _typical(masked["tissue_fraction"].to_numpy())
    out = []
    for donor, rows in masked.groupby(masked["donor_id"].astype(str), sort=True):
        own = len(rows) >= MIN_GROUP
        typical, spread = _typical(rows["tissue_fraction"].to_numpy()) if own else all_typical
        for r in rows.itertuples(index=False):
            gap = abs(float(r.tissue_fraction) - typical)
            if gap > max(SPREADS * spread, MIN_GAP):
                out.append(Outlier(int(r.image_id), donor, float(r.tissue_fraction), typical,
                                   spread, "donor" if own else "collection"))
    return sorted(out, key=lambda o: -abs(o.tissue_fraction - o.typical))


def _thumbnail(image_path: str, mask_path: str, out_path: str, declared: tuple[int, int],
               downsample: int, size: int) -> bool:
    """Writes an overlay thumbnail (longest side about `size`); False if unreadable."""
    from PIL import Image

    from ish_tf.data import image_io
    from ish_tf.data.segment import SegmentError, load_mask, save_overlay

    longest = max(declared) // max(downsample, 1) if all(declared) else 0
    factor = image_io.preview_factor(longest, 2 * size) * max(downsample, 1)
    try:
        rgb = image_io.read_image(image_path, factor)
        mask = load_mask(mask_path)
    except (OSError, ValueError, SegmentError):
        return False
    if mask.shape != rgb.shape[:2]:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (rgb.shape[1], rgb.shape[0]), Image.NEAREST)) > 127
    save_overlay(rgb, mask, out_path, max_size=size)
    return True


def write_contact_sheet(out_dir: str, report: pd.DataFrame, manifest: pd.DataFrame,
                        manifest_path: str, n: int = 5, size: int = 256,
                        outliers: Sequence[Outlier] | None = None) -> str | None:
    """Writes OUT/mask_qc.html: the `n` lowest and highest tissue fractions and the outliers.

    Args:
      out_dir: the records directory (holds masks/ and the report).
      report: the extract report rows.
      manifest: the manifest rows extracted (paths, sizes, read_downsample).
      manifest_path: the manifest file (image paths are relative to it).
      n: sections per end of the tissue-fraction range (0: no sheet).
      size: thumbnail side.
      outliers: from `find_outliers` (computed when None).

    Returns:
      The sheet's path, or None when nothing was masked or n is 0.
    """
    from ish_tf.data.manifest import image_path

    masked = report[report["status"].astype(str).isin(MASKED_STATUSES)].copy()
    if n <= 0 or masked.empty:
        return None
    masked["tissue_fraction"] = pd.to_numeric(masked["tissue_fraction"], errors="coerce")
    masked = masked.sort_values(["tissue_fraction", "image_id"])
    outliers = find_outliers(report) if outliers is None else outliers
    rows_of = {int(r.image_id): r for r in manifest.itertuples(index=False)}
    thumbs = os.path.join(out_dir, THUMB_DIR)
    fs.makedirs(thumbs)
    sections: list[tuple[str, list[tuple[int, str]]]] = [
        ("Lowest tissue fraction", [(int(i), "") for i in masked["image_id"].head(n)]),
        ("Highest tissue fraction", [(int(i), "") for i in masked["image_id"].tail(n)[::-1]]),
        ("Outliers (far from their donor's or the collection's typical fraction)",
         [(o.image_id, o.describe()) for o in outliers])]
    fraction = dict(zip(masked["image_id"].astype(int), masked["tissue_fraction"], strict=True))
    donor = dict(zip(masked["image_id"].astype(int), masked["donor_id"].astype(str), strict=True))
    parts = ["<!doctype html><meta charset='utf-8'><title>Mask QC</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;"
             f"width:{size}px;vertical-align:top;font-size:12px}}img{{max-width:100%}}</style>",
             f"<h1>Mask QC: {len(masked)} masked sections</h1>",
             "<p>Green: tissue mask; red: its outline. Fractions far from the donor's typical "
             "value usually mean a failed mask (a paler or darker scan, a tinted slide).</p>"]
    written: dict[int, bool] = {}
    for title, items in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not items:
            parts.append("<p>none</p>")
        for image_id, note in items:
            row = rows_of.get(image_id)
            if row is None:
                continue
            if image_id not in written:
                down = getattr(row, "read_downsample", 1)
                down = 1 if down is None or pd.isna(down) else int(down)
                written[image_id] = _thumbnail(
                    image_path(manifest_path, str(row.path)),
                    os.path.join(out_dir, "masks", f"{image_id}.png"),
                    os.path.join(thumbs, f"{image_id}.png"),
                    (int(row.width), int(row.height)), down, size)
            img = (f"<img src='{THUMB_DIR}/{image_id}.png'>" if written[image_id]
                   else "<p>(image or mask unreadable)</p>")
            caption = (f"{image_id} {html.escape(str(row.gene_symbol))} donor "
                       f"{html.escape(donor.get(image_id, ''))}: "
                       f"{fraction.get(image_id, float('nan')):.2f}")
            if note:
                caption += f"<br>{html.escape(note)}"
            parts.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
    path = os.path.join(out_dir, SHEET_NAME)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path


def qc_lines(outliers: Sequence[Outlier], sheet: str | None, shown: int = 5) -> list[str]:
    """Summary lines: the contact sheet and a warning naming the outlying images."""
    lines = []
    if outliers:
        names = "; ".join(o.describe() for o in outliers[:shown])
        more = f" (and {len(outliers) - shown} more)" if len(outliers) > shown else ""
        lines.append(f"warning: {len(outliers)} image(s) have a tissue fraction far from "
                     f"their donor's or the collection's: {names}{more}; check their masks"
                     f"{' in ' + sheet if sheet else ''}")
    if sheet:
        lines.append(f"mask contact sheet: {sheet}")
    return lines

