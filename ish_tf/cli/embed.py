"""`bin/embed`: embed TFRecord patches with an exported SavedModel; write embedding tables.

Examples:
  bin/embed --saved_model=export/triplet --records_dir=work/records --out=work/embed
  bin/embed --saved_model=export/triplet/3 --records_dir=DIR --out=DIR --splits=test \\
      --gene_from=images

The serialized records go through the SavedModel's tf_example signature (older exports:
the encoded patch bytes through serving_default); the served model is what gets
evaluated. Only SavedModels exported by bin/export (with assets.extra/ish_tf.json) are
loaded unless --allow_foreign_saved_model: a SavedModel is code. A shard with an
unreadable record, or another record count than index.json lists, is an error naming it;
--skip_corrupt embeds its readable records and counts the lost ones. Writes OUT/patch_embeddings.csv,
image_embeddings.csv, gene_donor_embeddings.csv (one row per gene and donor),
gene_embeddings.csv (means over patches; --gene_from=images: over image means), with
every manifest column and dimensions dim_000...; --table_format=parquet or h5ad (AnnData:
metadata in obs, embedding in obsm["X_<family>"]) instead of csv; skipped.csv,
embed_summary.json and flags.cfg.
An interrupted run resumes shard by shard when rerun with the same flags.
--runner=beam embeds the shards in an Apache Beam pipeline (`ish_tf.embed_beam`; one
shard per worker, --beam_options passes the runner's options) and writes the same tables.

Expression profiles (`ish_tf.embed_expression`):
  bin/embed --saved_model=export/cic --expression=new_cells.h5ad --out=work/cic_codes
aligns the new matrix's genes by name to the model's (genes.csv of the bin/ingest
--expression directory, --preprocessing or found from the export), replays the stored
preprocessing and writes OUT/codes.csv (or .parquet) and OUT/codes.h5ad (codes in
obsm["X_cic"], every obs column kept). Vector records of an ingest directory embed as
above and also give OUT/codes.h5ad (obs from the directory's profiles.csv).
"""

from __future__ import annotations

import os
import sys

from ish_tf import config, fs
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "embed"


def define_embed(fv) -> None:
    """Flags of `bin/embed` (SavedModel + TFRecord patches -> patch/image/donor/gene tables)."""
    d = definer(fv, NAME)
    d.string("saved_model", "", "Export base EXPORT/<name> (newest version) or a SavedModel "
             "version directory written by bin/export.")
    d.string("records_dir", "", "TFRecord shards + index.json written by bin/extract.")
    d.string("out", "", "Output directory.")
    d.list("splits", [], "Splits to embed (train, validation, test); empty = all.")
    d.integer("embed_batch_size", 64, "Patches per call of the serving signature.",
              lower_bound=1)
    d.enum("gene_from", "patches", ["patches", "images"], "Donor and gene vectors: mean of all "
           "their patches (the paper) or mean of their image means.")
    d.enum("table_format", "csv", ["csv", "parquet", "h5ad"], "Format of the embedding "
           "tables: csv, parquet (needs pyarrow: pip install ish_tf[parquet]) or h5ad (one "
           "AnnData per level: metadata in obs, the embedding in obsm['X_<family>']; needs "
           "anndata: pip install ish_tf[expression]).")
    d.string("manifest", "", "Manifest whose columns (the lab's own included) join the "
             "tables by image_id; empty = the one index.json names; none = record keys only.")
    d.string("signature", "", "Serving signature; empty = tf_example (fed the serialized "
             "records) when the export has it, else serving_default (fed the encoded patch "
             "bytes).")
    d.string("output_key", "", "Output of the signature to store; empty = the export's first "
             "output (embedding for triplet).")
    d.list("levels", ["patch", "image", "donor", "gene"], "Tables to write: patch, image, "
           "donor (one row per gene and donor, gene_donor_embeddings.*; also called "
           "gene_donor), gene.")
    d.bool("skip_corrupt", False, "Embed the readable records of a shard with an unreadable "
           "(corrupt) record or fewer records than index.json lists, and count the records "
           "lost (skipped.csv, embed_summary.json, a warning); default: such a shard is an "
           "error naming it and the counts.")
    d.bool("allow_foreign_saved_model", False, "Load a SavedModel without ish_tf's export "
           "metadata (assets.extra/ish_tf.json). A SavedModel is code that runs when "
           "called: only load one from a trusted source.")
    d.string("expression", "", "An expression matrix (.h5ad, .csv/.tsv(.gz)) to encode with "
             "a vector model instead of --records_dir: genes aligned by name to the model's, "
             "missing ones filled with the training mean.")
    d.string("preprocessing", "", "--expression: the bin/ingest --expression directory of the "
             "model's training data (preprocessing.json); empty = found from the export.")
    d.string("obs", "", "--expression: CSV/TSV of sample annotations (first column the names).")
    d.list("obs_columns", [], "--expression: annotation columns of a samples x genes table "
           "(e.g. the cell type), kept as obs instead of read as genes.")
    d.string("layer", "", "--expression: the .h5ad layer to read instead of X.")
    d.bool("use_raw", False, "--expression: read the .h5ad's .raw matrix.")
    d.enum("orientation", "auto", ["auto", "samples_x_genes", "genes_x_samples"],
           "--expression: axes of a delimited table.")
    d.string("obsm_key", "X_cic", "Key of the codes in the .h5ad's obsm (expression input "
             "or vector records of an ingest directory).")
    d.string("projector_dir", "", "Also write a TensorBoard embedding-projector view of the "
             "gene-level embeddings (labelled by gene) here; open it with tensorboard --logdir "
             "DIR. Empty = none.")


def embed_config(fv):
    """`ish_tf.embed.EmbedConfig` from the embed flags.

    Raises:
      ish_tf.embed.EmbedError (a ValueError): a required flag is empty or a value is invalid.
    """
    from ish_tf.embed import EmbedConfig

    return EmbedConfig(
        saved_model=fv.saved_model, records_dir=fv.records_dir, out_dir=fv.out,
        splits=tuple(config.parse_list(fv.splits)), batch_size=fv.embed_batch_size,
        gene_from=fv.gene_from, table_format=fv.table_format, signature=fv.signature,
        output=fv.output_key or None, levels=tuple(config.parse_list(fv.levels)),
        skip_corrupt=fv.skip_corrupt,
        allow_foreign_saved_model=fv.allow_foreign_saved_model, manifest=fv.manifest).validate()


def define_flags(fv) -> None:
    from ish_tf.cli.extract import define_runner

    define_common(fv, small_run=False)
    define_embed(fv)
    define_runner(definer(fv, NAME), "embedding")


def main(fv, argv: list[str]) -> int:
    """Embeds; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    from ish_tf.data.records import RecordsError
    from ish_tf.embed import EmbedError, embed_records

    if fv.expression:
        return main_expression(fv)
    with usage_errors():
        cfg = embed_config(fv)
    try:
        fs.makedirs(cfg.out_dir)  # --out may be a URL (gs://...)
        config.write_flagfile(fs.join(cfg.out_dir, "flags.cfg"), fv)
        if fv.runner == "beam":
            from ish_tf.embed_beam import embed_records_beam

            result = embed_records_beam(cfg, fv.beam_options)
        else:
            result = embed_records(cfg)
    except KeyboardInterrupt:
        print(f"embed: interrupted; rerun the same command to resume ({cfg.out_dir}/.parts "
              "keeps the finished shards)", file=sys.stderr)
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else f"{cfg.out_dir}: "
        print(f"embed: error: {where}cannot write ({e.strerror or e}); the finished shards "
              f"are kept in {os.path.join(cfg.out_dir, '.parts')}: rerun the same command "
              "to resume", file=sys.stderr)
        return 1
    except (EmbedError, RecordsError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    print(f"embed: {result.saved_model} -> {result.out_dir} (D={result.dim}, "
          f"{result.patches_embedded} patches embedded at {result.patches_per_sec:.1f}/s"
          f"{f', {result.shards_reused} shard(s) reused' if result.shards_reused else ''})")
    for level, path in result.tables.items():
        label = "gene_donor" if level == "donor" else level  # one row per gene and donor
        print(f"  {label:<10} {result.rows[level]:>8} rows  {path}")
    if result.manifest:
        print(f"  metadata: {len(result.manifest_columns)} manifest column(s) from "
              f"{result.manifest}")
    if result.manifest_note:
        print(f"embed: warning: {result.manifest_note}", file=sys.stderr)
    if result.skipped:
        print(f"  skipped {result.skipped} record(s): see {result.skipped_path}")
    for shard, n in result.lost_by_shard.items():
        print(f"embed: warning: {shard}: {n} record(s) lost (unreadable; --skip_corrupt): "
              f"see {result.skipped_path}", file=sys.stderr)
    if fv.projector_dir and "gene" in result.tables:
        from ish_tf.data.embeddings import read_embedding_table
        from ish_tf.train.tensorboard import write_projector_from_table

        n = write_projector_from_table(fv.projector_dir,
                                       read_embedding_table(result.tables["gene"]),
                                       ("gene_symbol", "split", "entrez_id"))
        print(f"  projector: {n} genes -> tensorboard --logdir {fv.projector_dir}")
    return _records_h5ad(fv, result)


def _records_h5ad(fv, result) -> int:
    """OUT/codes.h5ad when the records are the vectors of a bin/ingest --expression dir."""
    from ish_tf.data.expression import PROFILES_NAME
    from ish_tf.data.shards import records_input_spec
    from ish_tf.embed_expression import H5AD_NAME, ExpressionEmbedError, write_records_h5ad

    ingest_dir = os.path.dirname(os.path.normpath(fv.records_dir))
    if (records_input_spec(fv.records_dir).kind != "vector" or "image" not in result.tables
            or not os.path.exists(os.path.join(ingest_dir, PROFILES_NAME))):
        return 0
    try:
        path = write_records_h5ad(result.tables["image"], ingest_dir,
                                  os.path.join(result.out_dir, H5AD_NAME), fv.obsm_key)
    except (ExpressionEmbedError, OSError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    print(f"  h5ad   {result.rows['image']:>8} rows  {path} (obsm[{fv.obsm_key!r}])")
    return 0


def main_expression(fv) -> int:
    """`bin/embed --expression`: codes of a new matrix; 0 ok, 1 bad input."""
    from absl import app

    from ish_tf.data.expression import ExpressionError
    from ish_tf.embed_expression import (
        ExpressionEmbedConfig,
        ExpressionEmbedError,
        embed_expression,
    )

    if fv.records_dir:
        raise app.UsageError("give --expression or --records_dir, not both")
    if not fv.saved_model or not fv.out:
        raise app.UsageError("--expression needs --saved_model and --out")
    cfg = ExpressionEmbedConfig(
        saved_model=fv.saved_model, expression=fv.expression, out_dir=fv.out,
        preprocessing=fv.preprocessing, obs_path=fv.obs,
        obs_columns=tuple(config.parse_list(fv.obs_columns)), layer=fv.layer, use_raw=fv.use_raw,
        orientation=fv.orientation, table_format=fv.table_format, obsm_key=fv.obsm_key,
        output=fv.output_key or "code", batch_size=fv.embed_batch_size,
        allow_foreign_saved_model=fv.allow_foreign_saved_model)
    try:
        os.makedirs(fv.out, exist_ok=True)
        config.write_flagfile(os.path.join(fv.out, "flags.cfg"), fv)
        result = embed_expression(
            cfg, warn=lambda s: print(f"embed: warning: {s}", file=sys.stderr))
    except (ExpressionEmbedError, ExpressionError, OSError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    print(f"embed: {result.n_profiles} profiles -> codes of {result.code_size} "
          f"({result.genes_matched}/{result.genes_model} model genes matched, "
          f"{len(result.genes_missing)} missing (training mean), {result.genes_dropped} "
          "extra dropped)")
    print(f"  table  {result.table}")
    print(f"  h5ad   {result.h5ad} (obsm[{cfg.obsm_key!r}])")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)
