"""`bin/search`: which genes look like these images? Queries a search export locally.

Examples:
  bin/search --saved_model=export/triplet_search --images=patch1.png,patch2.jpg --k=5
  bin/search --saved_model=export/triplet_search/2 --images='queries/*.png' --out=hits.csv
  bin/search --saved_model=export/triplet_search --embeddings=work/embed/image_embeddings.csv

The export must have been written with `bin/export --search_index=GENE_EMBEDDINGS_CSV`
(its `search` signatures; see ish_tf.export.search). Images go through `search` (the
model embeds them in the graph); --embeddings (a table bin/embed wrote) through
`search_embedding`. Prints one line per hit (query, rank, gene, id, distance); --out
also writes them as CSV.
"""

from __future__ import annotations

import glob
import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "search"


def define_search(fv) -> None:
    """Flags of `bin/search`."""
    d = definer(fv, NAME)
    d.string("saved_model", "", "Export base EXPORT/<name> (newest version) or a version "
             "directory written by bin/export --search_index.")
    d.list("images", [], "Query images: JPEG/PNG files (or .npy arrays for exports of raw "
           "pixels), comma-separated; glob patterns are expanded.")
    d.string("embeddings", "", "Query with the rows of this embedding table instead "
             "(search_embedding signature).")
    d.integer("k", 5, "Genes (index rows) returned per query.", lower_bound=1)
    d.string("out", "", "Also write the hits as CSV here; empty = print only.")


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_search(fv)


def _expand(patterns: list[str]) -> list[str]:
    """Files named by the patterns, in order; a pattern matching nothing is an error."""
    files = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits or not all(os.path.isfile(h) for h in hits):
            missing = next((h for h in hits if not os.path.isfile(h)), p)
            raise ValueError(f"--images: {missing}: no such file")
        files.extend(hits)
    return files


def main(fv, argv: list[str]) -> int:
    """Searches; returns the exit status (0 ok, 1 bad export or input)."""
    from ish_tf.data.embeddings import EmbeddingTableError, read_embedding_table
    from ish_tf.export.saved_model import ExportError
    from ish_tf.export.search import query_saved_model
    from ish_tf.io_utils import atomic_path

    with usage_errors():
        if not fv.saved_model:
            raise ValueError("--saved_model is required: an export written by bin/export "
                             "--search_index")
        if bool(fv.images) == bool(fv.embeddings):
            raise ValueError("give exactly one of --images and --embeddings")
        images = _expand(config.parse_list(fv.images)) if fv.images else None
    try:
        labels = None
        embeddings = None
        if fv.embeddings:
            table = read_embedding_table(fv.embeddings)
            embeddings = table.values
            key = next((c for c in ("image_id", "gene_symbol") if c in table.keys.columns), None)
            labels = table.keys[key].astype(str).tolist() if key else None
        path, hits = query_saved_model(fv.saved_model, images=images, embeddings=embeddings,
                                       k=fv.k)
    except (ExportError, EmbeddingTableError, OSError) as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 1
    if labels is not None:
        hits["query"] = [labels[int(q.split()[1]) - 1] for q in hits["query"]]
    print(f"search: {path} ({hits['query'].nunique()} queries, k={fv.k})")
    width = max([len("query")] + [len(str(q)) for q in hits["query"]])
    gwidth = max([len("gene")] + [len(g) for g in hits["gene"]])
    print(f"{'query':<{width}}  rank  {'gene':<{gwidth}}  {'distance':>10}  id")
    for row in hits.itertuples(index=False):
        print(f"{row.query:<{width}}  {row.rank:>4}  {row.gene:<{gwidth}}  "
              f"{row.distance:>10.4f}  {row.id}")
    if fv.out:
        with atomic_path(fv.out) as tmp:
            hits.to_csv(tmp, index=False)
        print(f"  hits -> {fv.out}")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)
