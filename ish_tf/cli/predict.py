"""`bin/predict`: ISH CNN dense prediction over a section, the ensemble, and Dice.

Example:
  bin/predict --model_dirs='runs/ish_cnn_quickstart/p*' \\
      --section_image=work/spatial_quickstart/sections/animal1.png \\
      --spot_table=work/spatial_quickstart/sections/animal1_spots.csv \\
      --section_mask=work/spatial_quickstart/sections/animal1_mask.png \\
      --out=work/spatial_quickstart/predict

Writes OUT/dice.csv (per-class Dice, mean Dice and pixel accuracy per patch size, the
ensemble and the majority/random baselines), OUT/maps/*.png (class overlays, truth
included), OUT/classes.csv (class colours), OUT/segmentation.json and OUT/report.html.
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors
from ish_tf.cli.extract import define_mask_background
from ish_tf.cli.spatial import define_spot_flags, mask_config

NAME = "predict"


def define_predict(fv) -> None:
    """Flags of `bin/predict` (ISH CNN dense prediction + Dice on an independent section)."""
    d = definer(fv, NAME)
    d.string("out", "", "Output directory.")
    d.string("model_dirs", "", "ISH CNN training runs (or .keras files), one per "
             "patch size, comma-separated; shell-style patterns allowed "
             "(runs/ish_cnn/p*).")
    d.string("section_image", "", "The section to predict (TIFF/PNG).")
    d.string("spot_table", "", "Its spot table (x, y, gene): the Dice ground truth.")
    d.string("section_mask", "", "Its tissue mask PNG; empty = computed.")
    define_mask_background(d)
    define_spot_flags(d)
    d.float("truth_radius", 6.0, "Radius (px) of the discs drawn around the "
            "section's spots as gene ground truth.", lower_bound=0.5)
    d.integer("predict_stride", 4, "Pixels between window centres; 0 = each "
              "model's native stride. Must divide or be a multiple of it (dense).",
              lower_bound=0)
    d.enum("predict_method", "dense", ["dense", "sliding"], "Fully convolutional "
           "(shift-and-stitch for small strides) or cropped sliding windows.")
    d.integer("predict_batch_size", 256, "Windows per call (sliding).",
              lower_bound=1)
    d.bool("report", True, "Write report.html.")


def segmentation_config(fv):
    """`ish_tf.families.ish_cnn.segmentation.SegmentationConfig` from the predict flags.

    Raises:
      ValueError (SegmentationError): a missing input or a pattern matching nothing.
    """
    import glob

    from ish_tf.families.ish_cnn.segmentation import SegmentationConfig, SegmentationError

    dirs: list[str] = []
    for item in config.parse_list(fv.model_dirs):
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise SegmentationError(f"--model_dirs pattern {item!r} matches nothing")
            dirs.extend(found)
        else:
            dirs.append(item)
    return SegmentationConfig(
        model_dirs=tuple(dirs), image=fv.section_image, spots=fv.spot_table,
        mask=fv.section_mask, out_dir=fv.out, radius=fv.truth_radius, stride=fv.predict_stride,
        method=fv.predict_method, spot_scale=fv.spot_scale, outside=fv.outside_spots,
        batch_size=fv.predict_batch_size, seed=fv.seed, report=fv.report,
        mask_config=mask_config(fv), max_pixels=fv.max_pixels).validate()


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_predict(fv)


def main(fv, argv: list[str]) -> int:
    """Runs dense prediction and scoring; returns the exit status (0 ok, 1 bad input)."""
    from absl import logging

    from ish_tf.families.ish_cnn import segmentation
    from ish_tf.families.ish_cnn.spatial import SpatialError

    with usage_errors():
        cfg = segmentation_config(fv)
    os.makedirs(cfg.out_dir, exist_ok=True)
    config.write_flagfile(os.path.join(cfg.out_dir, "predict_flags.cfg"), fv)
    try:
        result = segmentation.run_segmentation(cfg, log=logging.info)
    except KeyboardInterrupt:
        print("predict: interrupted", file=sys.stderr)
        return 130
    except (segmentation.SegmentationError, SpatialError, ValueError, OSError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    table = result["table"]
    cols = ["model"] + [c for c in table.columns if c.startswith("dice_")] + ["mean_dice"]
    print(f"predict: {len(cfg.model_dirs)} model(s) on {cfg.image}; classes "
          f"{', '.join(result['classes'])}")
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"  dice:   {result['dice_csv']}")
    print(f"  maps:   {os.path.dirname(result['maps']['truth'])}/")
    if result["report"]:
        print(f"  report: {result['report']}")
    return 0



if __name__ == "__main__":
    run(NAME, define_flags, main)
