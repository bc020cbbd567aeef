"""Embedding tables: keys vs values, foreign tables, aggregation, errors."""

import numpy as np
import pandas as pd
import pytest

from ish_tf.data import embeddings as emb


def test_foreign_table_like_published_embeddings(tmp_path):
    # Shaped like the Cortex Study files: unnamed index, gene_symbol, entrez_id, 0..D-1.
    df = pd.DataFrame({"gene_symbol": ["A", "B"], "entrez_id": [1, 2],
                       "0": [0.1, 0.2], "1": [0.3, 0.4]})
    path = tmp_path / "e.csv"
    df.to_csv(path)  # writes the unnamed index column
    t = emb.read_embedding_table(str(path), require=("gene_symbol",))
    assert t.dim == 2 and len(t) == 2
    assert list(t.keys.columns) == ["gene_symbol", "entrez_id"]  # entrez_id is a key, not a dim
    np.testing.assert_allclose(t.values, [[0.1, 0.3], [0.2, 0.4]], rtol=1e-6)


def test_round_trip_and_missing_key(tmp_path):
    keys = pd.DataFrame({"image_id": [1, 2], "gene_symbol": ["A", "B"], "donor_id": ["d1", "d2"]})
    t = emb.EmbeddingTable(keys, np.arange(6, dtype=np.float32).reshape(2, 3))
    path = str(tmp_path / "t.csv")
    emb.write_embedding_table(path, t)
    back = emb.read_embedding_table(path)
    np.testing.assert_array_equal(back.values, t.values)
    with pytest.raises(emb.EmbeddingTableError, match="'entrez_id'"):
        emb.read_embedding_table(path, require=("entrez_id",))


def test_non_finite_stray_text_and_no_numeric_rejected(tmp_path):
    with pytest.raises(emb.EmbeddingTableError,
                       match=r"column '0' at data row 2 \(line 3 of a CSV, gene B\) is empty"):
        emb.from_frame(pd.DataFrame({"gene_symbol": ["A", "B"], "0": [1.0, np.nan]}), "x")
    with pytest.raises(emb.EmbeddingTableError, match="column '1' at data row 1 .* infinite"):
        emb.from_frame(pd.DataFrame({"0": [1.0, 2.0], "1": [np.inf, 0.0]}), "x")
    # A column of numbers with one word in it was left out of the embedding without a word;
    # a column of words (a label of the user's) still is, silently.
    path = tmp_path / "typo.csv"
    path.write_text("gene_symbol,0,1,note\nA,0.1,0.2,x\nB,0.3,abc,y\nC,0.5,0.6,z\n")
    with pytest.raises(emb.EmbeddingTableError,
                       match=r"typo.csv: column '1' is numeric but data row 2 \(line 3 of a CSV, "
                             r"gene B\) holds 'abc'"):
        emb.read_embedding_table(str(path))
    path.write_text("gene_symbol,0,1,note\nA,0.1,0.2,x\nB,0.3,0.4,y\n")
    assert emb.read_embedding_table(str(path)).dim == 2
    with pytest.raises(emb.EmbeddingTableError, match="no numeric"):
        emb.from_frame(pd.DataFrame({"gene_symbol": ["A"], "image_id": [3]}), "x")


def test_aggregate_means_and_counts():
    keys = pd.DataFrame({"image_id": [1, 1, 2, 3], "patch_index": [0, 1, 0, 0],
                         "gene_symbol": ["A", "A", "A", "B"], "donor_id": ["d1", "d1", "d2", "d1"]})
    vals = np.array([[0, 0], [2, 2], [4, 4], [9, 9]], dtype=np.float32)
    t = emb.EmbeddingTable(keys, vals)
    per_image = emb.aggregate(t, ("image_id",))
    np.testing.assert_allclose(per_image.values, [[1, 1], [4, 4], [9, 9]])
    assert per_image.keys["n_patches"].tolist() == [2, 1, 1]
    assert "patch_index" not in per_image.keys.columns  # varies within an image
    per_gene = emb.aggregate(t, ("gene_symbol",))  # gene = mean over all patches, as the paper
    np.testing.assert_allclose(per_gene.values, [[2, 2], [9, 9]])
    image_then_gene = emb.aggregate(per_image, ("gene_symbol",))
    np.testing.assert_allclose(image_then_gene.values, [[2.5, 2.5], [9, 9]])


def _lab_table() -> emb.EmbeddingTable:
    keys = pd.DataFrame({"image_id": [1, 2, 3], "gene_symbol": ["A", "B", "C"],
                         "entrez_id": pd.array([11, None, 13], dtype="Int64"),
                         "donor_id": ["d1", "d2", "d1"], "donor_age": [40.5, 52.0, None],
                         "stain_batch": ["B1", None, "B2"], "split": "test"})
    return emb.EmbeddingTable(keys, np.arange(12, dtype=np.float32).reshape(3, 4), "lab")


@pytest.mark.parametrize("ext", ["csv", "parquet", "h5ad"])
def test_every_format_round_trips_metadata_and_dims(tmp_path, ext):
    if ext == "parquet":
        pytest.importorskip("pyarrow")
    if ext == "h5ad":
        pytest.importorskip("anndata")
    t = _lab_table()
    path = str(tmp_path / f"t.{ext}")
    emb.write_embedding_table(path, t, name="triplet")
    back = emb.read_embedding_table(path)
    np.testing.assert_array_equal(back.values, t.values)
    # Numeric metadata (donor_age) stays metadata beside the dim_* columns.
    assert list(back.keys.columns) == list(t.keys.columns)
    assert back.keys["donor_age"].isna().tolist() == [False, False, True]
    assert back.keys["stain_batch"].isna().tolist() == [False, True, False]
    assert back.keys["entrez_id"].isna().tolist() == [False, True, False]
    if ext == "csv":
        assert list(pd.read_csv(path).columns[-4:]) == ["dim_000", "dim_001", "dim_002",
                                                          "dim_003"]


def test_dim_names_pad_to_the_width():
    assert emb.dim_names(3) == ["dim_000", "dim_001", "dim_002"]
    assert emb.dim_names(1500)[-1] == "dim_1499" and emb.dim_names(1500)[0] == "dim_0000"


def test_old_gene_donor_name_is_still_found(tmp_path):
    assert emb.level_table_path(str(tmp_path), "donor").endswith("gene_donor_embeddings.csv")
    old = tmp_path / "donor_embeddings.csv"
    old.write_text("gene_symbol,donor_id,0\nA,d1,1\n")
    assert emb.level_table_path(str(tmp_path), "gene_donor") == str(old)
    new = tmp_path / "gene_donor_embeddings.parquet"
    new.write_bytes(b"")
    assert emb.level_table_path(str(tmp_path), "donor") == str(new)


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    path = str(tmp_path / "t.h5ad")
    open(path, "wb").close()
    monkeypatch.setattr(emb, "_installed", lambda module: False)
    with pytest.raises(emb.EmbeddingTableError, match=r"pip install 'ish_tf\[expression\]'"):
        emb.read_embedding_table(path)
    with pytest.raises(emb.EmbeddingTableError, match=r"pip install 'ish_tf\[parquet\]'"):
        emb.write_embedding_table(str(tmp_path / "t.parquet"), _lab_table())


def test_bin_evaluate_reads_parquet_and_h5ad(tmp_path, capsys):
    pytest.importorskip("anndata")
    pytest.importorskip("pyarrow")
    from ish_tf import cli

    rng = np.random.default_rng(0)
    keys = pd.DataFrame({"image_id": range(12), "gene_symbol": np.repeat(list("ABC"), 4),
                         "donor_id": ["d1", "d2"] * 6, "split": "test", "lab_column": 7.0})
    t = emb.EmbeddingTable(keys, (rng.standard_normal((12, 5)) +
                                  np.repeat(np.eye(3, 5) * 4, 4, axis=0)).astype(np.float32))
    rows = []
    for ext in ("csv", "parquet", "h5ad"):
        path = str(tmp_path / f"image_embeddings.{ext}")
        emb.write_embedding_table(path, t)
        assert cli.invoke("evaluate", ["--task=reid", f"--embedding={ext}={path}",
                                       f"--out={tmp_path / ext}", "--noreport"]) == 0, \
            capsys.readouterr().err
        rows.append(pd.read_csv(tmp_path / ext / "reid.csv").drop(columns="embedding"))
    pd.testing.assert_frame_equal(rows[0], rows[1])
    pd.testing.assert_frame_equal(rows[0], rows[2])
