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

from absl import app, logging

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_spatial()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Runs the spatial stage; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.families.ish_cnn import spatial
    from ish_tf.data.records import RecordsError

    try:
        config, synth = flags.spatial_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(config.out_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(config.out_dir, "spatial_flags.cfg"))
    try:
        if synth is not None:
            from ish_tf.families.ish_cnn.synthetic_pairs import generate_pair

            table = generate_pair(synth)
            print(f"spatial: synthetic pair ({len(table)} sections, genes "
                  f"{', '.join(synth.genes)}) in {synth.out_dir}")
        result = spatial.run_spatial(config, log=logging.info)
    except KeyboardInterrupt:
        print("spatial: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (spatial.SpatialError, RecordsError, ValueError) as e:
        print(f"spatial: error: {e}", file=sys.stderr)
        return 1
    print(spatial.format_summary(result))
    return 0


if __name__ == "__main__":
    app.run(main)
