"""`bin/ingest`: index your own section images into a manifest, as bin/fetch writes one.

Example:
  bin/ingest --images=my_sections --name_pattern='{gene_symbol}/{donor_id}_*.jpg' --out=data/mine
  bin/ingest --table=my_sections/sections.csv --out=data/mine --study_label=my_lab
  bin/extract --manifest=data/mine/manifest.csv --out=data/mine_records

Reads each image's header for its size and writes OUT/manifest.csv (images stay where they
are), OUT/skipped.csv (files or rows left out, with the reason) and OUT/ingest_flags.cfg.
Ids are derived from the paths, so rerunning after adding images keeps the others' ids.
"""

from __future__ import annotations

import os
import sys

from absl import app

from ish_tf import flags

flags.define_common()
flags.define_ingest()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Runs the ingest stage; returns the exit status (0 ok, 1 nothing usable or bad table)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.data import ingest, manifest

    config = flags.ingest_config(FLAGS)
    try:
        config.validate()
    except ingest.IngestError as e:
        raise app.UsageError(str(e)) from e
    try:
        result = ingest.ingest(config)
    except ingest.IngestError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 1
    flags.write_flagfile(os.path.join(config.out, "ingest_flags.cfg"))
    summary = manifest.summarize(result.manifest)
    print(f"ingest: {summary['images']} images of {summary['genes']} genes in "
          f"{summary['donors']} donor(s), study {', '.join(summary['studies'])}")
    print(f"  manifest: {os.path.abspath(result.manifest_path)}")
    if result.skipped_path:
        kinds = result.skipped["kind"].value_counts()
        print(f"  skipped:  {len(result.skipped)} ({', '.join(f'{k} {n}' for k, n in kinds.items())}):"
              f" {os.path.abspath(result.skipped_path)}")
    print(f"  next:     bin/extract --manifest={result.manifest_path} --out=RECORDS_DIR")
    return 0


if __name__ == "__main__":
    app.run(main)
