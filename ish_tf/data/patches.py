"""Patch sampling from section images: summed-area tables, seeded sampling, per-image extraction.

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
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from absl import logging
from PIL import Image

from ish_tf.data.segment import MaskConfig, load_or_compute_mask
from ish_tf.io_utils import Progress, atomic_path, remove_stale_tmp

IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png")
SPLIT_BY: tuple[str, ...] = ("gene", "donor")

# Outcome of one image (`ImageResult.status`).
OK = "ok"
FEW_PATCHES = "few_patches"
TOO_SMALL = "too_small"
NO_TISSUE = "no_tissue"
UNREADABLE = "unreadable"
STATUSES: tuple[str, ...] = (OK, FEW_PATCHES, TOO_SMALL, NO_TISSUE, UNREADABLE)


class ExtractError(ValueError):
    """Extraction settings or inputs that make the whole stage impossible; names the culprit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordSetConfig(abc.ABC):
    """What every sharded record set of a manifest shares (patches, whole sections).

    A stage's config extends it with what its records are made of, and says which of its
    settings determine the records (`sampling_key`) and their sizes (`record_sizes`).

    Attributes:
      manifest: manifest CSV (`bin/fetch`, `bin/synth`).
      out_dir: records directory (shards, index.json, genes.csv, the report, masks/).
      image_format: "jpeg" or "png" encoding of the stored images.
      jpeg_quality: JPEG quality (1-95).
      num_shards: most shards per split (a split with fewer genes gets one per gene).
      compression: None or "GZIP".
      split_by: "gene" (evaluation on unseen genes) or "donor" (on unseen donors).
      split_fractions: (train, validation, test) proportions.
      workers: worker processes over images (1 = in-process).
      seed: seed of the split and of every image's sampling.
      genes: restrict extraction to these genes (empty = all of the manifest).
      mask: foreground mask settings.
    """

    manifest: str
    out_dir: str
    image_format: str = "jpeg"
    jpeg_quality: int = 90
    num_shards: int = 4
    compression: str | None = None
    split_by: str = "gene"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    workers: int = 1
    seed: int = 0
    genes: tuple[str, ...] = ()
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.image_format in IMAGE_FORMATS, f"image_format must be one of {IMAGE_FORMATS}"),
            (1 <= self.jpeg_quality <= 95, "jpeg_quality must lie in 1..95"),
            (self.num_shards >= 1, "num_shards must be >= 1"),
            (self.compression in (None, "GZIP"), "compression must be None or 'GZIP'"),
            (self.split_by in SPLIT_BY, f"split_by must be one of {SPLIT_BY}"),
            (len(self.split_fractions) == 3 and min(self.split_fractions) >= 0
             and sum(self.split_fractions) > 0,
             "split_fractions must be three non-negative numbers (train, validation, test)"),
            (self.workers >= 1, "workers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExtractError(message)

    def sharing_key(self) -> dict:
        """The shared settings that determine the records (part of `sampling_key`)."""
        return {"image_format": self.image_format, "jpeg_quality": self.jpeg_quality,
                "seed": self.seed, "split_by": self.split_by,
                "split_fractions": list(self.split_fractions), "num_shards": self.num_shards,
                "compression": self.compression, "mask": self._mask_key()}

    def _mask_key(self) -> dict:
        key = dataclasses.asdict(self.mask)
        if key["background"] == "bright":
            del key["background"]  # record sets written before the option resume unchanged
        return key

    @abc.abstractmethod
    def sampling_key(self) -> dict:
        """The settings that determine the records; a resumed run must match them."""

    @abc.abstractmethod
    def record_sizes(self) -> tuple[int, int]:
        """(source_size, patch_size) for `shards.DatasetInfo` (0 where not one number)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractConfig(RecordSetConfig):
    """Settings of patch extraction (`bin/extract`): `RecordSetConfig` and the sampling.

    Attributes:
      patches_per_image: N, most patches kept per image.
      source_size: S, side of the window in original-image pixels.
      patch_size: R, side of the stored patch (resized with an antialiasing filter).
      min_fraction: F, least tissue fraction of a window.
      max_tries: T, most candidate windows drawn per image.
      save_overlays: also write `OUT/overlays/{image_id}.png` (mask over image) for checks.
    """

    patches_per_image: int = 50
    source_size: int = 1024
    patch_size: int = 256
    min_fraction: float = 0.9
    max_tries: int = 500
    save_overlays: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.patches_per_image >= 1, "patches_per_image must be >= 1"),
            (self.source_size >= 1, "source_size must be >= 1"),
            (self.patch_size >= 1, "patch_size must be >= 1"),
            (0.0 <= self.min_fraction <= 1.0, "min_fraction must lie in [0, 1]"),
            (self.max_tries >= 1, "max_tries must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExtractError(message)
        super().__post_init__()

    def sampling_key(self) -> dict:
        """The settings that determine the patches; a resumed run must match them."""
        return {
            "patches_per_image": self.patches_per_image, "source_size": self.source_size,
            "patch_size": self.patch_size, "min_fraction": self.min_fraction,
            "max_tries": self.max_tries, "segmenter": self.mask.segmenter,
            **self.sharing_key(),
        }

    def record_sizes(self) -> tuple[int, int]:
        return self.source_size, self.patch_size


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


def read_rgb(path: str) -> np.ndarray:
    """Decodes an image file fully to uint8 (H, W, 3).

    Raises:
      OSError: missing, corrupt or truncated file (Pillow refuses truncated data).
    """
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


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

    Never raises for a bad image: the outcome is in `status` / `reason`.

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
    """
    try:
        rgb = read_rgb(image_path)
    except FileNotFoundError:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: file not found")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return ImageResult(image_id, UNREADABLE, f"{image_path}: cannot decode image: {e}")
    h, w = rgb.shape[:2]
    base = dict(width=w, height=h)
    if h < cfg.source_size or w < cfg.source_size:
        return ImageResult(image_id, TOO_SMALL,
                           f"{image_path}: image is {w}x{h}, smaller than source_size "
                           f"{cfg.source_size}", **base)
    try:
        mask, cached = load_or_compute_mask(rgb, image_id, cfg.mask, mask_dir)
    except Exception as e:  # a segmenter failure must not stop the stage
        return ImageResult(image_id, UNREADABLE, f"{image_path}: mask failed: {e}", **base)
    if overlay_dir:
        from ish_tf.data.segment import save_overlay

        save_overlay(rgb, mask, os.path.join(overlay_dir, f"{int(image_id)}.png"))
    fraction = float(mask.mean())
    base.update(tissue_fraction=fraction, mask_cached=cached)
    if not mask.any():
        return ImageResult(image_id, NO_TISSUE, f"{image_path}: no tissue found "
                           f"({cfg.mask.segmenter} segmenter)", **base)
    corners = sample_patches(mask, n=cfg.patches_per_image, size=cfg.source_size,
                             min_fraction=cfg.min_fraction, max_tries=cfg.max_tries,
                             rng=image_rng(cfg.seed, image_id))
    image = Image.fromarray(rgb)
    patches = [Patch(x, y, encode_patch(crop_and_resize(image, x, y, cfg.source_size,
                                                        cfg.patch_size),
                                        cfg.image_format, cfg.jpeg_quality))
               for x, y in corners]
    if len(patches) < cfg.patches_per_image:
        return ImageResult(image_id, FEW_PATCHES,
                           f"{len(patches)} of {cfg.patches_per_image} windows with tissue >= "
                           f"{cfg.min_fraction:g} in {cfg.max_tries} tries "
                           f"(tissue fraction {fraction:.2f})", patches, **base)
    return ImageResult(image_id, OK, "", patches, **base)


# --------------------------------------------------------------------------- whole stage
REPORT_NAME = "extract_report.csv"
REPORT_COLUMNS: tuple[str, ...] = ("image_id", "gene_symbol", "donor_id", "split", "shard",
                                   "status", "n_patches", "tissue_fraction", "reason")


@dataclasses.dataclass
class ShardPlan:
    """The images of one shard, in write order (gene, then image id)."""

    split: str
    index: int
    num_shards: int
    rows: pd.DataFrame


@dataclasses.dataclass
class ExtractHooks:
    """Callbacks for progress reporting and for tests that simulate crashes.

    Attributes:
      after_image: called as `after_image(split, shard_index, result)` after an image's
        patches are written to the (still temporary) shard.
      after_shard: called with the `ShardInfo` once a shard is in the index.
    """

    after_image: Callable[[str, int, ImageResult], None] | None = None
    after_shard: Callable[[Any], None] | None = None


def _manifest_digest(df) -> str:
    """Fingerprint of the manifest rows that decide the shards' content."""
    cols = ["image_id", "gene_symbol", "donor_id", "path"]
    text = df[cols].astype(str).sort_values("image_id").to_csv(index=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def plan_extraction(df: pd.DataFrame,
                    cfg: RecordSetConfig) -> tuple[Any, list[ShardPlan], dict[int, str]]:
    """Splits, vocabularies and the shard plan of a manifest.

    Args:
      df: validated manifest (already filtered to `cfg.genes`).
      cfg: extraction settings (patches or whole sections).

    Returns:
      (shards.DatasetInfo, [ShardPlan, ...] in split then shard order,
       image_id -> split).

    Raises:
      ExtractError: no images.
    """
    from ish_tf.data import shards

    if len(df) == 0:
        raise ExtractError(f"{cfg.manifest}: no images to extract (empty gene list)")
    genes = sorted(df["gene_symbol"].astype(str).unique())
    donors = sorted(df["donor_id"].astype(str).unique())
    entrez: dict[str, int] = {}
    for g, e in zip(df["gene_symbol"].astype(str), df["entrez_id"], strict=True):
        if g not in entrez and not pd.isna(e):
            entrez[g] = int(e)
    if cfg.split_by == "gene":
        gene_split = shards.split_genes(genes, cfg.split_fractions, cfg.seed)
        image_split = dict(zip(df["image_id"].astype(int),
                               df["gene_symbol"].astype(str).map(gene_split), strict=True))
        donor_split: dict[str, str] = {}
    else:
        donor_split = shards.split_donors(donors, cfg.split_fractions, cfg.seed)
        image_split = dict(zip(df["image_id"].astype(int),
                               df["donor_id"].astype(str).map(donor_split), strict=True))
        gene_split = {}
    source_size, patch_size = cfg.record_sizes()
    info = shards.DatasetInfo(
        genes=shards.make_gene_vocabulary(genes, gene_split, entrez), donors=donors,
        source_size=source_size, patch_size=patch_size, format=cfg.image_format,
        seed=cfg.seed, split_by=cfg.split_by, donor_splits=donor_split,
        extra={"manifest": os.path.abspath(cfg.manifest), "manifest_digest": _manifest_digest(df),
               "sampling": cfg.sampling_key()})
    split_col = df["image_id"].astype(int).map(image_split)
    plans: list[ShardPlan] = []
    for split in shards.SPLITS:
        part = df[split_col == split]
        if len(part) == 0:
            continue
        split_genes = sorted(part["gene_symbol"].astype(str).unique())
        k = min(cfg.num_shards, len(split_genes))
        shard_of = shards.assign_shards(split_genes, k)
        shard_col = part["gene_symbol"].astype(str).map(shard_of)
        for i in range(k):
            rows = part[shard_col == i].sort_values(["gene_symbol", "image_id"], kind="stable")
            plans.append(ShardPlan(split, i, k, rows.reset_index(drop=True)))
    return info, plans, image_split


def _extract_task(args: tuple) -> ImageResult:
    """Worker entry point (top level so it pickles)."""
    image_path, image_id, cfg, mask_dir, overlay_dir = args
    try:
        return extract_image_patches(image_path, image_id, cfg, mask_dir, overlay_dir)
    except Exception as e:  # never lose the whole shard to one image
        return ImageResult(image_id, UNREADABLE, f"{image_path}: {type(e).__name__}: {e}")


def _read_report(path: str) -> dict[int, dict]:
    if not os.path.exists(path):
        return {}
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        logging.warning("%s: unreadable, rebuilding it (%s)", path, e)
        return {}
    if "image_id" not in df.columns:
        return {}
    return {int(r["image_id"]): dict(r) for r in df.to_dict("records")}


def _write_report(path: str, rows: dict[int, dict],
                  columns: Sequence[str] = REPORT_COLUMNS) -> None:
    df = pd.DataFrame([rows[k] for k in sorted(rows)], columns=list(columns))
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _check_resume(out_dir: str, info: Any) -> None:
    """Refuses to mix shards of different settings or manifests in one directory."""
    from ish_tf.data import shards

    old = shards.load_dataset_info(out_dir)
    if old is None:
        if shards.load_index(out_dir, missing_ok=True)["shards"]:
            raise ExtractError(f"{shards.index_path(out_dir)}: lists shards but no dataset "
                               "info; use a fresh --out")
        return
    diffs = []
    if old.extra.get("sampling") != info.extra["sampling"]:
        a, b = old.extra.get("sampling") or {}, info.extra["sampling"]
        diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)]
    if old.extra.get("manifest_digest") != info.extra["manifest_digest"]:
        diffs.append("the manifest's images, genes, donors or paths changed")
    if [g.gene_symbol for g in old.genes] != [g.gene_symbol for g in info.genes]:
        diffs.append("the gene vocabulary changed")
    if diffs:
        raise ExtractError(
            f"{out_dir} holds patches extracted with other settings ({'; '.join(diffs)}); "
            "rerun with the original settings to resume, or use a fresh --out")


@dataclasses.dataclass
class ShardedStage:
    """What one stage that turns a manifest's images into sharded records does per image.

    `write_shards` runs the rest (pending shards, worker processes, atomic shard files,
    the report, the index, resume), the same for patches and whole sections.

    Attributes:
      name: progress bar label.
      worker: top-level (picklable) function: task tuple -> result with `status` and
        `reason`; must not raise for a bad image.
      task: (image path, manifest row) -> the worker's task tuple.
      examples: (record fields common to every record of the image, row, result) ->
        the image's tf.train.Examples, in write order.
      report_fields: result -> its report columns beyond image_id, gene_symbol,
        donor_id, split, shard and status.
      report_name, report_columns: the report file in OUT and its columns.
      hooks: callbacks (tests use them to simulate crashes).
    """

    name: str
    worker: Callable[[tuple], Any]
    task: Callable[[str, Any], tuple]
    examples: Callable[[dict, Any, Any], list]
    report_fields: Callable[[Any], dict]
    report_name: str
    report_columns: Sequence[str]
    hooks: ExtractHooks = dataclasses.field(default_factory=ExtractHooks)


def write_shards(stage: ShardedStage, out: str, manifest: str, info: Any,
                 plans: list[ShardPlan], *, workers: int, compression: str,
                 progress_enabled: bool | None = None) -> tuple[dict[int, dict], int, int]:
    """Writes every shard of `plans` not yet complete in OUT/index.json (resumable).

    Each pending shard is written to a temporary file and renamed when complete; then
    its images' rows go into the report and the shard into the index, so an interrupted
    run loses at most the shard in progress. Rows of images no longer planned (another
    --genes) are dropped from the report.

    Returns:
      (report rows by image id, shards written, shards resumed).
    """
    from ish_tf.data import manifest as mf
    from ish_tf.data import shards

    report_path = os.path.join(out, stage.report_name)
    report = _read_report(report_path)
    done = {split: shards.completed_shards(out, split) for split in shards.SPLITS}
    pending = [p for p in plans if p.index not in done[p.split]]
    resumed = len(plans) - len(pending)
    if resumed:
        logging.info("resuming: %d of %d shard(s) already complete", resumed, len(plans))
    gene_index = info.gene_index()
    entrez = {g.gene_symbol: g.entrez_id for g in info.genes}
    donor_index = {d: i for i, d in enumerate(info.donors)}
    pool = None
    if workers > 1 and sum(len(p.rows) for p in pending) > 1:
        # Fork the workers before this process runs any TensorFlow op (forking a live TF
        # runtime is unsafe); workers only use NumPy and Pillow (and Keras for a U-Net).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
    written = 0
    hooks = stage.hooks
    try:
        with Progress(sum(len(p.rows) for p in pending), stage.name, progress_enabled) as bar:
            for plan in pending:
                rows = list(plan.rows.itertuples(index=False))
                tasks = [stage.task(mf.image_path(manifest, str(r.path)), r) for r in rows]
                results = pool.imap(stage.worker, tasks) if pool else map(stage.worker, tasks)
                new_rows = {}
                with shards.ShardWriter(out, plan.split, plan.index, plan.num_shards,
                                         compression) as writer:
                    for row, res in zip(rows, results, strict=True):
                        gene, image_id = str(row.gene_symbol), int(row.image_id)
                        common = dict(
                            image_id=image_id, gene_symbol=gene, gene_index=gene_index[gene],
                            entrez_id=entrez.get(gene, -1), donor_id=str(row.donor_id),
                            donor_index=donor_index[str(row.donor_id)],
                            region=_text(row.region), study=_text(row.study))
                        for example in stage.examples(common, row, res):
                            writer.write(example, gene, image_id)
                        new_rows[image_id] = {
                            "image_id": image_id, "gene_symbol": gene,
                            "donor_id": str(row.donor_id), "split": plan.split,
                            "shard": plan.index, "status": res.status,
                            **stage.report_fields(res)}
                        if res.status not in (OK, FEW_PATCHES):
                            logging.debug("image %s: %s", image_id, res.reason)
                        bar.update()
                        if hooks.after_image:
                            hooks.after_image(plan.split, plan.index, res)
                # The shard file is in place; record its images, then mark it complete.
                report.update(new_rows)
                _write_report(report_path, report, stage.report_columns)
                shards.update_index(out, writer.info)
                written += 1
                if hooks.after_shard:
                    hooks.after_shard(writer.info)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    planned = {int(i) for p in plans for i in p.rows["image_id"]}
    report = {k: v for k, v in report.items() if k in planned}
    _write_report(report_path, report, stage.report_columns)
    return report, written, resumed


def select_images(cfg: RecordSetConfig) -> pd.DataFrame:
    """The manifest's rows to extract: all, or those of `cfg.genes`.

    Genes asked for but absent from the manifest are named in a warning and ignored.

    Raises:
      ManifestError: the manifest is missing, unreadable or misses a column.
      ExtractError: no rows, or none of the requested genes is in the manifest.
    """
    from ish_tf.data import manifest as mf

    df = mf.read_manifest(cfg.manifest)
    if len(df) == 0:
        raise ExtractError(f"{cfg.manifest}: the manifest has no rows (empty gene list)")
    if cfg.genes:
        present = set(df["gene_symbol"].astype(str))
        unknown = [g for g in cfg.genes if g not in present]
        if unknown:
            logging.warning("genes not in %s, ignored: %s", cfg.manifest, ", ".join(unknown))
        df = df[df["gene_symbol"].astype(str).isin(set(cfg.genes))].reset_index(drop=True)
        if len(df) == 0:
            raise ExtractError(f"{cfg.manifest}: none of the requested genes "
                               f"({', '.join(cfg.genes)}) is in the manifest")
    return df


def check_background(df: pd.DataFrame, cfg: RecordSetConfig, n: int = 5) -> str | None:
    """A warning if the images look like the other kind of slide than the masks assume.

    Fluorescence sections (dark background) read with the brightfield default take the
    slide for tissue (patches of bare slide); brightfield ones read as fluorescence miss
    most of the tissue. Up to
    `n` images spread over the manifest are read and their background guessed
    (`segment.guess_background`); unreadable ones are left to the stage's report.

    Returns:
      The warning (also logged), or None where most of the images agree with
      `cfg.mask.background` (or the segmenter is a U-Net, which learnt its own).
    """
    from ish_tf.data.manifest import image_path
    from ish_tf.data.segment import guess_background

    if cfg.mask.segmenter != "classical" or len(df) == 0:
        return None
    rows = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(n, len(df))).astype(int))]
    other = []
    for row in rows.itertuples():
        path = image_path(cfg.manifest, row.path)
        try:
            with Image.open(path) as im:
                im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))  # JPEG: fast
                kind = guess_background(np.asarray(im.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if kind != cfg.mask.background:
            other.append(path)
    if len(other) * 2 <= len(rows):
        return None
    want = "dark" if cfg.mask.background == "bright" else "bright"
    message = (f"{len(other)} of {len(rows)} images sampled look like sections on a {want} "
               f"background ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) but "
               f"the masks assume a {cfg.mask.background} one, so they would be wrong (the "
               f"slide taken for tissue, or the tissue missed); for "
               f"{'fluorescence' if want == 'dark' else 'brightfield'} sections use "
               f"--mask_background={want}")
    logging.warning("%s", message)
    return message


def prepare_out_dir(out: str, info: Any, *subdirs: str | None) -> list[str]:
    """Readies OUT for writing: makes the sub-directories, removes the temporary files of
    an interrupted run, refuses records of other settings, and writes the dataset info.

    Returns:
      The paths of the partial files removed.

    Raises:
      ExtractError: OUT holds records of other settings or manifests.
    """
    from ish_tf.data import shards

    dirs = [out, *(d for d in subdirs if d)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    removed = [os.path.join(d, n) for d in dirs for n in remove_stale_tmp(d)]
    if removed:
        logging.info("removed %d partial file(s) of an interrupted run: %s", len(removed),
                     ", ".join(os.path.basename(r) for r in removed))
    _check_resume(out, info)
    shards.write_dataset_info(out, info)
    return removed


def run_extract(cfg: ExtractConfig, hooks: ExtractHooks | None = None,
                progress_enabled: bool | None = None) -> dict:
    """Extracts patches from every image of a manifest into sharded TFRecords (resumable).

    Reads the manifest, splits genes (or donors), plans whole-gene shards, skips shards
    already complete in `OUT/index.json`, extracts the others (with `cfg.workers`
    processes; results are identical for any worker count), writes each shard
    atomically, then `OUT/extract_report.csv` (one row per image: status, patch count,
    reason) and the index. Stale temporary files of a killed run are removed first.

    Args:
      cfg: extraction settings.
      hooks: optional callbacks (tests use them to simulate crashes).
      progress_enabled: force the progress bar on/off (default: when stderr is a tty).

    Returns:
      Summary dict: {"out_dir", "report", "index", "removed_tmp": [...],
      "shards_written": n, "shards_resumed": n, "splits": {split: {"images", "patches",
      "shards", "status": {status: count}}}, "skipped": {status: count}}.

    Raises:
      ManifestError: the manifest is missing, unreadable or misses a column.
      ExtractError: nothing to extract, or OUT holds a dataset of other settings.
    """
    from ish_tf.data import records

    hooks = hooks or ExtractHooks()
    df = select_images(cfg)
    check_background(df, cfg)
    info, plans, _ = plan_extraction(df, cfg)
    out = cfg.out_dir
    mask_dir = os.path.join(out, "masks")
    overlay_dir = os.path.join(out, "overlays") if cfg.save_overlays else None
    removed = prepare_out_dir(out, info, mask_dir, overlay_dir)

    def examples(common: dict, row: Any, res: ImageResult) -> list:
        return [records.make_example(
            image_encoded=p.encoded, patch_index=k, x=p.x, y=p.y,
            source_size=cfg.source_size, image_format=cfg.image_format,
            image_height=cfg.patch_size, image_width=cfg.patch_size, **common)
            for k, p in enumerate(res.patches)]

    stage = ShardedStage(
        name="extract", worker=_extract_task,
        task=lambda path, row: (path, int(row.image_id), cfg, mask_dir, overlay_dir),
        examples=examples,
        report_fields=lambda res: {"n_patches": res.n_patches,
                                   "tissue_fraction": round(res.tissue_fraction, 4),
                                   "reason": res.reason},
        report_name=REPORT_NAME, report_columns=REPORT_COLUMNS, hooks=hooks)
    report, written, resumed = write_shards(
        stage, out, cfg.manifest, info, plans, workers=cfg.workers,
        compression=cfg.compression, progress_enabled=progress_enabled)
    report_path = os.path.join(out, REPORT_NAME)
    return _summary(out, report, plans, removed, written, resumed, report_path)


def _text(value: Any) -> str:
    """A manifest string cell as str ('' for missing)."""
    if value is None or pd.isna(value):
        return ""
    return str(value)


def _summary(out: str, report: dict[int, dict], plans: list[ShardPlan], removed: list[str],
             written: int, resumed: int, report_path: str) -> dict:
    from ish_tf.data import shards

    index = shards.load_index(out, missing_ok=True)
    splits: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for plan in plans:
        s = splits.setdefault(plan.split, {"images": 0, "patches": 0, "shards": 0,
                                           "status": {}})
        s["images"] += len(plan.rows)
        s["shards"] += 1
    for shard in index["shards"]:
        if shard["split"] in splits:
            splits[shard["split"]]["patches"] += int(shard["num_records"])
    for row in report.values():
        s = splits.get(str(row["split"]))
        status = str(row["status"])
        if s is not None:
            s["status"][status] = s["status"].get(status, 0) + 1
        if status != OK:
            skipped[status] = skipped.get(status, 0) + 1
    return {"out_dir": out, "report": report_path, "index": shards.index_path(out),
            "removed_tmp": removed, "shards_written": written, "shards_resumed": resumed,
            "splits": splits, "skipped": skipped}


def format_summary(summary: dict) -> str:
    """A few human-readable lines of a `run_extract` summary."""
    lines = [f"extract: wrote {summary['shards_written']} shard(s), resumed "
             f"{summary['shards_resumed']}, into {summary['out_dir']}"]
    for split, s in summary["splits"].items():
        status = ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items()))
        lines.append(f"  {split:<10} {s['images']:>6} images {s['patches']:>8} patches "
                     f"{s['shards']:>3} shard(s)  [{status}]")
    if summary["skipped"]:
        lines.append("  not ok: " + ", ".join(f"{k} {v}" for k, v in
                                              sorted(summary["skipped"].items()))
                     + f" (reasons in {summary['report']})")
    if summary["removed_tmp"]:
        lines.append(f"  removed {len(summary['removed_tmp'])} partial file(s) of an "
                     "interrupted run")
    return "\n".join(lines)
