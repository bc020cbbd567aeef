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
