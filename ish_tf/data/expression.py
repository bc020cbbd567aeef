"""Expression matrices in: `.h5ad` or CSV/TSV(.gz) -> preprocessed vector records.

`bin/ingest --expression=PATH --out=DIR` (and `ingest_expression`) reads a samples x
genes matrix (an AnnData `X`, a layer or `.raw`, dense or sparse; or a delimited
table in either orientation), takes labels (the records' identity, e.g. the cell
type) and an optional group (batch, donor, study) from obs columns, and writes

    DIR/profiles.csv        one row per profile: image_id (the record's id), sample_id,
                            split, label, group, and every obs column of the input
    DIR/genes.csv           the selected genes in model order: gene, mean, std, variance
    DIR/preprocessing.json  how the values were made (replayable: `Preprocessing`)
    DIR/records/            vector records (`write_record_set`), train/validation/test

Preprocessing, recorded in preprocessing.json and replayed by `Preprocessing.transform`:
counts (non-negative integers) are detected and normalised to `target_sum` per profile
then log1p'd (`normalize="auto"`; "log1p" forces it, "none" keeps the values); the
`n_genes` highest-variance genes are selected on the TRAINING split only (genes with
zero training variance never are); each selected gene is standardised with the mean
and standard deviation of the training split.

Splits are stratified by label (each label's profiles shuffled with the seed and cut
by `val_fraction`/`test_fraction`), or with `split_by="label"` whole labels are held
out as the test split (the unseen-cell-type test) and the others are split between
train and validation.

anndata is imported only where an `.h5ad` file is read.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_write_text

PROFILES_NAME = "profiles.csv"
GENES_NAME = "genes.csv"
PREPROCESSING_NAME = "preprocessing.json"
RECORDS_SUBDIR = "records"
NORMALIZE_MODES = ("auto", "log1p", "none")
ORIENTATIONS = ("auto", "samples_x_genes", "genes_x_samples")
SPLIT_MODES = ("stratified", "label")


class ExpressionError(ValueError):
    """Input that cannot be ingested; the message names the file and the column/row."""


# --------------------------------------------------------------------------- reading
@dataclasses.dataclass
class ExpressionTable:
    """A samples x genes matrix with its names and sample annotations.

    Attributes:
      matrix: (N, G) float array, or a scipy.sparse CSR matrix.
      samples: N sample names.
      genes: G gene names.
      obs: DataFrame indexed by the sample names (may have no columns).
      source: where it came from (for messages).
    """

    matrix: Any
    samples: list[str]
    genes: list[str]
    obs: pd.DataFrame
    source: str = ""


def _is_sparse(x) -> bool:
    return hasattr(x, "tocsr") and not isinstance(x, np.ndarray)


def _duplicates(names: Sequence[str]) -> list[str]:
    seen, dup = set(), []
    for n in names:
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    return dup


def _check_table(table: ExpressionTable) -> ExpressionTable:
    """Duplicate names, non-numeric values and NaN raise naming the file and where."""
    src = table.source
    for what, names in (("gene", table.genes), ("sample", table.samples)):
        dup = _duplicates(names)
        if dup:
            raise ExpressionError(f"{src}: duplicate {what} names, e.g. {dup[:5]} "
                                  f"({len(dup)} repeated)")
    x = table.matrix
    data = x.data if _is_sparse(x) else np.asarray(x)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ExpressionError(f"{src}: the matrix holds non-numeric values (dtype {data.dtype})")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        if _is_sparse(x):
            coo = x.tocoo()
            bad = ~np.isfinite(coo.data)
            r, c = int(coo.row[bad][0]), int(coo.col[bad][0])
        else:
            r, c = (int(v[0]) for v in np.nonzero(~np.isfinite(data)))
        raise ExpressionError(f"{src}: NaN or infinite value at sample {table.samples[r]!r}, "
                              f"gene {table.genes[c]!r} (and {int((~np.isfinite(data)).sum()) - 1} "
                              "more); impute or drop them first")
    if x.shape != (len(table.samples), len(table.genes)):
        raise ExpressionError(f"{src}: matrix shape {x.shape} does not match "
                              f"{len(table.samples)} samples x {len(table.genes)} genes")
    if not table.samples or not table.genes:
        raise ExpressionError(f"{src}: no samples or no genes")
    return table


def read_h5ad(path: str, *, layer: str = "", use_raw: bool = False) -> ExpressionTable:
    """Reads an AnnData file: `X`, `layers[layer]` or `raw.X` (dense or sparse).

    Raises:
      ExpressionError: anndata missing, an unknown layer, no .raw, or bad values.
    """
    try:
        import anndata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExpressionError(f"{path}: reading .h5ad needs anndata: pip install "
                              "'ish_tf[expression]'") from e
    with warnings.catch_warnings():
        # Files written by older anndata versions read fine, with a warning per element.
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(path)
    if layer and use_raw:
        raise ExpressionError(f"{path}: give a layer or use_raw, not both")
    genes = list(map(str, adata.var_names))
    if layer:
        if layer not in adata.layers:
            raise ExpressionError(f"{path}: no layer {layer!r}; layers: {sorted(adata.layers)}")
        x = adata.layers[layer]
    elif use_raw:
        if adata.raw is None:
            raise ExpressionError(f"{path}: has no .raw matrix")
        x, genes = adata.raw.X, list(map(str, adata.raw.var_names))
    else:
        x = adata.X
    x = x.tocsr() if _is_sparse(x) else np.asarray(x)
    return _check_table(ExpressionTable(x, list(map(str, adata.obs_names)), genes,
                                        adata.obs.copy(), path))


def _delimiter(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    return "\t" if base.endswith((".tsv", ".txt", ".tab")) else ","


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
        path, encoding="utf-8", newline="")


def read_delimited(path: str, *, orientation: str = "auto", obs: pd.DataFrame | None = None,
                   obs_columns: Sequence[str] = ()) -> ExpressionTable:
    """Reads a CSV/TSV(.gz) matrix with names in its first row and first column.

    Args:
      path: the table (.csv, .tsv, .txt, optionally .gz).
      orientation: samples_x_genes, genes_x_samples, or auto: the axis whose names
        match `obs`'s index holds the samples; else a table whose columns include one
        of `obs_columns` is samples x genes (those columns are taken as obs); else a
        table with more rows than columns is genes x samples.
      obs: sample annotations indexed by sample name (e.g. a label file), or None.
      obs_columns: columns of a samples x genes table that are annotations, not genes
        (the label and group columns).

    Raises:
      ExpressionError: non-numeric values (naming the column), NaN, duplicate names.
    """
    if orientation not in ORIENTATIONS:
        raise ExpressionError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    sep = _delimiter(path)
    with _open_text(path) as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header or len(header) < 2:
        raise ExpressionError(f"{path}: no header row with names, or a single column "
                              f"(delimiter {sep!r})")
    df = pd.read_csv(path, sep=sep, index_col=0, low_memory=False)
    df.columns = [str(c) for c in header[1:]]  # pandas would rename duplicates ("a.1")
    df.index = df.index.map(str)
    obs_columns = [c for c in obs_columns if c]
    if orientation == "auto":
        orientation = _detect_orientation(df, obs, obs_columns)
    for axis, names in (("columns", list(df.columns)), ("rows", list(df.index))):
        dup = _duplicates(names)
        if dup:
            what = "gene" if (axis == "columns") == (orientation == "samples_x_genes") else "sample"
            raise ExpressionError(f"{path}: duplicate {what} names ({axis}), e.g. {dup[:5]} "
                                  f"({len(dup)} repeated)")
    if orientation == "samples_x_genes" and obs is None:
        absent = [c for c in obs_columns if c not in df.columns]
        if absent:
            raise ExpressionError(f"{path}: no label or group column {absent[0]!r}; columns: "
                                  f"{list(df.columns[:10])}{' ...' if df.shape[1] > 10 else ''}")
    table_obs = pd.DataFrame(index=df.index if orientation == "samples_x_genes" else df.columns)
    if orientation == "samples_x_genes":
        present = [c for c in obs_columns if c in df.columns]
        table_obs = df[present].copy()
        df = df.drop(columns=present)
    # Checked in the file's own layout (a transposed mixed frame is all object columns).
    bad = [i for i, t in enumerate(df.dtypes) if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        column = df.iloc[:, bad[0]]
        row = next(r for r, v in column.items() if not _is_number(v))
        raise ExpressionError(f"{path}: non-numeric values in column {df.columns[bad[0]]!r} "
                              f"(e.g. {column[row]!r} in row {row!r})"
                              f"{f' and {len(bad) - 1} more column(s)' if len(bad) > 1 else ''}; "
                              "annotation columns must be named as --label_column/"
                              "--group_column or given in a separate obs file")
    if orientation == "genes_x_samples":
        df = df.T
    table = ExpressionTable(df.to_numpy(dtype=np.float64), list(df.index), list(df.columns),
                            table_obs, path)
    _check_table(table)
    if obs is not None:
        table.obs = _join_obs(table, obs)
    return table


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _detect_orientation(df: pd.DataFrame, obs: pd.DataFrame | None,
                        obs_columns: Sequence[str]) -> str:
    if obs is not None:
        names = set(map(str, obs.index))
        rows, cols = len(names & set(df.index)), len(names & set(df.columns))
        if rows or cols:
            return "samples_x_genes" if rows >= cols else "genes_x_samples"
    if any(c in df.columns for c in obs_columns):
        return "samples_x_genes"
    if any(not pd.api.types.is_numeric_dtype(t) for t in df.dtypes):
        return "samples_x_genes"  # annotation columns beside the genes
    return "genes_x_samples" if len(df.index) > len(df.columns) else "samples_x_genes"


def _join_obs(table: ExpressionTable, obs: pd.DataFrame) -> pd.DataFrame:
    obs = obs.copy()
    obs.index = obs.index.map(str)
    missing = [s for s in table.samples if s not in obs.index]
    if missing:
        raise ExpressionError(f"{table.source}: {len(missing)} sample(s) have no row in the obs "
                              f"table, e.g. {missing[:5]}")
    joined = obs.loc[table.samples]
    extra = [c for c in table.obs.columns if c not in joined.columns]
    return pd.concat([table.obs[extra], joined], axis=1) if extra else joined


def read_expression(path: str, *, layer: str = "", use_raw: bool = False,
                    orientation: str = "auto", obs_path: str = "",
                    obs_columns: Sequence[str] = ()) -> ExpressionTable:
    """Reads `.h5ad` or a delimited table (see `read_h5ad`, `read_delimited`).

    Args:
      obs_path: CSV/TSV of sample annotations, first column the sample names (joined
        to the matrix's samples; its columns take precedence).

    Raises:
      ExpressionError: a missing file, or any problem the readers name.
    """
    if not os.path.exists(path):
        raise ExpressionError(f"{path}: no such file")
    obs = None
    if obs_path:
        if not os.path.exists(obs_path):
            raise ExpressionError(f"{obs_path}: no such file")
        obs = pd.read_csv(obs_path, sep=_delimiter(obs_path), index_col=0)
        if _duplicates(list(map(str, obs.index))):
            raise ExpressionError(f"{obs_path}: duplicate sample names, e.g. "
                                  f"{_duplicates(list(map(str, obs.index)))[:5]}")
    if path.endswith(".h5ad"):
        table = read_h5ad(path, layer=layer, use_raw=use_raw)
        if obs is not None:
            table.obs = _join_obs(table, obs)
        return table
    if layer or use_raw:
        raise ExpressionError(f"{path}: layer/use_raw apply to .h5ad files only")
    return read_delimited(path, orientation=orientation, obs=obs, obs_columns=obs_columns)


# --------------------------------------------------------------------------- preprocessing
def looks_like_counts(matrix) -> bool:
    """True when every value is a non-negative integer (raw counts)."""
    data = matrix.data if _is_sparse(matrix) else np.asarray(matrix)
    return bool(data.size == 0 or (data.min() >= 0 and np.all(np.equal(np.mod(data, 1), 0))))


def normalize_log1p(matrix, target_sum: float = 1e4):
    """Each profile scaled to `target_sum` total, then log1p (profiles of total 0 stay 0)."""
    if _is_sparse(matrix):
        import scipy.sparse as sp

        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64),
                          where=totals > 0)
        out = sp.diags(scale) @ matrix.astype(np.float64)
        out = out.tocsr()
        out.data = np.log1p(out.data)
        return out
    x = np.asarray(matrix, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(x * scale)


def _mean_var(matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sub = matrix[rows]
    if _is_sparse(sub):
        mean = np.asarray(sub.mean(axis=0)).ravel()
        sq = np.asarray(sub.multiply(sub).mean(axis=0)).ravel()
        return mean, np.maximum(sq - mean * mean, 0.0)
    sub = np.asarray(sub, dtype=np.float64)
    return sub.mean(axis=0), sub.var(axis=0)


@dataclasses.dataclass
class Preprocessing:
    """The recorded preprocessing: replay it on new profiles with `transform`.

    Attributes:
      normalize: "log1p" (per-profile total to `target_sum`, then log1p) or "none".
      target_sum: the per-profile total before log1p.
      genes: the selected genes, in model order.
      mean, std: per selected gene, fitted on the training split (after normalisation).
      variance: training variance of each selected gene (what selected it).
      counts_detected: whether the input looked like raw counts.
      source: facts about the input (path, layer, orientation, ...).
    """

    normalize: str
    target_sum: float
    genes: list[str]
    mean: np.ndarray
    std: np.ndarray
    variance: np.ndarray
    counts_detected: bool = False
    source: dict = dataclasses.field(default_factory=dict)

    def transform(self, matrix, genes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Standardised float32 (N, len(self.genes)) profiles from a matrix with `genes`.

        Genes are aligned by name: extra genes are dropped, missing ones are filled
        with the training mean (0 after standardisation) and returned. Normalisation
        uses the profile's total over the genes it has.

        Returns:
          (values, missing gene names).
        """
        x = normalize_log1p(matrix, self.target_sum) if self.normalize == "log1p" else matrix
        position = {g: i for i, g in enumerate(map(str, genes))}
        have = [position.get(g, -1) for g in self.genes]
        cols = [i for i in have if i >= 0]
        sub = x[:, cols]
        sub = sub.toarray() if _is_sparse(sub) else np.asarray(sub, dtype=np.float64)
        out = np.zeros((sub.shape[0], len(self.genes)), dtype=np.float64)
        present = np.array([i >= 0 for i in have], dtype=bool)
        out[:, present] = (sub - self.mean[present]) / self.std[present]
        missing = [g for g, i in zip(self.genes, have, strict=True) if i < 0]
        return out.astype(np.float32), missing

    def to_json(self) -> str:
        """preprocessing.json text (genes with their statistics are in genes.csv too)."""
        return json.dumps({"format": 1, "normalize": self.normalize,
                           "target_sum": self.target_sum, "counts_detected": self.counts_detected,
                           "genes": list(self.genes), "mean": [float(v) for v in self.mean],
                           "std": [float(v) for v in self.std],
                           "variance": [float(v) for v in self.variance],
                           "source": self.source}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        d = json.loads(text)
        return cls(normalize=d["normalize"], target_sum=float(d["target_sum"]),
                   genes=list(d["genes"]), mean=np.asarray(d["mean"]), std=np.asarray(d["std"]),
                   variance=np.asarray(d["variance"]), counts_detected=bool(d["counts_detected"]),
                   source=dict(d.get("source") or {}))

    @classmethod
    def load(cls, out_dir: str) -> Preprocessing:
        """Reads DIR/preprocessing.json."""
        with open(os.path.join(out_dir, PREPROCESSING_NAME), encoding="utf-8") as f:
            return cls.from_json(f.read())


def fit_preprocessing(matrix, genes: Sequence[str], train_rows: np.ndarray, *,
                      normalize: str = "auto", n_genes: int = 1000, target_sum: float = 1e4,
                      source: dict | None = None) -> Preprocessing:
    """Decides normalisation, selects the top-variance genes and fits standardisation,
    all on the training rows.

    Raises:
      ExpressionError: a bad mode, n_genes < 1, or no gene varies on the training split.
    """
    if normalize not in NORMALIZE_MODES:
        raise ExpressionError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if n_genes < 1:
        raise ExpressionError(f"n_genes must be >= 1, got {n_genes}")
    counts = looks_like_counts(matrix)
    mode = ("log1p" if counts else "none") if normalize == "auto" else normalize
    x = normalize_log1p(matrix, target_sum) if mode == "log1p" else matrix
    _, var = _mean_var(x, train_rows)
    varying = np.flatnonzero(var > 1e-12)
    if varying.size == 0:
        raise ExpressionError(f"{(source or {}).get('path', 'the matrix')}: empty gene "
                              f"selection: no gene varies across the {len(train_rows)} "
                              "training profiles")
    # Highest variance first; ties keep the input order. The model order is the input's.
    ranked = varying[np.argsort(-var[varying], kind="stable")][:min(n_genes, varying.size)]
    chosen = np.sort(ranked)
    sub = x[train_rows][:, chosen]
    sub = sub.toarray() if _is_sparse(sub) else np.asarray(sub, dtype=np.float64)
    mean, std = sub.mean(axis=0), sub.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return Preprocessing(normalize=mode, target_sum=float(target_sum),
                         genes=[str(genes[i]) for i in chosen], mean=mean, std=std,
                         variance=var[chosen], counts_detected=counts, source=dict(source or {}))


# --------------------------------------------------------------------------- splits
def split_profiles(labels: Sequence[str], *, split_by: str = "stratified",
                   val_fraction: float = 0.1, test_fraction: float = 0.2,
                   holdout_labels: Sequence[str] = (), seed: int = 0) -> np.ndarray:
    """The split of each profile: "train", "validation" or "test".

    stratified: each label's profiles are shuffled (seeded) and the first
    round(n * test_fraction) go to test, the next round(n * val_fraction) to
    validation, keeping at least one in train. label: the profiles of
    `holdout_labels` (default: max(1, round(L * test_fraction)) labels drawn with
    the seed) are the test split; the others are split stratified into train and
    validation.

    Raises:
      ExpressionError: a bad mode or fraction, an unknown held-out label, or nothing
        left to train on.
    """
    if split_by not in SPLIT_MODES:
        raise ExpressionError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ExpressionError(f"val_fraction={val_fraction} and test_fraction={test_fraction} "
                              "must be in [0, 1) with a sum below 1")
    labels = np.asarray([str(v) for v in labels])
    names = sorted(set(labels))
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    held: set[str] = set()
    if split_by == "label":
        unknown = sorted(set(holdout_labels) - set(names))
        if unknown:
            raise ExpressionError(f"held-out labels {unknown} do not occur; labels: {names}")
        held = set(holdout_labels) or set(rng.choice(
            names, size=max(1, int(round(len(names) * test_fraction))), replace=False).tolist())
        if len(held) >= len(names):
            raise ExpressionError(f"holding out {sorted(held)} leaves no label to train on")
        out[np.isin(labels, sorted(held))] = "test"
    for name in names:
        if name in held:
            continue
        idx = np.flatnonzero(labels == name)
        idx = idx[rng.permutation(idx.size)]
        n_test = 0 if held else int(round(idx.size * test_fraction))
        n_val = int(round(idx.size * val_fraction))
        while n_test + n_val >= idx.size and n_test + n_val > 0:
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "validation"
    return out.astype(str)


# --------------------------------------------------------------------------- ingest
@dataclasses.dataclass
class ExpressionIngestConfig:
    """What `ingest_expression` reads and writes (see the module docstring).

    Attributes:
      path: .h5ad, or .csv/.tsv/.txt (optionally .gz).
      out: output directory.
      label_column: obs (or table) column of the labels; "" = every profile "unlabelled".
      group_column: obs column of the group (batch, donor, study); "" = none.
      layer, use_raw: which AnnData matrix (default X).
      orientation: auto | samples_x_genes | genes_x_samples (delimited tables).
      obs_path: a separate CSV of sample annotations (first column: sample names).
      normalize: auto (log1p-normalise detected counts) | log1p | none.
      target_sum: per-profile total before log1p.
      n_genes: highest-variance genes kept (capped at the number of genes).
      split_by: stratified | label (whole labels held out as test).
      holdout_labels: labels held out with split_by=label (default: drawn).
      val_fraction, test_fraction: split fractions.
      num_shards: record shards per split.
      seed: seed of the splits.
    """

    path: str
    out: str
    label_column: str = ""
    group_column: str = ""
    layer: str = ""
    use_raw: bool = False
    orientation: str = "auto"
    obs_path: str = ""
    normalize: str = "auto"
    target_sum: float = 1e4
    n_genes: int = 1000
    split_by: str = "stratified"
    holdout_labels: tuple[str, ...] = ()
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    num_shards: int = 1
    seed: int = 0


@dataclasses.dataclass
class ExpressionIngestResult:
    """What `ingest_expression` wrote."""

    profiles_path: str
    genes_path: str
    preprocessing_path: str
    records_dir: str
    n_profiles: int
    n_genes_in: int
    n_genes: int
    split_counts: dict[str, int]
    labels: list[str]
    preprocessing: Preprocessing


def ingest_expression(cfg: ExpressionIngestConfig) -> ExpressionIngestResult:
    """Reads, splits, preprocesses and writes an expression matrix (module docstring).

    Raises:
      ExpressionError: bad input (naming the file and the column), or an existing
        record set in `out`.
    """
    if not cfg.out:
        raise ExpressionError("an output directory (--out) is required")
    table = read_expression(cfg.path, layer=cfg.layer, use_raw=cfg.use_raw,
                            orientation=cfg.orientation, obs_path=cfg.obs_path,
                            obs_columns=(cfg.label_column, cfg.group_column))
    for role, column in (("label", cfg.label_column), ("group", cfg.group_column)):
        if column and column not in table.obs.columns:
            raise ExpressionError(f"{cfg.path}: no {role} column {column!r}; columns: "
                                  f"{list(map(str, table.obs.columns))}")
    n = len(table.samples)
    labels = (table.obs[cfg.label_column].astype(str).to_numpy() if cfg.label_column
              else np.full(n, "unlabelled", dtype=object))
    groups = (table.obs[cfg.group_column].astype(str).to_numpy() if cfg.group_column
              else np.full(n, "", dtype=object))
    if cfg.label_column and table.obs[cfg.label_column].isna().any():
        first = table.samples[int(np.flatnonzero(table.obs[cfg.label_column].isna())[0])]
        raise ExpressionError(f"{cfg.path}: label column {cfg.label_column!r} is empty for "
                              f"sample {first!r} (and maybe others)")
    splits = split_profiles(labels, split_by=cfg.split_by, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, holdout_labels=cfg.holdout_labels,
                            seed=cfg.seed)
    train_rows = np.flatnonzero(splits == "train")
    source = {"path": os.path.abspath(cfg.path), "layer": cfg.layer, "use_raw": cfg.use_raw,
              "orientation": cfg.orientation, "label_column": cfg.label_column,
              "group_column": cfg.group_column, "split_by": cfg.split_by,
              "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
              "seed": cfg.seed, "n_genes_requested": cfg.n_genes}
    prep = fit_preprocessing(table.matrix, table.genes, train_rows, normalize=cfg.normalize,
                             n_genes=cfg.n_genes, target_sum=cfg.target_sum, source=source)
    values, _ = prep.transform(table.matrix, table.genes)

    from ish_tf.data.record_sets import write_record_set

    os.makedirs(cfg.out, exist_ok=True)
    records_dir = os.path.join(cfg.out, RECORDS_SUBDIR)
    by_split: dict[str, list[dict]] = {}
    for i in range(n):
        by_split.setdefault(str(splits[i]), []).append(
            {"identity": labels[i], "group": groups[i], "vector": values[i], "image_id": i})
    write_record_set(records_dir, by_split, _vector_spec(len(prep.genes)), num_shards=cfg.num_shards,
                     identity_name="cell_type" if cfg.label_column else "label",
                     group_name=cfg.group_column or "group", seed=cfg.seed,
                     extra={"expression": {"source": os.path.abspath(cfg.path),
                                           "normalize": prep.normalize,
                                           "n_genes": len(prep.genes)}})

    profiles = pd.DataFrame({"image_id": np.arange(n), "sample_id": table.samples,
                             "split": splits, "label": labels, "group": groups})
    obs = table.obs.reset_index(drop=True)
    obs = obs[[c for c in obs.columns if str(c) not in profiles.columns]]
    profiles = pd.concat([profiles, obs], axis=1)
    paths = {k: os.path.join(cfg.out, v) for k, v in (("profiles", PROFILES_NAME),
                                                      ("genes", GENES_NAME),
                                                      ("prep", PREPROCESSING_NAME))}
    atomic_write_text(paths["profiles"], profiles.to_csv(index=False))
    atomic_write_text(paths["genes"], pd.DataFrame(
        {"gene": prep.genes, "mean": prep.mean, "std": prep.std, "variance": prep.variance}
    ).to_csv(index=False))
    atomic_write_text(paths["prep"], prep.to_json() + "\n")
    counts = {s: int((splits == s).sum()) for s in ("train", "validation", "test")}
    return ExpressionIngestResult(paths["profiles"], paths["genes"], paths["prep"], records_dir,
                                  n, len(table.genes), len(prep.genes), counts,
                                  sorted(set(map(str, labels))), prep)


def _vector_spec(dim: int):
    from ish_tf.data.inputs import InputSpec

    return InputSpec.vector(dim)


# --------------------------------------------------------------------------- reading back
@dataclasses.dataclass
class IngestedSplit:
    """The preprocessed profiles of one split, read back from the records.

    Attributes:
      values: float32 (N, G) standardised profiles, in the records' order.
      image_id: N record ids (rows of profiles.csv).
      labels: N labels (profiles.csv `label`).
      sample_id: N sample names.
    """

    values: np.ndarray
    image_id: np.ndarray
    labels: np.ndarray
    sample_id: np.ndarray


def read_ingested(out_dir: str, splits: Sequence[str] = ("train", "validation", "test")
                  ) -> tuple[pd.DataFrame, Preprocessing, dict[str, IngestedSplit]]:
    """Reads what `ingest_expression` wrote: profiles.csv, the preprocessing and the
    vectors of each split (from the records, exactly as the models saw them).

    Splits without shards are left out of the returned dict.

    Raises:
      ExpressionError: a missing file, or records whose ids are not in profiles.csv.
    """
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards
    from ish_tf.data.records import RecordsError

    for name in (PROFILES_NAME, PREPROCESSING_NAME):
        if not os.path.exists(os.path.join(out_dir, name)):
            raise ExpressionError(f"{out_dir}: no {name}: give the directory written by "
                                  "bin/ingest --expression")
    profiles = pd.read_csv(os.path.join(out_dir, PROFILES_NAME), dtype={"label": str,
                                                                        "sample_id": str})
    prep = Preprocessing.load(out_dir)
    records_dir = os.path.join(out_dir, RECORDS_SUBDIR)
    dim = shards.records_input_spec(records_dir).dim or len(prep.genes)
    by_id = profiles.set_index("image_id")
    out: dict[str, IngestedSplit] = {}
    for split in splits:
        try:
            files = list_shards(records_dir, split)
        except RecordsError:
            continue
        ds = tf.data.TFRecordDataset(files, compression_type=shards.compression_of(files[0]) or "")
        def parse(serialized):
            feats = records.parse_example(serialized, ["vector", "image_id"], "vector")
            return records.decode_vector(feats, dim), feats["image_id"]

        vecs, ids = [], []
        for vec, image_id in ds.map(parse).batch(512):
            vecs.append(vec.numpy())
            ids.append(image_id.numpy().reshape(-1))
        values = np.concatenate(vecs).astype(np.float32)
        image_id = np.concatenate(ids).astype(np.int64)
        missing = [i for i in image_id if i not in by_id.index]
        if missing:
            raise ExpressionError(f"{records_dir}: record ids {missing[:5]} of split {split!r} "
                                  f"have no row in {PROFILES_NAME}")
        rows = by_id.loc[image_id]
        out[split] = IngestedSplit(values, image_id, rows["label"].astype(str).to_numpy(),
                                   rows["sample_id"].astype(str).to_numpy())
    return profiles, prep, out
