"""`bin/embed --expression`: codes of new expression profiles through an exported model.

A vector model exported by `bin/export` (e.g. `cic`) is fed profiles prepared exactly as
its training profiles were: the new matrix (`.h5ad` or CSV/TSV, read by
`ish_tf.data.expression.read_expression`) is aligned BY GENE NAME to the training genes
(`genes.csv` / `preprocessing.json` of the `bin/ingest --expression` directory): genes
the model does not know are dropped, genes it needs but the file lacks are filled with
the training mean (0 after standardisation) and counted in a warning; then the stored
normalisation and standardisation are replayed. Nothing is retrained.

Writes, in OUT:

    codes.csv (or codes.parquet)   sample_id, every input obs column, code_0..code_{C-1}
    codes.h5ad                     X: the aligned, standardised profiles (var: the
                                   model's genes); obs: every input obs column;
                                   obsm[obsm_key]: the codes (C columns)
    embed_summary.json             model, genes matched / missing / dropped, counts

Records instead of a matrix: `write_records_h5ad` turns the table `bin/embed` wrote for
the vector records of an ingest directory into the same `.h5ad`, obs from profiles.csv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_path, atomic_write_text

CODES_NAME = "codes"
H5AD_NAME = "codes.h5ad"
SUMMARY_NAME = "embed_summary.json"
DEFAULT_OBSM_KEY = "X_cic"


class ExpressionEmbedError(ValueError):
    """Bad input or settings; the message names the file or flag."""


class VectorModel:
    """The `serving_default` signature of an exported vector model (float32 (B, D) in).

    Args:
      path: SavedModel version directory or export base (newest version).
      allow_foreign: load a SavedModel without ish_tf's export metadata.

    Attributes:
      dim: D, the number of inputs.
      outputs: output names (e.g. code, reconstruction, probabilities).
      metadata: the export's sidecar (assets.extra/ish_tf.json).

    Raises:
      ExpressionEmbedError: not an ish_tf export (unless allow_foreign), or not a vector
        model.
    """

    def __init__(self, path: str, allow_foreign: bool = False):
        import tensorflow as tf

        from ish_tf.export import saved_model as sm

        try:
            self.path, self.metadata = sm.open_trusted(path, allow_foreign)
        except sm.ExportError as e:
            raise ExpressionEmbedError(str(e)) from None
        loaded = tf.saved_model.load(self.path)
        self._loaded = loaded
        self._fn = loaded.signatures[sm.SERVING_DEFAULT]
        inputs = self._fn.structured_input_signature[1]
        if len(inputs) != 1 or next(iter(inputs.values())).dtype != tf.float32 or len(
                next(iter(inputs.values())).shape) != 2:
            raise ExpressionEmbedError(f"{self.path}: serving_default takes {dict(inputs)}, not "
                                       "float32 vectors (B, D): export a vector model (cic)")
        self.input_key = next(iter(inputs))
        self.dim = int(next(iter(inputs.values())).shape[1])
        self.outputs = list(self._fn.structured_outputs)

    @property
    def class_names(self) -> list[str]:
        """Class names of a classifier export (else []): the sidecar's class_names, or the
        classes the family's config read from the records (model_config)."""
        names = self.metadata.get("class_names")
        if not names:
            family = (((self.metadata.get("extra") or {}).get("model_config") or {})
                      .get("config") or {}).get("family") or {}
            names = family.get("classes")
        return [str(n) for n in names or []]

    def __call__(self, values: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Runs (N, D) profiles through the model; returns {output: (N, ...) float32}.

        Raises:
          ExpressionEmbedError: the profiles have another width than the model.
        """
        import tensorflow as tf

        values = np.asarray(values, np.float32)
        if values.ndim != 2 or values.shape[1] != self.dim:
            raise ExpressionEmbedError(f"{self.path}: the model takes {self.dim} genes, got "
                                       f"profiles of shape {values.shape}")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for start in range(0, max(len(values), 1), batch_size):
            out = self._fn(**{self.input_key: tf.constant(values[start:start + batch_size])})
            for k in self.outputs:
                parts[k].append(out[k].numpy().astype(np.float32))
        return {k: np.concatenate(v) if v else np.zeros((0,), np.float32)
                for k, v in parts.items()}


@dataclasses.dataclass(frozen=True)
class ExpressionEmbedConfig:
    """Settings of `embed_expression`.

    Attributes:
      saved_model: export base or version directory of a vector model.
      expression: the new matrix (.h5ad, .csv/.tsv(.gz)).
      out_dir: OUT.
      preprocessing: the `bin/ingest --expression` directory of the model's training data
        (preprocessing.json, genes.csv); "" = the directory above the records the model
        was trained on (read from the export's flags).
      obs_path, layer, use_raw, orientation: as for `bin/ingest --expression`.
      obs_columns: annotation (non-gene) columns of a samples x genes table, kept as obs.
      table_format: csv, parquet, or h5ad (codes.h5ad only).
      obsm_key: where the codes go in the .h5ad.
      output: the model output stored (code).
      batch_size: profiles per call.
      allow_foreign_saved_model: see `VectorModel`.
    """

    saved_model: str
    expression: str
    out_dir: str
    preprocessing: str = ""
    obs_path: str = ""
    obs_columns: tuple[str, ...] = ()
    layer: str = ""
    use_raw: bool = False
    orientation: str = "auto"
    table_format: str = "csv"
    obsm_key: str = DEFAULT_OBSM_KEY
    output: str = "code"
    batch_size: int = 256
    allow_foreign_saved_model: bool = False


@dataclasses.dataclass
class ExpressionEmbedResult:
    """What `embed_expression` wrote and what it found."""

    table: str
    h5ad: str
    summary_path: str
    n_profiles: int
    code_size: int
    genes_model: int
    genes_matched: int
    genes_missing: list[str]
    genes_dropped: int


def preprocessing_dir_of(model: VectorModel, given: str = "") -> str:
    """The ingest directory holding preprocessing.json: `given`, else the parent of the
    records the model was trained on (the export's `records_dir` flag).

    Raises:
      ExpressionEmbedError: none found.
    """
    from ish_tf.data.expression import PREPROCESSING_NAME

    candidates = [given] if given else []
    records_dir = str((model.metadata.get("flags") or {}).get("records_dir") or "")
    if not given and records_dir:
        candidates += [os.path.dirname(os.path.normpath(records_dir)), records_dir]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, PREPROCESSING_NAME)):
            return c
    if given:
        raise ExpressionEmbedError(f"--preprocessing={given}: no {PREPROCESSING_NAME} (give the "
                                   "directory bin/ingest --expression wrote)")
    raise ExpressionEmbedError(f"{model.path}: cannot find the training preprocessing "
                               f"(trained on records_dir={records_dir or '?'}); give "
                               "--preprocessing=DIR, the bin/ingest --expression output")


def code_columns(n: int, prefix: str = "code") -> list[str]:
    return [f"{prefix}_{i}" for i in range(n)]


def write_table(frame: pd.DataFrame, out_dir: str, table_format: str) -> str:
    """OUT/codes.csv or codes.parquet, atomically; returns the path."""
    if table_format not in ("csv", "parquet"):
        raise ExpressionEmbedError(f"table format must be csv or parquet, got {table_format!r}")
    path = os.path.join(out_dir, f"{CODES_NAME}.{table_format}")
    if table_format == "csv":
        atomic_write_text(path, frame.to_csv(index=False))
    else:
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    return path


def write_h5ad(path: str, values: np.ndarray, genes: Sequence[str], obs: pd.DataFrame,
               codes: np.ndarray, obsm_key: str = DEFAULT_OBSM_KEY,
               uns: dict | None = None) -> str:
    """An AnnData file: X the profiles (var: genes), obs kept, obsm[obsm_key] the codes."""
    import anndata

    obs = obs.copy()
    obs.index = obs.index.map(str)
    for c in obs.columns:  # h5ad stores str/numeric/categorical columns, not mixed objects
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    obs.columns = [str(c) for c in obs.columns]
    adata = anndata.AnnData(X=np.asarray(values, np.float32), obs=obs,
                            var=pd.DataFrame(index=pd.Index(list(map(str, genes)), name="gene")))
    adata.obsm[obsm_key] = np.asarray(codes, np.float32)
    if uns:
        adata.uns["ish_tf"] = {k: str(v) for k, v in uns.items()}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(tmp)
    return path


def embed_expression(cfg: ExpressionEmbedConfig,
                     warn=lambda s: None) -> ExpressionEmbedResult:
    """Aligns, preprocesses and encodes a new expression matrix (module docstring).

    Args:
      cfg: the settings.
      warn: called with the missing-genes warning (one line).

    Raises:
      ExpressionEmbedError, ExpressionError: bad settings or input (naming the file).
    """
    from ish_tf.data.expression import Preprocessing, read_expression

    if not cfg.out_dir:
        raise ExpressionEmbedError("--out is required")
    model = VectorModel(cfg.saved_model, cfg.allow_foreign_saved_model)
    if cfg.output not in model.outputs:
        raise ExpressionEmbedError(f"{model.path}: no output {cfg.output!r}; it has "
                                   f"{model.outputs}")
    prep_dir = preprocessing_dir_of(model, cfg.preprocessing)
    prep = Preprocessing.load(prep_dir)
    if len(prep.genes) != model.dim:
        raise ExpressionEmbedError(f"{prep_dir}: {len(prep.genes)} genes but {model.path} takes "
                                   f"{model.dim}: not the preprocessing of this model")
    table = read_expression(cfg.expression, layer=cfg.layer, use_raw=cfg.use_raw,
                            orientation=cfg.orientation, obs_path=cfg.obs_path,
                            obs_columns=cfg.obs_columns)
    values, missing = prep.transform(table.matrix, table.genes)
    known = set(prep.genes)
    dropped = sum(1 for g in table.genes if g not in known)
    if len(missing) == len(prep.genes):
        raise ExpressionEmbedError(f"{cfg.expression}: none of the model's {len(prep.genes)} "
                                   f"genes (e.g. {prep.genes[:3]}) is in the file (its genes: "
                                   f"{table.genes[:3]} ...); are the names the same kind?")
    if missing:
        warn(f"{cfg.expression}: {len(missing)} of the model's {len(prep.genes)} genes are "
             f"missing and were filled with the training mean, e.g. {missing[:5]}")
    codes = model(values, cfg.batch_size)[cfg.output].reshape(len(values), -1)
    os.makedirs(cfg.out_dir, exist_ok=True)
    obs = table.obs.copy()
    frame = pd.concat([pd.DataFrame({"sample_id": table.samples}),
                       obs.reset_index(drop=True).drop(columns=["sample_id"], errors="ignore"),
                       pd.DataFrame(codes, columns=code_columns(codes.shape[1]))], axis=1)
    obs.index = pd.Index(table.samples, name="sample_id")
    h5ad = write_h5ad(os.path.join(cfg.out_dir, H5AD_NAME), values, prep.genes, obs, codes,
                      cfg.obsm_key, {"saved_model": model.path, "preprocessing": prep_dir,
                                     "source": os.path.abspath(cfg.expression)})
    # table_format h5ad: codes.h5ad is the table.
    table_path = h5ad if cfg.table_format == "h5ad" else write_table(frame, cfg.out_dir,
                                                                      cfg.table_format)
    summary = {"saved_model": model.path, "preprocessing": os.path.abspath(prep_dir),
               "expression": os.path.abspath(cfg.expression), "output": cfg.output,
               "n_profiles": len(values), "code_size": int(codes.shape[1]),
               "genes_model": len(prep.genes), "genes_matched": len(prep.genes) - len(missing),
               "genes_missing": len(missing), "genes_missing_examples": missing[:20],
               "genes_dropped": dropped, "table": table_path, "h5ad": h5ad,
               "obsm_key": cfg.obsm_key}
    summary_path = os.path.join(cfg.out_dir, SUMMARY_NAME)
    atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    return ExpressionEmbedResult(table_path, h5ad, summary_path, len(values), int(codes.shape[1]),
                                 len(prep.genes), len(prep.genes) - len(missing), missing,
                                 dropped)


def write_records_h5ad(image_table: str, ingest_dir: str, out_path: str,
                       obsm_key: str = DEFAULT_OBSM_KEY) -> str:
    """The .h5ad of codes `bin/embed` wrote for the vector records of an ingest directory.

    Args:
      image_table: bin/embed's image-level table (one row per record: image_id + dims).
      ingest_dir: the `bin/ingest --expression` directory (profiles.csv, genes.csv).
      out_path: the .h5ad to write (X empty of genes: the codes are in obsm).

    Raises:
      ExpressionEmbedError: records whose ids are not in profiles.csv.
    """
    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.data.expression import PROFILES_NAME

    table = read_embedding_table(image_table)
    profiles = pd.read_csv(os.path.join(ingest_dir, PROFILES_NAME), dtype={"sample_id": str,
                                                                           "label": str})
    ids = table.keys["image_id"].astype(np.int64).to_numpy()
    by_id = profiles.set_index("image_id")
    unknown = [i for i in ids if i not in by_id.index]
    if unknown:
        raise ExpressionEmbedError(f"{image_table}: image ids {unknown[:5]} are not in "
                                   f"{os.path.join(ingest_dir, PROFILES_NAME)}")
    obs = by_id.loc[ids].reset_index()
    obs.index = pd.Index(obs["sample_id"].astype(str), name="sample_id")
    obs = obs.drop(columns=["sample_id"])
    return write_h5ad(out_path, np.zeros((len(ids), 0), np.float32), [], obs,
                      np.asarray(table.values, np.float32), obsm_key,
                      {"source": os.path.abspath(image_table)})
