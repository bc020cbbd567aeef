"""`bin/synth`: write a synthetic ISH dataset (images, true masks, manifest, annotations, GO).

Example:
  bin/synth --out=data/synth --n_genes=24 --n_donors=4 --seed=0
  bin/synth --flagfile=configs/synth_quickstart.cfg

Writes OUT/images/{image_id}.jpg, OUT/masks/{image_id}.png, OUT/manifest.csv,
OUT/annotations.csv, OUT/go.gaf, OUT/go.obo, OUT/specs.json and OUT/synth_flags.cfg
(the resolved flags). Rerunning the same command resumes: images already on disk are
kept, and the same seed gives the same bytes.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, logging

from ish_tf import flags

flags.define_common()
flags.define_synth()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.data import manifest, synthetic

    try:
        config = flags.synth_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    logging.info("synth: %d genes x %d donors (%d per gene) x %d images, %dx%d px, seed %d -> %s",
                 config.n_genes, config.n_donors, config.donors_per_gene,
                 config.images_per_gene_donor, config.height, config.width, config.seed,
                 config.out_dir)
    start = time.monotonic()
    try:
        df = synthetic.generate_dataset(config)
    except (ValueError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 1
    # Written only after success, so a refused rerun cannot overwrite the record of a dataset.
    flags.write_flagfile(os.path.join(config.out_dir, "synth_flags.cfg"))
    summary = manifest.summarize(df)
    out = os.path.abspath(config.out_dir)
    # Counts describe the dataset on disk (a resumed run keeps finished images).
    print(f"synth: dataset of {summary['images']} images of {summary['genes']} genes in "
          f"{summary['donors']} donors ({summary['experiments']} experiments, regions "
          f"{', '.join(summary['regions'])}) ready in {time.monotonic() - start:.1f}s")
    print(f"  manifest:    {os.path.join(out, manifest.MANIFEST_NAME)}")
    print(f"  images:      {os.path.join(out, 'images')}/  masks: {os.path.join(out, 'masks')}/")
    print(f"  annotations: {os.path.join(out, 'annotations.csv')}")
    print(f"  GO groups:   {os.path.join(out, 'go.gaf')}, {os.path.join(out, 'go.obo')}")
    skipped = os.path.join(out, "skipped.csv")
    if os.path.exists(skipped):
        print(f"  skipped:     {skipped} (images that could not be written; rerun to retry)")
    return 0


if __name__ == "__main__":
    app.run(main)
