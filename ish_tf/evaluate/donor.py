"""The gene x donor assay matrix: a control for donor bias.

In the Cortex Study each gene was assayed in a few donors, and which donors is not
random (genes were run in batches). An image embedding can therefore "predict" an
annotation just by recognising the donor's tissue. Scoring the binary matrix
`assayed[gene, donor]` exactly like an embedding shows how much the assay design
alone predicts; an embedding is informative beyond donor identity only where it
beats this matrix.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ish_tf.data.embeddings import EmbeddingTable, EmbeddingTableError, from_frame

NAME = "donor_matrix"


def donor_matrix_from_manifest(manifest: pd.DataFrame, source: str = "<manifest>") -> EmbeddingTable:
    """Builds the binary gene x donor matrix from a manifest.

    Args:
      manifest: a validated manifest (ish_tf.data.manifest.read_manifest) with
        gene_symbol, donor_id and optionally entrez_id.
      source: file name for messages.

    Returns:
      A gene-level table: keys gene_symbol (and entrez_id where the manifest gives a
      gene exactly one), values (G, n_donors) float32 in {0, 1}, donors in sorted order.

    Raises:
      EmbeddingTableError: gene_symbol or donor_id is missing.
    """
    missing = [c for c in ("gene_symbol", "donor_id") if c not in manifest.columns]
    if missing:
        raise EmbeddingTableError(f"{source}: manifest lacks column(s) {missing}")
    pairs = manifest[["gene_symbol", "donor_id"]].dropna().astype(str).drop_duplicates()
    wide = pd.crosstab(pairs["gene_symbol"], pairs["donor_id"]).clip(upper=1)
    keys = pd.DataFrame({"gene_symbol": wide.index.astype(str)})
    if "entrez_id" in manifest.columns:
        ids = manifest.dropna(subset=["entrez_id"]).groupby("gene_symbol")["entrez_id"]
        unique = ids.first()[ids.nunique() == 1]  # genes with conflicting ids get none
        if len(unique):
            keys["entrez_id"] = pd.to_numeric(keys["gene_symbol"].map(unique)).astype("Int64")
    return EmbeddingTable(keys, wide.to_numpy(dtype=np.float32), source)


def read_donor_matrix(path: str) -> EmbeddingTable:
    """Reads a gene x donor 0/1 matrix CSV (e.g. the Cortex Study's gene_donor_matrix.csv).

    The file has gene_symbol (and optionally entrez_id and an unnamed index) plus one
    column per donor.

    Raises:
      EmbeddingTableError: the file is missing, gene_symbol is absent, or a donor
        column holds a value other than 0 or 1 (the message names column and row).
    """
    if not os.path.exists(path):
        raise EmbeddingTableError(f"{path}: donor matrix not found")
    df = pd.read_csv(path)
    table = from_frame(df, source=path, require=("gene_symbol",))
    bad = ~np.isin(table.values, (0.0, 1.0))
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        donors = [c for c in df.columns if c not in table.keys.columns
                  and not str(c).startswith("Unnamed") and pd.api.types.is_numeric_dtype(df[c])]
        # from_frame keeps numeric non-key columns in file order, so `col` indexes `donors`.
        raise EmbeddingTableError(
            f"{path}: donor column '{donors[col]}' holds {table.values[row, col]:g} in row "
            f"{row + 2} (line of the CSV); a donor matrix holds only 0 and 1")
    return table

