"""Several embeddings side by side: a wide table and paired comparisons across groups.

Each group (annotation x category) is one paired observation: the same genes and
folds scored with two embeddings (`evaluate_many(common_genes=True)` guarantees the
same genes). For every pair of embeddings we count the groups each wins, the mean and
median difference, and a two-sided Wilcoxon signed-rank test across groups.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

PAIR_COLUMNS: tuple[str, ...] = (
    "category", "a", "b", "metric", "n_groups", "a_wins", "b_wins", "ties",
    "mean_a", "mean_b", "mean_diff", "median_diff", "wilcoxon_stat", "p_value",
)


def wide_table(results: pd.DataFrame, metric: str = "auc") -> pd.DataFrame:
    """One row per group, one column per embedding, plus the best embedding.

    Args:
      results: long results (annotation, category, n_genes, embedding, metric...).
      metric: column to spread.

    Returns:
      Columns category, annotation, n_genes (the smallest over embeddings), one
      column per embedding (in order of first appearance), and `best`; rows in the
      order of the results.

    Raises:
      KeyError: a needed column is missing from `results` (names it).
    """
    for col in ("annotation", "category", "embedding", metric):
        if col not in results.columns:
            raise KeyError(f"results have no column '{col}'")
    names = list(dict.fromkeys(results["embedding"]))
    keys = ["category", "annotation"]
    wide = results.pivot_table(index=keys, columns="embedding", values=metric, aggfunc="first",
                               sort=False)
    wide = wide.reindex(columns=names)
    n = results.groupby(keys, sort=False)["n_genes"].min()
    out = pd.concat([n, wide], axis=1).reset_index()
    filled = out[names].astype(float)
    best = filled.idxmax(axis=1, skipna=True)
    out["best"] = best.where(filled.notna().any(axis=1))
    out.columns.name = None
    return out


def paired_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of a vs b; (nan, nan) below 2 pairs, p=1 if all tie."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, float) - np.asarray(b, float)
    if len(diff) < 2:
        return float("nan"), float("nan")
    if np.all(diff == 0):
        return 0.0, 1.0
    res = wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def compare_pairs(results: pd.DataFrame, metric: str = "auc",
                  by_category: bool = True) -> pd.DataFrame:
    """Paired comparisons of every pair of embeddings across groups.

    Args:
      results: long results with annotation, category, embedding and `metric`.
      metric: the score compared (higher is better).
      by_category: add rows per category besides the overall row (category "all").

    Returns:
      PAIR_COLUMNS, one row per (category, pair) with at least 2 groups scored by
      both (rows with fewer are left out); wins count groups where one embedding
      scores strictly higher; mean_diff = mean(a - b).
    """
    wide = wide_table(results, metric)
    names = [c for c in wide.columns if c not in ("category", "annotation", "n_genes", "best")]
    scopes = [("all", wide)]
    if by_category:
        scopes += [(str(c), part) for c, part in wide.groupby("category", sort=False)]
    rows = []
    for scope, part in scopes:
        for a, b in itertools.combinations(names, 2):
            both = part[[a, b]].dropna()
            if len(both) < 2:
                continue  # nothing to compare: an empty or one-group row says nothing
            x, y = both[a].to_numpy(float), both[b].to_numpy(float)
            stat, p = paired_test(x, y)
            d = x - y
            rows.append({
                "category": scope, "a": a, "b": b, "metric": metric, "n_groups": len(d),
                "a_wins": int((d > 0).sum()), "b_wins": int((d < 0).sum()),
                "ties": int((d == 0).sum()),
                "mean_a": float(x.mean()) if len(d) else np.nan,
                "mean_b": float(y.mean()) if len(d) else np.nan,
                "mean_diff": float(d.mean()) if len(d) else np.nan,
                "median_diff": float(np.median(d)) if len(d) else np.nan,
                "wilcoxon_stat": stat, "p_value": p,
            })
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
