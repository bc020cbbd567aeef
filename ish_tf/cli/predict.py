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

from absl import app, logging

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_predict()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Runs dense prediction and scoring; returns the exit status (0 ok, 1 bad input)."""
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.families.ish_cnn import segmentation
    from ish_tf.families.ish_cnn.spatial import SpatialError

    try:
        config = flags.segmentation_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(config.out_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(config.out_dir, "predict_flags.cfg"))
    try:
        result = segmentation.run_segmentation(config, log=logging.info)
    except KeyboardInterrupt:
        print("predict: interrupted", file=sys.stderr)
        return 130
    except (segmentation.SegmentationError, SpatialError, ValueError, OSError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    table = result["table"]
    cols = ["model"] + [c for c in table.columns if c.startswith("dice_")] + ["mean_dice"]
    print(f"predict: {len(config.model_dirs)} model(s) on {config.image}; classes "
          f"{', '.join(result['classes'])}")
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"  dice:   {result['dice_csv']}")
    print(f"  maps:   {os.path.dirname(result['maps']['truth'])}/")
    if result["report"]:
        print(f"  report: {result['report']}")
    return 0


if __name__ == "__main__":
    app.run(main)
