"""Diagnosis prediction: can a gene's donor-level embedding tell patients from controls?

For each gene, donor-level embeddings (the mean over that donor's patches or images of
the gene) are labelled from the manifest (schizophrenia vs control by default, or any
column and values by configuration). Genes assayed in at least `min_donors` labelled
donors are scored with the same stratified k-fold, unpenalised logistic regression as
annotations (`ish_tf.evaluate.annotations.cross_validate_binary`), four ways:

- `embedding`: the donor-level embedding (B, D);
- `demographics`: donor covariates alone (age, PMI, tissue pH as numbers; smoker,
  sex, race one-hot);
- `combined`: demographics and embedding side by side;
- `random`: a Gaussian random embedding of the same shape (the chance baseline).

An embedding carries diagnosis information for a gene only where it beats both the
demographics and the random baseline.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from absl import logging

from ish_tf.data.embeddings import EmbeddingTable, EmbeddingTableError, aggregate
from ish_tf.evaluate.annotations import cross_validate_binary

DEMOGRAPHICS: tuple[str, ...] = ("donor_age", "pmi", "tissue_ph", "smoker", "donor_sex",
                                 "donor_race")
FEATURE_SETS: tuple[str, ...] = ("embedding", "demographics", "combined", "random")


class DiagnosisError(ValueError):
    """Labels or inputs that cannot be used; the message names the file, column or donor."""


@dataclasses.dataclass
class DiagnosisConfig:
    """Settings of diagnosis prediction.

    Attributes:
      label_column: manifest column holding the donor label.
      positive: value of the positive class (case-insensitive).
      negative: value of the negative class; "" means every other non-empty value.
      min_donors: genes assayed in fewer labelled donors are skipped.
      demographics: manifest columns used as covariates (numeric as is, others one-hot).
      n_splits, seed, standardize, max_iter, solver: as in annotation scoring.
      n_jobs: parallel worker processes over genes.
      penalty, pca_components: as in annotation scoring (`ScoringConfig`).
    """

    label_column: str = "diagnosis"
    positive: str = "schizophrenia"
    negative: str = "control"
    min_donors: int = 40
    demographics: tuple[str, ...] = DEMOGRAPHICS
    n_splits: int = 5
    seed: int = 0
    standardize: bool = True
    max_iter: int = 500
    solver: str = "newton-cg"
    n_jobs: int = 1
    penalty: str = "none"
    pca_components: int = 0


def _per_donor(manifest: pd.DataFrame, column: str, source: str) -> pd.Series:
    """One value of `column` per donor; conflicting values are an error."""
    if column not in manifest.columns:
        raise DiagnosisError(f"{source}: manifest has no column '{column}'")
    values = manifest[["donor_id", column]].dropna()
    counts = values.groupby("donor_id")[column].nunique()
    if (counts > 1).any():
        donor = counts.index[counts > 1][0]
        seen = sorted(map(str, values.loc[values["donor_id"] == donor, column].unique()))
        raise DiagnosisError(f"{source}: donor {donor} has conflicting '{column}' values {seen}")
    return values.groupby("donor_id")[column].first()


def donor_labels(manifest: pd.DataFrame, column: str = "diagnosis",
                 positive: str = "schizophrenia", negative: str = "control",
                 source: str = "<manifest>") -> pd.Series:
    """Binary donor labels from a manifest column.

    Args:
      manifest: a manifest with donor_id and `column`.
      column: the label column.
      positive: value of class 1 (case-insensitive, stripped).
      negative: value of class 0; "" = any other value.
      source: file name for messages.

    Returns:
      Series indexed by donor_id with values 0/1; donors with other or missing values
      are left out.

    Raises:
      DiagnosisError: the column is missing, a donor has conflicting values, or the
        positive or negative value occurs nowhere (the values found are listed).
    """
    values = _per_donor(manifest, column, source).astype(str).str.strip().str.lower()
    pos, neg = positive.strip().lower(), negative.strip().lower()
    found = sorted(values.unique())
    if pos not in found:
        raise DiagnosisError(f"{source}: no donor has {column}='{positive}'; values are {found}")
    if neg and neg not in found:
        raise DiagnosisError(f"{source}: no donor has {column}='{negative}'; values are {found}")
    keep = (values == pos) | ((values == neg) if neg else (values != ""))
    return (values[keep] == pos).astype(np.int64)


def donor_demographics(manifest: pd.DataFrame, columns: tuple[str, ...] = DEMOGRAPHICS,
                       source: str = "<manifest>") -> pd.DataFrame:
    """Donor covariates: numeric columns as is (missing -> median), others one-hot.

    Args:
      manifest: a manifest with donor_id and the columns.
      columns: covariate columns; entirely empty ones are dropped (logged).
      source: file name for messages.

    Returns:
      Float DataFrame indexed by donor_id, one column per number or category level.

    Raises:
      DiagnosisError: a column is missing or a donor has conflicting values.
    """
    donors = pd.Index(sorted(manifest["donor_id"].dropna().astype(str).unique()), name="donor_id")
    parts = []
    for col in columns:
        values = _per_donor(manifest, col, source).reindex(donors)
        if values.isna().all():
            logging.info("%s: demographic column '%s' is empty; left out", source, col)
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() == values.notna().sum():
            parts.append(numeric.fillna(numeric.median()).astype(float).rename(col).to_frame())
        else:
            parts.append(pd.get_dummies(values.astype("string"), prefix=col, dtype=float))
    if not parts:
        return pd.DataFrame(index=donors)
    return pd.concat(parts, axis=1)


def donor_level_table(table: EmbeddingTable, manifest: pd.DataFrame | None = None) -> EmbeddingTable:
    """Means per (gene_symbol, donor_id) of a patch-, image- or donor-level table.

    Args:
      table: embedding table with gene_symbol and donor_id keys, or with image_id
        (then `manifest` supplies gene and donor).
      manifest: needed only when the table lacks gene_symbol or donor_id.

    Raises:
      EmbeddingTableError: neither the keys nor image_id with a manifest are available,
        or no image_id matches the manifest.
    """
    keys = table.keys
    if not {"gene_symbol", "donor_id"} <= set(keys.columns):
        if "image_id" not in keys.columns or manifest is None:
            raise EmbeddingTableError(
                f"{table.source}: needs gene_symbol and donor_id columns (or image_id and a "
                f"manifest) for donor-level embeddings; has {', '.join(map(str, keys.columns))}")
        info = manifest.set_index("image_id")[["gene_symbol", "donor_id"]]
        ids = pd.to_numeric(keys["image_id"], errors="coerce")
        joined = info.reindex(ids)
        ok = joined["gene_symbol"].notna().to_numpy()
        if not ok.any():
            raise EmbeddingTableError(f"{table.source}: no image_id matches the manifest")
        keys = pd.DataFrame({"gene_symbol": joined["gene_symbol"].to_numpy()[ok],
                             "donor_id": joined["donor_id"].to_numpy()[ok]})
        table = EmbeddingTable(keys, table.values[ok], table.source)
    small = EmbeddingTable(table.keys[["gene_symbol", "donor_id"]].astype(str), table.values,
                           table.source)
    return aggregate(small, ("gene_symbol", "donor_id"))


def _score_gene(gene_index: int, x: np.ndarray, y: np.ndarray, demo: np.ndarray,
                config: DiagnosisConfig) -> dict[str, float]:
    kw = dict(n_splits=config.n_splits, seed=config.seed, standardize=config.standardize,
              max_iter=config.max_iter, solver=config.solver,
              penalty=getattr(config, "penalty", "none"),
              pca_components=getattr(config, "pca_components", 0))
    rng = np.random.default_rng([config.seed, gene_index])
    sets = {"embedding": x, "random": rng.standard_normal(x.shape)}
    if demo.shape[1]:
        sets["demographics"] = demo
        sets["combined"] = np.hstack([demo, x])
    out: dict[str, float] = {}
    for name in FEATURE_SETS:
        if name not in sets:
            out[f"auc_{name}"] = out[f"f1_{name}"] = float("nan")
            continue
        s = cross_validate_binary(sets[name], y, **kw)
        out[f"auc_{name}"], out[f"f1_{name}"] = s["auc"], s["f1"]
        if name == "embedding":
            out["flag"] = s["flag"]
    return out


def predict_diagnosis(donor_table: EmbeddingTable, labels: pd.Series,
                      demographics: pd.DataFrame | None = None,
                      config: DiagnosisConfig | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores every gene assayed in enough labelled donors.

    Args:
      donor_table: donor-level table (keys gene_symbol, donor_id), values (R, D).
      labels: donor_id -> 0/1 (from `donor_labels`).
      demographics: donor_id -> covariates (from `donor_demographics`), or None.
      config: settings.

    Returns:
      (per_gene, skipped): per_gene has gene_symbol, n_donors, n_positive and
      auc_/f1_ for each of FEATURE_SETS, sorted by auc_embedding (best first);
      skipped has gene_symbol, n_donors, reason.

    Raises:
      DiagnosisError: no donor of the table has a label.
    """
    config = config or DiagnosisConfig()
    keys = donor_table.keys.reset_index(drop=True)
    donors = keys["donor_id"].astype(str)
    labelled = donors.isin(labels.index).to_numpy()
    if not labelled.any():
        raise DiagnosisError(
            f"{donor_table.source}: no donor_id of the table has a label "
            f"(e.g. table {list(donors.unique()[:3])}, labels {list(labels.index[:3])})")
    if demographics is None:
        demographics = pd.DataFrame(index=labels.index)
    tasks, skipped = [], []
    genes = keys["gene_symbol"].astype(str)
    for gi, (gene, rows) in enumerate(genes[labelled].groupby(genes[labelled], sort=True).groups.items()):
        rows = np.asarray(rows)
        y = labels.reindex(donors.iloc[rows]).to_numpy(dtype=np.int64)
        n, n_pos = len(rows), int(y.sum())
        if n < config.min_donors:
            skipped.append({"gene_symbol": gene, "n_donors": n,
                            "reason": f"{n} labelled donors < minimum {config.min_donors}"})
            continue
        if min(n_pos, n - n_pos) < config.n_splits:
            skipped.append({"gene_symbol": gene, "n_donors": n,
                            "reason": f"{n_pos} positive / {n - n_pos} negative donors < "
                                      f"{config.n_splits} folds"})
            continue
        demo = demographics.reindex(donors.iloc[rows].to_numpy()).fillna(0.0).to_numpy(float)
        tasks.append((gi, gene, rows, y, demo))
    from ish_tf.progress import progress
    shown = progress(tasks, desc="diagnosis", unit="genes")
    if config.n_jobs > 1 and len(tasks) > 1:
        from joblib import Parallel, delayed
        scores = Parallel(n_jobs=config.n_jobs)(
            delayed(_score_gene)(gi, donor_table.values[rows], y, demo, config)
            for gi, _, rows, y, demo in shown)
    else:
        scores = [_score_gene(gi, donor_table.values[rows], y, demo, config)
                  for gi, _, rows, y, demo in shown]
    columns = ["gene_symbol", "n_donors", "n_positive"] + [
        f"{m}_{s}" for s in FEATURE_SETS for m in ("auc", "f1")] + ["flag"]
    per_gene = pd.DataFrame(
        [{"gene_symbol": t[1], "n_donors": len(t[2]), "n_positive": int(t[3].sum()), **s}
         for t, s in zip(tasks, scores, strict=True)], columns=columns)
    per_gene = per_gene.sort_values("auc_embedding", ascending=False, kind="stable")
    logging.info("diagnosis: %d genes scored, %d skipped", len(per_gene), len(skipped))
    return (per_gene.reset_index(drop=True),
            pd.DataFrame(skipped, columns=["gene_symbol", "n_donors", "reason"]))


def summarize_diagnosis(per_gene: pd.DataFrame) -> pd.DataFrame:
    """Mean and median AUC of each feature set over genes, and how often the embedding wins.

    Returns:
      One row per feature set: features, n_genes, mean_auc, median_auc, mean_f1,
      embedding_wins (genes where the embedding's AUC is strictly higher).
    """
    rows = []
    for s in FEATURE_SETS:
        auc = per_gene[f"auc_{s}"]
        rows.append({"features": s, "n_genes": int(auc.notna().sum()),
                     "mean_auc": float(auc.mean()), "median_auc": float(auc.median()),
                     "mean_f1": float(per_gene[f"f1_{s}"].mean()),
                     "embedding_wins": int((per_gene["auc_embedding"] > auc).sum())})
    return pd.DataFrame(rows)
