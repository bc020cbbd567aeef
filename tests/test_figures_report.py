"""Tests of the evaluation figures and the HTML report."""

from __future__ import annotations

import datetime
import io
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data.embeddings import EmbeddingTable
from ish_tf.evaluate import figures, report
from ish_tf.evaluate.reid import evaluate_reid


def _png_ok(path: str) -> tuple[int, int]:
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# --------------------------------------------------------------------------- figures
def _clusters(n_per: int = 15, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 10)) * 4
    labels = np.repeat(["laminar", "sparse", "widespread"], n_per)
    values = centres[np.repeat(np.arange(3), n_per)] + rng.normal(size=(3 * n_per, 10))
    return values, pd.Series(labels, name="pattern")


@pytest.mark.parametrize("method, name", [("pca", "PCA"), ("tsne", "t-SNE")])
def test_embedding_map_writes_png_and_names_method(tmp_path, monkeypatch, method, name):
    monkeypatch.setattr(figures, "TSNE_MAX_ITER", 250)  # the minimum: keeps the test fast
    values, labels = _clusters()
    path = str(tmp_path / f"map_{method}.png")
    caption = figures.plot_embedding_map(values, labels, "Genes", path, method=method)
    _png_ok(path)
    assert name in caption and "pattern" in caption and "45 embeddings" in caption


def test_embedding_map_auto_and_many_categories(tmp_path, monkeypatch):
    monkeypatch.setattr(figures.importlib.util, "find_spec", lambda name: None)  # no umap
    monkeypatch.setattr(figures, "TSNE_MAX_ITER", 250)
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 5))
    labels = pd.Series([f"c{i % 20}" for i in range(38)] + [None, None], name="marker")
    path = str(tmp_path / "auto.png")
    caption = figures.plot_embedding_map(values, labels, "Markers", path)
    _png_ok(path)
    assert "t-SNE" in caption and "pooled as 'other'" in caption
    monkeypatch.setattr(figures, "TSNE_MAX_POINTS", 10)
    assert "PCA" in figures.plot_embedding_map(values, labels, "Markers", path)
    numeric = pd.Series(np.linspace(0, 1, 40), name="level")
    assert "colour scale" in figures.plot_embedding_map(values, numeric, "L", path, "pca")
    with pytest.raises(figures.FigureError, match="labels"):
        figures.plot_embedding_map(values, labels[:5], "x", path)
    with pytest.raises(figures.FigureError, match="method"):
        figures.plot_embedding_map(values, labels, "x", path, method="mds")


def test_auc_bars(tmp_path):
    results = pd.DataFrame({
        "annotation": ["pattern"] * 4 + ["level"] * 2,
        "category": ["laminar", "laminar", "sparse", "sparse", "high", "high"],
        "embedding": ["triplet", "random"] * 3,
        "auc": [0.8, 0.5, 0.7, 0.52, 0.66, 0.49],
    })
    path = str(tmp_path / "auc.png")
    caption = figures.plot_auc_bars(results, path)
    _png_ok(path)
    # Panels and caption use the categories' human labels, not the raw column names.
    assert "Expression pattern, Expression level in V1 (- to +++++)" in caption
    assert "triplet, random" in caption
    with pytest.raises(figures.FigureError, match="'auc'"):
        figures.plot_auc_bars(results.drop(columns="auc"), path)


def test_reid_bars(tmp_path):
    rng = np.random.default_rng(2)
    genes = rng.integers(0, 10, 120)
    donors = rng.integers(0, 4, 120)
    good = np.eye(10)[genes] + 0.3 * rng.normal(size=(120, 10))
    df = pd.concat([evaluate_reid(good, genes, donors).assign(embedding="triplet"),
                    evaluate_reid(rng.normal(size=(120, 10)), genes, donors)
                    .assign(embedding="random")])
    path = str(tmp_path / "reid.png")
    caption = figures.plot_reid_bars(df, path)
    _png_ok(path)
    assert "chance" in caption and "triplet, random" in caption
    assert "answerable" in figures.plot_reid_bars(df, path, column="rank1_answerable")
    with pytest.raises(figures.FigureError, match="column"):
        figures.plot_reid_bars(df, path, column="map")


def _write_records(out_dir: str):
    """Two genes; gene A has 6 patches whose grey level rises with dimension 0."""
    from ish_tf.data import records, shards

    rng = np.random.default_rng(3)
    rows, encoded = [], {}
    with shards.ShardWriter(out_dir, "test", 0, 1) as w:
        for gene, n_img in (("A", 3), ("B", 2)):
            for image_id in range(n_img):
                image_id += 100 if gene == "B" else 0
                for p in range(2):
                    level = int(rng.integers(0, 256))
                    buf = io.BytesIO()
                    Image.new("RGB", (16, 16), (level, level, 255 - level)).save(buf, "PNG")
                    data = buf.getvalue()
                    w.write(records.make_example(
                        image_encoded=data, image_height=16, image_width=16, image_id=image_id,
                        patch_index=p, gene_symbol=gene, gene_index=0 if gene == "A" else 1),
                        gene, image_id)
                    encoded[(image_id, p)] = data
                    rows.append((image_id, p, gene, level / 255.0))
    shards.update_index(out_dir, w.info)
    keys = pd.DataFrame(rows, columns=["image_id", "patch_index", "gene_symbol", "level"])
    values = np.stack([keys["level"], rng.normal(size=len(keys))], axis=1).astype(np.float32)
    return EmbeddingTable(keys.drop(columns="level"), values, "patches.csv"), encoded


def test_extreme_patches_reads_back_records(tmp_path):
    out = str(tmp_path / "records")
    table, encoded = _write_records(out)
    wanted = {(0, 1), (2, 0)}
    assert figures.read_patches(out, "A", wanted) == {k: encoded[k] for k in wanted}
    path = str(tmp_path / "extreme.png")
    caption = figures.plot_extreme_patches(out, table, "A", 0, path, k=2)
    _png_ok(path)
    assert "dimension 0" in caption and "A (6 in the table)" in caption
    assert "not found" not in caption
    with pytest.raises(figures.FigureError, match="no patch of gene 'Z'"):
        figures.plot_extreme_patches(out, table, "Z", 0, path)
    with pytest.raises(figures.FigureError, match="dim 5 out of range"):
        figures.plot_extreme_patches(out, table, "A", 5, path)


# --------------------------------------------------------------------------- report
def test_report_is_self_contained_and_complete(tmp_path):
    fig_path = str(tmp_path / "bars.png")
    caption = figures.plot_auc_bars(pd.DataFrame({
        "annotation": ["pattern"], "category": ["laminar"], "embedding": ["triplet"],
        "auc": [0.75]}), fig_path)
    table = pd.DataFrame({"candidates": ["other_donor"], "rank1": [0.38312345],
                          "n_queries": [23258]})
    sections = [
        report.Section("Re-identification", text="Rank-1 <b>across</b> donors.\n\nSecond & last.",
                       tables=[("rank-1", table)], figures=[(caption, fig_path)],
                       settings={"metric": "euclidean", "block_size": 1024}),
        report.Section("Annotations <AUC>", text="x < y",
                       figures=[("gone", str(tmp_path / "missing.png"))],
                       settings={"genes": ["A", "B"]}),
    ]
    path = report.write_report(str(tmp_path / "out"), sections,
                               inputs={"embeddings": "triplet.csv"})
    assert path == str(tmp_path / "out" / "report.html")
    text = open(path, encoding="utf-8").read()
    assert "Re-identification" in text and "Annotations &lt;AUC&gt;" in text
    assert "Rank-1 &lt;b&gt;across&lt;/b&gt; donors." in text and "<b>" not in text
    assert "x &lt; y" in text and "Second &amp; last." in text
    assert "0.3831" in text and "23258" in text and "other_donor" in text
    assert text.count("data:image/png;base64,") == 1
    assert "Figure not available" in text and "missing.png" in text
    assert "Inputs and settings" in text and "triplet.csv" in text
    assert "euclidean" in text and "[&quot;A&quot;, &quot;B&quot;]" in text
    from ish_tf import __version__
    assert f"ish_tf {__version__}" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<link" not in text and "<script" not in text
    assert not [f for f in os.listdir(tmp_path / "out") if f != "report.html"]  # no temp left


def test_render_report_dates_and_empty_sections():
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    text = report.render_report([report.Section("Empty")], title="T & <U>", now=when)
    assert "<title>T &amp; &lt;U&gt;</title>" in text
    assert "2026-01-02T03:04:05+00:00" in text and "(none)" in text
