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

from ish_tf import config
from ish_tf.cli import define_common, definer, run

NAME = "ingest"
USES_TENSORFLOW = False


def define_ingest(fv) -> None:
    """Flags of `bin/ingest` (your own section images -> manifest.csv)."""
    d = definer(fv, NAME)
    d.string("out", "", "Output directory: manifest.csv, skipped.csv.")
    d.string("images", "", "Folder of your section images: searched with --name_pattern, and "
             "the base of --table's relative paths.")
    d.string("table", "", "CSV of the images: path and gene_symbol columns, plus any manifest "
             "column (donor_id, entrez_id, region, diagnosis, ...) and your own.")
    d.string("name_pattern", "", "Read the columns from the file names instead, e.g. "
             "'{gene_symbol}/{donor_id}_*.jpg' (* within a folder, ** across folders).")
    d.string("study_label", "user", "The manifest's study column where the table has none.")
    d.string("default_donor", "unknown", "donor_id where neither the table nor the pattern "
             "gives one.")
    d.integer("workers", 4, "Threads reading image headers.", lower_bound=1)


def ingest_config(fv):
    """`ish_tf.data.ingest.IngestConfig` from the ingest flags (not yet validated)."""
    from ish_tf.data.ingest import IngestConfig

    return IngestConfig(out=fv.out, images=fv.images, table=fv.table,
                        name_pattern=fv.name_pattern, study=fv.study_label,
                        default_donor=fv.default_donor, workers=fv.workers)


def define_flags(fv) -> None:
    define_common(fv)
    define_ingest(fv)


def main(fv, argv: list[str]) -> int:
    """Runs the ingest stage; returns the exit status (0 ok, 1 nothing usable or bad table)."""
    from absl import app

    from ish_tf.data import ingest, manifest

    cfg = ingest_config(fv)
    try:
        cfg.validate()
    except ingest.IngestError as e:
        raise app.UsageError(str(e)) from e
    try:
        result = ingest.ingest(cfg)
    except ingest.IngestError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(cfg.out, "ingest_flags.cfg"), fv)
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
    run(NAME, define_flags, main, tensorflow=USES_TENSORFLOW)
