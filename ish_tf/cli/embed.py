"""`bin/embed`: embed TFRecord patches with an exported SavedModel; write embedding tables.

Examples:
  bin/embed --saved_model=export/triplet --records_dir=work/records --out=work/embed
  bin/embed --saved_model=export/triplet/3 --records_dir=DIR --out=DIR --splits=test \\
      --gene_from=images

The encoded patch bytes go through the SavedModel's serving_default signature (the
served model is what gets evaluated). Writes OUT/patch_embeddings.csv,
image_embeddings.csv, donor_embeddings.csv, gene_embeddings.csv (means over patches;
--gene_from=images: over image means), skipped.csv, embed_summary.json and flags.cfg.
An interrupted run resumes shard by shard when rerun with the same flags.
"""

from __future__ import annotations

import os
import sys

from absl import app

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_embed()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.data.records import RecordsError
    from ish_tf.embed import EmbedError, embed_records

    try:
        cfg = flags.embed_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(cfg.out_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(cfg.out_dir, "flags.cfg"))
    try:
        result = embed_records(cfg)
    except KeyboardInterrupt:
        print(f"embed: interrupted; rerun the same command to resume ({cfg.out_dir}/.parts "
              "keeps the finished shards)", file=sys.stderr)
        return 130
    except (EmbedError, RecordsError, OSError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    print(f"embed: {result.saved_model} -> {result.out_dir} (D={result.dim}, "
          f"{result.patches_embedded} patches embedded at {result.patches_per_sec:.1f}/s"
          f"{f', {result.shards_reused} shard(s) reused' if result.shards_reused else ''})")
    for level, path in result.tables.items():
        print(f"  {level:<6} {result.rows[level]:>8} rows  {path}")
    if result.skipped:
        print(f"  skipped {result.skipped} record(s): see {result.skipped_path}")
    if FLAGS.projector_dir and "gene" in result.tables:
        from ish_tf.data.embeddings import read_embedding_table
        from ish_tf.train.tensorboard import write_projector_from_table

        n = write_projector_from_table(FLAGS.projector_dir,
                                       read_embedding_table(result.tables["gene"]),
                                       ("gene_symbol", "split", "entrez_id"))
        print(f"  projector: {n} genes -> tensorboard --logdir {FLAGS.projector_dir}")
    return 0


if __name__ == "__main__":
    app.run(main)
