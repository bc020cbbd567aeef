"""Tests of gene re-identification (ish_tf/evaluate/reid.py)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from ish_tf.data.embeddings import (
    EmbeddingTable,
    EmbeddingTableError,
    read_embedding_table,
    write_embedding_table,
)
from ish_tf.evaluate.reid import (
    CANDIDATE_SETS,
    COLUMNS,
    ReidError,
    evaluate_reid,
    naive_rank1_other_donor,
    reid_table,
)


def _row(df: pd.DataFrame, candidates: str) -> pd.Series:
    return df.set_index("candidates").loc[candidates]


# --------------------------------------------------------------------------- hand-made
def test_hand_made_case_matches_hand_computation():
    """Five images on a line (1-D embeddings).

    row: value gene donor
      0:  0.0   A    1
      1:  1.0   A    2
      2:  3.0   B    1
      3:  0.6   B    2
      4: 10.0   C    1

    other_donor (donor 1 -> candidates {1, 3}; donor 2 -> {0, 2, 4}):
      q0: 1 at 1.0, 3 at 0.6 -> nearest 3 (B) miss; positive 1 at rank 2 -> AP 1/2; chance 1/2
      q1: 0 at 1.0, 2 at 2.0, 4 at 9.0 -> nearest 0 (A) hit; AP 1; chance 1/3
      q2: 1 at 2.0, 3 at 2.4 -> nearest 1 (A) miss; positive 3 rank 2 -> AP 1/2; chance 1/2
      q3: 0 at 0.6, 2 at 2.4, 4 at 9.4 -> nearest 0 (A) miss; positive 2 rank 2 -> AP 1/2;
          chance 1/3
      q4: gene C has no other image -> unanswerable, miss; chance 0
      rank1 = 1/5, rank1_answerable = 1/4, chance = (1/2+1/3+1/2+1/3+0)/5 = 1/3,
      chance_answerable = (5/3)/4 = 5/12, fold = (1/4)/(5/12) = 3/5, mAP = 2.5/4 = 0.625.
    all (every other image is a candidate; 4 candidates each):
      q0: order 3 (.6), 1 (1), 2 (3), 4 (10) -> miss; positive 1 rank 2 -> AP 1/2
      q1: order 3 (.4), 0 (1), 2 (2), 4 (9) -> miss; positive 0 rank 2 -> AP 1/2
      q2: order 1 (2), 3 (2.4), 0 (3), 4 (7) -> miss; positive 3 rank 2 -> AP 1/2
      q3: order 1 (.4), 0 (.6), 2 (2.4), 4 (9.4) -> miss; positive 2 rank 3 -> AP 1/3
      q4: unanswerable.
      rank1 = 0, chance = (4 × 1/4 + 0)/5 = 1/5, chance_answerable = 1/4,
      mAP = (1/2 + 1/2 + 1/2 + 1/3)/4 = 11/24, fold = 0.
    same_donor: donor 1 = {0, 2, 4} (genes A, B, C), donor 2 = {1, 3} (A, B): no query has
      a same-gene image in its own donor -> every query unanswerable: rank1 0, chance 0,
      the answerable averages NaN, n_answerable 0.
    """
    x = np.array([[0.0], [1.0], [3.0], [0.6], [10.0]])
    genes = ["A", "A", "B", "B", "C"]
    donors = [1, 2, 1, 2, 1]
    df = evaluate_reid(x, genes, donors, block_size=2)
    assert list(df.columns) == list(COLUMNS)
    assert list(df["candidates"]) == list(CANDIDATE_SETS)

    o = _row(df, "other_donor")
    assert o["rank1"] == pytest.approx(1 / 5)
    assert o["rank1_answerable"] == pytest.approx(1 / 4)
    assert o["chance"] == pytest.approx(1 / 3)
    assert o["chance_answerable"] == pytest.approx(5 / 12)
    assert o["fold_over_chance"] == pytest.approx(3 / 5)
    assert o["map"] == pytest.approx(0.625)
    assert (o["n_queries"], o["n_answerable"]) == (5, 4)

    a = _row(df, "all")
    assert a["rank1"] == 0 and a["rank1_answerable"] == 0
    assert a["chance"] == pytest.approx(1 / 5)
    assert a["chance_answerable"] == pytest.approx(1 / 4)
    assert a["map"] == pytest.approx(11 / 24)
    assert a["fold_over_chance"] == 0

    s = _row(df, "same_donor")
    assert s["rank1"] == 0 and s["chance"] == 0 and s["n_answerable"] == 0
    assert np.isnan(s["rank1_answerable"]) and np.isnan(s["chance_answerable"])
    assert np.isnan(s["map"]) and np.isnan(s["fold_over_chance"])


def test_ties_are_broken_by_lower_candidate_index():
    """Query 0 at 0 has two candidates at distance 1 (rows 1 and 2).

    genes A, B, A: row 1 (B) wins the tie -> miss, the positive (row 2) is 2nd -> AP 1/2.
    genes A, A, B: row 1 (A) wins -> hit, AP 1.
    """
    x = np.array([[0.0], [1.0], [-1.0]])
    donors = ["d0", "d1", "d2"]
    miss = evaluate_reid(x, ["A", "B", "A"], donors, candidate_sets=("other_donor",))
    hit = evaluate_reid(x, ["A", "A", "B"], donors, candidate_sets=("other_donor",))
    # Query 0 decides; queries 1 and 2 each have one positive at most.
    # genes A,B,A: q1 (B) unanswerable; q2 (A): candidates 0 (1.0), 1 (2.0) -> hit.
    assert miss["rank1"].iloc[0] == pytest.approx(1 / 3)
    assert miss["map"].iloc[0] == pytest.approx((0.5 + 1.0) / 2)
    # genes A,A,B: q1 (A): candidates 0 (1.0), 2 (2.0) -> hit; q2 (B) unanswerable.
    assert hit["rank1"].iloc[0] == pytest.approx(2 / 3)
    assert hit["map"].iloc[0] == pytest.approx(1.0)


def test_empty_candidate_sets_count_as_misses():
    """One donor only: nothing to compare across donors; one image only: nothing at all."""
    x = np.arange(6, dtype=float).reshape(3, 2)
    df = evaluate_reid(x, ["A", "A", "B"], ["d", "d", "d"])
    o = _row(df, "other_donor")
    assert o["rank1"] == 0 and o["chance"] == 0 and o["n_answerable"] == 0
    s = _row(df, "same_donor")
    assert s["n_answerable"] == 2 and s["rank1_answerable"] == 1.0
    single = evaluate_reid(np.ones((1, 3)), ["A"], ["d"])
    assert (single["rank1"] == 0).all() and (single["n_answerable"] == 0).all()


# --------------------------------------------------------------------------- random data
def _random_design(n: int, dim: int, n_genes: int, n_donors: int, seed: int, spread: float):
    rng = np.random.default_rng(seed)
    genes = rng.integers(0, n_genes, n)
    donors = rng.integers(0, n_donors, n)
    x = rng.normal(size=(n_genes, dim))[genes] + spread * rng.normal(size=(n, dim))
    return x, genes, donors


def _brute_force(x, genes, donors, metric):
    """Per-query reference: explicit candidate lists, stable sort by (distance, index)."""
    scipy_metric = {"euclidean": "euclidean", "sqeuclidean": "sqeuclidean",
                    "cosine": "cosine", "cityblock": "cityblock"}[metric]
    dist = cdist(x, x, metric=scipy_metric)
    n = len(x)
    out = {}
    for s in CANDIDATE_SETS:
        hits, chances, aps, answerable = [], [], [], []
        for q in range(n):
            c = np.array([i for i in range(n) if i != q and (
                s == "all" or (s == "same_donor") == (donors[i] == donors[q]))], dtype=int)
            pos = genes[c] == genes[q] if c.size else np.zeros(0, bool)
            chances.append(pos.mean() if c.size else 0.0)
            answerable.append(bool(pos.any()))
            if not c.size:
                hits.append(False)
                continue
            order = np.lexsort((c, dist[q, c]))  # by distance, then index
            ranked = pos[order]
            hits.append(bool(ranked[0]))
            if ranked.any():
                ranks = np.flatnonzero(ranked) + 1
                aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
        answerable = np.array(answerable)
        out[s] = dict(rank1=np.mean(hits), chance=np.mean(chances),
                      chance_answerable=np.mean(np.array(chances)[answerable]),
                      rank1_answerable=np.mean(np.array(hits)[answerable]),
                      map=np.mean(aps), n_answerable=int(answerable.sum()))
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "cityblock", "sqeuclidean"])
def test_matches_brute_force_on_random_data(metric):
    x, genes, donors = _random_design(90, 6, 12, 4, seed=1, spread=1.0)
    df = evaluate_reid(x, genes, donors, metric=metric, block_size=16)
    ref = _brute_force(x, genes, donors, metric)
    for s in CANDIDATE_SETS:
        row = _row(df, s)
        for key, value in ref[s].items():
            assert row[key] == pytest.approx(value, abs=1e-12), (metric, s, key)


@pytest.mark.parametrize("block_size", [1, 7, 64, 250, 251, 1000])
def test_blocked_equals_naive_for_any_block_size(block_size):
    # N = 250 is not divisible by 7 or 64; 1000 > N.
    x, genes, donors = _random_design(250, 16, 40, 6, seed=2, spread=1.2)
    df = evaluate_reid(x, genes, donors, block_size=block_size)
    reference = evaluate_reid(x, genes, donors, block_size=250)
    pd.testing.assert_frame_equal(df, reference)
    assert _row(df, "other_donor")["rank1"] == pytest.approx(
        naive_rank1_other_donor(x, genes, donors), abs=1e-12)
    assert 0.05 < _row(df, "other_donor")["rank1"] < 0.95  # a non-degenerate test case


def test_one_hot_gene_embedding_is_perfect():
    rng = np.random.default_rng(3)
    genes = np.repeat(np.arange(10), 6)
    donors = np.tile(np.repeat(np.arange(3), 2), 10)  # every gene: 2 images in each of 3 donors
    perm = rng.permutation(len(genes))
    genes, donors = genes[perm], donors[perm]
    x = np.eye(10)[genes]
    for metric in ("euclidean", "cosine", "cityblock"):
        df = evaluate_reid(x, genes, donors, metric=metric, block_size=13)
        assert (df["n_answerable"] == 60).all()
        np.testing.assert_allclose(df["rank1"], 1.0)
        np.testing.assert_allclose(df["map"], 1.0)
        np.testing.assert_allclose(df["fold_over_chance"], 1.0 / df["chance_answerable"])


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(4)
    n = 1200
    genes = rng.integers(0, 20, n)
    donors = rng.integers(0, 5, n)
    x = rng.normal(size=(n, 8))
    df = evaluate_reid(x, genes, donors, block_size=256)
    for s in CANDIDATE_SETS:
        row = _row(df, s)
        # chance ~ 1/20; the binomial s.e. of rank-1 over 1,200 queries is ~0.006.
        assert abs(row["rank1_answerable"] - row["chance_answerable"]) < 0.03, s
        assert 0.5 < row["fold_over_chance"] < 1.6, s


def test_chance_is_exact_for_a_small_design():
    """Gene A: 3 images in donor 1, 1 in donor 2; gene B: 1 in donor 1; N = 5.

    other_donor: A in d1 (3 queries): candidates {A(d2)} -> 1/1 each; A in d2: candidates
    {A,A,A,B} -> 3/4; B in d1: {A(d2)} -> 0/1. chance = (3 + 3/4 + 0)/5 = 0.75.
    """
    genes = ["A", "A", "A", "A", "B"]
    donors = [1, 1, 1, 2, 1]
    df = evaluate_reid(np.random.default_rng(0).normal(size=(5, 3)), genes, donors)
    assert _row(df, "other_donor")["chance"] == pytest.approx(0.75)
    assert _row(df, "other_donor")["chance_answerable"] == pytest.approx((3 + 0.75) / 4)
    # all: A queries: 3 of 4 candidates are A; B: 0 of 4 -> (4 * 3/4 + 0)/5 = 0.6.
    assert _row(df, "all")["chance"] == pytest.approx(0.6)
    # same_donor: A in d1: 2 of 3 candidates; A in d2: no candidate; B: 0 of 3 -> (3*2/3)/5.
    assert _row(df, "same_donor")["chance"] == pytest.approx(0.4)


def test_memory_stays_blocked():
    """Peak NumPy memory stays far below one N×N float32 matrix (N = 2,000, block 100)."""
    x, genes, donors = _random_design(2000, 8, 150, 10, seed=5, spread=1.0)
    tracemalloc.start()
    try:
        evaluate_reid(x, genes, donors, block_size=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * 2000 * 2000 * 4, peak


def test_candidate_subset_and_no_map():
    x, genes, donors = _random_design(100, 4, 10, 3, seed=6, spread=1.0)
    full = evaluate_reid(x, genes, donors)
    only = evaluate_reid(x, genes, donors, candidate_sets=("other_donor",), compute_map=False)
    assert list(only["candidates"]) == ["other_donor"]
    assert np.isnan(only["map"].iloc[0])
    assert only["rank1"].iloc[0] == _row(full, "other_donor")["rank1"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=np.array([[0.0], [np.nan]])), "row 1"),
    (dict(genes=["A"]), "genes"),
    (dict(donors=["a", None]), "donors: missing value at row 1"),
    (dict(metric="hamming"), "metric"),
    (dict(block_size=0), "block_size"),
    (dict(candidate_sets=("nearby",)), "candidate_sets"),
])
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = dict(values=np.zeros((2, 1)), genes=["A", "A"], donors=["a", "b"])
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("metric", "block_size", "candidate_sets") if k in args}
    with pytest.raises(ReidError, match=message):
        evaluate_reid(args["values"], args["genes"], args["donors"], **extra)


# --------------------------------------------------------------------------- tables
def _patch_table(seed: int, good: bool) -> EmbeddingTable:
    """12 images (4 genes × 3 donors), 2 patches each; `good` embeds the gene."""
    rng = np.random.default_rng(seed)
    keys = pd.DataFrame({
        "image_id": np.repeat(np.arange(12), 2),
        "patch_index": np.tile([0, 1], 12),
        "gene_symbol": np.repeat([f"G{i % 4}" for i in range(12)], 2),
        "donor_id": np.repeat([f"H{i // 4}" for i in range(12)], 2),
    })
    gene_idx = keys["gene_symbol"].str[1:].astype(int).to_numpy()
    values = rng.normal(size=(24, 5)) * 0.1
    if good:
        values += np.eye(5)[gene_idx] * 3
    return EmbeddingTable(keys, values.astype(np.float32), f"<{seed}>")


def test_reid_table_rows_per_embedding_and_set(tmp_path):
    path = str(tmp_path / "trained.csv")
    write_embedding_table(path, _patch_table(0, good=True))
    tables = {"trained": read_embedding_table(path), "random": _patch_table(1, good=False)}
    df = reid_table(tables, level="image", block_size=5)
    assert list(df.columns) == ["embedding", "level", *COLUMNS]
    assert len(df) == 2 * len(CANDIDATE_SETS)
    assert (df["n_queries"] == 12).all()  # patches averaged per image
    trained = df[(df["embedding"] == "trained") & (df["candidates"] == "other_donor")].iloc[0]
    assert trained["rank1"] == 1.0 and trained["map"] == 1.0
    donor = reid_table(tables, level="donor")
    assert (donor["n_queries"] == 12).all()  # 4 genes × 3 donors
    patch = reid_table(tables, level="patch", candidate_sets=("other_donor",))
    assert (patch["n_queries"] == 24).all()


def test_reid_table_names_missing_column_and_file(tmp_path):
    table = _patch_table(0, good=True)
    table.keys = table.keys.drop(columns=["donor_id"])
    path = str(tmp_path / "nodonor.csv")
    write_embedding_table(path, table)
    with pytest.raises(EmbeddingTableError, match=r"nodonor\.csv.*'donor_id'"):
        reid_table({"x": read_embedding_table(path)})
    with pytest.raises(ReidError, match="level"):
        reid_table({"x": _patch_table(0, True)}, level="gene")


def test_counting_paths_agree(monkeypatch):
    """Broadcast and per-positive counting of ranks give the same table (ties included)."""
    from ish_tf.evaluate import reid

    x, genes, donors = _random_design(200, 3, 20, 4, seed=7, spread=0.8)
    x = np.round(2 * x)  # small integers: many exact ties, all distances exact
    for metric in ("euclidean", "cityblock"):
        monkeypatch.setattr(reid, "_BROADCAST_MAX", 1 << 16)
        broadcast = evaluate_reid(x, genes, donors, metric=metric, block_size=32)
        monkeypatch.setattr(reid, "_BROADCAST_MAX", 0)
        looped = evaluate_reid(x, genes, donors, metric=metric, block_size=32)
        pd.testing.assert_frame_equal(broadcast, looped)
        if metric != "cityblock":
            continue  # centred float32 |b|²-2ab is not exact, so exact ties may split
        ref = _brute_force(x, genes, donors, metric)
        for s in CANDIDATE_SETS:
            for key in ("rank1", "map"):
                assert _row(looped, s)[key] == pytest.approx(ref[s][key], abs=1e-12), (metric, s)
