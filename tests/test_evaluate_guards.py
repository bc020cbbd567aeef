"""Split-aware, guarded evaluation: --splits, degenerate set-ups flagged, the report's words.

The scenarios of issue 22: re-identification over all splits vs the held-out ones, a
one-gene split, 14 genes x 64 dimensions, and what the report says about its columns.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from ish_tf import cli
from ish_tf.data.embeddings import EmbeddingTable
from ish_tf.evaluate import annotations as A
from ish_tf.evaluate import compare, glossary, reid
from ish_tf.evaluate.splits import SplitSelectionError, select_splits


def _image_table(genes_by_split: dict[str, list[str]], donors=("D1", "D2", "D3"),
                 images: int = 2, dim: int = 8, seed: int = 0, signal: float = 3.0):
    """Image-level table: every gene in every donor, `images` images each; a gene's
    images share a centre (so genes re-identify), training genes are spread wider."""
    rng = np.random.default_rng(seed)
    rows, values, image_id = [], [], 0
    for split, genes in genes_by_split.items():
        for gene in genes:
            centre = rng.standard_normal(dim) * signal
            for donor in donors:
                for _ in range(images):
                    rows.append({"image_id": image_id, "gene_symbol": gene, "donor_id": donor,
                                 "split": split, "n_patches": 4})
                    values.append(centre + rng.standard_normal(dim))
                    image_id += 1
    return EmbeddingTable(pd.DataFrame(rows), np.asarray(values, np.float32), "img.csv")


def _undefined_columns(html: str, embeddings=()) -> dict[str, list[str]]:
    """Table title -> columns the report shows without defining them."""
    tables = re.findall(r"<h3>(.*?)</h3>\s*<table[^>]*class=\"dataframe data\"[^>]*>\s*"
                        r"<thead>(.*?)</thead>", html, flags=re.S)
    assert tables
    out = {}
    for title, head in tables:
        cols = re.findall(r"<th>(.*?)</th>", head)
        missing = [c for c in glossary.undefined(cols, embeddings) if f"<dt>{c}</dt>" not in html]
        if missing:
            out[title] = missing
    return out


def _write(table: EmbeddingTable, path) -> str:
    table.to_frame().to_csv(path, index=False)
    return str(path)


def test_default_scores_held_out_splits_and_says_so():
    t = _image_table({"train": ["A", "B", "C"], "validation": ["D"], "test": ["E", "F"]})
    kept, choice = select_splits(t)
    assert set(kept.keys["split"]) == {"test", "validation"}
    assert choice.splits == ("test", "validation") and "held-out" in choice.how
    assert choice.describe().startswith("test, validation (default: held-out splits")
    assert choice.small_splits() == ["validation: 1 gene, 6 rows"]
    everything, c_all = select_splits(t, ("all",))
    assert len(everything) == len(t) and c_all.how == "--splits=all"
    only, _ = select_splits(t, ("train",))
    assert set(only.keys["split"]) == {"train"}
    with pytest.raises(SplitSelectionError, match="no rows of split.*holdout.*splits are "
                                                  "test, train, validation"):
        select_splits(t, ("holdout",))
    train_only, _ = select_splits(t, ("train",))
    with pytest.raises(SplitSelectionError, match="no held-out rows.*--splits=train"):
        select_splits(train_only)
    no_split = EmbeddingTable(t.keys.drop(columns="split"), t.values, "x.csv")
    assert select_splits(no_split)[1].how == "no split column: every row"
    with pytest.raises(SplitSelectionError, match="no 'split' column"):
        select_splits(no_split, ("test",))


def test_bin_evaluate_reid_held_out_by_default_vs_all_splits(tmp_path, capsys):
    t = _image_table({"train": ["A", "B", "C", "G"], "test": ["E", "F", "H"]})
    path = _write(t, tmp_path / "image_embeddings.csv")
    runs = {}
    for name, extra in (("default", []), ("all", ["--splits=all"])):
        out = tmp_path / name
        rc = cli.invoke("evaluate", ["--task=reid", f"--embedding={path}", f"--out={out}",
                                     "--noreport"] + extra)
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        runs[name] = (pd.read_csv(out / "reid.csv"), printed.out)
    held, out_held = runs["default"]
    every, out_all = runs["all"]
    assert (held["n_queries"] == 3 * 6).all() and (every["n_queries"] == 7 * 6).all()
    assert (held["splits"] == "test").all() and (every["splits"] == "all").all()
    assert "scored rows: image_embeddings: test (default: held-out splits" in out_held
    assert "(--splits=all; 42 of 42 rows)" in out_all
    assert "fold over chance" in out_held and "fold_over_chance" in held.columns
    assert held["flag"].isna().all()  # 3 genes, chance 0.4 in other_donor: well posed


def test_one_gene_split_is_flagged_in_table_output_and_report(tmp_path, capsys):
    t = _image_table({"train": ["A", "B"], "test": ["E"]})
    path = _write(t, tmp_path / "img.csv")
    out = tmp_path / "out"
    rc = cli.invoke("evaluate", ["--task=reid", f"--embedding={path}", f"--out={out}",
                                 "--map_method=none"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    df = pd.read_csv(out / "reid.csv")
    other = df[df["candidates"] == "other_donor"].iloc[0]
    assert other["rank1"] == 1.0 and other["chance"] == 1.0 and other["n_genes"] == 1
    assert "1 gene" in other["flag"] and "chance 1.000 >= 0.5" in other["flag"]
    assert "[DEGENERATE: 1 gene" in printed.out
    assert "warning: reid img: 1 gene" in printed.err
    assert "split test: 1 gene, 6 rows: too small" in printed.err
    report = (out / "report.html").read_text()
    assert "Degenerate or doubtful set-ups" in report and "chance 1.000 &gt;= 0.5" in report
    assert _undefined_columns(report) == {}
    assert "<h2>Embeddings</h2>" in report and "--splits" in report


def test_evaluate_reid_flags_chance_at_least_half_and_single_query():
    x = np.eye(4, dtype=np.float32)
    df = reid.evaluate_reid(x, ["a", "a", "a", "b"], ["d1", "d2", "d3", "d1"])
    other = df.set_index("candidates").loc["other_donor"]
    assert other["chance"] >= 0.5 and "chance" in other["flag"]
    ok = reid.evaluate_reid(np.eye(6, dtype=np.float32), list("aabbcc"), ["d1", "d2"] * 3)
    assert (ok["flag"] == "").all()
    assert reid.degenerate_reasons(3, 1, 0.1) == ["1 query"]


def _fourteen_genes(dim: int = 64):
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(14)]
    pattern = np.array(["laminar"] * 7 + ["sparse"] * 7)
    x = rng.standard_normal((14, dim)) + (pattern == "laminar")[:, None] * 1.5
    keys = pd.DataFrame({"gene_symbol": genes})
    ann = A.from_categorical_table(pd.DataFrame({"gene_symbol": genes, "pattern": pattern}))
    return EmbeddingTable(keys, x.astype(np.float32), "g.csv"), ann


def test_fourteen_genes_by_64_dimensions_is_flagged_and_penalty_or_pca_fix_it():
    table, ann = _fourteen_genes()
    cfg = A.ScoringConfig(n_splits=5, max_iter=200, min_genes=5)
    res, _ = A.evaluate_annotations(table, ann, cfg)
    assert len(res) == 2
    assert res["flag"].str.contains("64 dimensions (+ intercept) for 11 training genes", regex=False).all(), res["flag"]
    assert res["flag"].str.contains("--penalty=l2").all()
    summary = A.summarize(res)
    assert (summary["n_flagged"] == summary["n_groups"]).all()
    for fix in (dict(penalty="l2"), dict(pca_components=4)):
        fixed, _ = A.evaluate_annotations(table, ann, A.ScoringConfig(
            n_splits=5, max_iter=200, min_genes=5, **fix))
        assert (fixed["flag"] == "").all(), (fix, fixed["flag"])
        assert fixed["auc"].mean() > 0.7, fixed  # the signal is there once well posed
    # The paper's unpenalised default stays where it is well posed.
    assert A.degenerate_reasons(8, 11) == []
    assert "constant predictions in 2 of 5 folds" in A.degenerate_reasons(
        2, 100, constant_folds=2)
    with pytest.raises(ValueError, match="--penalty"):
        A.ScoringConfig(penalty="l1").validate()


def test_constant_predictions_are_flagged():
    y = np.array([0, 1] * 10)
    flat = np.zeros((20, 2))
    s = A.cross_validate_binary(flat, y, n_splits=5, max_iter=50)
    assert s["auc"] == 0.5 and "constant predictions in 5 of 5 folds" in s["flag"]


def test_benjamini_hochberg_and_the_significance_count():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    adj = A.benjamini_hochberg(p)
    # Sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, 0.053, 0.053, 0.5 after the step-up.
    np.testing.assert_allclose(adj[:4], [0.04, 4 / 75, 4 / 75, 0.5])
    assert np.isnan(adj[4])
    res = pd.DataFrame({"annotation": list("abcd"), "category": "c", "auc": 0.8, "auc_pr": 0.5,
                        "f1": 0.5, "max_p": p[:4], "embedding": "e", "flag": ""})
    s = A.summarize(res)
    row = s[s["category"] == "all"].iloc[0]
    # Uncorrected, three p-values are < 0.05; after BH only one group is.
    assert row["n_significant_bh"] == 1 and "n_significant" not in s.columns


def test_natural_order_and_human_labels():
    assert A.natural_order(["+++", "-", "+", "+++++", "++", "++++"]) == [
        "-", "+", "++", "+++", "++++", "+++++"]
    assert A.natural_order(["medium", "high", "low"]) == ["low", "medium", "high"]
    assert A.natural_order(["layer 10", "layer 2", "layer 1"]) == [
        "layer 1", "layer 2", "layer 10"]
    # A category mixing scales is not ordinal: alphabetical, numbers as numbers.
    assert A.natural_order(["+", "high", "-"]) == ["+", "-", "high"]
    lv = A.from_categorical_table(pd.DataFrame({"gene_symbol": list("abcd"),
                                                "level": ["++", "-", "+", "+++++"]}))
    assert list(lv.groups["annotation"]) == ["-", "+", "++", "+++++"]
    assert A.category_label("level_description") == "Expression level (high / medium / low)"
    assert A.category_label("my_column") == "My column"


def test_comparison_rows_without_two_groups_are_omitted():
    results = pd.DataFrame({
        "annotation": ["x", "y", "z"] * 2, "category": ["big", "big", "lonely"] * 2,
        "embedding": ["a"] * 3 + ["b"] * 3, "auc": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        "n_genes": 10})
    pairs = compare.compare_pairs(results)
    assert set(pairs["category"]) == {"all", "big"}  # "lonely" has one group
    assert pairs["n_groups"].min() >= 2


def test_report_defines_every_column_and_only_what_it_contains(tmp_path, capsys):
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(40)]
    level = rng.choice(["low", "medium", "high"], size=40)
    ann = tmp_path / "ann.csv"
    pd.DataFrame({"gene_symbol": genes, "level": level}).to_csv(ann, index=False)
    paths = []
    for name in ("one", "two"):
        t = EmbeddingTable(pd.DataFrame({"gene_symbol": genes, "split": "test"}),
                           rng.standard_normal((40, 3)).astype(np.float32), name)
        paths.append(f"{name}={_write(t, tmp_path / f'{name}.csv')}")
    out = tmp_path / "out"
    rc = cli.invoke("evaluate", ["--task=annotations", f"--annotations={ann}",
                                 f"--embeddings={','.join(paths)}", f"--out={out}",
                                 "--map_method=none", "--n_jobs=1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "significant (Benjamini-Hochberg FDR 5%)" in printed.out
    html = (out / "report.html").read_text()
    assert "donor_matrix" not in html  # no donor matrix was scored: none is explained
    assert "Benjamini-Hochberg" in html and "<h2>Embeddings</h2>" in html
    # Every column of every table drawn in the report has a definition under it.
    assert _undefined_columns(html, {"one", "two"}) == {}
    assert html.count('class="dataframe data"') >= 5
    for col in ("n_significant_bh", "mean_auc", "best", "flag"):
        assert f"<dt>{col}</dt>" in html
    # Ordinal levels in their natural order in the per-group table.
    wide = pd.read_csv(out / "annotations_wide.csv")
    assert list(wide["annotation"]) == ["low", "medium", "high"]


def test_glossary_covers_the_diagnosis_and_reid_columns():
    from ish_tf.evaluate import diagnosis

    per_gene = ["embedding", "gene_symbol", "n_donors", "n_positive", "flag"] + [
        f"{m}_{s}" for s in diagnosis.FEATURE_SETS for m in ("auc", "f1")]
    summary = ["embedding", "features", "n_genes", "mean_auc", "median_auc", "mean_f1",
               "embedding_wins"]
    assert glossary.undefined(per_gene + summary) == []
    assert glossary.undefined(["embedding", "level", "splits", *reid.COLUMNS]) == []
    assert glossary.undefined(["mystery"]) == ["mystery"]
