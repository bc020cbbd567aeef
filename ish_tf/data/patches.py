"""Patch extraction over a manifest (`bin/extract`): planned, sharded, resumable.

`run_extract` selects the manifest's images, splits them by gene (or donor) into
train/validation/test, plans whole genes per shard, and writes
``OUT/{split}-NNNNN-of-NNNNN.tfrecord`` shards with ``OUT/index.json``, ``OUT/genes.csv``
and ``OUT/extract_report.csv`` (one row per image: status, patch count, reason). Images
are processed by a pool of worker processes (`write_shards`, shared with
`ish_tf.families.cdae.whole`); each shard is written under a temporary name and renamed when
complete, so a rerun keeps complete shards and redoes the rest.

The sampling of one image's patches (`extract_image_patches`, `sample_patches`) is in
`ish_tf.data.patch_sampling`; the settings (`RecordSetConfig`, `ExtractConfig`) are here.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import fcntl
import hashlib
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from absl import logging
from PIL import Image

from ish_tf import fs
from ish_tf.data.patch_sampling import (
    FEW_PATCHES,
    OK,
    UNREADABLE,
    ImageIOError,
    ImageResult,
)
from ish_tf.data.segment import MaskConfig
from ish_tf.io_utils import Progress, atomic_open, atomic_path, remove_stale_tmp

IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png")
SPLIT_BY: tuple[str, ...] = ("gene", "donor")


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
        # Record sets written before these options resume unchanged at their defaults.
        for name, default in (("background", "bright"), ("method", "deficit"),
                              ("threshold_mode", "auto"), ("sensitivity", 1.0)):
            if key[name] == default:
                del key[name]
        if key["rel_threshold"] is None and self.mask.method == "deficit":
            key["rel_threshold"] = 0.1  # the deficit score's own, as it was written
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
      source_um: > 0: windows of this many micrometres instead of `source_size` pixels,
        converted per image with the manifest's `um_per_pixel` (and `read_downsample`);
        `image_config` gives an image's own `source_size`.
      max_pixels: most pixels decoded per image (`ish_tf.data.image_io`).
      read_downsample: the image's reduction at reading (set per image by `image_config`
        from the manifest's `read_downsample`; 1 = full resolution).
      split_assign: "plan" (genes or donors split before extraction, by count) or
        "balanced" (split after counting each image's patches, so each split gets close
        to its share of patches; `ish_tf.data.splits`).
      allow_empty_splits: a requested split left without patches is a warning, not an
        error.
      mask_qc: sections at each end of the tissue-fraction range in OUT/mask_qc.html,
        with the outliers (`ish_tf.data.mask_qc`); 0 = no contact sheet (outlying images
        are still named).
      fast_decode: decode JPEG sources at 1/2, 1/4 or 1/8 scale when S / R is an integer
        >= 2, and mask, sample and crop there (`ish_tf.data.fast_decode`; the same windows
        for the same mask, patches within ~35-50 dB PSNR of the full-resolution ones).
    """

    patches_per_image: int = 50
    source_size: int = 1024
    patch_size: int = 256
    min_fraction: float = 0.9
    max_tries: int = 500
    save_overlays: bool = False
    source_um: float = 0.0
    max_pixels: int = 400_000_000
    read_downsample: int = 1
    split_assign: str = "plan"
    allow_empty_splits: bool = False
    mask_qc: int = 5
    fast_decode: bool = False

    def __post_init__(self) -> None:
        from ish_tf.data.splits import SPLIT_ASSIGN

        checks = [
            (self.source_um >= 0, "source_um must be >= 0 (0 = windows of source_size pixels)"),
            (self.max_pixels >= 1, "max_pixels must be >= 1"),
            (self.read_downsample >= 1, "read_downsample must be >= 1"),
            (self.split_assign in SPLIT_ASSIGN, f"split_assign must be one of {SPLIT_ASSIGN}"),
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
        key = {
            "patches_per_image": self.patches_per_image, "source_size": self.source_size,
            "patch_size": self.patch_size, "min_fraction": self.min_fraction,
            "max_tries": self.max_tries, "segmenter": self.mask.segmenter,
            **self.sharing_key(),
            # Only when on, so record sets written before the option resume unchanged.
            **({"fast_decode": True} if self.fast_decode else {}),
        }
        if self.split_assign != "plan":  # older record sets resume unchanged
            key["split_assign"] = self.split_assign
        if self.source_um:
            key["source_um"] = self.source_um
            del key["source_size"]
        return key

    def record_sizes(self) -> tuple[int, int]:
        return (0 if self.source_um else self.source_size), self.patch_size


def image_config(cfg: ExtractConfig, row: Any) -> ExtractConfig:
    """`cfg` as it applies to one manifest row: its reading reduction and, with
    `cfg.source_um`, its window side in (read) pixels, `round(source_um / (um_per_pixel x
    read_downsample))`.

    Raises:
      ExtractError: `source_um` is set and the row has no um_per_pixel.
    """
    down = _row_int(row, "read_downsample", 1)
    size = cfg.source_size
    if cfg.source_um:
        um = getattr(row, "um_per_pixel", None)
        if um is None or pd.isna(um) or float(um) <= 0:
            raise ExtractError(f"image {int(row.image_id)} has no um_per_pixel; --source_um "
                               "needs it on every row (or use --source_size in pixels)")
        size = max(1, round(cfg.source_um / (float(um) * down)))
    if size == cfg.source_size and down == cfg.read_downsample:
        return cfg
    return dataclasses.replace(cfg, source_size=size, read_downsample=down)


def _row_int(row: Any, name: str, default: int) -> int:
    value = getattr(row, name, None)
    if value is None or pd.isna(value):
        return default
    return int(value)


def check_scale(df: pd.DataFrame, cfg: ExtractConfig) -> None:
    """Refuses `--source_um` over a manifest whose rows lack um_per_pixel, naming them.

    Raises:
      ExtractError: names the count and the first image ids without a scale.
    """
    if not cfg.source_um:
        return
    um = (pd.to_numeric(df["um_per_pixel"], errors="coerce") if "um_per_pixel" in df.columns
          else pd.Series(np.nan, index=df.index))
    missing = df.loc[~(um > 0), "image_id"].astype(int).tolist()
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ExtractError(
            f"{cfg.manifest}: --source_um={cfg.source_um:g} needs the um_per_pixel column on "
            f"every row; {len(missing)} of {len(df)} image(s) have none (image_id {shown}); "
            "fill it (bin/fetch writes it; bin/ingest --um_per_pixel, a table column or TIFF "
            "metadata) or use --source_size in pixels")


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
    # Scale and reading level change the patches; older manifests had neither column.
    cols += [c for c in ("um_per_pixel", "read_downsample")
             if c in df.columns and df[c].notna().any()]
    text = df[cols].astype(str).sort_values("image_id").to_csv(index=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def plan_extraction(df: pd.DataFrame, cfg: RecordSetConfig,
                    assignment: dict[str, str] | None = None,
                    ) -> tuple[Any, list[ShardPlan], dict[int, str]]:
    """Splits, vocabularies and the shard plan of a manifest.

    Args:
      df: validated manifest (already filtered to `cfg.genes`).
      cfg: extraction settings (patches or whole sections).
      assignment: gene (or donor, with split_by="donor") -> split, decided elsewhere
        (`ish_tf.data.splits.balance_splits`); None = split by count now.

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
        gene_split = (dict(assignment) if assignment is not None
                      else shards.split_genes(genes, cfg.split_fractions, cfg.seed))
        image_split = dict(zip(df["image_id"].astype(int),
                               df["gene_symbol"].astype(str).map(gene_split), strict=True))
        donor_split: dict[str, str] = {}
    else:
        donor_split = (dict(assignment) if assignment is not None
                       else shards.split_donors(donors, cfg.split_fractions, cfg.seed))
        image_split = dict(zip(df["image_id"].astype(int),
                               df["donor_id"].astype(str).map(donor_split), strict=True))
        gene_split = {}
    source_size, patch_size = cfg.record_sizes()
    info = shards.DatasetInfo(
        genes=shards.make_gene_vocabulary(genes, gene_split, entrez), donors=donors,
        source_size=source_size, patch_size=patch_size, format=cfg.image_format,
        seed=cfg.seed, split_by=cfg.split_by, donor_splits=donor_split,
        extra={"manifest": fs.abspath(cfg.manifest), "manifest_digest": _manifest_digest(df),
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
    from ish_tf.data.fast_decode import extract_patches

    image_path, image_id, cfg, mask_dir, overlay_dir = args
    try:
        return extract_patches(image_path, image_id, cfg, mask_dir, overlay_dir)
    except ImageIOError as e:  # the input's storage, not the image: stop the run
        raise ExtractError(str(e)) from None
    except Exception as e:  # never lose the whole shard to one image
        return ImageResult(image_id, UNREADABLE, f"{image_path}: {type(e).__name__}: {e}")


def _read_report(path: str) -> dict[int, dict]:
    if not fs.exists(path):
        return {}
    try:
        df = pd.read_csv(fs.readable(path), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        logging.warning("%s: unreadable, rebuilding it (%s)", path, e)
        return {}
    if "image_id" not in df.columns:
        return {}
    return {int(r["image_id"]): dict(r) for r in df.to_dict("records")}


def _write_report(path: str, rows: dict[int, dict],
                  columns: Sequence[str] = REPORT_COLUMNS) -> None:
    df = pd.DataFrame([rows[k] for k in sorted(rows)], columns=list(columns))
    if fs.is_url(path):  # pandas writes no gfile URL: the same text through a file object
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(df.to_csv(index=False))
        return
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

    A shard whose images were all unreadable is only marked complete once some image of
    the run was readable: a missing or unreadable input must not pass for bad images.

    Returns:
      (report rows by image id, shards written, shards resumed).

    Raises:
      ExtractError: an images directory of the manifest does not exist, every image of
        the run was unreadable, or an image could not be read for an I/O error; no shard
        is marked complete from such input.
    """
    from ish_tf.data import manifest as mf
    from ish_tf.data import shards

    report_path = os.path.join(out, stage.report_name)
    report = _read_report(report_path)
    done = {split: shards.completed_shards(out, split) for split in shards.SPLITS}
    pending = [p for p in plans if p.index not in done[p.split]]
    resumed = len(plans) - len(pending)
    _check_image_dirs(manifest, pending)
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
    # Shards of unreadable images only, held back until the run shows its input works.
    held: list[tuple[dict, Any, str]] = []
    readable = resumed > 0
    first_reason = ""

    def mark_complete(new_rows: dict, info: Any) -> None:
        nonlocal written
        report.update(new_rows)
        _write_report(report_path, report, stage.report_columns)
        shards.update_index(out, info)
        written += 1
        if hooks.after_shard:
            hooks.after_shard(info)

    try:
        with Progress(sum(len(p.rows) for p in pending), stage.name, progress_enabled,
                      unit="images") as bar:
            for plan in pending:
                rows = list(plan.rows.itertuples(index=False))
                tasks = [stage.task(mf.image_path(manifest, str(r.path)), r) for r in rows]
                results = pool.imap(stage.worker, tasks) if pool else map(stage.worker, tasks)
                new_rows = {}
                shard_readable = False
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
                        note = size_mismatch(row, res)
                        if note and "reason" in new_rows[image_id]:
                            reason = str(new_rows[image_id]["reason"] or "")
                            new_rows[image_id]["reason"] = f"{reason}; {note}" if reason else note
                        if res.status not in (OK, FEW_PATCHES):
                            logging.debug("image %s: %s", image_id, res.reason)
                        if res.status != UNREADABLE:
                            shard_readable = True
                        elif not first_reason:
                            first_reason = res.reason
                        bar.update()
                        if hooks.after_image:
                            hooks.after_image(plan.split, plan.index, res)
                # The shard file is in place; record its images, then mark it complete.
                if not (readable or shard_readable):
                    held.append((new_rows, writer.info, writer.path))
                    continue
                readable = True
                for rows_, info_, _ in held:
                    mark_complete(rows_, info_)
                held.clear()
                mark_complete(new_rows, writer.info)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if held:
        for _, _, path in held:
            with contextlib.suppress(OSError):
                os.remove(path)
        n = sum(len(rows_) for rows_, _, _ in held)
        raise ExtractError(
            f"every one of the {n} image(s) of {manifest} was unreadable (first: "
            f"{first_reason}); no shard was marked complete: check the images and rerun")
    planned = {int(i) for p in plans for i in p.rows["image_id"]}
    report = {k: v for k, v in report.items() if k in planned}
    _write_report(report_path, report, stage.report_columns)
    return report, written, resumed


def _check_image_dirs(manifest: str, plans: list[ShardPlan]) -> None:
    """Refuses to start when a directory holding the manifest's images does not exist.

    Raises:
      ExtractError: names the first missing directory and how many images it should hold.
    """
    from ish_tf.data import manifest as mf

    counts: dict[str, int] = {}
    for plan in plans:
        for path in plan.rows["path"]:
            d = fs.dirname(mf.image_path(manifest, str(path)))
            counts[d] = counts.get(d, 0) + 1
    missing = [d for d in sorted(counts) if not fs.isdir(d)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExtractError(
            f"{missing[0]}: the images directory does not exist{more}; it should hold "
            f"{counts[missing[0]]} image(s) of {manifest}; nothing was extracted: fix the "
            "path (or restore the directory) and rerun")


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
    from ish_tf.data import image_io
    from ish_tf.data.manifest import image_path
    from ish_tf.data.segment import guess_background

    if cfg.mask.segmenter != "classical" or len(df) == 0:
        return None
    rows = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(n, len(df))).astype(int))]
    other = []
    for row in rows.itertuples():
        path = image_path(cfg.manifest, row.path)
        # A small reduced read (JPEG: DCT scaling; pyramids: a low level) is enough.
        longest = max(int(getattr(row, "width", 0) or 0), int(getattr(row, "height", 0) or 0))
        try:
            small = image_io.read_image(path, max(8, image_io.preview_factor(longest, 1024)),
                                        cfg.max_pixels
                                        if isinstance(cfg, ExtractConfig) else
                                        image_io.DEFAULT_MAX_PIXELS)
            kind = guess_background(small)
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
        fs.makedirs(d)
    removed = [fs.join(d, n) for d in dirs for n in remove_stale_tmp(d)]
    if removed:
        logging.info("removed %d partial file(s) of an interrupted run: %s", len(removed),
                     ", ".join(os.path.basename(r) for r in removed))
    _check_resume(out, info)
    shards.write_dataset_info(out, info)
    return removed


LOCK_NAME = ".extract.lock"


@contextlib.contextmanager
def exclusive_out_dir(out: str) -> Iterator[None]:
    """Holds OUT for one run: an exclusive lock, and write errors as one clear line.

    A second run into the same OUT would remove the first one's temporary shards as
    leftovers of a crash; it fails at once instead. The lock (`flock` on OUT/.extract.lock)
    goes with the process, so a killed run never leaves OUT locked.

    Raises:
      ExtractError: another run holds OUT; or a file under OUT could not be written
        (read-only, disk full), naming the path and the system's reason.
    """
    if fs.is_url(out):
        # Object stores have no file locks: OUT at a URL is held by convention (one run
        # at a time), and nothing is locked or left behind.
        try:
            fs.makedirs(out)
        except OSError as e:
            raise _write_error(e, out) from e
        with _write_errors_named(out):
            yield
        return
    lock_path = os.path.join(out, LOCK_NAME)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(lock_path, "a")  # noqa: SIM115 - held until the run ends
    except OSError as e:
        raise _write_error(e, out) from e
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExtractError(
                f"{out}: another extract is writing there (it holds {lock_path}); wait for "
                "it to finish, or write to another --out") from None
        with _write_errors_named(out):
            yield
            # The run is over and holds OUT: its lock files go (the index's, then, just
            # before the lock is released, its own), so a finished OUT has none left.
            from ish_tf.data import shards

            shards.remove_index_lock(out)
            with contextlib.suppress(OSError):
                os.remove(lock_path)
    finally:
        lock.close()  # releases the lock


@contextlib.contextmanager
def _write_errors_named(out: str):
    """Turns write errors inside the block into ExtractErrors naming the file (OSError) or
    OUT (TensorFlow's gfile and TFRecordWriter errors); anything else passes."""
    try:
        yield
    except OSError as e:
        raise _write_error(e, out) from e
    except Exception as e:
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(e, tf.errors.OpError):
            raise
        raise ExtractError(f"{out}: cannot write ({e.message}); check that it is writable "
                           "and has space, then rerun to resume") from e


def _write_error(e: OSError, out: str) -> ExtractError:
    path = e.filename if isinstance(e.filename, str) and e.filename else out
    return ExtractError(f"{path}: cannot write ({e.strerror or e}); check that {out} is "
                        "writable and its disk has space, then rerun to resume")


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
      ExtractError: nothing to extract, OUT holds a dataset of other settings, another
        run is writing OUT, OUT cannot be written, or the images cannot be read (a
        missing directory, an I/O error, not one readable image).
    """
    with exclusive_out_dir(cfg.out_dir):
        return _run_extract(cfg, hooks, progress_enabled)


def _run_extract(cfg: ExtractConfig, hooks: ExtractHooks | None,
                 progress_enabled: bool | None) -> dict:
    from ish_tf.data import records

    hooks = hooks or ExtractHooks()
    df = select_images(cfg)
    check_scale(df, cfg)
    check_background(df, cfg)
    out = cfg.out_dir
    mask_dir = os.path.join(out, "masks")
    overlay_dir = os.path.join(out, "overlays") if cfg.save_overlays else None
    assignment = None
    if cfg.split_assign == "balanced":
        assignment = _balanced_assignment(df, cfg, mask_dir, progress_enabled)
    info, plans, _ = plan_extraction(df, cfg, assignment)
    removed = prepare_out_dir(out, info, mask_dir, overlay_dir)

    def examples(common: dict, row: Any, res: ImageResult) -> list:
        own = image_config(cfg, row)
        # Windows are recorded in the stored file's pixels, whatever level was read.
        n = own.read_downsample
        return [records.make_example(
            image_encoded=p.encoded, patch_index=k, x=p.x * n, y=p.y * n,
            source_size=own.source_size * n, image_format=cfg.image_format,
            image_height=cfg.patch_size, image_width=cfg.patch_size, **common)
            for k, p in enumerate(res.patches)]

    stage = ShardedStage(
        name="extract", worker=_extract_task,
        task=lambda path, row: (path, int(row.image_id), image_config(cfg, row), mask_dir,
                                overlay_dir),
        examples=examples,
        report_fields=lambda res: {"n_patches": res.n_patches,
                                   "tissue_fraction": round(res.tissue_fraction, 4),
                                   "reason": res.reason},
        report_name=REPORT_NAME, report_columns=REPORT_COLUMNS, hooks=hooks)
    report, written, resumed = write_shards(
        stage, out, cfg.manifest, info, plans, workers=cfg.workers,
        compression=cfg.compression, progress_enabled=progress_enabled)
    report_path = os.path.join(out, REPORT_NAME)
    summary = extract_summary(out, report, plans, removed, written, resumed, report_path)
    return check_outcome(summary, report, df, cfg)


def check_outcome(summary: dict, report: dict[int, dict], df: pd.DataFrame,
                  cfg: ExtractConfig) -> dict:
    """After either runner: mask QC (outliers named, contact sheet) and the splits' shares
    (an empty requested split an error, or allowed a warning); adds both to `summary`.

    Raises:
      ExtractError: a requested split holds no patches (unless `cfg.allow_empty_splits`).
    """
    summary["mask_qc"] = _mask_qc(report, df, cfg)
    summary["split_shares"] = _check_split_shares(summary, cfg)
    return summary


def plan_assignment(df: pd.DataFrame, cfg: ExtractConfig, mask_dir: str,
                    progress_enabled: bool | None = None) -> dict[str, str] | None:
    """The split assignment `plan_extraction` takes: None for "plan", else balanced."""
    if cfg.split_assign != "balanced":
        return None
    return _balanced_assignment(df, cfg, mask_dir, progress_enabled)


def _mask_qc(report: dict[int, dict], df: pd.DataFrame, cfg: ExtractConfig) -> list[str]:
    """Names images of outlying tissue fraction (logged) and writes the contact sheet."""
    from ish_tf.data import mask_qc

    rows = pd.DataFrame([report[k] for k in sorted(report)], columns=list(REPORT_COLUMNS))
    outliers = mask_qc.find_outliers(rows)
    sheet = mask_qc.write_contact_sheet(cfg.out_dir, rows, df, cfg.manifest, cfg.mask_qc,
                                        outliers=outliers)
    lines = mask_qc.qc_lines(outliers, sheet)
    for line in lines:
        if line.startswith("warning: "):
            logging.warning("%s", line[len("warning: "):])
    return lines


def _balanced_assignment(df: pd.DataFrame, cfg: ExtractConfig, mask_dir: str,
                         progress_enabled: bool | None) -> dict[str, str]:
    """The split of each gene (or donor) from its patch count: OUT/splits.csv if a run
    wrote it for the same items, else a counting pass (`ish_tf.data.splits`)."""
    from ish_tf.data import manifest as mf
    from ish_tf.data import splits

    items = sorted(set(splits.split_items(df, cfg.split_by)))
    try:
        known = splits.read_assignment(cfg.out_dir, items)
    except splits.SplitError as e:
        raise ExtractError(str(e)) from e
    if known is not None:
        logging.info("split assignment read from %s", splits.splits_path(cfg.out_dir))
        return known
    # Refuse an OUT of other settings before writing masks into it.
    provisional, _, _ = plan_extraction(df, cfg)
    _check_resume(cfg.out_dir, provisional)
    os.makedirs(mask_dir, exist_ok=True)
    paths = [mf.image_path(cfg.manifest, str(p)) for p in df["path"]]
    try:
        counts = splits.count_patches(df, cfg, mask_dir, paths, cfg.workers, progress_enabled)
    except ImageIOError as e:
        raise ExtractError(str(e)) from None
    assignment = splits.balance_splits(counts, cfg.split_fractions, cfg.seed)
    splits.write_assignment(cfg.out_dir, assignment, counts)
    return assignment


def _check_split_shares(summary: dict, cfg: ExtractConfig) -> list[str]:
    """Each requested split's share of the patches; an empty one is an error (or warning)."""
    from ish_tf.data import splits

    patches = {s: v["patches"] for s, v in summary["splits"].items()}
    what = "genes" if cfg.split_by == "gene" else "donors"
    hint = (f"; too few {what} yield patches for every split (see {summary['report']}); "
            "lower --min_fraction or --source_size, or --allow_empty_splits to accept"
            if cfg.split_assign == "balanced" else
            f"; {what} were split before their images' outcomes were known: rerun into a "
            f"fresh --out with --split_assign=balanced, or --allow_empty_splits to accept")
    try:
        lines = splits.check_splits(patches, cfg.split_fractions,
                                    allow_empty=cfg.allow_empty_splits, hint=hint)
    except splits.SplitError as e:
        raise ExtractError(str(e)) from e
    for line in lines:
        if line.startswith("warning: "):
            logging.warning("%s", line[len("warning: "):])
    return lines


def _text(value: Any) -> str:
    """A manifest string cell as str ('' for missing)."""
    if value is None or pd.isna(value):
        return ""
    return str(value)


SIZE_MISMATCH = "manifest says"


def size_mismatch(row: Any, result: Any) -> str:
    """A note when an image read is not the size its manifest row declares, else "".

    The manifest's width and height describe the file (bin/fetch and bin/ingest read
    them from it); another size means another file than the one listed, or one rescanned
    or resized since, and the physical scale of its patches is then not what was planned.
    """
    width, height = int(getattr(result, "width", 0) or 0), int(getattr(result, "height", 0) or 0)
    if not width or not height:
        return ""
    declared = (int(getattr(row, "width", 0) or 0), int(getattr(row, "height", 0) or 0))
    down = _row_int(row, "read_downsample", 1)
    if down > 1 and all(declared):  # read reduced: compare with the reduced size
        from ish_tf.data.image_io import reduced_size

        if reduced_size(*declared, down) == (width, height):
            return ""
    if declared == (width, height) or not all(declared):
        return ""
    return (f"{SIZE_MISMATCH} {declared[0]}x{declared[1]}, the image read is "
            f"{width}x{height}")


def extract_summary(out: str, report: dict[int, dict], plans: list[ShardPlan],
                    removed: list[str], written: int, resumed: int, report_path: str) -> dict:
    """The summary of an extraction (`format_summary` prints it): per split the images,
    patches, shards and per-status image counts, the skipped images by status, the
    images whose declared size differed, and the paths of the index and the report.
    Shared by the local, Beam and whole-section extractors."""
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
    mismatched = []
    for row in report.values():
        if SIZE_MISMATCH in str(row.get("reason", "")):
            mismatched.append(int(row["image_id"]))
        s = splits.get(str(row["split"]))
        status = str(row["status"])
        if s is not None:
            s["status"][status] = s["status"].get(status, 0) + 1
        if status != OK:
            skipped[status] = skipped.get(status, 0) + 1
    return {"out_dir": out, "report": report_path, "index": shards.index_path(out),
            "removed_tmp": removed, "shards_written": written, "shards_resumed": resumed,
            "splits": splits, "skipped": skipped, "size_mismatch": sorted(mismatched)}


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
    warnings = [w for w in summary.get("split_shares", []) if w.startswith("warning: ")]
    lines.extend(f"  {w}" for w in warnings)
    lines.extend(f"  {w}" for w in summary.get("mask_qc", []))
    mismatched = summary.get("size_mismatch") or []
    if mismatched:
        shown = ", ".join(str(i) for i in mismatched[:5]) + (", ..." if len(mismatched) > 5 else "")
        lines.append(f"  warning: {len(mismatched)} image(s) are not the size their manifest row "
                     f"declares (image_id {shown}): other files than listed, or rescanned/resized "
                     f"since; the patch scale differs from the plan (details in "
                     f"{summary['report']})")
    if summary["removed_tmp"]:
        lines.append(f"  removed {len(summary['removed_tmp'])} partial file(s) of an "
                     "interrupted run")
    return "\n".join(lines)
