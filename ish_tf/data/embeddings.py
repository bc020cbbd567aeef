"""Embedding tables: the file format between `bin/embed` and `bin/evaluate`.

A table is CSV (or Parquet, when pyarrow is installed) with key columns followed by
one column per embedding dimension. The writer names dimensions "0", "1", ...;
the reader takes *every numeric column that is not a key* as the embedding, so
tables made by other tools (e.g. the published Cortex Study embeddings with
columns gene_symbol, entrez_id, 0..127) are read the same way.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_path

# Columns that identify a row and are never part of the embedding, even when numeric.
KEY_COLUMNS: tuple[str, ...] = (
    "image_id", "patch_index", "x", "y", "gene_symbol", "entrez_id", "gene_index",
    "donor_id", "donor_index", "experiment_id", "specimen_id", "region", "study", "split",
    "n_patches", "n_images", "label", "diagnosis",
)
# Index columns written by pandas/R that carry no information.
_INDEX_LIKE = ("Unnamed: 0", "index", "")

LEVELS = ("patch", "image", "donor", "gene")
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "patch": ("image_id", "patch_index"),
    "image": ("image_id",),
    "donor": ("gene_symbol", "donor_id"),
    "gene": ("gene_symbol",),
}


class EmbeddingTableError(ValueError):
    """An embedding table that cannot be read; the message names the file and column."""


@dataclasses.dataclass
class EmbeddingTable:
    """Keys (a DataFrame) and values (float32 array of shape (N, D)) of one table."""

    keys: pd.DataFrame
    values: np.ndarray
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to_frame(self) -> pd.DataFrame:
        emb = pd.DataFrame(self.values, columns=[str(i) for i in range(self.dim)])
        return pd.concat([self.keys.reset_index(drop=True), emb], axis=1)


def _read_any(path: str) -> pd.DataFrame:
    if not os.path.exists(path):
        raise EmbeddingTableError(f"{path}: embedding table not found")
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise EmbeddingTableError(f"{path}: cannot be read as CSV ({e})") from e


def from_frame(df: pd.DataFrame, source: str = "<table>",
               require: tuple[str, ...] = ()) -> EmbeddingTable:
    """Splits a DataFrame into keys and embedding values.

    Args:
      df: the table.
      source: name quoted in error messages.
      require: key columns that must be present (e.g. ("gene_symbol",)).

    Raises:
      EmbeddingTableError: a required key is missing or no numeric column remains.
    """
    df = df.drop(columns=[c for c in df.columns if str(c) in _INDEX_LIKE], errors="ignore")
    missing = [c for c in require if c not in df.columns]
    if missing:
        raise EmbeddingTableError(
            f"{source}: missing key column(s) {', '.join(repr(m) for m in missing)}; "
            f"columns are {', '.join(map(str, df.columns[:8]))}{'...' if df.shape[1] > 8 else ''}")
    key_cols = [c for c in df.columns if str(c) in KEY_COLUMNS]
    value_cols = []
    for c in df.columns:
        if c in key_cols:
            continue
        if pd.api.types.is_numeric_dtype(df[c]):
            value_cols.append(c)
            continue
        # A column of numbers with a stray word in it is a broken dimension, not a label
        # column to leave out: say where.
        numbers = pd.to_numeric(df[c], errors="coerce")
        stray = numbers.isna() & df[c].notna()
        if numbers.notna().sum() > stray.sum() > 0:
            i = int(np.flatnonzero(stray.to_numpy())[0])
            raise EmbeddingTableError(f"{source}: column '{c}' is numeric but {_where(df, i)} "
                                      f"holds {df[c].iloc[i]!r}")
    if not value_cols:
        raise EmbeddingTableError(f"{source}: no numeric embedding columns besides the keys")
    values = df[value_cols].to_numpy(dtype=np.float32)
    if not np.isfinite(values).all():
        i, j = (int(v[0]) for v in np.nonzero(~np.isfinite(values)))
        raise EmbeddingTableError(f"{source}: column '{value_cols[j]}' at {_where(df, i)} is "
                                  f"{'empty or NaN' if np.isnan(values[i, j]) else 'infinite'}")
    return EmbeddingTable(df[key_cols].reset_index(drop=True), values, source)


def _where(df: pd.DataFrame, i: int) -> str:
    """Row i of a table as a reader finds it: its data row (line i + 2 of a CSV) and gene."""
    gene = df["gene_symbol"].iloc[i] if "gene_symbol" in df.columns else None
    return f"data row {i + 1} (line {i + 2} of a CSV{f', gene {gene}' if gene is not None else ''})"


def read_embedding_table(path: str, require: tuple[str, ...] = ()) -> EmbeddingTable:
    """Reads a CSV or Parquet embedding table (see module docstring)."""
    return from_frame(_read_any(path), source=path, require=require)


def write_embedding_table(path: str, table: EmbeddingTable) -> None:
    """Writes keys then dimensions "0".."D-1" atomically; Parquet if the name ends in .parquet."""
    frame = table.to_frame()
    with atomic_path(path) as tmp:
        if path.endswith(".parquet"):
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False, float_format="%.7g")


def aggregate(table: EmbeddingTable, by: tuple[str, ...]) -> EmbeddingTable:
    """Means of the embedding over groups of key columns (e.g. per image, per gene).

    Key columns that are constant within every group are kept; a count column
    `n_patches` (or `n_images`) records how many rows were averaged.
    """
    missing = [c for c in by if c not in table.keys.columns]
    if missing:
        raise EmbeddingTableError(f"{table.source}: cannot aggregate by missing column(s) {missing}")
    keys = table.keys.reset_index(drop=True)
    codes = keys.groupby(list(by), sort=True, dropna=False).ngroup().to_numpy()
    n = int(codes.max()) + 1 if len(codes) else 0
    sums = np.zeros((n, table.dim), dtype=np.float64)
    np.add.at(sums, codes, table.values)
    counts = np.bincount(codes, minlength=n)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    first = keys.groupby(codes, sort=True).first()
    constant = [c for c in keys.columns
                if c in by or (keys.groupby(codes)[c].nunique(dropna=False) <= 1).all()]
    out_keys = first[constant].reset_index(drop=True)
    out_keys["n_patches" if "patch_index" in keys.columns else "n_images"] = counts
    return EmbeddingTable(out_keys, means, table.source)


# --------------------------------------------------------------------------- duplicates
#: Keys that make a table finer than gene level (several rows per gene are expected).
_FINER_THAN_GENE = ("image_id", "patch_index", "donor_id", "experiment_id", "specimen_id")


def gene_key(table: EmbeddingTable) -> str | None:
    """The gene key of a gene-level table (one row per gene), or None for other tables.

    A table is gene-level when it has gene_symbol or entrez_id and none of the keys of
    a finer level (image_id, patch_index, donor_id, ...).
    """
    cols = set(map(str, table.keys.columns))
    if cols & set(_FINER_THAN_GENE):
        return None
    for key in ("gene_symbol", "entrez_id"):
        if key in cols:
            return key
    return None


def duplicate_genes(table: EmbeddingTable) -> list[tuple[str, list[int]]]:
    """Genes on more than one row of a gene-level table: (gene, 0-based data rows).

    Returns [] for a table that is not gene-level (`gene_key`) or has no duplicates.
    """
    key = gene_key(table)
    if key is None:
        return []
    values = table.keys[key]
    dup = values.duplicated(keep=False) & values.notna()
    if not dup.any():
        return []
    rows = pd.Series(np.arange(len(values)))[dup.to_numpy()]
    return [(str(g), [int(r) for r in part])
            for g, part in rows.groupby(values[dup].astype(str).to_numpy(), sort=False)]


def describe_duplicates(table: EmbeddingTable, dups: list[tuple[str, list[int]]],
                        limit: int = 3) -> str:
    """'gene X on data rows 2, 5 (lines 3, 6 of a CSV); ...' for an error message."""
    parts = []
    for gene, rows in dups[:limit]:
        parts.append(f"gene {gene} on data rows {', '.join(str(r + 1) for r in rows)} "
                     f"(lines {', '.join(str(r + 2) for r in rows)} of a CSV)")
    more = f"; and {len(dups) - limit} more gene(s)" if len(dups) > limit else ""
    return "; ".join(parts) + more


def average_duplicate_genes(table: EmbeddingTable) -> EmbeddingTable:
    """A gene-level table with each repeated gene's rows replaced by their mean (at the
    gene's first row; the other keys of that first row kept)."""
    key = gene_key(table)
    if key is None or not duplicate_genes(table):
        return table
    codes, _ = pd.factorize(table.keys[key].astype(str), sort=False)
    n = int(codes.max()) + 1
    sums = np.zeros((n, table.dim), dtype=np.float64)
    np.add.at(sums, codes, table.values)
    counts = np.bincount(codes, minlength=n)
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    keys = table.keys.iloc[first].reset_index(drop=True)
    return EmbeddingTable(keys, (sums / counts[:, None]).astype(np.float32), table.source)
