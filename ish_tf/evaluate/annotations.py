"""Annotation prediction: how well does an embedding predict binary gene groups?

For every binary group (e.g. "laminar expression pattern", "layer 5 marker", a GO
term) the genes of the group are positives and the other annotated genes of the same
category are negatives. A logistic regression without penalty is scored by
stratified, shuffled k-fold cross-validation with a fixed seed; per group we report
the fold means of AUC, AUC-PR (average precision) and F1, and the largest one-sided
Mann-Whitney U p-value across folds (do the held-out scores of positives exceed those
of negatives in *every* fold?).

Groups come from any source through one structure, `Annotations` (genes x groups),
built by `ish_tf.evaluate.zeng`, `ish_tf.evaluate.go` or `from_categorical_table`.
Embedding rows are joined to annotation genes by gene_symbol (case-insensitive,
stripped) or entrez_id; `key="auto"` uses whichever matches more genes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import numpy as np
import pandas as pd
from absl import logging

from ish_tf.data.embeddings import EmbeddingTable

GENE_KEYS: tuple[str, ...] = ("gene_symbol", "entrez_id")
RESULT_COLUMNS: tuple[str, ...] = (
    "annotation", "category", "n_genes", "auc", "auc_pr", "f1", "max_p", "max_p_bh",
    "embedding", "n_total", "converged", "key", "flag",
)
PENALTIES: tuple[str, ...] = ("none", "l2")
#: Human labels of the categories this package builds (figure panels, report tables).
CATEGORY_LABELS: dict[str, str] = {
    "pattern": "Expression pattern",
    "level_description": "Expression level (high / medium / low)",
    "level": "Expression level in V1 (- to +++++)",
    "layer_marker": "Layer marker",
    "celltype_marker": "Cell-type marker",
    "cell_type": "Cell type",
    "group_name": "Gene group",
    "go": "GO term",
    "all": "All groups",
}
# Words of an ordinal scale, low to high (matched case-insensitively).
_LEVEL_WORDS = ("none", "absent", "very low", "low", "medium", "moderate", "intermediate",
                "high", "very high")
_PLUS_SCALE = re.compile(r"^(-|\+{1,9})$")


def category_label(category: str) -> str:
    """A category's human label: "layer_marker" -> "Layer marker"; unknown names get their
    underscores replaced and the first letter capitalised."""
    if category in CATEGORY_LABELS:
        return CATEGORY_LABELS[category]
    text = str(category).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: "layer 2" < "layer 10"."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower())
                 for t in re.split(r"(\d+)", str(text)) if t)


def natural_order(values) -> list[str]:
    """The distinct values of one category in their natural order.

    Ordinal scales sort low to high: "-" < "+" < "++" < ... (Zeng et al.'s levels), and
    none < low < medium < high; anything else sorts alphabetically with numbers compared
    as numbers ("layer 2" before "layer 10").
    """
    distinct = list(dict.fromkeys(str(v) for v in values))
    if distinct and all(_PLUS_SCALE.match(v.strip()) for v in distinct):
        return sorted(distinct, key=lambda v: 0 if v.strip() == "-" else len(v.strip()))
    if distinct and all(v.strip().lower() in _LEVEL_WORDS for v in distinct):
        return sorted(distinct, key=lambda v: _LEVEL_WORDS.index(v.strip().lower()))
    return sorted(distinct, key=_natural_key)


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1); NaN stays NaN.

    A group is significant at false discovery rate q when its adjusted p-value is < q.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.minimum(adjusted, 1.0)
    return out


class AnnotationError(ValueError):
    """Annotations that cannot be read or joined; the message names the file, row or column."""


# --------------------------------------------------------------------------- structure
@dataclasses.dataclass
class Annotations:
    """Binary gene groups over a set of annotated genes.

    Attributes:
      genes: one row per annotated gene, with gene_symbol and/or entrez_id (G rows).
      groups: one row per group with columns `annotation` and `category` (K rows), and
        optionally `description`.
      members: K integer arrays of row indices into `genes`: the positives of each group.
      universes: category -> row indices into `genes` of the genes annotated in that
        category (the candidates for negatives). A category that is absent uses all genes.
      source: file the annotations came from, quoted in messages.
    """

    genes: pd.DataFrame
    groups: pd.DataFrame
    members: list[np.ndarray]
    universes: dict[str, np.ndarray]
    source: str = "<annotations>"

    def __len__(self) -> int:
        return len(self.members)

    def universe_mask(self, category: str) -> np.ndarray:
        """Boolean (G,) mask of genes that count as annotated in `category`."""
        mask = np.zeros(len(self.genes), dtype=bool)
        rows = self.universes.get(category)
        if rows is None:
            mask[:] = True
        else:
            mask[rows] = True
        return mask


def normalize_symbols(values: pd.Series) -> pd.Series:
    """Gene symbols as join keys: stripped, upper case; empty strings become missing."""
    out = values.astype("string").str.strip().str.upper()
    return out.mask(out == "")


def normalize_entrez(values: pd.Series) -> pd.Series:
    """Entrez ids as join keys: the integer as text ("2", not "2.0"); non-numbers become missing."""
    numeric = pd.to_numeric(values, errors="coerce")
    numeric = numeric.where(np.isfinite(numeric.astype("float64")) & (numeric == np.floor(numeric)))
    return numeric.astype("Int64").astype("string")


def _normalized(frame: pd.DataFrame, key: str) -> pd.Series:
    return normalize_symbols(frame[key]) if key == "gene_symbol" else normalize_entrez(frame[key])


def _gene_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    keys = [k for k in GENE_KEYS if k in df.columns]
    if not keys:
        raise AnnotationError(
            f"{source}: needs a gene_symbol or entrez_id column; columns are "
            f"{', '.join(map(str, df.columns[:10]))}")
    out = pd.DataFrame({k: _normalized(df, k) for k in keys})
    if len(out) and out.isna().all(axis=1).all():
        raise AnnotationError(f"{source}: every row has an empty {' and '.join(keys)}")
    return out


def from_long(long: pd.DataFrame, source: str,
              universes: dict[str, pd.DataFrame] | None = None) -> Annotations:
    """Builds `Annotations` from a long table of (gene, annotation, category) rows.

    Args:
      long: columns gene_symbol and/or entrez_id, `annotation`, `category`, and
        optionally `description`; one row per gene in a group.
      source: file name for messages.
      universes: category -> a frame of gene keys (same key columns) annotated in that
        category; genes listed here but in no group become negatives only.

    Returns:
      The annotations; genes are de-duplicated by their first non-missing key.

    Raises:
      AnnotationError: key columns or annotation/category columns are missing.
    """
    for col in ("annotation", "category"):
        if col not in long.columns:
            raise AnnotationError(f"{source}: missing column '{col}'")
    universes = universes or {}
    gene_rows = [_gene_frame(long, source)] + [_gene_frame(u, source) for u in universes.values()]
    genes = pd.concat(gene_rows, ignore_index=True)
    keys = list(genes.columns)
    # A gene's identity is its first present key (gene_symbol before entrez_id).
    ident = genes[keys[0]].copy()
    for k in keys[1:]:
        ident = ident.fillna(k + ":" + genes[k])
    codes, _ = pd.factorize(ident, use_na_sentinel=True)
    valid = codes >= 0
    first = pd.Series(np.arange(len(codes)))[valid].groupby(codes[valid]).first().to_numpy()
    gene_table = genes.iloc[first].reset_index(drop=True)

    n_long = len(long)
    long_codes = codes[:n_long]
    cats = long["category"].astype(str).to_numpy()
    names = long["annotation"].astype(str).to_numpy()
    keep = long_codes >= 0
    frame = pd.DataFrame({"category": cats[keep], "annotation": names[keep], "gene": long_codes[keep]})
    if "description" in long.columns:
        frame["description"] = long["description"].astype("string").to_numpy()[keep]
    grouped = dict(list(frame.groupby(["category", "annotation"], sort=True)))
    # Groups in their natural order inside each category (ordinal levels low to high).
    order = [(cat, name) for cat in sorted({c for c, _ in grouped})
             for name in natural_order([n for c, n in grouped if c == cat])]
    group_rows, members = [], []
    for cat, name in order:
        part = grouped[(cat, name)]
        row = {"annotation": name, "category": cat}
        if "description" in part.columns:
            row["description"] = part["description"].iloc[0]
        group_rows.append(row)
        members.append(np.unique(part["gene"].to_numpy()))
    uni_idx: dict[str, np.ndarray] = {}
    offset = n_long
    for cat, frame_u in universes.items():
        part = codes[offset:offset + len(frame_u)]
        offset += len(frame_u)
        in_groups = frame.loc[frame["category"] == cat, "gene"].to_numpy()
        uni_idx[cat] = np.unique(np.concatenate([part[part >= 0], in_groups]).astype(np.int64))
    groups = pd.DataFrame(group_rows, columns=["annotation", "category"] +
                          (["description"] if "description" in frame.columns else []))
    return Annotations(gene_table, groups, members, uni_idx, source)


def from_categorical_table(df: pd.DataFrame, columns: list[str] | None = None,
                           source: str = "<annotations>",
                           categories: dict[str, str] | None = None) -> Annotations:
    """One group per value of each categorical column (e.g. pattern=laminar).

    Args:
      df: gene_symbol and/or entrez_id plus categorical columns.
      columns: the columns to use (default: every column that is not a gene key).
      source: file name for messages.
      categories: optional column -> category name (default: the column name).

    Returns:
      Annotations whose universe for a column is the genes with a value in it.

    Raises:
      AnnotationError: a named column is missing or there is no gene key column.
    """
    _gene_frame(df, source)
    keys = [k for k in GENE_KEYS if k in df.columns]
    if columns is None:
        columns = [c for c in df.columns if c not in keys and not str(c).startswith("Unnamed:")]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnnotationError(
            f"{source}: missing annotation column(s) {', '.join(repr(m) for m in missing)}; "
            f"columns are {', '.join(map(str, df.columns))}")
    if not columns:
        raise AnnotationError(f"{source}: no annotation columns besides {', '.join(keys)}")
    categories = categories or {}
    parts, universes = [], {}
    for col in columns:
        values = df[col].astype("string").str.strip()
        has = values.notna() & (values != "")
        cat = categories.get(col, str(col))
        part = df.loc[has, keys].copy()
        part["annotation"] = values[has].to_numpy()
        part["category"] = cat
        parts.append(part)
        universes[cat] = df.loc[has, keys]
    return from_long(pd.concat(parts, ignore_index=True), source, universes)


def read_annotation_table(path: str, columns: list[str] | None = None) -> Annotations:
    """Reads a generic annotation CSV: gene_symbol (and/or entrez_id) + categorical columns.

    Raises:
      AnnotationError: the file is missing or unreadable, or columns are missing.
    """
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: annotation table not found")
    try:
        df = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot be read as CSV ({e})") from e
    return from_categorical_table(df, columns, source=path)


# --------------------------------------------------------------------------- joining
@dataclasses.dataclass
class Aligned:
    """An embedding joined to annotation genes.

    Attributes:
      values: (n, D) float32 gene-level embedding of the matched genes, sorted by key.
      ann_rows: (n,) row index into `Annotations.genes` of each matched gene.
      key: the join column used.
      n_table_genes: distinct genes in the embedding table.
    """

    values: np.ndarray
    ann_rows: np.ndarray
    key: str
    n_table_genes: int

    def subset(self, ann_rows: np.ndarray) -> Aligned:
        keep = np.isin(self.ann_rows, ann_rows)
        return Aligned(self.values[keep], self.ann_rows[keep], self.key, self.n_table_genes)


def _match(table_keys: pd.Series, ann_keys: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of the (deduplicated) table keys and annotation rows that share a key."""
    ann_map = pd.Series(np.arange(len(ann_keys)), index=ann_keys)
    ann_map = ann_map[ann_map.index.notna() & ~ann_map.index.duplicated()]
    uniq = pd.unique(table_keys.dropna())
    pos = ann_map.reindex(uniq)
    hit = pos.notna().to_numpy()
    return np.asarray(uniq[hit]), pos[hit].to_numpy(dtype=np.int64), len(uniq)


def align(table: EmbeddingTable, annotations: Annotations, key: str = "auto") -> Aligned:
    """Joins an embedding table to annotation genes, averaging repeated genes.

    Rows of the table with the same gene (an image- or donor-level table) are averaged
    into one gene-level vector.

    Args:
      table: embedding table with gene_symbol and/or entrez_id keys.
      annotations: the groups to join with.
      key: "gene_symbol", "entrez_id" or "auto" (the key matching more genes).

    Returns:
      The matched genes, sorted by key so folds are identical across embeddings.

    Raises:
      AnnotationError: the key column is missing on either side, or no gene matches.
    """
    if key not in ("auto",) + GENE_KEYS:
        raise AnnotationError(f"join key must be auto, gene_symbol or entrez_id, not {key!r}")
    wanted = GENE_KEYS if key == "auto" else (key,)
    if key != "auto":
        for name, cols, src in (("embedding table", table.keys.columns, table.source),
                                ("annotations", annotations.genes.columns, annotations.source)):
            if key not in cols:
                raise AnnotationError(f"{src}: {name} has no '{key}' column to join on")
    candidates = [k for k in wanted if k in table.keys.columns and k in annotations.genes.columns]
    if not candidates:
        raise AnnotationError(
            f"{table.source}: no gene key shared with {annotations.source}; the embedding has "
            f"{', '.join(map(str, table.keys.columns)) or 'no key columns'}, the annotations have "
            f"{', '.join(map(str, annotations.genes.columns))}")
    best = None
    for k in candidates:
        t_keys = _normalized(table.keys, k)
        matched, rows, n_genes = _match(t_keys, annotations.genes[k])
        if best is None or len(matched) > len(best[1]):
            best = (k, matched, rows, n_genes, t_keys)
    k, matched, rows, n_genes, t_keys = best
    if len(matched) == 0:
        sample_t = ", ".join(map(str, pd.unique(t_keys.dropna())[:3]))
        sample_a = ", ".join(map(str, annotations.genes[k].dropna().iloc[:3]))
        raise AnnotationError(
            f"{table.source}: no gene matches {annotations.source} by '{k}' "
            f"(embedding has e.g. {sample_t or 'nothing'}; annotations have e.g. {sample_a})")
    order = np.argsort(matched.astype(str), kind="stable")
    matched, rows = matched[order], rows[order]
    # Mean over table rows sharing a gene: (n, D).
    codes = pd.Index(matched).get_indexer(t_keys)
    ok = codes >= 0
    sums = np.zeros((len(matched), table.dim), dtype=np.float64)
    np.add.at(sums, codes[ok], table.values[ok])
    counts = np.bincount(codes[ok], minlength=len(matched))
    values = (sums / counts[:, None]).astype(np.float32)
    return Aligned(values, rows, k, n_genes)


# --------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class ScoringConfig:
    """How groups are scored.

    Attributes:
      n_splits: folds of stratified cross-validation.
      seed: seed of the fold shuffle.
      standardize: z-score features inside each fold (fit on the training part only).
      max_iter: iteration cap of the logistic regression.
      solver: scikit-learn solver of the logistic regression (see `cross_validate_binary`).
      min_genes: groups with fewer matched positives are skipped.
      size_bounds: category -> (min, max) matched positives, e.g. {"go": (40, 200)}.
      n_jobs: parallel worker processes over groups.
      penalty: "none" (the paper's unpenalised logistic regression) or "l2" (ridge,
        C = 1 on standardised features): well posed when a fold has fewer training genes
        than dimensions.
      pca_components: project the (standardised) features of each fold onto this many
        principal components of its training genes first; 0 = no projection.
      alpha: false discovery rate of the significance count (Benjamini-Hochberg).
    """

    n_splits: int = 5
    seed: int = 0
    standardize: bool = True
    max_iter: int = 500
    solver: str = "newton-cg"
    min_genes: int = 5
    size_bounds: dict[str, tuple[int, int]] = dataclasses.field(
        default_factory=lambda: {"go": (40, 200)})
    n_jobs: int = 1
    penalty: str = "none"
    pca_components: int = 0
    alpha: float = 0.05

    def validate(self) -> ScoringConfig:
        """Checks penalty and pca_components.

        Raises:
          ValueError: naming the setting.
        """
        if self.penalty not in PENALTIES:
            raise ValueError(f"--penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.pca_components < 0:
            raise ValueError(f"--pca_components must be >= 0, got {self.pca_components}")
        return self


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *,
                  standardize: bool = True, max_iter: int = 500,
                  solver: str = "newton-cg", penalty: str = "none",
                  pca_components: int = 0) -> tuple[np.ndarray, bool]:
    """The scoring model of every annotation task: one logistic regression (unpenalised
    by default, as in the paper).

    Args:
      x_train, y_train: (n, D) features and (n,) labels in {0, 1} to fit on.
      x_test: (m, D) features to score.
      standardize: z-score both with the training rows' mean and deviation.
      max_iter, solver: as `cross_validate_binary`.
      penalty: "none" or "l2" (C = 1).
      pca_components: k > 0 projects both onto the first k principal components of
        the training rows (at most min(n, D)).

    Returns:
      (decision function values (m,), whether the solver converged).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    if standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # constant columns stay constant instead of dividing by 0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if pca_components > 0:
        from sklearn.decomposition import PCA

        k = min(pca_components, x_train.shape[0], x_train.shape[1])
        pca = PCA(n_components=k, svd_solver="full").fit(x_train)
        x_train, x_test = pca.transform(x_train), pca.transform(x_test)
    model = LogisticRegression(penalty=None if penalty == "none" else penalty,
                               max_iter=max_iter, solver=solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.decision_function(x_test), converged


def cross_validate_binary(x: np.ndarray, y: np.ndarray, *, n_splits: int = 5, seed: int = 0,
                          standardize: bool = True, max_iter: int = 500,
                          solver: str = "newton-cg", penalty: str = "none",
                          pca_components: int = 0) -> dict:
    """Stratified k-fold logistic regression (no penalty by default) on one binary label.

    Args:
      x: (n, D) features.
      y: (n,) labels in {0, 1}; each class needs at least `n_splits` members.
      n_splits: folds; shuffled with `seed`.
      standardize: z-score features with the training fold's mean and deviation.
      max_iter: iteration cap; folds that hit it count as not converged.
      solver: scikit-learn solver. "newton-cg" (default) converges in ~10-20
        iterations on these problems; "lbfgs" needs 20-500 and hit the 500 cap in
        ~11% of folds on the ResNet50 embedding. Both fit the same unpenalised model.
      penalty, pca_components: see `fit_and_score`.

    Returns:
      auc, auc_pr, f1 (means over folds), max_p (largest one-sided Mann-Whitney U
      p-value over folds: held-out scores of positives greater than negatives),
      converged (fraction of folds whose solver converged) and flag: "" for a
      well-posed result, else why it is degenerate (`degenerate_reasons`).

    Raises:
      ValueError: a class has fewer members than folds.
    """
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < n_splits:
        raise ValueError(f"{n_pos} positives and {n_neg} negatives: each needs >= {n_splits} folds")
    x = np.asarray(x, dtype=np.float64)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    aucs, aps, f1s, ps, conv, constant, n_train = [], [], [], [], 0, 0, len(y)
    for train, test in folds.split(x, y):
        score, converged = fit_and_score(x[train], y[train], x[test], standardize=standardize,
                                         max_iter=max_iter, solver=solver, penalty=penalty,
                                         pca_components=pca_components)
        conv += converged
        n_train = min(n_train, len(train))
        constant += bool(np.ptp(score) <= 1e-9 * max(1.0, float(np.abs(score).max())))
        y_test = y[test]
        aucs.append(roc_auc_score(y_test, score))
        aps.append(average_precision_score(y_test, score))
        f1s.append(f1_score(y_test, (score > 0).astype(np.int64), zero_division=0.0))
        pos, neg = score[y_test == 1], score[y_test == 0]
        ps.append(float(mannwhitneyu(pos, neg, alternative="greater").pvalue))
    flag = "; ".join(degenerate_reasons(x.shape[1], n_train, penalty=penalty,
                                        pca_components=pca_components,
                                        constant_folds=constant, n_splits=n_splits))
    return {"auc": float(np.mean(aucs)), "auc_pr": float(np.mean(aps)), "f1": float(np.mean(f1s)),
            "max_p": float(np.max(ps)), "converged": conv / n_splits, "flag": flag}


def degenerate_reasons(n_dims: int, n_train: int, *, penalty: str = "none",
                       pca_components: int = 0, constant_folds: int = 0,
                       n_splits: int = 5) -> list[str]:
    """Why a cross-validated logistic regression result is not to be read as a result.

    * Unpenalised, with at least as many parameters (features + intercept) as training
      genes in a fold, the training genes are separable: the maximum-likelihood fit
      does not exist, the solver runs off to infinity and the held-out AUC means
      nothing (14 genes x 64 dimensions gave AUC 0.500 for every group).
    * Constant held-out scores in a fold: the model ranks nothing (AUC 0.5 by ties).

    Args:
      n_dims: D, the features given.
      n_train: the fewest training genes of any fold.
      penalty, pca_components: the model's settings (see `fit_and_score`).
      constant_folds: folds whose held-out scores were all equal.
      n_splits: folds.

    Returns:
      Reasons, empty when the set-up is well posed.
    """
    reasons = []
    used = min(pca_components, n_dims, n_train) if pca_components > 0 else n_dims
    if penalty == "none" and used + 1 >= n_train:
        what = f"{used} PCA components" if pca_components > 0 else f"{n_dims} dimensions"
        reasons.append(
            f"{what} (+ intercept) for {n_train} training genes per fold: unpenalised "
            f"logistic regression separates them perfectly (not well posed); use --penalty=l2 or "
            f"--pca_components=k with k < {max(n_train - 1, 1)}")
    if constant_folds:
        reasons.append(f"constant predictions in {constant_folds} of {n_splits} folds")
    return reasons


def group_labels(aligned: Aligned, annotations: Annotations, config: ScoringConfig,
                 ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], pd.DataFrame]:
    """Label vectors of the groups that can be scored, and the skipped ones with reasons.

    Returns:
      (tasks, skipped): tasks are (group index, rows of `aligned` in the category's
      universe (m,), labels (m,) in {0, 1}); skipped has annotation, category,
      n_genes, reason.
    """
    # Position of every annotation gene in `aligned` (-1 when not matched).
    where = np.full(len(annotations.genes), -1, dtype=np.int64)
    where[aligned.ann_rows] = np.arange(len(aligned.ann_rows))
    universe_rows: dict[str, np.ndarray] = {}
    tasks, skipped = [], []
    for k, members in enumerate(annotations.members):
        cat = str(annotations.groups["category"].iat[k])
        if cat not in universe_rows:
            rows = where[annotations.universe_mask(cat)]
            universe_rows[cat] = np.sort(rows[rows >= 0])
        rows = universe_rows[cat]
        pos = where[members]
        pos = pos[pos >= 0]
        n_pos = len(pos)
        lo, hi = config.size_bounds.get(cat, (config.min_genes, np.inf))
        lo = max(lo, config.min_genes)
        reason = ""
        if n_pos < lo:
            reason = f"{n_pos} matched genes < minimum {lo}"
        elif n_pos > hi:
            reason = f"{n_pos} matched genes > maximum {hi}"
        elif n_pos < config.n_splits:
            reason = f"{n_pos} matched genes < {config.n_splits} folds"
        elif len(rows) - n_pos < config.n_splits:
            reason = f"{len(rows) - n_pos} negatives < {config.n_splits} folds"
        if reason:
            skipped.append({"annotation": annotations.groups["annotation"].iat[k],
                            "category": cat, "n_genes": n_pos, "reason": reason})
            continue
        labels = np.isin(rows, pos).astype(np.int64)
        tasks.append((k, rows, labels))
    return tasks, pd.DataFrame(skipped, columns=["annotation", "category", "n_genes", "reason"])


def _score_task(values: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                config: ScoringConfig) -> dict[str, float]:
    return cross_validate_binary(values[rows], labels, n_splits=config.n_splits, seed=config.seed,
                                 standardize=config.standardize, max_iter=config.max_iter,
                                 solver=config.solver, penalty=config.penalty,
                                 pca_components=config.pca_components)


def score_aligned(aligned: Aligned, annotations: Annotations, config: ScoringConfig,
                  name: str = "embedding") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores every group of `annotations` on an aligned embedding.

    Returns:
      (results, skipped): results has RESULT_COLUMNS (plus description when the groups
      have one), one row per scored group; skipped lists groups left out and why.
    """
    tasks, skipped = group_labels(aligned, annotations, config)
    from ish_tf.progress import progress
    shown = progress(tasks, desc=f"annotations ({name})", unit="groups")
    if config.n_jobs > 1 and len(tasks) > 1:
        from joblib import Parallel, delayed
        # Processes (loky, reused across calls): threads were slower than serial here
        # because the many small solver steps hold the GIL; 2 processes run the 24 Zeng
        # groups of a 1,000 x 128 embedding in ~1.8 s vs 3.4 s serial (2 cores).
        scores = Parallel(n_jobs=config.n_jobs)(
            delayed(_score_task)(aligned.values, rows, labels, config) for _, rows, labels in shown)
    else:
        scores = [_score_task(aligned.values, rows, labels, config) for _, rows, labels in shown]
    records = []
    for (k, rows, labels), s in zip(tasks, scores, strict=True):
        rec = {"annotation": annotations.groups["annotation"].iat[k],
               "category": annotations.groups["category"].iat[k],
               "n_genes": int(labels.sum()), **s, "embedding": name,
               "n_total": int(len(rows)), "key": aligned.key}
        if "description" in annotations.groups.columns:
            rec["description"] = annotations.groups["description"].iat[k]
        records.append(rec)
    columns = list(RESULT_COLUMNS) + (["description"] if "description" in annotations.groups else [])
    results = pd.DataFrame(records, columns=columns)
    results["max_p_bh"] = benjamini_hochberg(results["max_p"]) if len(results) else []
    not_conv = int((results["converged"] < 1).sum()) if len(results) else 0
    if not_conv:
        logging.info("%s: the solver hit max_iter in some folds of %d of %d groups "
                     "(see column 'converged')", name, not_conv, len(results))
    skipped.insert(0, "embedding", name)
    return results, skipped


def evaluate_annotations(table: EmbeddingTable, annotations: Annotations,
                         config: ScoringConfig | None = None, name: str = "embedding",
                         key: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Joins one embedding to annotations and scores every group.

    Args:
      table: embedding table with gene keys, (N, D) values.
      annotations: groups to predict.
      config: scoring settings (defaults: 5 folds, standardised, min 5 genes).
      name: embedding name written into the results.
      key: join key (see `align`).

    Returns:
      (results, skipped) as in `score_aligned`.

    Raises:
      AnnotationError: no gene key is shared or nothing matches.
    """
    config = config or ScoringConfig()
    aligned = align(table, annotations, key)
    logging.info("%s: %d of %d genes match %s by %s", name, len(aligned.ann_rows),
                 aligned.n_table_genes, annotations.source, aligned.key)
    return score_aligned(aligned, annotations, config, name)


def evaluate_many(tables: dict[str, EmbeddingTable], annotations: list[Annotations],
                  config: ScoringConfig | None = None, key: str = "auto",
                  common_genes: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Scores several embeddings on several annotation sources.

    Args:
      tables: embedding name -> table.
      annotations: annotation sources (Zeng, GO, generic tables).
      config: scoring settings.
      key: join key (see `align`).
      common_genes: restrict every embedding to the genes all of them match, so each
        group is scored on the same genes and folds and the comparison is paired.

    Returns:
      (results, skipped, matches): results and skipped rows of every embedding and
      source; matches has embedding, source, key, n_table_genes, n_matched, n_used.

    Raises:
      AnnotationError: a table shares no key with a source, matches none of its
        genes, or (with common_genes) no gene is matched by all tables.
    """
    config = config or ScoringConfig()
    results, skipped, matches = [], [], []
    for ann in annotations:
        aligned = {name: align(t, ann, key) for name, t in tables.items()}
        common = None
        if common_genes and len(aligned) > 1:
            common = np.array(sorted(set.intersection(*(set(a.ann_rows.tolist())
                                                         for a in aligned.values()))), dtype=np.int64)
            if len(common) == 0:
                raise AnnotationError(
                    f"{ann.source}: no gene is matched by every embedding "
                    f"({', '.join(aligned)}); use common_genes=False (--nocommon_genes) "
                    f"to score each on its own genes")
        for name, a in aligned.items():
            used = a.subset(common) if common is not None else a
            matches.append({"embedding": name, "source": ann.source, "key": a.key,
                            "n_table_genes": a.n_table_genes, "n_matched": len(a.ann_rows),
                            "n_used": len(used.ann_rows)})
            logging.info("%s: %d of %d genes match %s by %s; %d used", name, len(a.ann_rows),
                         a.n_table_genes, ann.source, a.key, len(used.ann_rows))
            r, s = score_aligned(used, ann, config, name)
            results.append(r)
            skipped.append(s)
    results = pd.concat(results, ignore_index=True)
    # One family of tests per embedding: every group of every source it was scored on.
    for _, rows in results.groupby("embedding", sort=False).groups.items():
        results.loc[rows, "max_p_bh"] = benjamini_hochberg(results.loc[rows, "max_p"])
    return results, pd.concat(skipped, ignore_index=True), pd.DataFrame(matches)


def summarize(results: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Mean AUC per embedding and category (and over all groups, category "all").

    Returns:
      Columns embedding, category, n_groups, mean_auc, median_auc, mean_auc_pr,
      mean_f1, n_significant_bh (groups whose Benjamini-Hochberg adjusted max_p,
      `max_p_bh`, is < alpha: false discovery rate alpha over all groups of the
      embedding) and n_flagged (groups with a degenerate set-up, column `flag`).
    """
    if "embedding" not in results.columns:
        results = results.assign(embedding="embedding")
    if "max_p_bh" not in results.columns or results["max_p_bh"].isna().all():
        results = results.assign(max_p_bh=np.nan)
        for _, rows in results.groupby("embedding", sort=False).groups.items():
            results.loc[rows, "max_p_bh"] = benjamini_hochberg(results.loc[rows, "max_p"])
    if "flag" not in results.columns:
        results = results.assign(flag="")
    frames = [results, results.assign(category="all")]
    both = pd.concat(frames, ignore_index=True)
    both["flagged"] = both["flag"].fillna("").astype(str) != ""
    out = both.groupby(["embedding", "category"], sort=False).agg(
        n_groups=("auc", "size"), mean_auc=("auc", "mean"), median_auc=("auc", "median"),
        mean_auc_pr=("auc_pr", "mean"), mean_f1=("f1", "mean"),
        n_significant_bh=("max_p_bh", lambda p: int((p < alpha).sum())),
        n_flagged=("flagged", "sum")).reset_index()
    out["n_flagged"] = out["n_flagged"].astype(int)
    return out


def category_labels(aligned: Aligned, annotations: Annotations, category: str,
                    missing: str = "none") -> pd.Series:
    """One label per aligned gene: the (first) group of `category` it belongs to.

    Used to colour gene maps. Genes in no group of the category get `missing`.

    Returns:
      Series of length n (the aligned genes, in order).

    Raises:
      AnnotationError: the category does not exist.
    """
    cats = annotations.groups["category"].astype(str).to_numpy()
    if category not in cats:
        raise AnnotationError(f"{annotations.source}: no category '{category}'; "
                              f"categories are {sorted(set(cats))}")
    label_of = np.full(len(annotations.genes), None, dtype=object)
    for k in np.flatnonzero(cats == category)[::-1]:  # reversed: the first group wins
        label_of[annotations.members[k]] = annotations.groups["annotation"].iat[k]
    labels = label_of[aligned.ann_rows]
    return pd.Series([missing if v is None else v for v in labels], name=category)
