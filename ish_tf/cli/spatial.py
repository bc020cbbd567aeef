"""`bin/spatial`: section images + spot tables -> patch centres -> one record set per patch size.

Examples:
  bin/spatial --flagfile=configs/spatial_quickstart.cfg       # synthetic pair + records
  bin/spatial --section_images=s1.tif --spot_tables=s1.csv --genes=Sst,Pvalb \\
      --patch_sizes=16,32,48,64,128 --out=work/spatial

Writes OUT/labels.csv (centres, classes, splits), OUT/label_summary.csv (per section and
class: candidates, kept, ambiguous skipped, spots dropped), OUT/p{R}/ TFRecords +
index.json for each patch size, and OUT/spatial_flags.cfg. With --synthetic_pair=DIR a
pair of synthetic sections (animal0 for training, animal1 as the independent test) is
generated first. Rerunning resumes: finished record sets of the same inputs are kept.
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import FlagDefiner, define_common, definer, run, usage_errors
from ish_tf.cli.extract import define_mask_background

NAME = "spatial"


def define_spot_flags(d: FlagDefiner) -> None:
    """--spot_scale, --outside_spots and --max_pixels (bin/spatial and bin/predict each
    define them)."""
    from ish_tf.families.ish_cnn.sections import DEFAULT_MAX_PIXELS

    d.integer("max_pixels", DEFAULT_MAX_PIXELS, "Largest section image read (width x height as "
              "the file declares it, checked before decoding; about 1 byte per pixel is "
              "needed): larger files are refused, naming them.", lower_bound=1)
    d.float("spot_scale", 1.0, "Spot table units -> image pixels (e.g. 0.5 for an image "
            "downsampled twice).")
    d.enum("outside_spots", "error", ["error", "drop"], "Spots outside the image: error "
           "(stop, naming the row) or drop.")


def define_spatial(fv) -> None:
    """Flags of `bin/spatial` (sections + spot tables -> labels -> record sets per patch size)."""
    d = definer(fv, NAME)
    d.string("out", "", "Output directory.")
    d.string("genes", "", "Comma-separated genes (the gene classes, "
             "in label order).")
    d.string("section_images", "", "Section images (TIFF/PNG), comma-separated.")
    d.string("spot_tables", "", "Spot table CSVs (x, y, gene), one per image.")
    d.string("section_masks", "", "Tissue mask PNGs, one per image; empty = "
             "computed with the classical segmenter.")
    define_mask_background(d)
    define_spot_flags(d)
    d.string("patch_sizes", "16,32,48,64,128", "Patch sides in pixels; one record "
             "set OUT/p{R} (and one model) each.")
    d.float("label_radius", 8.0, "Radius (px): a gene spot nearer than this to "
            "another chosen gene's spot is ambiguous; tissue centres keep this "
            "distance from every chosen gene's spot.", lower_bound=0.0)
    d.bool("keep_ambiguous", False, "Keep ambiguous gene spots (labelled with "
           "their own gene) instead of skipping them.")
    d.integer("max_per_class", 2000, "Most patch centres per class and section; "
              "0 = all gene spots, and as many tissue/background centres as the "
              "largest gene class.", lower_bound=0)
    d.bool("balance_classes", True, "Cut every class to the smallest one's count.")
    d.float("validation_fraction", 0.1, "Share of each class's centres written to "
            "the validation split.", lower_bound=0.0, upper_bound=0.9)
    d.string("synthetic_pair", "", "Generate a synthetic pair of sections (two "
             "animals) into this directory first; without --section_images the "
             "first animal is labelled (the second is the independent test).")
    d.integer("synthetic_size", 512, "Side of the synthetic sections, pixels.",
              lower_bound=64)


def mask_config(fv):
    """The classical segmenter's settings for sections without a mask file."""
    from ish_tf.cli.extract import mask_settings
    from ish_tf.data.segment import MaskConfig

    return MaskConfig(**mask_settings(fv))


def spatial_config(fv):
    """`ish_tf.families.ish_cnn.spatial.SpatialConfig` (+ the synthetic settings or None) from the flags.

    Returns:
      (SpatialConfig, SpatialSynthConfig or None).

    Raises:
      ValueError (SpatialError): missing inputs or invalid values, naming the flag.
    """
    from ish_tf.families.ish_cnn.spatial import LabelConfig, SpatialConfig, SpatialError
    from ish_tf.families.ish_cnn.synthetic_pairs import SpatialSynthConfig

    synth = None
    images, spots, masks = (tuple(config.parse_list(fv.section_images)),
                            tuple(config.parse_list(fv.spot_tables)), tuple(config.parse_list(fv.section_masks)))
    genes = tuple(config.parse_list(fv.genes))
    if fv.synthetic_pair:
        kw = {"genes": genes} if genes else {}
        synth = SpatialSynthConfig(out_dir=fv.synthetic_pair, height=fv.synthetic_size,
                                   width=fv.synthetic_size, seed=fv.seed, **kw)
        genes = synth.genes
        if not images:
            d = fv.synthetic_pair
            images = (os.path.join(d, "animal0.png"),)
            spots = (os.path.join(d, "animal0_spots.csv"),)
            masks = (os.path.join(d, "animal0_mask.png"),)
    if not genes:
        raise SpatialError("--genes is required: the gene classes, e.g. --genes=Sst,Pvalb")
    try:
        sizes = tuple(int(v) for v in config.parse_list(fv.patch_sizes))
    except ValueError as e:
        raise SpatialError(f"--patch_sizes must be integers, got {fv.patch_sizes!r}") from e
    labels = LabelConfig(genes=genes, radius=fv.label_radius, keep_ambiguous=fv.keep_ambiguous,
                         max_per_class=fv.max_per_class, balance=fv.balance_classes, seed=fv.seed)
    cfg = SpatialConfig(images=images, spot_tables=spots, masks=masks, out_dir=fv.out,
                        labels=labels, patch_sizes=sizes, spot_scale=fv.spot_scale,
                        outside=fv.outside_spots, validation_fraction=fv.validation_fraction,
                        mask_config=mask_config(fv), max_pixels=fv.max_pixels)
    return cfg.validate(), synth


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_spatial(fv)


def main(fv, argv: list[str]) -> int:
    """Runs the spatial stage; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    from absl import logging

    from ish_tf.data.records import RecordsError
    from ish_tf.families.ish_cnn import spatial

    with usage_errors():
        cfg, synth = spatial_config(fv)
    os.makedirs(cfg.out_dir, exist_ok=True)
    config.write_flagfile(os.path.join(cfg.out_dir, "spatial_flags.cfg"), fv)
    try:
        if synth is not None:
            from ish_tf.families.ish_cnn.synthetic_pairs import generate_pair

            table = generate_pair(synth)
            print(f"spatial: synthetic pair ({len(table)} sections, genes "
                  f"{', '.join(synth.genes)}) in {synth.out_dir}")
        result = spatial.run_spatial(cfg, log=logging.info)
    except KeyboardInterrupt:
        print("spatial: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (spatial.SpatialError, RecordsError, ValueError) as e:
        print(f"spatial: error: {e}", file=sys.stderr)
        return 1
    print(spatial.format_summary(result))
    return 0



if __name__ == "__main__":
    run(NAME, define_flags, main)
