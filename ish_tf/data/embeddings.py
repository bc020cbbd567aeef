"""Embedding tables: the file format between `bin/embed` and `bin/evaluate`.

A table is one row per patch, image, (gene, donor) or gene: metadata columns (the
record keys and every manifest column, the user's own included), then one column per
embedding dimension, named `dim_000`, `dim_001`, ... (wider when D > 1000). Unknown
values are empty (NaN), never a sentinel such as entrez_id = -1.

Formats, by file name:

* `.csv` (default) and `.parquet` (needs pyarrow: `pip install ish_tf[parquet]`): the
  wide table as above.
* `.h5ad` (needs anndata: `pip install ish_tf[expression]`): an AnnData whose `obs`
  holds the metadata (one row per table row) and `obsm["X_<name>"]` the (N, D)
  embedding; `uns["ish_tf"]["embedding_key"]` names that key. `X` is empty (0 columns).

The reader takes the `dim_*` columns as the embedding when a table has them (every
other column is metadata, numeric or not). Tables without them, made by other tools
(e.g. the published Cortex Study embeddings with columns gene_symbol, entrez_id,
0..127), are read as before: *every numeric column that is not a key* is a dimension.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import numpy as np
import pandas as pd

from ish_tf import fs
from ish_tf.io_utils import atomic_open, atomic_path

# Columns that identify a row and are never part of the embedding, even when numeric.
KEY_COLUMNS: tuple[str, ...] = (
    "image_id", "patch_index", "x", "y", "gene_symbol", "entrez_id", "gene_index",
    "donor_id", "donor_index", "experiment_id", "specimen_id", "region", "study", "split",
    "n_patches", "n_images", "label", "diagnosis",
)
# Index columns written by pandas/R that carry no information.
_INDEX_LIKE = ("Unnamed: 0", "index", "")

#: Prefix of the dimension columns the writer names dim_000, dim_001, ...
DIM_PREFIX = "dim_"
_DIM_COLUMN = re.compile(r"^dim_\d+$")
TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet", "h5ad")
#: The extra of setup.py that installs each optional format's dependency.
FORMAT_EXTRAS: dict[str, tuple[str, str]] = {"parquet": ("pyarrow", "parquet"),
                                             "h5ad": ("anndata", "expression")}

LEVELS = ("patch", "image", "donor", "gene")
#: File name (without extension) of each level's table. The "donor" level is one row
#: per (gene, donor) pair, hence its name; tables written before were
#: donor_embeddings.* (`OLD_LEVEL_FILES`), which `level_table_path` still finds.
LEVEL_FILES: dict[str, str] = {"patch": "patch_embeddings", "image": "image_embeddings",
                               "donor": "gene_donor_embeddings", "gene": "gene_embeddings"}
OLD_LEVEL_FILES: dict[str, str] = {"donor": "donor_embeddings"}
#: Names accepted for the levels (--levels=gene_donor means the "donor" level).
LEVEL_ALIASES: dict[str, str] = {"gene_donor": "donor"}
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "patch": ("image_id", "patch_index"),
    "image": ("image_id",),
    "donor": ("gene_symbol", "donor_id"),
    "gene": ("gene_symbol",),
}


class EmbeddingTableError(ValueError):
    """An embedding table that cannot be read; the message names the file and column."""


def dim_names(d: int) -> list[str]:
    """Dimension column names: dim_000 ... (zero-padded to at least 3 digits)."""
    width = max(3, len(str(max(d - 1, 0))))
    return [f"{DIM_PREFIX}{i:0{width}d}" for i in range(d)]


def format_of(path: str) -> str:
    """"csv", "parquet" or "h5ad" from a file name (anything else reads as CSV)."""
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".h5ad"):
        return "h5ad"
    return "csv"


def _installed(module: str) -> bool:
    """Whether `module` can be imported (tests replace this to play a bare install)."""
    return importlib.util.find_spec(module) is not None


def require_format(fmt: str, path: str = "") -> None:
    """Raises EmbeddingTableError naming the extra to install when `fmt` needs a missing
    package (parquet: pyarrow, h5ad: anndata)."""
    if fmt not in FORMAT_EXTRAS:
        return
    module, extra = FORMAT_EXTRAS[fmt]
    alternatives = ("pyarrow", "fastparquet") if fmt == "parquet" else (module,)
    if not any(_installed(m) for m in alternatives):
        where = f"{path}: " if path else ""
        raise EmbeddingTableError(
            f"{where}{fmt} tables need {module}, which is not installed: "
            f"pip install 'ish_tf[{extra}]' (or pip install {module}), or use csv")


def level_table_path(out_dir: str, level: str, fmt: str | None = None) -> str:
    """The table of `level` in a bin/embed output directory.

    Finds `<level file>.<csv|parquet|h5ad>` (the format `fmt` only, when given),
    falling back to the old name (donor_embeddings.*) of tables written before the
    (gene, donor) level was named for what it is. Returns the new-name CSV path when
    nothing exists.
    """
    level = LEVEL_ALIASES.get(level, level)
    formats = (fmt,) if fmt else TABLE_FORMATS
    for stem in (LEVEL_FILES[level], OLD_LEVEL_FILES.get(level)):
        for f in formats:
            if stem and fs.exists(fs.join(out_dir, f"{stem}.{f}")):
                return fs.join(out_dir, f"{stem}.{f}")
    return fs.join(out_dir, f"{LEVEL_FILES[level]}.{fmt or 'csv'}")


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
        """Metadata columns then the dimensions dim_000 ... (see the module docstring)."""
        emb = pd.DataFrame(self.values, columns=dim_names(self.dim))
        return pd.concat([self.keys.reset_index(drop=True), emb], axis=1)

    def to_anndata(self, name: str = "embedding"):
        """An AnnData: metadata in `obs`, the embedding in `obsm["X_<name>"]` (module docstring).

        Raises:
          EmbeddingTableError: anndata is not installed (names the extra).
        """
        require_format("h5ad")
        import anndata

        obs = _obs_frame(self.keys)
        key = f"X_{name}"
        return anndata.AnnData(obs=obs, obsm={key: np.asarray(self.values, np.float32)},
                               uns={"ish_tf": {"embedding_key": key,
                                               "source": str(self.source)}})


def _obs_names(keys: pd.DataFrame) -> list[str]:
    """Readable unique row names: image_id[/patch_index], gene[/donor], else the row number."""
    for cols in (("image_id", "patch_index"), ("image_id",), ("gene_symbol", "donor_id"),
                 ("gene_symbol",)):
        if all(c in keys.columns for c in cols):
            names = keys[list(cols)].astype(str).agg("/".join, axis=1)
            if names.is_unique:
                return names.tolist()
    return [str(i) for i in range(len(keys))]


def _obs_frame(keys: pd.DataFrame) -> pd.DataFrame:
    """Metadata as AnnData obs: text columns categorical (missing stays missing), numbers
    as they are, a unique string index."""
    obs = keys.reset_index(drop=True).copy()
    for c in obs.columns:
        col = obs[c]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            text = col.astype("string")
            obs[c] = text.astype("category")
    obs.columns = [str(c) for c in obs.columns]
    obs.index = pd.Index(_obs_names(keys), dtype=str)
    return obs


def _read_h5ad(path: str) -> pd.DataFrame:
    require_format("h5ad", path)
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except (OSError, ValueError, KeyError) as e:
        raise EmbeddingTableError(f"{path}: cannot be read as .h5ad ({e})") from e
    keys = [k for k in adata.obsm.keys() if str(k).startswith("X_")]
    wanted = (adata.uns.get("ish_tf") or {}).get("embedding_key")
    if wanted in adata.obsm:
        key = wanted
    elif len(keys) == 1:
        key = keys[0]
    else:
        raise EmbeddingTableError(
            f"{path}: expected one embedding in obsm['X_<name>'], found "
            f"{sorted(map(str, adata.obsm.keys())) or 'none'}")
    obs = adata.obs.reset_index(drop=True)
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            obs[c] = obs[c].astype(object).where(obs[c].notna(), np.nan)
    values = np.asarray(adata.obsm[key], dtype=np.float32)
    emb = pd.DataFrame(values.reshape(len(values), -1),
                       columns=dim_names(int(np.prod(values.shape[1:]))))
    return pd.concat([obs, emb], axis=1)


def _read_any(path: str) -> pd.DataFrame:
    if not fs.exists(path):
        raise EmbeddingTableError(f"{path}: embedding table not found")
    fmt = format_of(path)
    if fmt == "h5ad":
        if fs.is_url(path):
            raise EmbeddingTableError(f"{path}: .h5ad tables are read from local paths only")
        return _read_h5ad(path)
    if fmt == "parquet":
        require_format("parquet", path)
        return pd.read_parquet(fs.readable(path))
    try:
        return pd.read_csv(fs.readable(path))
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
    dims = [c for c in df.columns if _DIM_COLUMN.match(str(c))]
    if dims:
        # Written by this package: the dim_* columns are the embedding, every other column
        # is metadata (manifest columns such as donor_age are numeric but no dimension).
        key_cols = [c for c in df.columns if c not in dims]
        return _split(df, key_cols, dims, source)
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
    return _split(df, key_cols, value_cols, source)


def _split(df: pd.DataFrame, key_cols: list, value_cols: list, source: str) -> EmbeddingTable:
    try:
        values = df[value_cols].to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        bad = next(c for c in value_cols if not pd.api.types.is_numeric_dtype(df[c]))
        numbers = pd.to_numeric(df[bad], errors="coerce")
        i = int(np.flatnonzero((numbers.isna() & df[bad].notna()).to_numpy())[0])
        raise EmbeddingTableError(f"{source}: column '{bad}' is numeric but {_where(df, i)} "
                                  f"holds {df[bad].iloc[i]!r}") from None
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
    """Reads a CSV, Parquet or .h5ad embedding table (see module docstring).

    Raises:
      EmbeddingTableError: missing or unreadable file, a missing optional package
        (naming the extra to install), missing required keys, bad values.
    """
    return from_frame(_read_any(path), source=path, require=require)


def write_embedding_table(path: str, table: EmbeddingTable, name: str = "embedding") -> None:
    """Writes a table atomically in the format its name says (module docstring).

    Args:
      path: `.csv`, `.parquet` or `.h5ad` file.
      table: the table.
      name: the embedding's name in an .h5ad (`obsm["X_<name>"]`).

    Raises:
      EmbeddingTableError: the format's package is missing (names the extra).
    """
    fmt = format_of(path)
    require_format(fmt, path)
    if fs.is_url(path):
        _write_table_at_url(path, table, name, fmt)
        return
    with atomic_path(path) as tmp:
        if fmt == "h5ad":
            table.to_anndata(name).write_h5ad(tmp)
        elif fmt == "parquet":
            table.to_frame().to_parquet(tmp, index=False)
        else:
            table.to_frame().to_csv(tmp, index=False, float_format="%.7g")


def _write_table_at_url(path: str, table: EmbeddingTable, name: str, fmt: str) -> None:
    """`write_embedding_table` at a URL (`ish_tf.fs`): the same content, written through
    gfile (pandas and pyarrow write no gfile URL themselves)."""
    if fmt == "h5ad":  # h5py wants a real file: written locally, then copied up
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ish_tf_h5ad_") as scratch:
            local = os.path.join(scratch, "table.h5ad")
            table.to_anndata(name).write_h5ad(local)
            with open(local, "rb") as src, atomic_open(path, "wb") as dst:
                dst.write(src.read())
        return
    if fmt == "parquet":  # pyarrow wants a real file object: built in memory, then written
        import io

        buf = io.BytesIO()
        table.to_frame().to_parquet(buf, index=False)
        with atomic_open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(table.to_frame().to_csv(index=False, float_format="%.7g"))


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
