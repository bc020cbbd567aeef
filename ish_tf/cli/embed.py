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
image_embeddings.csv, donor_embeddings.csv, gene_embeddings.csv (means over patches;
--gene_from=images: over image means), skipped.csv, embed_summary.json and flags.cfg.
An interrupted run resumes shard by shard when rerun with the same flags.
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
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
    d.enum("table_format", "csv", ["csv", "parquet"], "Format of the embedding tables "
           "(parquet needs pyarrow).")
    d.string("signature", "", "Serving signature; empty = tf_example (fed the serialized "
             "records) when the export has it, else serving_default (fed the encoded patch "
             "bytes).")
    d.string("output_key", "", "Output of the signature to store; empty = the export's first "
             "output (embedding for triplet).")
    d.list("levels", ["patch", "image", "donor", "gene"], "Tables to write.")
    d.bool("skip_corrupt", False, "Embed the readable records of a shard with an unreadable "
           "(corrupt) record or fewer records than index.json lists, and count the records "
           "lost (skipped.csv, embed_summary.json, a warning); default: such a shard is an "
           "error naming it and the counts.")
    d.bool("allow_foreign_saved_model", False, "Load a SavedModel without ish_tf's export "
           "metadata (assets.extra/ish_tf.json). A SavedModel is code that runs when "
           "called: only load one from a trusted source.")
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
        allow_foreign_saved_model=fv.allow_foreign_saved_model).validate()


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_embed(fv)


def main(fv, argv: list[str]) -> int:
    """Embeds; returns the exit status (0 ok, 1 bad input, 130 Ctrl-C)."""
    from ish_tf.data.records import RecordsError
    from ish_tf.embed import EmbedError, embed_records

    with usage_errors():
        cfg = embed_config(fv)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        config.write_flagfile(os.path.join(cfg.out_dir, "flags.cfg"), fv)
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
        print(f"  {level:<6} {result.rows[level]:>8} rows  {path}")
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
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)
