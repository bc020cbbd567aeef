"""Spatial inputs of the ISH CNN: sections, spot tables, per-pixel labels and patches.

A *section* is one large single-channel image (TIFF or PNG, read with Pillow), a
*spot table* (CSV with columns x, y, gene: one detected transcript per row, in
pixel coordinates of the image after multiplying by a scale factor) and a tissue
mask (a PNG beside it, or computed with the data layer's segmenter).

Classes, in label order: the chosen genes (`--genes`, e.g. two), then "tissue"
(general tissue) and "background". Patch centres:

* gene g: every spot of g, rounded to the nearest pixel, unless a spot of another
  chosen gene lies closer than `radius` (ambiguous; skipped by default);
* tissue: mask pixels at distance >= `radius` from every spot of the chosen genes;
* background: pixels outside the mask.

A patch of size R centred at (x, y) is the window with top-left corner
(x - R // 2, y - R // 2) of the image reflect-padded by R on every side; dense
prediction (`ish_tf.families.ish_cnn.segmentation`) uses exactly the same convention, which
is what makes patch-wise and dense predictions comparable centre by centre.

Output of `run_spatial` (`bin/spatial`)::

    OUT/labels.csv                 section, x, y, label, class_name, split (the centres)
    OUT/label_summary.csv          per section and class: candidates, kept, skipped
    OUT/p{R}/train-00000-of-00001.tfrecord (+ validation) + index.json + genes.csv
    OUT/spatial_flags.cfg          (written by the CLI)

Each record is a grey PNG patch with gene_symbol = class name and gene_index =
label = class index, so `pipeline.pk_dataset` with P = number of classes draws
class-balanced batches. One record set per patch size, all from the same centres.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ish_tf.families.ish_cnn.sections import DEFAULT_MAX_PIXELS, Section, SpatialError, load_section
from ish_tf.io_utils import atomic_write_text

TISSUE = "tissue"
BACKGROUND = "background"
LABELS_NAME = "labels.csv"
LABEL_SUMMARY_NAME = "label_summary.csv"

# --------------------------------------------------------------------------- labels
def class_names(genes: Sequence[str]) -> list[str]:
    """Class names in label order: the genes, then tissue and background.

    Raises:
      SpatialError: no genes, repeated genes, or a gene named like a reserved class.
    """
    genes = [str(g) for g in genes]
    if not genes:
        raise SpatialError("choose at least one gene (--genes)")
    if len(set(genes)) != len(genes):
        raise SpatialError(f"--genes repeats a gene: {genes}")
    reserved = [g for g in genes if g in (TISSUE, BACKGROUND)]
    if reserved:
        raise SpatialError(f"gene names {reserved} clash with the reserved class names")
    return [*genes, TISSUE, BACKGROUND]


def disc_raster(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
                radius: float) -> np.ndarray:
    """Pixels closer than `radius` to any of the points.

    Args:
      shape: (H, W).
      xs, ys: (N,) point coordinates in pixels.
      radius: strict distance bound (a pixel at exactly `radius` is outside).

    Returns:
      bool (H, W).
    """
    h, w = shape
    out = np.zeros((h, w), bool)
    if radius <= 0 or len(xs) == 0:
        return out
    r = int(math.ceil(radius))
    for x, y in zip(np.asarray(xs, float), np.asarray(ys, float), strict=True):
        x0, x1 = max(0, int(math.floor(x)) - r), min(w, int(math.ceil(x)) + r + 1)
        y0, y1 = max(0, int(math.floor(y)) - r), min(h, int(math.ceil(y)) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 < radius * radius
    return out


def ambiguous_spots(spots: pd.DataFrame, genes: Sequence[str], radius: float) -> np.ndarray:
    """Spots of a chosen gene with a spot of another chosen gene closer than `radius`.

    Args:
      spots: canonical frame (x, y, gene).
      genes: chosen genes.
      radius: ambiguity distance in pixels.

    Returns:
      bool (N,) over the rows of `spots` (False for spots of other genes).
    """
    out = np.zeros(len(spots), bool)
    if radius <= 0:
        return out
    xy = spots[["x", "y"]].to_numpy(float)
    g = spots["gene"].to_numpy()
    chosen = np.isin(g, list(genes))
    idx = np.flatnonzero(chosen)
    # Grid hashing keeps this O(N) for large tables: only neighbouring cells are compared.
    cell = max(radius, 1e-9)
    keys = np.floor(xy[idx] / cell).astype(np.int64)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (kx, ky) in zip(idx, keys, strict=True):
        buckets.setdefault((int(kx), int(ky)), []).append(int(i))
    r2 = radius * radius
    for i, (kx, ky) in zip(idx, keys, strict=True):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in buckets.get((int(kx) + dx, int(ky) + dy), ()):
                    if g[j] != g[i] and ((xy[i] - xy[j]) ** 2).sum() < r2:
                        out[i] = True
                        break
                if out[i]:
                    break
            if out[i]:
                break
    return out


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """How patch centres and their classes are chosen.

    Attributes:
      genes: chosen genes (classes 0..G-1); tissue = G, background = G + 1.
      radius: ambiguity and exclusion radius in pixels (see the module docstring).
      keep_ambiguous: keep gene spots near another chosen gene's spot (labelled with
        their own gene) instead of skipping them.
      max_per_class: most centres per class (random subset); 0 = no cap. Tissue and
        background, which have a candidate at nearly every pixel, get this many, or
        as many as the largest gene class when it is 0.
      balance: cut every class to the size of the smallest one (exact balance).
      seed: seed of the random choices.
    """

    genes: tuple[str, ...] = ()
    radius: float = 8.0
    keep_ambiguous: bool = False
    max_per_class: int = 2000
    balance: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        class_names(self.genes)
        if self.radius < 0:
            raise SpatialError(f"label radius must be >= 0, got {self.radius}")
        if self.max_per_class < 0:
            raise SpatialError(f"max_per_class must be >= 0, got {self.max_per_class}")


@dataclasses.dataclass
class LabelSet:
    """Patch centres of one section.

    Attributes:
      centres: DataFrame with int x, y, int label, str class_name.
      summary: DataFrame with one row per class: class_name, label, candidates
        (before sampling), kept, ambiguous (gene classes: skipped spots).
    """

    centres: pd.DataFrame
    summary: pd.DataFrame


def _sample(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
    """Sorted random subset of range(n_items) of size min(n, n_items)."""
    if n >= n_items:
        return np.arange(n_items)
    return np.sort(rng.choice(n_items, size=n, replace=False))


def make_labels(spots: pd.DataFrame, mask: np.ndarray, cfg: LabelConfig) -> LabelSet:
    """Chooses the patch centres of one section (see the module docstring for the rules).

    Deterministic for a given seed. Gene centres are the rounded spot positions
    (duplicates at the same pixel are kept once); tissue and background centres are
    drawn uniformly from their candidate pixels.

    Args:
      spots: canonical frame (x, y, gene) in pixels, inside the image.
      mask: bool (H, W) tissue mask.
      cfg: the labelling rules.

    Returns:
      LabelSet.

    Raises:
      SpatialError: a class without any candidate (e.g. an all-tissue mask leaves no
        background), naming the class.
    """
    names = class_names(cfg.genes)
    n_genes = len(cfg.genes)
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    rng = np.random.default_rng([cfg.seed, 7])
    ambiguous = ambiguous_spots(spots, cfg.genes, cfg.radius)
    gene_col = spots["gene"].to_numpy()
    per_class: list[np.ndarray] = []  # (n, 2) int (x, y)
    rows = []
    for label, gene in enumerate(cfg.genes):
        sel = gene_col == gene
        skipped = int((sel & ambiguous).sum())
        if not cfg.keep_ambiguous:
            sel = sel & ~ambiguous
        xy = np.rint(spots.loc[sel, ["x", "y"]].to_numpy(float)).astype(np.int64)
        xy[:, 0] = np.clip(xy[:, 0], 0, w - 1)
        xy[:, 1] = np.clip(xy[:, 1], 0, h - 1)
        xy = np.unique(xy, axis=0) if len(xy) else xy.reshape(0, 2)
        per_class.append(xy)
        rows.append({"class_name": gene, "label": label, "candidates": len(xy),
                     "ambiguous": skipped})
    chosen = spots[np.isin(gene_col, list(cfg.genes))]
    near = disc_raster((h, w), chosen["x"].to_numpy(), chosen["y"].to_numpy(), cfg.radius)
    for label, cand in ((n_genes, mask & ~near), (n_genes + 1, ~mask)):
        ys, xs = np.nonzero(cand)
        per_class.append(np.stack([xs, ys], axis=1).astype(np.int64))
        rows.append({"class_name": names[label], "label": label, "candidates": len(xs),
                     "ambiguous": 0})
    empty = [names[i] for i, xy in enumerate(per_class) if len(xy) == 0]
    if empty:
        raise SpatialError(f"no candidate centres for class(es) {empty} (gene spots all "
                           "ambiguous, no tissue away from spots, or no background outside "
                           "the mask); check the mask and --label_radius")

    gene_sizes = [len(xy) for xy in per_class[:n_genes]]
    targets = []
    for i, xy in enumerate(per_class):
        if i < n_genes:
            t = cfg.max_per_class or len(xy)
        else:
            t = cfg.max_per_class or max(gene_sizes)
        targets.append(min(t, len(xy)))
    if cfg.balance:
        targets = [min(targets)] * len(targets)
    frames = []
    for label, (xy, t) in enumerate(zip(per_class, targets, strict=True)):
        pick = xy[_sample(rng, len(xy), t)]
        frames.append(pd.DataFrame({"x": pick[:, 0], "y": pick[:, 1], "label": label,
                                    "class_name": names[label]}))
        rows[label]["kept"] = int(t)
    centres = pd.concat(frames, ignore_index=True)
    summary = pd.DataFrame(rows)[["class_name", "label", "candidates", "kept", "ambiguous"]]
    return LabelSet(centres=centres, summary=summary)


# --------------------------------------------------------------------------- patches
def pad_for_patches(image: np.ndarray, size: int, extra: int = 0) -> np.ndarray:
    """Reflect-pads an image by `size + extra` on every side (the patch convention).

    Args:
      image: (H, W) or (H, W, C).
      size: patch size R.
      extra: additional padding (dense prediction needs room for its last window).

    Returns:
      Padded array (H + 2p, W + 2p[, C]) with p = size + extra.
    """
    p = size + extra
    pad = [(p, p), (p, p)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect" if min(image.shape[:2]) > 1 else "edge")


def crop_patches(image: np.ndarray, xs: Sequence[int], ys: Sequence[int], size: int,
                 padded: np.ndarray | None = None) -> np.ndarray:
    """Patches of side `size` centred at integer pixel positions.

    Window of centre (x, y): rows y - size//2 .. y - size//2 + size - 1 (same for
    columns) of the reflect-padded image.

    Args:
      image: (H, W) or (H, W, C).
      xs, ys: (N,) integer centres inside the image.
      size: patch size R.
      padded: `pad_for_patches(image, size)` when already computed.

    Returns:
      (N, R, R[, C]) array of the image's dtype.
    """
    if padded is None:
        padded = pad_for_patches(image, size)
    off = size - size // 2  # padding minus half the window
    out = np.empty((len(xs), size, size, *image.shape[2:]), image.dtype)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        out[i] = padded[int(y) + off:int(y) + off + size, int(x) + off:int(x) + off + size]
    return out


def encode_png(patch: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (R, R) grey patch."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(patch, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def assign_splits(labels: np.ndarray, validation_fraction: float, seed: int) -> np.ndarray:
    """Per-class random train/validation assignment (each class keeps its share).

    Args:
      labels: (N,) class labels.
      validation_fraction: share of each class sent to "validation".
      seed: seed.

    Returns:
      str array (N,) of "train" / "validation".
    """
    out = np.full(len(labels), "train", dtype=object)
    if validation_fraction <= 0:
        return out
    rng = np.random.default_rng([seed, 11])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(validation_fraction * len(idx)))
        if 0 < n_val < len(idx):
            out[rng.choice(idx, size=n_val, replace=False)] = "validation"
    return out


def write_patch_records(sections: Sequence[Section], centres: pd.DataFrame, out_dir: str,
                        size: int, names: Sequence[str], extra: dict | None = None,
                        seed: int = 0) -> dict:
    """Writes the patches of one size as a records directory (one shard per split).

    Records of a split are written class by class (class contiguous, as the P×K
    reader requires), gene_symbol = class name, gene_index = label = class index,
    image_id = section position, patch_index = row of `centres`, region = section name.

    Args:
      sections: the sections the centres refer to (`centres.section` = position).
      centres: DataFrame with section, x, y, label, split.
      out_dir: records directory (created).
      size: patch size R.
      names: class names in label order.
      extra: facts stored in the dataset info (`index.json`).
      seed: stored in the dataset info.

    Returns:
      {split: number of records}.
    """
    from ish_tf.data import records, shards

    os.makedirs(out_dir, exist_ok=True)
    padded = [pad_for_patches(s.image, size) for s in sections]
    counts = {}
    for split in ("train", "validation"):
        part = centres[centres["split"] == split]
        if part.empty:
            continue
        with shards.ShardWriter(out_dir, split, 0, 1) as writer:
            for label in sorted(part["label"].unique()):
                rows = part[part["label"] == label]
                for row in rows.itertuples():
                    sec = sections[int(row.section)]
                    patch = crop_patches(sec.image, [row.x], [row.y], size, padded[int(row.section)])[0]
                    writer.write(records.make_example(
                        encoded=encode_png(patch), format="png", height=size, width=size,
                        image_id=int(row.section), patch_index=int(row.Index), x=int(row.x),
                        y=int(row.y), source_size=size, gene_symbol=names[int(label)],
                        gene_index=int(label), label=int(label), region=sec.name,
                        study="spatial"), names[int(label)], int(row.section))
        shards.update_index(out_dir, writer.info)
        counts[split] = writer.info.num_records
    genes = [shards.GeneEntry(n, i, -1, "") for i, n in enumerate(names)]
    shards.write_dataset_info(out_dir, shards.DatasetInfo(
        genes=genes, donors=[s.name for s in sections], source_size=size, patch_size=size,
        format="png", seed=seed, split_by="gene", extra=dict(extra or {})))
    shards.remove_index_lock(out_dir)
    return counts


# --------------------------------------------------------------------------- stage
@dataclasses.dataclass(frozen=True)
class SpatialConfig:
    """Settings of `bin/spatial` (sections -> labels -> one record set per patch size).

    Attributes:
      images: section images.
      spot_tables: one spot table per image.
      masks: one mask PNG per image, or empty (computed masks).
      out_dir: output directory.
      labels: the labelling rules (genes, radius, balance, ...).
      patch_sizes: patch sides R; one record set `OUT/p{R}` each.
      spot_scale: spot table units -> pixels.
      outside: "error" or "drop" spots outside the image.
      validation_fraction: share of each class's centres in the validation split.
      mask_config: `segment.MaskConfig` for computed masks (None: default).
    """

    images: tuple[str, ...]
    spot_tables: tuple[str, ...]
    out_dir: str
    labels: LabelConfig
    masks: tuple[str, ...] = ()
    patch_sizes: tuple[int, ...] = (16, 32, 48, 64, 128)
    spot_scale: float = 1.0
    outside: str = "error"
    validation_fraction: float = 0.1
    mask_config: object = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> SpatialConfig:
        """Checks the settings; returns self.

        Raises:
          SpatialError: naming the flag at fault.
        """
        if not self.images:
            raise SpatialError("--section_images is required")
        if len(self.spot_tables) != len(self.images):
            raise SpatialError(f"--spot_tables has {len(self.spot_tables)} file(s) for "
                               f"{len(self.images)} --section_images")
        if self.masks and len(self.masks) != len(self.images):
            raise SpatialError(f"--section_masks has {len(self.masks)} file(s) for "
                               f"{len(self.images)} --section_images")
        if not self.out_dir:
            raise SpatialError("--out is required")
        if not self.patch_sizes or any(p < 4 for p in self.patch_sizes):
            raise SpatialError(f"--patch_sizes must be sizes >= 4, got {self.patch_sizes}")
        if len(set(self.patch_sizes)) != len(self.patch_sizes):
            raise SpatialError(f"--patch_sizes repeats a size: {self.patch_sizes}")
        if not 0 <= self.validation_fraction < 1:
            raise SpatialError(f"--validation_fraction must be in [0, 1), got "
                               f"{self.validation_fraction}")
        return self

    def digest(self) -> str:
        """Hash of everything that determines the centres (resume check)."""
        key = {"images": self.images, "spots": self.spot_tables, "masks": self.masks,
               "labels": dataclasses.asdict(self.labels), "scale": self.spot_scale,
               "outside": self.outside, "val": self.validation_fraction}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def records_dir_for(out_dir: str, size: int) -> str:
    """`OUT/p{size}`: the record set of one patch size."""
    return os.path.join(out_dir, f"p{int(size)}")


def _records_done(path: str, digest: str) -> bool:
    from ish_tf.data import records, shards

    try:
        info = shards.load_dataset_info(path)
    except records.RecordsError:
        return False
    return (info is not None and info.extra.get("digest") == digest
            and bool(shards.completed_shards(path, "train")))


def run_spatial(cfg: SpatialConfig, log=None) -> dict:
    """Labels the sections and writes one record set per patch size.

    Resumable: a patch size whose record set was completed with the same inputs and
    rules (same digest) is kept; others are (re)written.

    Args:
      cfg: the stage's settings.
      log: optional `fn(str)` for progress lines.

    Returns:
      {"out_dir", "classes", "labels" (path), "summary" (DataFrame), "records": {size:
       {"dir", "counts", "reused"}}, "dropped_spots": {section: n}}.

    Raises:
      SpatialError: bad inputs (named), or a class without candidates.
    """
    cfg.validate()
    log = log or (lambda s: None)
    names = class_names(cfg.labels.genes)
    os.makedirs(cfg.out_dir, exist_ok=True)
    sections, frames, summaries, dropped = [], [], [], {}
    for i, image_path in enumerate(cfg.images):
        sec = load_section(image_path, cfg.spot_tables[i], cfg.masks[i] if cfg.masks else "",
                           scale=cfg.spot_scale, genes=cfg.labels.genes, outside=cfg.outside,
                           mask_config=cfg.mask_config, max_pixels=cfg.max_pixels)
        n_out = sec.dropped_spots
        if any(sec.name == other.name for other in sections):
            sec.name = f"{sec.name}_{i}"  # records and reports tell sections apart by name
        sections.append(sec)
        dropped[sec.name] = n_out
        lab = make_labels(sec.spots, sec.mask,
                          dataclasses.replace(cfg.labels, seed=cfg.labels.seed + 1000 * i))
        c = lab.centres.copy()
        c.insert(0, "section", i)
        frames.append(c)
        s = lab.summary.copy()
        s.insert(0, "section", sec.name)
        s["dropped_outside"] = n_out
        summaries.append(s)
        log(f"{sec.name}: {len(c)} centres ({', '.join(f'{r.class_name} {r.kept}' for r in lab.summary.itertuples())})")
    centres = pd.concat(frames, ignore_index=True)
    centres["split"] = assign_splits(centres["label"].to_numpy(), cfg.validation_fraction,
                                     cfg.labels.seed)
    summary = pd.concat(summaries, ignore_index=True)
    labels_path = os.path.join(cfg.out_dir, LABELS_NAME)
    atomic_write_text(labels_path, centres.to_csv(index=False))
    atomic_write_text(os.path.join(cfg.out_dir, LABEL_SUMMARY_NAME), summary.to_csv(index=False))
    digest = cfg.digest()
    out = {"out_dir": cfg.out_dir, "classes": names, "labels": labels_path, "summary": summary,
           "records": {}, "dropped_spots": dropped}
    for size in cfg.patch_sizes:
        path = records_dir_for(cfg.out_dir, size)
        if _records_done(path, digest):
            from ish_tf.data import shards

            index = shards.load_index(path)
            counts = {}
            for s in index["shards"]:
                counts[s["split"]] = counts.get(s["split"], 0) + s["num_records"]
            out["records"][size] = {"dir": path, "counts": counts, "reused": True}
            log(f"p{size}: complete already, kept")
            continue
        extra = {"digest": digest, "classes": names, "radius": cfg.labels.radius,
                 "sections": [s.name for s in sections], "kind": "spatial"}
        counts = write_patch_records(sections, centres, path, size, names, extra,
                                     seed=cfg.labels.seed)
        out["records"][size] = {"dir": path, "counts": counts, "reused": False}
        log(f"p{size}: {counts}")
    return out


def format_summary(result: dict) -> str:
    """A few lines describing what `run_spatial` wrote."""
    lines = [f"spatial: classes {', '.join(result['classes'])}; centres in {result['labels']}"]
    for row in result["summary"].itertuples():
        lines.append(f"  {row.section} {row.class_name}: {row.kept} kept of {row.candidates} "
                     f"candidates" + (f", {row.ambiguous} ambiguous skipped" if row.ambiguous else ""))
    for sec, n in result["dropped_spots"].items():
        if n:
            lines.append(f"  {sec}: {n} spot(s) outside the image dropped")
    for size, r in result["records"].items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        lines.append(f"  p{size}: {r['dir']} ({counts}{'; kept' if r['reused'] else ''})")
    return "\n".join(lines)
