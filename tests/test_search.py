"""Tests of ish_tf.export.search: the nearest-gene `search` signatures and bin/search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ish_tf import cli  # noqa: E402
from ish_tf.evaluate.reid import _Scores  # noqa: E402
from ish_tf.export import saved_model as sm  # noqa: E402
from ish_tf.export import search  # noqa: E402
from ish_tf.models.backbones import CaffePreprocess  # noqa: E402

S, D, N_GENES = 16, 6, 40


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((S, S, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(D, name="dense")(x)
    return keras.Model(inputs, x, name="tiny_triplet")


def _images(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [tf.io.encode_png(rng.integers(0, 256, (S, S, 3)).astype(np.uint8)).numpy()
            for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run dir (cityblock training metric), a gene table near the queries, one export."""
    root = tmp_path_factory.mktemp("search")
    model = _tiny_model()
    run = root / "run"
    run.mkdir()
    model.save(str(run / "model.keras"))
    (run / "model_config.json").write_text(json.dumps(
        {"builder": "triplet", "config": {"model": "triplet", "input_size": S,
                                          "family": {"metric": "cityblock"}}}))
    queries = _images(5, 1)
    for i, data in enumerate(queries):
        (root / f"q{i}.png").write_bytes(data)
    emb = model(tf.stack([tf.cast(tf.io.decode_png(q), tf.float32) for q in queries]),
                training=False).numpy()
    rng = np.random.default_rng(0)
    spread = np.abs(emb).mean() + 1e-3
    # Genes around the queries' embeddings (and far ones), so neighbours are not arbitrary.
    values = np.concatenate([emb[rng.integers(0, 5, N_GENES // 2)]
                             + rng.normal(0, spread, (N_GENES // 2, D)),
                             rng.normal(0, 3 * spread, (N_GENES // 2, D))]).astype(np.float32)
    table = pd.DataFrame(values, columns=[str(i) for i in range(D)])
    table.insert(0, "gene_symbol", [f"G{i:02d}" for i in range(N_GENES)])
    table.to_csv(root / "gene_embeddings.csv", index=False)
    base = root / "export"
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={base}",
                                 f"--search_index={root / 'gene_embeddings.csv'}"]) == 0
    return {"root": root, "model": model, "values": values, "emb": emb, "run": run,
            "path": os.path.join(base, "1")}


def _reid_nearest(index_values, queries, metric):
    """Nearest index row of each query by the rank-1 code's scores (ish_tf.evaluate.reid)."""
    x = np.concatenate([index_values, queries])
    n = len(index_values)
    scores = _Scores(x, metric).block(n, len(x))[:, :n]
    return np.argmin(scores, axis=1)


def test_search_in_a_fresh_process_agrees_with_reid(setup):
    root, path = setup["root"], setup["path"]
    meta = sm.read_metadata(path)
    assert meta["search"]["index"] == {"source": str(root / "gene_embeddings.csv"),
                                       "level": "gene", "metric": "cityblock",
                                       "size": N_GENES, "dim": D}
    script = textwrap.dedent(f"""
        import sys, json, numpy as np, tensorflow as tf
        m = tf.saved_model.load({path!r})
        assert "ish_tf" not in sys.modules
        data = [open({str(root)!r} + f"/q{{i}}.png", "rb").read() for i in range(5)]
        out = m.signatures["search"](image_bytes=tf.constant(data), k=tf.constant(4))
        emb = np.load({str(root / "emb.npy")!r})
        out2 = m.signatures["search_embedding"](embedding=tf.constant(emb), k=tf.constant(99))
        json.dump({{"genes": out["genes"].numpy().astype(str).tolist(),
                    "dist": out["distances"].numpy().tolist(),
                    "idx": out["indices"].numpy().tolist(),
                    "emb": out["embedding"].numpy().tolist(),
                    "idx2": out2["indices"].numpy().tolist()}},
                  open({str(root / "served.json")!r}, "w"))
    """)
    np.save(root / "emb.npy", setup["emb"])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(root), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads((root / "served.json").read_text())
    idx = np.array(served["idx"])
    assert idx.shape == (5, 4)
    np.testing.assert_allclose(served["emb"], setup["emb"], atol=1e-4)
    # Rank 1 is the rank-1 code's nearest neighbour under the training metric (cityblock).
    np.testing.assert_array_equal(idx[:, 0], _reid_nearest(setup["values"], setup["emb"],
                                                           "cityblock"))
    ref_d, ref_i = search.numpy_search(setup["emb"], setup["values"], 4, "cityblock")
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(served["dist"], ref_d, rtol=1e-4, atol=1e-5)
    assert [g for g in np.array(served["genes"])[:, 0]] == [f"G{i:02d}" for i in idx[:, 0]]
    # k beyond the index is clipped to its size; the order is the full ranking.
    assert np.array(served["idx2"]).shape == (5, N_GENES)
    # Not a degenerate set-up: the queries do not all find the same gene.
    assert len(set(idx[:, 0])) > 1


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_metrics_match_numpy_and_reid(metric):
    rng = np.random.default_rng(1)
    values = rng.normal(5, 1, (60, 8)).astype(np.float32)  # a shared offset: centring matters
    queries = rng.normal(5, 1, (7, 8)).astype(np.float32)
    index = search.SearchIndex(values, [f"g{i}" for i in range(60)],
                               [f"g{i}" for i in range(60)], metric=metric)
    module = search._tf_module(index)
    out = search._top_k(module, tf.constant(queries), 5, metric)
    ref_d, ref_i = search.numpy_search(queries, values, 5, metric)
    np.testing.assert_array_equal(out["indices"].numpy(), ref_i)
    np.testing.assert_allclose(out["distances"].numpy(), ref_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["indices"].numpy()[:, 0],
                                  _reid_nearest(values, queries, metric))
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 1"):
        search._top_k(module, tf.constant(queries), 0, metric)


def test_bin_search_prints_the_table(setup, capsys):
    root = setup["root"]
    out_csv = root / "hits.csv"
    assert cli.invoke("search", [f"--saved_model={root / 'export'}",
                                 f"--images={root}/q*.png", "--k=2", f"--out={out_csv}"]) == 0
    text = capsys.readouterr().out
    hits = pd.read_csv(out_csv)
    assert len(hits) == 10 and list(hits["rank"][:2]) == [1, 2]
    ref = _reid_nearest(setup["values"], setup["emb"], "cityblock")
    assert list(hits[hits["rank"] == 1]["gene"]) == [f"G{i:02d}" for i in ref]
    assert f"q0.png     1  G{ref[0]:02d}" in text
    # Errors name what is wrong.
    assert cli.invoke("search", [f"--saved_model={root / 'export'}",
                                 f"--images={root}/missing.png"]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err


def test_index_errors(tmp_path, setup):
    dup = pd.DataFrame({"gene_symbol": ["A", "B", "A"], "0": [1.0, 2.0, 3.0]})
    dup.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(search.SearchIndexError, match="gene A on data rows 1, 3"):
        search.read_search_index(str(tmp_path / "dup.csv"))
    narrow = pd.DataFrame({"gene_symbol": ["A", "B"], "0": [1.0, 2.0]})
    narrow.to_csv(tmp_path / "narrow.csv", index=False)
    assert cli.invoke("export", [f"--model_dir={setup['run']}",
                                 f"--export_dir={tmp_path / 'e'}",
                                 f"--search_index={tmp_path / 'narrow.csv'}"]) == 1
    images = pd.DataFrame({"image_id": [7, 8], "gene_symbol": ["A", "A"], "0": [1.0, 2.0]})
    index = search.index_from_table(
        __import__("ish_tf.data.embeddings", fromlist=["from_frame"]).from_frame(images))
    assert index.level == "image" and list(index.ids) == ["7", "8"]
    assert search.training_metric({"config": {"family": {"metric": "sqeuclidean"}}}) == \
        "sqeuclidean"
    assert search.training_metric(None) == "euclidean"
