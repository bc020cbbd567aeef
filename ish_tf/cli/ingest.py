"""`bin/ingest`: index your own section images into a manifest, as bin/fetch writes one;
or turn an expression matrix into vector records (`--expression`).

Example:
  bin/ingest --images=my_sections --name_pattern='{gene_symbol}/{donor_id}_*.jpg' --out=data/mine
  bin/ingest --table=my_sections/sections.csv --out=data/mine --study_label=my_lab
  bin/extract --manifest=data/mine/manifest.csv --out=data/mine_records
  bin/ingest --expression=cells.h5ad --label_column=cell_type --out=data/cells
  bin/ingest --layout=rxrx1 --images=data/rxrx1 --out=data/rxrx1_manifest

RxRx1 plates (`--layout=rxrx1`, `ish_tf.data.rxrx1`): writes OUT/manifest.csv (one row per
site: experiment, plate, well, site, cell_type, well_type, sirna, dataset, six channel
paths), OUT/skipped.csv and OUT/ingest_flags.cfg; TFRecords are unpacked into OUT/images/.

Images: reads each image's header for its size and writes OUT/manifest.csv (images stay
where they are), OUT/skipped.csv (files or rows left out, with the reason) and
OUT/ingest_flags.cfg. Ids are derived from the paths, so rerunning after adding images
keeps the others' ids.

Expression (`ish_tf.data.expression`): writes OUT/profiles.csv, OUT/genes.csv,
OUT/preprocessing.json, OUT/records/ (train with --records_dir=OUT/records) and
OUT/ingest_flags.cfg.
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
    d.float("um_per_pixel", 0.0, "Micrometres per pixel of every image (0 = from the "
            "table's um_per_pixel column or the files' TIFF/OME metadata, where present).",
            lower_bound=0.0)
    d.integer("downsample", 1, "Record that bin/extract reads the images reduced this many "
              "times per side (a pyramid level, reduced-scale JPEG decoding); files are not "
              "rewritten.", lower_bound=1)
    d.float("target_um", 0.0, "Instead of --downsample: per image, the largest reduction "
            "whose scale stays at or below this many um per pixel (0 = off).",
            lower_bound=0.0)
    d.enum("layout", "sections", ["sections", "rxrx1"], "What --images holds: sections "
           "(your section images, with --table or --name_pattern) or rxrx1 (fluorescence "
           "plates in an RxRx1 layout: challenge, released or TFRecords; see "
           "ish_tf.data.rxrx1).")
    d.string("rxrx1_labels", "", "--layout=rxrx1: CSV (id_code, sirna) filling the labels of "
             "unlabelled wells, e.g. a synthetic set's truth.csv, to score held-out "
             "experiments.")
    d.string("expression", "", "An expression matrix to ingest instead of images: .h5ad, or "
             ".csv/.tsv/.txt (optionally .gz) with sample and gene names.")
    d.string("label_column", "", "--expression: obs (or table) column of the labels, the "
             "records' identity (e.g. cell type); empty = unlabelled.")
    d.string("group_column", "", "--expression: obs column of the group (batch, donor, study).")
    d.string("obs", "", "--expression: CSV/TSV of sample annotations (first column the "
             "sample names) for a table without them.")
    d.string("layer", "", "--expression: the .h5ad layer to read instead of X.")
    d.bool("use_raw", False, "--expression: read the .h5ad's .raw matrix instead of X.")
    d.enum("orientation", "auto", ["auto", "samples_x_genes", "genes_x_samples"],
           "--expression: axes of a delimited table; auto: the axis matching --obs holds the "
           "samples, else a table with --label_column or text columns is samples x genes, "
           "else one with more rows than columns is genes x samples.")
    d.enum("normalize", "auto", ["auto", "log1p", "none"], "--expression: auto log1p-"
           "normalises (per-profile total 1e4) input that looks like counts.")
    d.integer("n_genes", 1000, "--expression: highest-variance genes kept (on the training "
              "split).", lower_bound=1)
    d.enum("split_by", "stratified", ["stratified", "label"], "--expression: splits "
           "stratified by label, or whole labels held out as the test split.")
    d.list("holdout_labels", [], "--expression --split_by=label: the labels held out "
           "(default: drawn with --seed).")
    d.float("val_fraction", 0.1, "--expression: fraction of each label for validation.",
            lower_bound=0.0, upper_bound=0.9)
    d.float("test_fraction", 0.2, "--expression: fraction of each label (or of the labels, "
            "with --split_by=label) for test.", lower_bound=0.0, upper_bound=0.9)


def ingest_config(fv):
    """`ish_tf.data.ingest.IngestConfig` from the ingest flags (not yet validated)."""
    from ish_tf.data.ingest import IngestConfig

    return IngestConfig(out=fv.out, images=fv.images, table=fv.table,
                        name_pattern=fv.name_pattern, study=fv.study_label,
                        default_donor=fv.default_donor, workers=fv.workers,
                        um_per_pixel=fv.um_per_pixel, downsample=fv.downsample,
                        target_um=fv.target_um)


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_ingest(fv)


def expression_config(fv):
    """`ish_tf.data.expression.ExpressionIngestConfig` from the flags."""
    from ish_tf.data.expression import ExpressionIngestConfig

    return ExpressionIngestConfig(
        path=fv.expression, out=fv.out, label_column=fv.label_column,
        group_column=fv.group_column, layer=fv.layer, use_raw=fv.use_raw,
        orientation=fv.orientation, obs_path=fv.obs, normalize=fv.normalize,
        n_genes=fv.n_genes, split_by=fv.split_by,
        holdout_labels=tuple(config.parse_list(fv.holdout_labels)),
        val_fraction=fv.val_fraction, test_fraction=fv.test_fraction, seed=fv.seed)


def main_expression(fv) -> int:
    """`bin/ingest --expression`: 0 ok, 1 bad input (the message names file and column)."""
    from absl import app

    from ish_tf.cli import quiet_tensorflow_info

    # Writing records brings TensorFlow in (image ingest does not): keep its start-up
    # lines out of the output, as the commands that always use it do.
    quiet_tensorflow_info()
    from ish_tf.data.expression import ExpressionError
    from ish_tf.data.records import RecordsError

    if not fv.out:
        raise app.UsageError("--out is required: the directory to write the profiles and "
                             "records to")
    if fv.images or fv.table:
        raise app.UsageError("--expression ingests a matrix; --images/--table are for images")
    from ish_tf.data.expression import ingest_expression

    try:
        result = ingest_expression(expression_config(fv))
    except (ExpressionError, RecordsError, OSError) as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(fv.out, "ingest_flags.cfg"), fv)
    prep = result.preprocessing
    print(f"ingest: {result.n_profiles} profiles x {result.n_genes_in} genes, "
          f"{len(result.labels)} label(s); "
          f"{'counts, log1p-normalised' if prep.normalize == 'log1p' else 'values as given'}; "
          f"{result.n_genes} highest-variance genes standardised on the training split")
    print("  splits:   " + ", ".join(f"{k} {v}" for k, v in result.split_counts.items()))
    print(f"  profiles: {os.path.abspath(result.profiles_path)}")
    print(f"  genes:    {os.path.abspath(result.genes_path)}")
    print(f"  records:  {os.path.abspath(result.records_dir)}")
    print(f"  next:     bin/train --model=cic --records_dir={result.records_dir} --run_dir=RUN")
    return 0


def main_rxrx1(fv) -> int:
    """`bin/ingest --layout=rxrx1`: 0 ok, 1 bad input (the message names file, line, column)."""
    from absl import app

    from ish_tf.data import rxrx1

    if not fv.out or not fv.images:
        raise app.UsageError("--layout=rxrx1 needs --images (the RxRx1 folder) and --out")
    if fv.table or fv.name_pattern or fv.expression:
        raise app.UsageError("--layout=rxrx1 reads the layout's own tables; --table, "
                             "--name_pattern and --expression do not apply")
    cfg = rxrx1.Rxrx1IngestConfig(images=fv.images, out=fv.out, labels=fv.rxrx1_labels,
                                  workers=fv.workers)
    try:
        result = rxrx1.ingest_rxrx1(cfg)
    except rxrx1.Rxrx1Error as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(fv.out, "ingest_flags.cfg"), fv)
    df = result.manifest
    labelled = int(df["sirna"].notna().sum())
    print(f"ingest: RxRx1 {result.layout} layout: {len(df)} sites of "
          f"{df['id_code'].nunique()} wells in {df['experiment'].nunique()} experiments "
          f"({', '.join(sorted(df['cell_type'].unique()))}), {labelled} labelled, "
          f"{df['sirna'].nunique()} classes")
    print(f"  manifest: {os.path.abspath(result.manifest_path)}")
    if result.skipped_path:
        kinds = result.skipped["kind"].value_counts()
        print(f"  skipped:  {len(result.skipped)} ({', '.join(f'{k} {n}' for k, n in kinds.items())}):"
              f" {os.path.abspath(result.skipped_path)}")
    print(f"  next:     bin/extract --manifest={result.manifest_path} --out=RECORDS_DIR")
    return 0


def main(fv, argv: list[str]) -> int:
    """Runs the ingest stage; returns the exit status (0 ok, 1 nothing usable or bad table)."""
    from absl import app

    from ish_tf.data import ingest, manifest

    if fv.layout == "rxrx1":
        return main_rxrx1(fv)
    if fv.expression:
        return main_expression(fv)

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
