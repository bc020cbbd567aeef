"""Gene re-identification: does an image's nearest neighbour show the same gene?

The paper's metric (Abed-Esfahani et al., PLoS ONE 2022) is image-level rank-1
where the candidates for a query are images from *other donors* only: an
embedding that re-identifies a gene across brains has learned the gene's
expression pattern rather than the donor, section or staining batch. This module
computes it for three candidate sets, with the exact chance level and mAP, in
blocks of query rows so memory grows with N·block and never with N².

Definitions (q is a query image; g(i), d(i) are the gene and donor of image i):

* Candidate sets C(q), never containing q itself:
  ``other_donor``: {c : d(c) != d(q)};
  ``all``: {c : c != q};
  ``same_donor``: {c : d(c) = d(q), c != q}.
* Positives P(q) = {c in C(q) : g(c) = g(q)}. A query is *answerable* for a set
  when P(q) is non-empty.
* Ranking: candidates sorted by increasing distance to q; **ties are broken by
  candidate index (row order of the input), lower index first**. This is what
  ``np.argmin`` does, so rank-1 and average precision agree on tied distances.
* rank-1 = fraction of queries whose first-ranked candidate is a positive.
  ``rank1`` divides by all N queries (unanswerable queries, and queries with an
  empty candidate set, count as misses); ``rank1_answerable`` divides by the
  answerable queries only.
* Exact chance of a query = |P(q)| / |C(q)| (0 when C(q) is empty): the
  probability that a uniformly random candidate is a positive, i.e. the expected
  rank-1 of a random ranking. ``chance`` averages it over all queries,
  ``chance_answerable`` over the answerable ones. Computed from counts, not simulated.
* ``fold_over_chance`` = rank1_answerable / chance_answerable: how many times more
  often than a random ranking the first candidate is a positive.
* ``flag``: "" for a well-posed result, else why it says little: fewer than 2 genes or
  2 queries, or chance >= 0.5 (the first candidate is a positive half the time by luck).
* Average precision of an answerable query = (1/|P|) Σ_k k / rank_k, where rank_k
  is the rank (1-based, in C(q)) of the k-th positive; ``map`` is its mean over the
  answerable queries.

Distances: only the order of candidates within a query's row matters, so each
metric is computed as a per-row increasing transform of the distance, in float32:
``euclidean`` and ``sqeuclidean`` as |b|² − 2a·b (the squared distance minus the
query's constant |a|²; one matrix product, columns centred first to limit
cancellation), ``cosine`` as −cos(a, b) (a zero vector scores 0, i.e. distance 1),
``cityblock`` as the L1 distance (scipy, slower). Rankings are therefore those of
float32 distances: candidates closer than float32 resolution may swap order
relative to a float64 computation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ish_tf.data.embeddings import EmbeddingTable, EmbeddingTableError, aggregate
from ish_tf.io_utils import Progress

CANDIDATE_SETS: tuple[str, ...] = ("other_donor", "all", "same_donor")
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cosine", "cityblock")
#: Columns of the frame returned by `evaluate_reid`, in order.
COLUMNS: tuple[str, ...] = (
    "candidates", "rank1", "rank1_answerable", "chance", "chance_answerable", "map",
    "fold_over_chance", "n_queries", "n_answerable", "n_genes", "flag")
#: At or above this chance level a rank-1 is flagged as degenerate.
CHANCE_LIMIT = 0.5
#: Levels `reid_table` can evaluate at (gene level has one row per gene: nothing to find).
REID_LEVELS: tuple[str, ...] = ("patch", "image", "donor")
# Above this many comparisons, `_count_before` loops over positives instead of broadcasting.
_BROADCAST_MAX = 1 << 16


class ReidError(ValueError):
    """Inputs that cannot be evaluated; the message names the argument, row or column."""


# --------------------------------------------------------------------------- inputs
def _encode(labels, name: str, n: int) -> np.ndarray:
    """Integer codes (N,) int64 of a label array; missing labels are an error."""
    arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ReidError(f"{name}: expected shape ({n},) to match values, got {arr.shape}")
    codes, _ = pd.factorize(pd.Series(arr), use_na_sentinel=True)
    if (codes < 0).any():
        raise ReidError(f"{name}: missing value at row {int(np.flatnonzero(codes < 0)[0])}")
    return codes.astype(np.int64)


def _check_values(values) -> np.ndarray:
    x = np.asarray(values)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ReidError(f"values: expected a non-empty (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ReidError(f"values: expected numbers, got dtype {x.dtype}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise ReidError(f"values: row {int(np.flatnonzero(~finite)[0])} holds a NaN or "
                        "infinite value")
    return x


class _Scores:
    """Per-row ranking scores from a block of query rows to all N rows, for one metric.

    Only the order of candidates within a query's row matters, so any transform
    that is increasing in the distance and may depend on the query is allowed:
    euclidean/sqeuclidean use |b|² − 2a·b (the squared distance minus the query's
    own |a|², constant along the row), cosine uses −cos(a, b), cityblock the L1
    distance itself. The first two are one float32 matrix product with an extra
    column, [a, 1]·[−2b, |b|²], so no pass over the (B, N) block is spent on them.
    """

    def __init__(self, values: np.ndarray, metric: str):
        if metric not in METRICS:
            raise ReidError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        x = values.astype(np.float64)
        if metric in ("euclidean", "sqeuclidean"):
            # Centring is free (distances are translation invariant) and keeps
            # |b|²-2ab from cancelling catastrophically when all vectors share a
            # large offset relative to their spread.
            x -= x.mean(axis=0)
            sq = np.einsum("ij,ij->i", x, x)
            self.q = np.hstack([x, np.ones((len(x), 1))]).astype(np.float32)
            self.c = np.hstack([-2.0 * x, sq[:, None]]).astype(np.float32)
        elif metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            unit = x / np.where(norms > 0, norms, 1.0)  # a zero vector scores 0: distance 1
            self.q = unit.astype(np.float32)
            self.c = (-unit).astype(np.float32)
        else:
            self.q = self.c = x

    def block(self, start: int, stop: int) -> np.ndarray:
        """(B, N) float32 scores of queries start..stop-1 against every row."""
        if self.metric == "cityblock":
            from scipy.spatial.distance import cdist

            # float32 like the other metrics: ranking keys are built from float32 scores.
            return cdist(self.q[start:stop], self.c, metric="cityblock").astype(np.float32)
        return self.q[start:stop] @ self.c.T


def _groups(codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Members of each group in ascending row order: order[starts[k]:starts[k+1]]."""
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(n_groups + 1))
    return order, starts


# --------------------------------------------------------------------------- ranking
def _order_keys(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Distinct int64 keys that sort like (score, row index): ties broken by index.

    The float32 bit pattern is mapped to an int32 with the same order (negative
    floats get their 31 magnitude bits flipped), then the row index fills the low
    32 bits. With every key distinct, "ranks before" is one comparison.

    Args:
      scores: (M,) float32 scores (finite or +inf).
      idx: (M,) row indices, 0 <= idx < 2**31.

    Returns:
      (M,) int64 keys.
    """
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.int32)  # -0 -> +0
    bits = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    return (bits.astype(np.int64) << 32) | np.asarray(idx, dtype=np.int64)


def _count_before(keys: np.ndarray, pos_keys: np.ndarray) -> np.ndarray:
    """(P,) number of candidate keys below each positive's key (see `_order_keys`).

    O(P·M) comparisons, cheaper than sorting the row (O(M log M)) for the few
    positives a query has: one broadcast comparison when P·M is small (few calls),
    one vectorised pass per positive otherwise (no P×M temporary).
    """
    if pos_keys.size * keys.size <= _BROADCAST_MAX:
        return np.count_nonzero(keys[None, :] < pos_keys[:, None], axis=1).astype(np.int64)
    return np.fromiter((np.count_nonzero(keys < k) for k in pos_keys), dtype=np.int64,
                       count=pos_keys.size)


def _average_precision(ranks: np.ndarray) -> float:
    """AP from the 1-based ranks of all positives (distinct ranks)."""
    r = np.sort(ranks)
    return float(np.mean(np.arange(1, r.size + 1) / r))


# --------------------------------------------------------------------------- metric
def evaluate_reid(values, genes, donors, *, metric: str = "euclidean", block_size: int = 1024,
                  candidate_sets: Sequence[str] = CANDIDATE_SETS,
                  compute_map: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """Rank-1, mAP and exact chance of gene re-identification (see module docstring).

    Queries are processed in blocks of `block_size` rows against all N candidates
    (a (block, N) distance block, masks built per block from integer-coded gene and
    donor arrays), so peak memory is O(block·N), never O(N²). For mAP, each
    positive's rank is counted among the candidates scoring at most the worst
    positive: O(P·N) per query with P positives, no full sort of the row.

    Args:
      values: (N, D) embeddings, one row per image (or patch, or gene×donor).
      genes: (N,) gene of each row (any hashable labels; missing is an error).
      donors: (N,) donor of each row.
      metric: "euclidean", "sqeuclidean", "cosine" or "cityblock".
      block_size: query rows per block (≥ 1); larger is faster, uses N·block memory.
      candidate_sets: which of "other_donor", "all", "same_donor" to report, in order.
      compute_map: compute mAP (otherwise the column is NaN; rank-1 alone is faster).
      progress: show progress over the queries (None: `ish_tf.progress` decides; False:
        never, e.g. inside training's validation, which has its own bar).

    Returns:
      One row per candidate set with columns `COLUMNS`: candidates, rank1,
      rank1_answerable, chance, chance_answerable, map, fold_over_chance,
      n_queries, n_answerable, n_genes, flag (`degenerate_reasons`). Averages over
      an empty query set are NaN.

    Raises:
      ReidError: bad shapes, non-finite values, missing labels, an unknown metric or
        candidate set, or block_size < 1.
    """
    x = _check_values(values)
    n = x.shape[0]
    g = _encode(genes, "genes", n)
    d = _encode(donors, "donors", n)
    sets = list(candidate_sets)
    unknown = [s for s in sets if s not in CANDIDATE_SETS]
    if unknown or not sets:
        raise ReidError(f"candidate_sets must be a non-empty subset of {CANDIDATE_SETS}, "
                        f"got {tuple(sets)}")
    if int(block_size) < 1:
        raise ReidError(f"block_size must be >= 1, got {block_size}")
    block_size = int(block_size)

    n_genes, n_donors = int(g.max()) + 1, int(d.max()) + 1
    gene_order, gene_starts = _groups(g, n_genes)
    donor_order, donor_starts = _groups(d, n_donors)
    gene_count = np.bincount(g, minlength=n_genes)
    donor_count = np.bincount(d, minlength=n_donors)
    _, pair_inv, pair_count = np.unique(g * n_donors + d, return_inverse=True,
                                        return_counts=True)
    gd_count = pair_count[pair_inv.reshape(-1)]

    # Candidate and positive counts per query and set: the exact chance needs no distances.
    n_cand = {"all": np.full(n, n - 1), "same_donor": donor_count[d] - 1,
              "other_donor": n - donor_count[d]}
    n_pos = {"all": gene_count[g] - 1, "same_donor": gd_count - 1,
             "other_donor": gene_count[g] - gd_count}
    hits = {s: np.zeros(n, dtype=bool) for s in CANDIDATE_SETS}
    ap = {s: np.full(n, np.nan) for s in CANDIDATE_SETS}
    need_same = "same_donor" in sets or (compute_map and "all" in sets)

    dist_fn = _Scores(x, metric)
    with Progress(n, desc="reid", enabled=progress, unit="queries") as bar:
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            q = np.arange(start, stop)
            rows = q - start
            dist = dist_fn.block(start, stop)
            dist[rows, q] = np.inf  # q is never its own candidate

            if "all" in sets:
                nn = np.argmin(dist, axis=1)  # lowest index among ties
                hits["all"][q] = (n_cand["all"][q] > 0) & (g[nn] == g[q])

            # Same-donor candidates: per donor present in the block, a small
            # (rows of that donor) × (images of that donor) sub-block.
            same_sub: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            for k in np.unique(d[q]):
                local = rows[d[q] == k]
                cols = donor_order[donor_starts[k]:donor_starts[k + 1]]
                if need_same:
                    sub = dist[np.ix_(local, cols)]  # self already inf
                    same_sub[int(k)] = (local, cols, sub)
                    if "same_donor" in sets and cols.size > 1:
                        nn_s = cols[np.argmin(sub, axis=1)]
                        hits["same_donor"][q[local]] = g[nn_s] == g[q[local]]
                dist[np.ix_(local, cols)] = np.inf  # leaves the other-donor candidates

            if "other_donor" in sets:
                nn = np.argmin(dist, axis=1)
                hits["other_donor"][q] = (n_cand["other_donor"][q] > 0) & (g[nn] == g[q])

            if compute_map:
                _block_average_precision(dist, q, g, d, gene_order, gene_starts, same_sub,
                                         sets, n_pos, ap)
            bar.update(stop - start)

    out = []
    for s in sets:
        answerable = n_pos[s] > 0
        n_ans = int(answerable.sum())
        chance_q = np.where(n_cand[s] > 0, n_pos[s] / np.maximum(n_cand[s], 1), 0.0)
        rank1_ans = float(hits[s][answerable].mean()) if n_ans else np.nan
        chance_ans = float(chance_q[answerable].mean()) if n_ans else np.nan
        chance = float(chance_q.mean())
        out.append({
            "candidates": s,
            "rank1": float(hits[s].mean()),
            "rank1_answerable": rank1_ans,
            "chance": chance,
            "chance_answerable": chance_ans,
            "map": float(np.mean(ap[s][answerable])) if (compute_map and n_ans) else np.nan,
            "fold_over_chance": rank1_ans / chance_ans if n_ans and chance_ans > 0 else np.nan,
            "n_queries": n,
            "n_answerable": n_ans,
            "n_genes": n_genes,
            "flag": "; ".join(degenerate_reasons(n_genes, n, chance)),
        })
    return pd.DataFrame(out, columns=list(COLUMNS))


def degenerate_reasons(n_genes: int, n_queries: int, chance: float) -> list[str]:
    """Why a re-identification result says little: [] when it is well posed.

    Args:
      n_genes: distinct genes among the rows scored.
      n_queries: rows scored (every row is a query).
      chance: the mean exact chance level of the candidate set.
    """
    reasons = []
    if n_genes < 2:
        reasons.append(f"{n_genes} gene: every candidate shows it")
    if n_queries < 2:
        reasons.append(f"{n_queries} query")
    if np.isfinite(chance) and chance >= CHANCE_LIMIT:
        reasons.append(f"chance {chance:.3f} >= {CHANCE_LIMIT}")
    return reasons


def _block_average_precision(dist: np.ndarray, q: np.ndarray, g: np.ndarray, d: np.ndarray,
                             gene_order: np.ndarray, gene_starts: np.ndarray,
                             same_sub: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
                             sets: Sequence[str], n_pos: Mapping[str, np.ndarray],
                             ap: dict[str, np.ndarray]) -> None:
    """Fills `ap[set][q]` for one block.

    `dist` holds the scores of the other-donor candidates only (everything else
    inf); `same_sub` the small same-donor sub-blocks. A positive's rank among all
    candidates is its rank among the other-donor ones plus the number of same-donor
    candidates before it, so "all" needs no third pass.
    """
    same_rows = {}
    for local, cols, sub in same_sub.values():
        for i, r in enumerate(local):
            same_rows[int(r)] = (cols, sub[i])
    want_all = "all" in sets
    for r, qi in enumerate(q):
        if not any(n_pos[s][qi] > 0 for s in sets):
            continue
        gi = g[qi]
        members = gene_order[gene_starts[gi]:gene_starts[gi + 1]]
        same = d[members] == d[qi]
        pos_o = members[~same]
        pos_s = members[same & (members != qi)]
        row = dist[r]
        s_o = row[pos_o]
        if r in same_rows:
            cols, sub_row = same_rows[r]
            s_s = sub_row[np.searchsorted(cols, pos_s)]
        else:
            cols, sub_row, s_s = None, None, np.zeros(0, dtype=row.dtype)
        # Other-donor candidates scoring above every positive never rank before one.
        top = max(s_o.max(initial=-np.inf), s_s.max(initial=-np.inf) if want_all else -np.inf)
        near = np.flatnonzero(row <= top)
        keys_o = _order_keys(row[near], near)
        pk_o = _order_keys(s_o, pos_o)
        before_o_o = _count_before(keys_o, pk_o)
        if "other_donor" in sets and pos_o.size:
            ap["other_donor"][qi] = _average_precision(before_o_o + 1)
        if sub_row is None:
            continue
        keys_s = _order_keys(sub_row, cols)
        pk_s = _order_keys(s_s, pos_s)
        before_s_s = _count_before(keys_s, pk_s)
        if "same_donor" in sets and pos_s.size:
            ap["same_donor"][qi] = _average_precision(before_s_s + 1)
        if want_all and (pos_o.size or pos_s.size):
            ranks = np.concatenate([before_o_o + _count_before(keys_s, pk_o),
                                    before_s_s + _count_before(keys_o, pk_s)]) + 1
            ap["all"][qi] = _average_precision(ranks)


def naive_rank1_other_donor(values, genes, donors, metric: str = "euclidean") -> float:
    """Dense all-pairs reference for other-donor rank-1, as the original code did it.

    Builds the full (N, N) float64 distance matrix (scikit-learn), sets NaN where the
    pair shares a donor (which includes the diagonal) and takes `np.nanargmin` per
    row. O(N²) memory: for tests and the benchmark only.

    Args:
      values: (N, D) embeddings.
      genes: (N,) gene labels.
      donors: (N,) donor labels.
      metric: any metric name scikit-learn's `pairwise_distances` accepts.

    Returns:
      Fraction of all N queries whose nearest other-donor image has the same gene
      (a query with no other-donor image counts as a miss).
    """
    from sklearn.metrics import pairwise_distances

    x = _check_values(values).astype(np.float64)
    n = x.shape[0]
    g = _encode(genes, "genes", n)
    d = _encode(donors, "donors", n)
    dist = pairwise_distances(x, metric=metric)
    dist[d[:, None] == d[None, :]] = np.nan
    has = ~np.isnan(dist).all(axis=1)
    nn = np.nanargmin(dist[has], axis=1)
    return float(np.count_nonzero(g[nn] == g[has]) / n)


# --------------------------------------------------------------------------- tables
def _at_level(table: EmbeddingTable, level: str, name: str) -> EmbeddingTable:
    """The table at `level`, averaging patch rows per image (or per gene×donor)."""
    source = table.source or name
    missing = [c for c in ("gene_symbol", "donor_id") if c not in table.keys.columns]
    if missing:
        raise EmbeddingTableError(
            f"{source}: re-identification needs key column(s) "
            f"{', '.join(repr(m) for m in missing)} (embedding '{name}'); "
            f"its key columns are {', '.join(map(str, table.keys.columns)) or 'none'}")
    if level == "patch":
        return table
    if level == "image":
        if "patch_index" not in table.keys.columns:
            return table
        if "image_id" not in table.keys.columns:
            raise EmbeddingTableError(f"{source}: a patch-level table needs column 'image_id' "
                                      f"to be averaged per image (embedding '{name}')")
        return aggregate(table, ("image_id",))
    return aggregate(table, ("gene_symbol", "donor_id"))


def _check_answerable(df: pd.DataFrame, table: EmbeddingTable, level: str, name: str) -> None:
    """NaN for the rank-1 of a set without answerable queries; an error for other_donor."""
    none = df["n_answerable"] == 0
    if not none.any():
        return
    if (none & (df["candidates"] == "other_donor")).any():
        genes, donors = table.keys["gene_symbol"], table.keys["donor_id"]
        per_gene = pd.DataFrame({"g": genes, "d": donors}).groupby("g")["d"].nunique()
        raise ReidError(
            f"{table.source or name}: embedding '{name}': no query is answerable for "
            f"re-identification across donors: among its {len(table)} {level}-level rows "
            f"({genes.nunique()} gene(s), {donors.nunique()} donor(s)), no gene has rows in "
            f"two donors (at most {int(per_gene.max()) if len(per_gene) else 0} donor(s) per "
            "gene), so rank-1 (other donors) has nothing to find; select rows where genes "
            "were assayed in several donors (e.g. more splits or all images)")
    df.loc[none, "rank1"] = np.nan


def reid_table(tables: Mapping[str, EmbeddingTable], level: str = "image",
               **kw) -> pd.DataFrame:
    """Re-identification of several named embeddings, one row per embedding × set.

    Baselines (random embeddings, the untrained backbone, ImageNet features) are
    just further entries of `tables`, so they land in the same table.

    Args:
      tables: name -> embedding table with key columns gene_symbol and donor_id.
      level: "image" (patch tables are averaged per image_id first), "patch" (rows
        as they are) or "donor" (averaged per gene_symbol × donor_id: can a gene's
        mean embedding in one brain find the same gene in another?).
      **kw: passed to `evaluate_reid` (metric, block_size, candidate_sets, compute_map).

    Returns:
      Columns embedding, level, then `COLUMNS`.

    A candidate set in which no query is answerable has rank1 NaN (not a 0 that
    would read like a result); when that set is other_donor, the paper's metric, it is
    an error saying why.

    Raises:
      EmbeddingTableError: a table lacks gene_symbol or donor_id (the message names
        the column, the embedding and its file).
      ReidError: an unknown level or bad evaluation arguments, or no query answerable
        across donors (no gene has rows in two donors).
    """
    if level not in REID_LEVELS:
        raise ReidError(f"level must be one of {', '.join(REID_LEVELS)} for "
                        f"re-identification, got {level!r}")
    if not tables:
        raise ReidError("reid_table: no embedding tables given")
    frames = []
    for name, table in tables.items():
        t = _at_level(table, level, name)
        df = evaluate_reid(t.values, t.keys["gene_symbol"].to_numpy(),
                           t.keys["donor_id"].to_numpy(), **kw)
        _check_answerable(df, t, level, name)
        df.insert(0, "level", level)
        df.insert(0, "embedding", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
