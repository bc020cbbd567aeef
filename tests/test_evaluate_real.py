"""Evaluation on the real Cortex Study files (skipped where ../shared/data is absent).

Only two Zeng categories are scored here to keep the test fast; the full table is in
bench/bench_annotations.py and the report.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data_path  # noqa: E402 - tests/ is on sys.path under pytest

from ish_tf.data.embeddings import read_embedding_table
from ish_tf.evaluate import annotations as A
from ish_tf.evaluate import compare, donor, zeng

CORTEX = "cortex_study"


@pytest.fixture(scope="module")
def zeng_groups():
    return zeng.load_zeng(shared_data_path(CORTEX, "zeng2012_table_s2.xlsx"),
                          categories=("pattern", "level_description"))


def test_zeng_table_loads_all_categories():
    path = shared_data_path(CORTEX, "zeng2012_table_s2.xlsx")
    table = zeng.read_zeng_table(path)
    assert len(table) == 995 and table["gene_symbol"].notna().all()
    ann = zeng.zeng_annotations(table, source=path)
    per_cat = ann.groups.groupby("category")["annotation"].apply(set)
    assert per_cat["pattern"] == {"widespread", "laminar", "scattered", "sparse", "ND"}
    assert per_cat["level_description"] == {"high", "medium", "low"}
    assert per_cat["level"] == {"-", "+", "++", "+++", "++++", "+++++"}
    assert {"layer 1", "layer 4", "layer 6"} <= per_cat["layer_marker"]
    assert {"interneuron", "astrocyte", "oligodendrocyte", "VEC"} == per_cat["celltype_marker"]


def test_real_embeddings_and_donor_matrix_on_zeng(zeng_groups):
    tables = {name: read_embedding_table(shared_data_path(CORTEX, f"embeddings_{name}_gene_level.csv"))
              for name in ("triplet", "random")}
    tables["donor_matrix"] = donor.read_donor_matrix(shared_data_path(CORTEX, "gene_donor_matrix.csv"))
    assert tables["donor_matrix"].values.shape == (1004, 42)
    cfg = A.ScoringConfig(n_jobs=2)
    results, skipped, matches = A.evaluate_many(tables, [zeng_groups], cfg)
    assert (matches["key"] == "entrez_id").all() and (matches["n_used"] >= 990).all()
    assert len(skipped) == 0 and len(results) == 3 * 8
    mean = results.groupby("embedding")["auc"].mean()
    assert 0.4 < mean["random"] < 0.6, mean
    assert mean["triplet"] > 0.75 and mean["triplet"] > mean["donor_matrix"] > mean["random"]
    pairs = compare.compare_pairs(results, by_category=False).set_index(["a", "b"])
    assert pairs.loc[("triplet", "random"), "a_wins"] == 8
    assert np.isfinite(pairs["p_value"]).all()
