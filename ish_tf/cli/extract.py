"""`bin/extract`: tissue masks, patch sampling and sharded TFRecords from a manifest.

Example:
  bin/extract --manifest=data/synth/manifest.csv --out=data/synth_records
  bin/extract --flagfile=configs/extract_quickstart.cfg

Writes OUT/{split}-NNNNN-of-NNNNN.tfrecord shards (whole genes per shard),
OUT/index.json, OUT/genes.csv, OUT/extract_report.csv (one row per image: status,
patch count, reason), OUT/masks/{image_id}.png (cached masks) and OUT/extract_flags.cfg
(the resolved flags). Rerunning the same command resumes: complete shards are kept,
partial files of an interrupted run are removed and their shards redone.
`--whole_images` writes one downsampled whole section per record instead (see
`ish_tf.data.whole`), with the same shards, index, report and resume.
"""

from __future__ import annotations

import os
import sys

from absl import app, logging

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_extract()
flags.define_whole()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Runs the extract stage; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.manifest or not FLAGS.out:
        raise app.UsageError("--manifest and --out are required")
    from ish_tf.data import patches, whole
    from ish_tf.data.manifest import ManifestError
    from ish_tf.data.records import RecordsError
    from ish_tf.data.segment import SegmentError

    sections = FLAGS.whole_images  # one whole section per record (CDAE input)
    try:
        config = flags.whole_config(FLAGS) if sections else flags.extract_config(FLAGS)
    except (ValueError, patches.ExtractError, SegmentError) as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(config.out_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(config.out_dir, "extract_flags.cfg"))
    logging.info("extracting %s into %s", config.manifest, config.out_dir)
    try:
        summary = whole.run_whole(config) if sections else patches.run_extract(config)
    except KeyboardInterrupt:
        print("extract: interrupted; completed shards are kept, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    except (ManifestError, patches.ExtractError, RecordsError, SegmentError) as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 1
    if sections:
        print(patches.format_summary(summary).replace("patches", "sections"))
        print(f"  whole sections {config.size}x{config.width} grayscale {config.image_format}; "
              f"report {summary['report']}")
    else:
        print(patches.format_summary(summary))
    return 0


if __name__ == "__main__":
    app.run(main)
