"""`bin/extract`: tissue masks, patch sampling and sharded TFRecords from a manifest.

Example:
  bin/extract --manifest=data/synth/manifest.csv --out=data/synth_records
  bin/extract --flagfile=configs/extract_quickstart.cfg

Writes OUT/{split}-NNNNN-of-NNNNN.tfrecord shards (whole genes per shard),
OUT/index.json, OUT/genes.csv, OUT/extract_report.csv (one row per image: status,
patch count, reason), OUT/masks/{image_id}.png (cached masks) and OUT/extract_flags.cfg
(the resolved flags). `--runner=beam` runs the same stage as an Apache Beam pipeline
(`ish_tf.data.beam_extract`; `--beam_options` passes the runner's options through) and
writes the same shards, byte for byte. Rerunning the same command resumes: complete shards are kept,
partial files of an interrupted run are removed and their shards redone.
An RxRx1 manifest (`bin/ingest --layout=rxrx1`; told from its channel columns) gives one
6-channel raw record per site instead, split by experiment, with OUT/channel_stats.csv
(`ish_tf.data.plate_records`, `ish_tf.data.plate_norm`):
  bin/extract --manifest=data/plates_manifest/manifest.csv --out=data/plate_records
`--whole_images` writes one downsampled whole section per record instead (see
`ish_tf.families.cdae.whole`), with the same shards, index, report and resume.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ish_tf import config, fs
from ish_tf.cli import FlagDefiner, define_common, definer, run, usage_errors

NAME = "extract"


def define_mask_background(d: FlagDefiner) -> None:
    """--mask_background and the classical segmenter's settings (--mask_method,
    --mask_threshold_mode, --mask_sensitivity, --mask_min_object_fraction); bin/extract,
    bin/spatial and bin/predict each define them."""
    d.enum("mask_background", "bright", ["bright", "dark"], "Slide background for the "
           "classical segmenter: bright (brightfield ISH on a white slide) or dark "
           "(fluorescence sections on black).")
    d.enum("mask_method", "od", ["od", "deficit"], "Classical mask score: od (optical "
           "density against the local slide colour: robust to exposure, gamma and stain "
           "saturation/hue) or deficit (grey levels below the local slide colour, the score "
           "of record sets extracted before issue 21).")
    d.enum("mask_threshold_mode", "auto", ["auto", "otsu", "triangle", "fixed"],
           "Classical mask threshold: auto (noise of the slide and share of the stain), "
           "otsu, triangle, or fixed (--mask_threshold).")
    d.float("mask_threshold", -1.0, "--mask_threshold_mode=fixed: the threshold (deficit: "
            "grey levels; od: optical density); -1 = unset.")
    d.float("mask_sensitivity", 1.0, "> 1 keeps fainter tissue (threshold moved towards "
            "the slide), < 1 less.", lower_bound=0.01)
    d.float("mask_min_object_fraction", 5e-4, "Tissue pieces smaller than this fraction "
            "of the image are dropped (dust, debris).", lower_bound=0.0, upper_bound=0.5)


def mask_settings(fv) -> dict:
    """The classical segmenter's settings from the --mask_* flags, as MaskConfig keywords."""
    return dict(background=fv.mask_background, method=fv.mask_method,
                threshold_mode=fv.mask_threshold_mode,
                threshold=fv.mask_threshold if fv.mask_threshold >= 0 else None,
                sensitivity=fv.mask_sensitivity,
                min_object_fraction=fv.mask_min_object_fraction)


def define_runner(d: FlagDefiner, what: str) -> None:
    """--runner and --beam_options (bin/extract and bin/embed each define them)."""
    d.enum("runner", "local", ["local", "beam"], f"Where {what} runs: local (worker processes "
           "of this machine) or beam (an Apache Beam pipeline: FnApiRunner here, or the runner "
           "--beam_options names; needs pip install -e .[beam]).")
    d.string("beam_options", "", "Beam pipeline options for --runner=beam, e.g. "
             "'--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp "
             "--setup_file=./setup.py' or '--runner=FlinkRunner --flink_master=HOST:8081'; "
             "empty = Beam's FnApiRunner on this machine with --workers processes.")


def define_extract(fv) -> None:
    """Flags of `bin/extract` (manifest -> masks, patches, sharded TFRecords)."""
    d = definer(fv, NAME)
    d.string("manifest", "", "Manifest CSV written by bin/fetch, bin/ingest or bin/synth.")
    d.string("out", "", "Output directory.")
    d.string("genes", "", "Comma-separated genes to keep (or @FILE, one per line); empty = "
             "all.")
    d.integer("workers", 1, "Worker processes.", lower_bound=1)
    d.integer("patches_per_image", 50, "N: most patches per image.", lower_bound=1)
    d.integer("source_size", 1024, "S: side of a patch window in original-image pixels.",
              lower_bound=1)
    d.float("source_um", 0.0, "Windows of this many micrometres instead of --source_size "
            "pixels, from each image's um_per_pixel manifest column (0 = off).",
            lower_bound=0.0)
    d.integer("max_pixels", 400_000_000, "Most pixels decoded per image (after any reduced-"
              "level read, bin/ingest --downsample); raise it for huge images if the memory "
              "is there.", lower_bound=1)
    d.integer("patch_size", 256, "R: side of the stored (resized) patch.", lower_bound=1)
    d.float("min_fraction", 0.9, "F: least tissue fraction of a window.", lower_bound=0.0,
            upper_bound=1.0)
    d.integer("max_tries", 500, "T: most random windows tried per image.", lower_bound=1)
    d.enum("format", "jpeg", ["jpeg", "png"], "Encoding of stored patches.")
    d.integer("jpeg_quality", 90, "JPEG quality of stored patches.", lower_bound=1,
              upper_bound=95)
    d.integer("num_shards", 4, "Most TFRecord shards per split (whole genes per shard).",
              lower_bound=1)
    d.enum("compression", "none", ["none", "gzip"], "TFRecord compression.")
    d.enum("split_by", "gene", ["gene", "donor"], "Hold out unseen genes or unseen donors in "
           "validation/test.")
    d.string("split_fractions", "0.8,0.1,0.1", "train,validation,test fractions.")
    d.enum("split_assign", "plan", ["plan", "balanced"], "plan: split genes (donors) by "
           "count before extraction; balanced: count each image's patches first (masks are "
           "cached for the extraction) and split so each split gets close to its share of "
           "patches; written to OUT/splits.csv and reused on resume.")
    d.bool("allow_empty_splits", False, "A requested split left without patches is a "
           "warning instead of an error.")
    d.integer("mask_qc_images", 5, "Sections at each end of the tissue-fraction range shown "
              "(with the outliers) in OUT/mask_qc.html; 0 = no contact sheet.", lower_bound=0)
    d.enum("segmenter", "classical", ["classical", "unet"], "Foreground mask method.")
    d.string("unet_path", "", "Trained U-Net .keras file for --segmenter=unet.")
    define_mask_background(d)
    d.integer("mask_work_size", 512, "Longest side of the resolution masks are computed at.",
              lower_bound=16)
    d.bool("fast_decode", False, "Decode JPEG sections at 1/2, 1/4 or 1/8 scale when "
           "--source_size / --patch_size is an integer >= 2, and mask, sample and crop there "
           "(same windows for the same mask; about 4x faster; patches within ~35-50 dB PSNR "
           "of the full-resolution Lanczos ones). Other formats keep the full decode.")
    d.bool("save_overlays", False, "Also write OUT/overlays/{image_id}.png (mask over image) "
           "for visual checks.")


def extract_config(fv):
    """`ish_tf.data.patches.ExtractConfig` from the extract flags (and --seed).

    Raises:
      ValueError: --split_fractions is not three numbers, or --genes names an unreadable file.
    """
    from ish_tf.data.patches import ExtractConfig
    from ish_tf.data.segment import MaskConfig

    try:
        fractions = tuple(float(v) for v in config.parse_list(fv.split_fractions))
    except ValueError as e:
        raise ValueError(f"--split_fractions must be three numbers, got "
                         f"{fv.split_fractions!r}") from e
    if len(fractions) != 3:
        raise ValueError(f"--split_fractions must be three numbers, got {fv.split_fractions!r}")
    genes_flag = fv.genes or ""
    if genes_flag.startswith("@"):
        try:
            with open(genes_flag[1:], encoding="utf-8") as f:
                genes = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ValueError(f"--genes={genes_flag}: cannot read the gene list: {e}") from e
    else:
        genes = config.parse_list(genes_flag)
    mask = MaskConfig(segmenter=fv.segmenter, unet_path=fv.unet_path or None,
                      work_size=fv.mask_work_size, **mask_settings(fv))
    return ExtractConfig(
        manifest=fv.manifest, out_dir=fv.out, patches_per_image=fv.patches_per_image,
        source_size=fv.source_size, patch_size=fv.patch_size, min_fraction=fv.min_fraction,
        max_tries=fv.max_tries, image_format=fv.format, jpeg_quality=fv.jpeg_quality,
        num_shards=fv.num_shards, compression=None if fv.compression == "none" else "GZIP",
        split_by=fv.split_by, split_fractions=fractions, workers=fv.workers, seed=fv.seed,
        genes=tuple(genes), mask=mask, save_overlays=fv.save_overlays,
        split_assign=fv.split_assign, allow_empty_splits=fv.allow_empty_splits,
        source_um=fv.source_um, max_pixels=fv.max_pixels, mask_qc=fv.mask_qc_images,
        fast_decode=fv.fast_decode)


# --------------------------------------------------------------------------- whole images
def define_whole(fv) -> None:
    """Flags of whole-section records (`bin/extract --whole_images`, `ish_tf.families.cdae.whole`)."""
    d = definer(fv, NAME)
    d.bool("whole_images", False, "Write one downsampled grayscale whole section per record "
           "(cropped to the tissue mask's bounding box, padded to --whole_aspect with the "
           "slide background) instead of patches.")
    d.integer("whole_size", 128, "Height of the stored whole sections, pixels.", lower_bound=8)
    d.float("whole_aspect", 1.0, "Width / height of the stored whole sections.",
            lower_bound=0.05)
    d.float("whole_margin", 0.02, "Margin around the tissue's bounding box, as a fraction of "
            "its longer side.", lower_bound=0.0, upper_bound=1.0)


def whole_config(fv):
    """`ish_tf.families.cdae.whole.WholeConfig` from the extract flags (manifest, out, genes, shards,
    splits, mask, workers, seed, --format) and the --whole_* flags.

    Raises:
      ValueError: as `extract_config`, or a bad whole-image setting.
    """
    from ish_tf.data.patches import RecordSetConfig
    from ish_tf.families.cdae.whole import WholeConfig

    ext = extract_config(fv)
    shared = {f.name: getattr(ext, f.name) for f in dataclasses.fields(RecordSetConfig)}
    return WholeConfig(size=fv.whole_size, aspect=fv.whole_aspect, margin=fv.whole_margin,
                       **shared)


# --------------------------------------------------------------------------- plates
def define_plates(fv) -> None:
    """Flags of fluorescence plate records (`bin/extract` on an RxRx1 manifest,
    `ish_tf.data.plate_records`)."""
    d = definer(fv, NAME)
    d.integer("site_size", 0, "RxRx1 manifests: side of the stored 6-channel sites (box "
              "downsampling); 0 = as on disk (RxRx1: 512).", lower_bound=0)
    d.list("validation_experiments", [], "RxRx1 manifests: labelled experiments held out "
           "for validation (default: the last --validation_per_cell_type of each cell type).")
    d.list("test_experiments", [], "RxRx1 manifests: labelled experiments held out for test "
           "(the test-dataset experiments always go to test).")
    d.integer("validation_per_cell_type", 1, "RxRx1 manifests: labelled experiments per cell "
              "type held out for validation when --validation_experiments is empty.",
              lower_bound=0)


def plates_config(fv):
    """`ish_tf.data.plate_records.PlateExtractConfig` from the flags."""
    from ish_tf.data.plate_records import PlateExtractConfig

    return PlateExtractConfig(
        manifest=fv.manifest, out_dir=fv.out, site_size=fv.site_size,
        num_shards=fv.num_shards, compression=None if fv.compression == "none" else "GZIP",
        validation_experiments=tuple(config.parse_list(fv.validation_experiments)),
        test_experiments=tuple(config.parse_list(fv.test_experiments)),
        validation_per_cell_type=fv.validation_per_cell_type, workers=fv.workers,
        seed=fv.seed)


def main_plates(fv) -> int:
    """`bin/extract` on an RxRx1 manifest: 0 ok, 1 bad input, 130 Ctrl-C."""
    from ish_tf.data import plate_records, rxrx1
    from ish_tf.data.plate_norm import StatsError
    from ish_tf.data.records import RecordsError

    cfg = plates_config(fv)
    os.makedirs(cfg.out_dir, exist_ok=True)
    config.write_flagfile(os.path.join(cfg.out_dir, "extract_flags.cfg"), fv)
    try:
        summary = plate_records.extract_plates(cfg, progress=False)
    except KeyboardInterrupt:
        print("extract: interrupted; completed shards are kept, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    except (rxrx1.Rxrx1Error, RecordsError, StatsError) as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 1
    print(plate_records.format_summary(summary))
    return 0


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_extract(fv)
    define_runner(definer(fv, NAME), "extraction")
    define_whole(fv)
    define_plates(fv)


def main(fv, argv: list[str]) -> int:
    """Runs the extract stage; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    from absl import app, logging

    if not fv.manifest or not fv.out:
        raise app.UsageError("--manifest and --out are required")
    from ish_tf.data.rxrx1 import is_rxrx1_manifest

    if is_rxrx1_manifest(fv.manifest):
        return main_plates(fv)
    from ish_tf.data import patches
    from ish_tf.data.manifest import ManifestError
    from ish_tf.data.records import RecordsError
    from ish_tf.data.segment import SegmentError
    from ish_tf.families.cdae import whole

    sections = fv.whole_images  # one whole section per record (CDAE input)
    if sections and fv.runner == "beam":
        raise app.UsageError("--runner=beam writes patches; --whole_images runs locally")
    try:
        with usage_errors():
            cfg = whole_config(fv) if sections else extract_config(fv)
    except (patches.ExtractError, SegmentError) as e:
        raise app.UsageError(str(e)) from e
    fs.makedirs(cfg.out_dir)  # --out may be a URL (gs://...) under --runner=beam
    config.write_flagfile(fs.join(cfg.out_dir, "extract_flags.cfg"), fv)
    logging.info("extracting %s into %s", cfg.manifest, cfg.out_dir)
    try:
        if sections:
            summary = whole.run_whole(cfg)
        elif fv.runner == "beam":
            from ish_tf.data import beam_extract

            summary = beam_extract.run_extract_beam(cfg, fv.beam_options)
        else:
            summary = patches.run_extract(cfg)
    except KeyboardInterrupt:
        print("extract: interrupted; completed shards are kept, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    except (ManifestError, patches.ExtractError, RecordsError, SegmentError) as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 1
    if sections:
        print(patches.format_summary(summary).replace("patches", "sections"))
        print(f"  whole sections {cfg.size}x{cfg.width} grayscale {cfg.image_format}; "
              f"report {summary['report']}")
    else:
        print(patches.format_summary(summary))
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)
