"""Annotation prediction, Zeng/GO loaders, donor matrix and paired comparisons on tiny data."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ish_tf.data.embeddings import EmbeddingTable, EmbeddingTableError, from_frame
from ish_tf.evaluate import annotations as A
from ish_tf.evaluate import compare, donor, go, zeng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = A.ScoringConfig(n_splits=5, seed=0, standardize=True, max_iter=200)


def _table(values: np.ndarray, genes: list[str], source: str = "emb.csv",
           **extra) -> EmbeddingTable:
    df = pd.DataFrame(values, columns=[str(i) for i in range(values.shape[1])])
    df.insert(0, "gene_symbol", genes)
    for k, v in extra.items():
        df.insert(1, k, v)
    return from_frame(df, source=source)


def _groups(n: int = 120, seed: int = 0) -> tuple[list[str], np.ndarray, pd.DataFrame]:
    """n genes in three patterns, plus a 'rare' column with a 3-gene group."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(n)]
    pattern = rng.choice(["laminar", "sparse", "widespread"], size=n)
    rare = np.where(np.arange(n) < 3, "yes", None)
    ann = pd.DataFrame({"gene_symbol": genes, "pattern": pattern, "rare": rare})
    return genes, pattern, ann


def test_label_embedding_reaches_auc_near_one_and_noise_near_half():
    genes, pattern, ann_df = _groups()
    ann = A.from_categorical_table(ann_df, source="ann.csv")
    onehot = (pattern[:, None] == np.array(["laminar", "sparse", "widespread"])).astype(float)
    rng = np.random.default_rng(1)
    informative = onehot * 3 + 0.3 * rng.standard_normal(onehot.shape)
    good, _ = A.evaluate_annotations(_table(informative, genes), ann, FAST, name="labels")
    assert set(good["annotation"]) == {"laminar", "sparse", "widespread"}
    assert (good["auc"] > 0.97).all(), good
    assert (good["max_p"] < 0.05).all()
    noise = rng.standard_normal((len(genes), 4))
    bad, _ = A.evaluate_annotations(_table(noise, genes), ann, FAST, name="noise")
    assert 0.3 < bad["auc"].mean() < 0.7, bad
    assert list(good.columns[:7]) == ["annotation", "category", "n_genes", "auc", "auc_pr",
                                      "f1", "max_p"]


def test_group_below_minimum_is_skipped_with_reason():
    genes, pattern, ann_df = _groups()
    ann = A.from_categorical_table(ann_df, source="ann.csv")
    x = np.random.default_rng(2).standard_normal((len(genes), 3))
    results, skipped = A.evaluate_annotations(_table(x, genes), ann, FAST)
    assert "yes" not in set(results["annotation"])
    row = skipped[skipped["annotation"] == "yes"].iloc[0]
    assert row["category"] == "rare" and row["n_genes"] == 3 and "minimum 5" in row["reason"]


def test_scale_does_not_change_standardised_scores():
    genes, pattern, ann_df = _groups()
    ann = A.from_categorical_table(ann_df, columns=["pattern"], source="ann.csv")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((len(genes), 4)) + (pattern == "laminar")[:, None]
    a, _ = A.evaluate_annotations(_table(x, genes), ann, FAST)
    b, _ = A.evaluate_annotations(_table(x * 1e-4, genes), ann, FAST)
    np.testing.assert_allclose(a["auc"], b["auc"], atol=1e-6)


def test_join_is_case_insensitive_and_averages_repeated_genes():
    genes, pattern, ann_df = _groups(60)
    ann = A.from_categorical_table(ann_df, columns=["pattern"], source="ann.csv")
    x = np.arange(120, dtype=float).reshape(60, 2)
    # Two image-level rows per gene, lower case with spaces: one mean row per gene.
    rows = np.concatenate([x - 1, x + 1])
    names = [f"  {g.lower()} " for g in genes] * 2
    aligned = A.align(_table(rows, names), ann)
    assert aligned.key == "gene_symbol" and len(aligned.ann_rows) == 60
    order = np.argsort(np.asarray(genes, dtype=str))
    np.testing.assert_allclose(aligned.values, x[order])


def test_auto_key_prefers_the_key_matching_more_genes():
    genes, pattern, ann_df = _groups(40)
    ann_df["entrez_id"] = np.arange(1000, 1040)
    ann = A.from_categorical_table(ann_df, columns=["pattern"], source="ann.csv")
    renamed = [f"OLD{i}" if i < 30 else g for i, g in enumerate(genes)]  # stale symbols
    t = _table(np.ones((40, 2)), renamed, entrez_id=np.arange(1000, 1040))
    assert A.align(t, ann).key == "entrez_id"
    assert len(A.align(t, ann, key="gene_symbol").ann_rows) == 10


def test_clear_errors_for_missing_column_and_unmatched_genes():
    genes, _, ann_df = _groups(20)
    with pytest.raises(A.AnnotationError, match="'layer'"):
        A.from_categorical_table(ann_df, columns=["layer"], source="ann.csv")
    with pytest.raises(A.AnnotationError, match="ann.csv.*gene_symbol or entrez_id"):
        A.from_categorical_table(ann_df.drop(columns="gene_symbol"), source="ann.csv")
    ann = A.from_categorical_table(ann_df, columns=["pattern"], source="ann.csv")
    t = _table(np.ones((3, 2)), ["XYZ1", "XYZ2", "XYZ3"], source="other.csv")
    with pytest.raises(A.AnnotationError, match=r"other\.csv: no gene matches ann\.csv by 'gene_symbol'"):
        A.align(t, ann)
    no_key = EmbeddingTable(pd.DataFrame({"image_id": [1, 2]}), np.ones((2, 2), np.float32), "img.csv")
    with pytest.raises(A.AnnotationError, match="img.csv: no gene key shared"):
        A.align(no_key, ann)
    with pytest.raises(A.AnnotationError, match="no 'entrez_id' column"):
        A.align(t, ann, key="entrez_id")


def test_read_annotation_table_and_category_labels(tmp_path):
    genes, pattern, ann_df = _groups(30)
    path = tmp_path / "annotations.csv"
    ann_df.to_csv(path, index=False)
    ann = A.read_annotation_table(str(path))
    assert set(ann.groups["category"]) == {"pattern", "rare"}
    aligned = A.align(_table(np.ones((30, 2)), genes), ann)
    labels = A.category_labels(aligned, ann, "pattern")
    sorted_genes = np.asarray(genes)[np.argsort(np.asarray(genes, dtype=str))]
    by_gene = dict(zip(sorted_genes, labels, strict=True))
    assert all(by_gene[g] == p for g, p in zip(genes, pattern, strict=True))
    with pytest.raises(A.AnnotationError, match="missing.csv"):
        A.read_annotation_table(str(tmp_path / "missing.csv"))


# --------------------------------------------------------------------------- Zeng
@pytest.mark.parametrize("text, layers, cells", [
    ("layer 2/3/6", ["layer 2", "layer 3", "layer 6"], []),
    ("interneuron/layer5/6", ["layer 5", "layer 6"], ["interneuron"]),
    ("interneuron or VEC", [], ["VEC", "interneuron"]),
    ("layer 4c/6", ["layer 4", "layer 6"], []),
    ("astrocyte?", [], ["astrocyte"]),
    ("interneuron+others", [], ["interneuron"]),
    (float("nan"), [], []),
])
def test_parse_cortical_marker(text, layers, cells):
    assert zeng.parse_cortical_marker(text) == (layers, cells)


def _write_zeng(path, n: int = 24) -> None:
    rng = np.random.default_rng(0)
    body = pd.DataFrame({
        "Gene name": [f"gene {i}" for i in range(n)],
        "Gene symbol": [f"G{i}" for i in range(n)],
        "Entrez Gene ID": np.arange(100, 100 + n),
        "Cortical marker (human)": [["layer 5", "interneuron/layer 5", None][i % 3] for i in range(n)],
        "pattern description for Fig 2": rng.choice(["laminar", "widespread", "ND"], n),
        "level description for Fig 2": rng.choice(["high", "low"], n),
        "Level": rng.choice(["-", "+", "++"], n),
        "Pattern": "x",
        "Level.1": "+",  # a second "Level" column (other region) that must not be used
    }).rename(columns={"Level.1": "Level"})
    top = pd.DataFrame([["group row"] + [""] * (body.shape[1] - 1)], columns=body.columns)
    with pd.ExcelWriter(path) as w:
        top.to_excel(w, sheet_name="Final1000New", index=False, header=False)
        body.to_excel(w, sheet_name="Final1000New", index=False, startrow=1)


def test_zeng_table_header_on_second_row_and_categories(tmp_path):
    path = str(tmp_path / "s2.xlsx")
    _write_zeng(path)
    table = zeng.read_zeng_table(path)
    assert len(table) == 24 and table["entrez_id"].dtype == "Int64"
    assert set(table["level"]) <= {"-", "+", "++"}
    ann = zeng.load_zeng(path)
    names = zip(ann.groups["category"], ann.groups["annotation"], strict=True)
    cats = dict(zip(names, ann.members, strict=True))
    assert len(cats[("layer_marker", "layer 5")]) == 16
    assert len(cats[("celltype_marker", "interneuron")]) == 8
    assert len(ann.universe_mask("layer_marker")) == 24 and ann.universe_mask("layer_marker").all()


def test_zeng_missing_column_is_named(tmp_path):
    path = str(tmp_path / "bad.xlsx")
    df = pd.DataFrame({"Gene symbol": ["A"], "Entrez Gene ID": [1]})
    with pd.ExcelWriter(path) as w:
        df.to_excel(w, sheet_name="Final1000New", index=False, startrow=1)
    with pytest.raises(A.AnnotationError, match="'pattern description for Fig 2'"):
        zeng.read_zeng_table(path)


# --------------------------------------------------------------------------- GO
GAF_LINES = [
    "!gaf-version: 2.2",
    "NCBIGene\t101\tA1\tinvolved_in\tGO:0000003\tREF\tIDA\t\tP\tname\t\tgene\ttaxon:9606\t20240101\tX",
    "NCBIGene\t102\tA2\tinvolved_in\tGO:0000003\tREF\tIEA\t\tP\tname\t\tgene\ttaxon:9606\t20240101\tX",
    "NCBIGene\t103\tA3\tNOT|involved_in\tGO:0000003\tREF\tIDA\t\tP\tname\t\tgene\ttaxon:9606\t20240101\tX",
    "NCBIGene\t103\tA3\tinvolved_in\tGO:0000002\tREF\tIDA\t\tP\tname\t\tgene\ttaxon:9606\t20240101\tX",
    "NCBIGene\t104\tA4\tenables\tGO:0000009\tREF\tIDA\t\tF\tname\t\tgene\ttaxon:9606\t20240101\tX",
]
OBO = """format-version: 1.2

[Term]
id: GO:0000001
name: root process

[Term]
id: GO:0000002
name: middle process
is_a: GO:0000001 ! root process

[Term]
id: GO:0000003
name: leaf process
is_a: GO:0000002 ! middle process

[Typedef]
id: part_of
name: part of
"""


def test_gaf_obo_propagation_and_filters(tmp_path):
    gaf_path, obo_path = tmp_path / "g.gaf", tmp_path / "g.obo"
    gaf_path.write_text("\n".join(GAF_LINES) + "\n")
    obo_path.write_text(OBO)
    gaf = go.read_gaf(str(gaf_path))
    assert len(gaf) == 4  # the NOT line is dropped
    assert gaf.loc[gaf["gene_symbol"] == "A1", "entrez_id"].iloc[0] == 101
    parents, names = go.read_obo(str(obo_path))
    assert parents["GO:0000003"] == {"GO:0000002"} and names["GO:0000001"] == "root process"
    ann = go.load_go(str(gaf_path), str(obo_path), aspects=("P",), exclude_evidence=("IEA",))
    members = {a: set(ann.genes.iloc[m]["gene_symbol"]) for a, m in
               zip(ann.groups["annotation"], ann.members, strict=True)}
    assert members == {"GO:0000003": {"A1"}, "GO:0000002": {"A1", "A3"},
                       "GO:0000001": {"A1", "A3"}}
    assert "description" in ann.groups.columns
    bad = tmp_path / "bad.gaf"
    bad.write_text("!x\nNCBIGene\t1\tA\n")
    with pytest.raises(A.AnnotationError, match="line 2"):
        go.read_gaf(str(bad))


def test_go_size_bounds_apply_to_matched_genes():
    genes = [f"G{i}" for i in range(60)]
    long = pd.DataFrame({"gene_symbol": genes[:12] + genes[:30],
                         "annotation": ["GO:1"] * 12 + ["GO:2"] * 30, "category": "go"})
    ann = A.from_long(long, "go.gaf", universes={"go": pd.DataFrame({"gene_symbol": genes})})
    cfg = A.ScoringConfig(size_bounds={"go": (10, 20)}, max_iter=100)
    x = np.random.default_rng(0).standard_normal((60, 2))
    results, skipped = A.evaluate_annotations(_table(x, genes), ann, cfg)
    assert list(results["annotation"]) == ["GO:1"]
    assert "maximum 20" in skipped.set_index("annotation").loc["GO:2", "reason"]


# --------------------------------------------------------------------------- donor matrix
def test_donor_matrix_from_manifest_and_csv(tmp_path):
    m = pd.DataFrame({"gene_symbol": ["A", "A", "B", "B", "C"],
                      "donor_id": ["d2", "d1", "d1", "d1", "d3"],
                      "entrez_id": pd.array([1, 1, 2, 2, None], dtype="Int64")})
    t = donor.donor_matrix_from_manifest(m)
    assert list(t.keys["gene_symbol"]) == ["A", "B", "C"]
    np.testing.assert_array_equal(t.values, [[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    path = tmp_path / "gdm.csv"
    df = pd.DataFrame({"gene_symbol": ["A", "B"], "H1": [1, 0], "H2": [0, 2], "entrez_id": [1, 2]})
    df.to_csv(path)  # with an unnamed index column, like the real file
    with pytest.raises(EmbeddingTableError, match="donor column 'H2' holds 2 in row 3"):
        donor.read_donor_matrix(str(path))
    df["H2"] = [0, 1]
    df.to_csv(path)
    t = donor.read_donor_matrix(str(path))
    assert t.dim == 2 and list(t.keys.columns) == ["gene_symbol", "entrez_id"]


# --------------------------------------------------------------------------- comparisons
def _long(aucs: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for name, vals in aucs.items():
        for i, v in enumerate(vals):
            rows.append({"annotation": f"g{i}", "category": "c" if i < 4 else "d",
                         "n_genes": 10, "auc": v, "embedding": name})
    return pd.DataFrame(rows)


def test_wide_table_and_paired_comparison():
    res = _long({"a": [0.9, 0.8, 0.85, 0.7, 0.95, 0.9, 0.8],
                 "b": [0.6, 0.5, 0.55, 0.5, 0.6, 0.55, 0.81]})
    wide = compare.wide_table(res)
    assert list(wide.columns) == ["category", "annotation", "n_genes", "a", "b", "best"]
    assert list(wide["best"]) == ["a"] * 6 + ["b"]
    pairs = compare.compare_pairs(res)
    overall = pairs[pairs["category"] == "all"].iloc[0]
    assert (overall["a_wins"], overall["b_wins"], overall["n_groups"]) == (6, 1, 7)
    assert overall["mean_diff"] == pytest.approx(np.mean(np.subtract(*[res[res.embedding == e].auc.to_numpy() for e in "ab"])))
    assert overall["p_value"] < 0.05
    assert set(pairs["category"]) == {"all", "c", "d"}
    same = compare.compare_pairs(_long({"a": [0.5] * 5, "b": [0.5] * 5}), by_category=False)
    assert same.iloc[0]["p_value"] == 1.0 and same.iloc[0]["ties"] == 5


def test_evaluate_many_uses_common_genes():
    genes, pattern, ann_df = _groups(80)
    ann = A.from_categorical_table(ann_df, columns=["pattern"], source="ann.csv")
    rng = np.random.default_rng(4)
    tables = {"full": _table(rng.standard_normal((80, 3)), genes),
              "part": _table(rng.standard_normal((70, 3)), genes[10:])}
    res, skipped, matches = A.evaluate_many(tables, [ann], FAST)
    assert list(matches["n_matched"]) == [80, 70] and list(matches["n_used"]) == [70, 70]
    assert res.groupby("annotation")["n_total"].nunique().eq(1).all()
    tables["disjoint"] = _table(rng.standard_normal((10, 3)), genes[:10])
    with pytest.raises(A.AnnotationError, match="no gene is matched by every embedding"):
        A.evaluate_many(tables, [ann], FAST)


def test_parse_named_paths():
    from ish_tf.cli.evaluate import parse_named_paths

    assert parse_named_paths("a=x/one.csv, /y/two.parquet") == {"a": "x/one.csv",
                                                                 "two": "/y/two.parquet"}
    with pytest.raises(ValueError, match="names 'a' twice"):
        parse_named_paths("a=1.csv,a=2.csv")


# --------------------------------------------------------------------------- CLI
def test_bin_evaluate_annotations_end_to_end(tmp_path):
    genes, pattern, ann_df = _groups(60)
    ann_path, emb_path, rnd_path = (str(tmp_path / n) for n in ("ann.csv", "emb.csv", "rnd.csv"))
    ann_df.to_csv(ann_path, index=False)
    rng = np.random.default_rng(5)
    onehot = (pattern[:, None] == np.array(["laminar", "sparse", "widespread"])).astype(float)
    _table(onehot * 2 + 0.5 * rng.standard_normal(onehot.shape), genes).to_frame().to_csv(
        emb_path, index=False)
    _table(rng.standard_normal((60, 3)), genes).to_frame().to_csv(rnd_path, index=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ish_tf.cli.evaluate", "--task=annotations",
           f"--annotations={ann_path}", f"--embeddings=good={emb_path},random={rnd_path}",
           f"--out={out}", "--n_jobs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "good: mean AUC" in proc.stdout
    res = pd.read_csv(out / "annotations.csv")
    good = res[res["embedding"] == "good"]
    assert (good["auc"] > 0.9).all() and len(good) == 3
    wide = pd.read_csv(out / "annotations_wide.csv")
    assert {"good", "random", "best"} <= set(wide.columns)
    assert (out / "comparisons.csv").exists() and (out / "evaluate_flags.cfg").exists()
    assert (out / "report.html").exists()
    # --manifest: the gene x donor assay design is scored as one more embedding (the
    # donor-bias control); --nodonor_control leaves it out.
    from ish_tf.data.manifest import write_manifest

    donors = rng.choice(["H1", "H2", "H3", "H4"], size=(60, 2))
    write_manifest(pd.DataFrame({
        "image_id": np.arange(120), "experiment_id": np.arange(120) // 2, "study": "cortex",
        "gene_symbol": np.repeat(genes, 2), "donor_id": donors.ravel(), "width": 100,
        "height": 100, "path": [f"images/{i}.jpg" for i in range(120)]}),
        str(tmp_path / "manifest.csv"))
    for control, want in (("--donor_control", True), ("--nodonor_control", False)):
        proc = subprocess.run(cmd + ["--noreport", f"--manifest={tmp_path / 'manifest.csv'}",
                                     control, f"--out={tmp_path / control}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scored = set(pd.read_csv(tmp_path / control / "annotations.csv")["embedding"])
        assert scored == ({"good", "random", "donor_matrix"} if want else {"good", "random"})
    # A key that matches nothing fails clearly, naming the file and the key.
    pd.DataFrame({"gene_symbol": ["NOPE1", "NOPE2"], "0": [1.0, 2.0]}).to_csv(rnd_path, index=False)
    proc = subprocess.run(cmd + ["--noreport"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert f"{rnd_path}: no gene matches {ann_path} by 'gene_symbol'" in proc.stderr


def test_mouse_go_config_scores_terms_of_15_to_500_genes(tmp_path):
    # configs/evaluate_mouse_go.cfg: FuncISH's GO category sizes for whole-section codes.
    genes, _, _ = _groups(60)
    rng = np.random.default_rng(6)
    emb_path, gaf_path = str(tmp_path / "emb.csv"), str(tmp_path / "go.gaf")
    _table(rng.standard_normal((60, 3)), genes).to_frame().to_csv(emb_path, index=False)
    # (GO's universe is the annotated genes: GO:0000030 makes it all 60.)
    members = {"GO:0000010": genes[:10], "GO:0000020": genes[10:30], "GO:0000030": genes[30:],
               "GO:0000040": genes[:40]}
    lines = ["!gaf-version: 2.2"]
    for term, syms in members.items():
        for k, sym in enumerate(syms):
            lines.append("\t".join(["test", f"ID{k}", sym, "involved_in", term, "REF:1", "IDA",
                                    "", "P", "", "", "protein", "taxon:10090", "20240101",
                                    "test", "", ""]))
    with open(gaf_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ish_tf.cli.evaluate",
           f"--flagfile={os.path.join(ROOT, 'configs', 'evaluate_mouse_go.cfg')}",
           f"--gaf={gaf_path}", f"--embedding={emb_path}", f"--out={out}", "--noreport",
           "--n_jobs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = set(pd.read_csv(out / "annotations.csv")["annotation"])
    assert scored == {"GO:0000020", "GO:0000030", "GO:0000040"}  # 10 genes are below 15
    skipped = pd.read_csv(out / "annotations_skipped.csv")
    assert skipped["reason"].tolist() == ["10 matched genes < minimum 15"]
