"""Expression matrices in (`ish_tf.data.expression`): CSV/TSV and .h5ad, preprocessing
fitted on the training split, stratified and held-out-label splits, clear errors, and
the real pbmc68k file ingested and trained on with the `cic` family."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest

from ish_tf.data.expression import (
    ExpressionError,
    ExpressionIngestConfig,
    Preprocessing,
    ingest_expression,
    read_expression,
    split_profiles,
)
from ish_tf.data.synthetic_expression import ExpressionSynthConfig, synthetic_profiles

_SYNTH = ExpressionSynthConfig(n_cells=120, n_genes=60, n_types=3, n_batches=2,
                               genes_per_program=10, seed=1)


def _synthetic_frame() -> tuple[pd.DataFrame, pd.DataFrame]:
    counts, obs, genes = synthetic_profiles(_SYNTH)
    return pd.DataFrame(counts, index=obs.index, columns=genes), obs


def _records_vectors(records_dir: str, split: str) -> tuple[np.ndarray, list[str]]:
    import tensorflow as tf

    from ish_tf.data import records
    from ish_tf.data.pipeline import list_shards

    vectors, ids = [], []
    for f in list_shards(records_dir, split):
        for raw in tf.data.TFRecordDataset(f):
            feats = records.parse_example(raw, kind="vector")
            vectors.append(records.decode_vector(feats).numpy())
            ids.append(int(feats["image_id"].numpy()))
    order = np.argsort(ids)
    return np.stack(vectors)[order], [ids[i] for i in order]


def test_csv_samples_by_genes_with_label_columns(tmp_path):
    frame, obs = _synthetic_frame()
    path = tmp_path / "counts.csv"
    frame.join(obs).to_csv(path)
    out = tmp_path / "out"
    result = ingest_expression(ExpressionIngestConfig(
        path=str(path), out=str(out), label_column="cell_type", group_column="batch",
        n_genes=20, seed=0))
    prep = result.preprocessing
    assert prep.counts_detected and prep.normalize == "log1p"
    assert result.n_genes_in == 60 and result.n_genes == 20
    assert result.split_counts == {"train": 84, "validation": 12, "test": 24}
    profiles = pd.read_csv(out / "profiles.csv")
    assert list(profiles.columns[:5]) == ["image_id", "sample_id", "split", "label", "group"]
    assert {"cell_type", "batch"} <= set(profiles.columns)
    # Stratified: every type in every split, in proportion.
    per = profiles.groupby(["label", "split"]).size().unstack()
    assert (per["test"] == 8).all() and (per["validation"] == 4).all()

    # Genes: the top-variance ones of the TRAINING split, standardised with its statistics.
    train = profiles["split"].to_numpy() == "train"
    x = frame.to_numpy(float)
    logged = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    var = logged[train].var(0)
    want = sorted(np.argsort(-var, kind="stable")[:20])
    genes = pd.read_csv(out / "genes.csv")
    assert list(genes["gene"]) == [frame.columns[i] for i in want]
    np.testing.assert_allclose(genes["mean"], logged[train][:, want].mean(0), rtol=1e-6)
    vectors, ids = _records_vectors(result.records_dir, "train")
    assert ids == list(np.flatnonzero(train))
    np.testing.assert_allclose(vectors.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(vectors.std(0), 1, atol=1e-4)

    # Replayable: the recorded preprocessing on the test profiles gives their records.
    loaded = Preprocessing.load(str(out))
    test_rows = np.flatnonzero(profiles["split"].to_numpy() == "test")
    replay, missing = loaded.transform(x[test_rows], list(frame.columns))
    assert not missing
    np.testing.assert_allclose(_records_vectors(result.records_dir, "test")[0], replay, atol=1e-5)
    # Genes absent from new data are filled with the training mean (0 once standardised).
    dropped = [g for g in frame.columns if g != loaded.genes[0]]
    partial, missing = loaded.transform(frame[dropped].to_numpy()[test_rows], dropped)
    assert missing == [loaded.genes[0]] and np.all(partial[:, 0] == 0)


def test_tsv_gz_genes_by_samples_with_obs_file(tmp_path):
    frame, obs = _synthetic_frame()
    path = tmp_path / "matrix.tsv.gz"
    with gzip.open(path, "wt") as f:
        frame.T.to_csv(f, sep="\t")
    obs_path = tmp_path / "obs.csv"
    obs.to_csv(obs_path)
    table = read_expression(str(path), obs_path=str(obs_path))
    assert table.samples == list(obs.index) and table.genes == list(frame.columns)
    np.testing.assert_array_equal(table.matrix, frame.to_numpy())
    assert list(table.obs["cell_type"]) == list(obs["cell_type"])
    # Without the obs file the shape decides (more samples than genes here: wrong), so
    # the orientation can be given.
    forced = read_expression(str(path), orientation="genes_x_samples")
    assert forced.samples == list(obs.index)
    guessed = read_expression(str(path))
    assert guessed.samples == list(frame.columns)


def test_h5ad_dense_sparse_layer_raw(tmp_path):
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    frame, obs = _synthetic_frame()
    counts = frame.to_numpy().astype(np.float32)
    logged = np.log1p(counts).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs.copy(),
                            var=pd.DataFrame(index=frame.columns))
    adata.layers["logged"] = logged
    adata.raw = adata.copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    table = read_expression(str(path))
    assert table.genes == list(frame.columns) and hasattr(table.matrix, "tocsr")
    np.testing.assert_array_equal(table.matrix.toarray(), counts)
    assert read_expression(str(path), use_raw=True).matrix.shape == counts.shape
    np.testing.assert_array_equal(read_expression(str(path), layer="logged").matrix, logged)
    with pytest.raises(ExpressionError, match="no layer 'nope'"):
        read_expression(str(path), layer="nope")

    out = tmp_path / "out"
    result = ingest_expression(ExpressionIngestConfig(
        path=str(path), out=str(out), label_column="cell_type", split_by="label",
        holdout_labels=("type2",), n_genes=1000))
    assert result.n_genes <= 60 and result.preprocessing.normalize == "log1p"
    profiles = pd.read_csv(out / "profiles.csv")
    assert set(profiles.loc[profiles["split"] == "test", "label"]) == {"type2"}
    assert "type2" not in set(profiles.loc[profiles["split"] != "test", "label"])
    # A layer of log values is not counts: used as they are.
    logged_run = ingest_expression(ExpressionIngestConfig(
        path=str(path), out=str(tmp_path / "out2"), label_column="cell_type", layer="logged"))
    assert logged_run.preprocessing.normalize == "none"
    assert not logged_run.preprocessing.counts_detected


def test_split_profiles_stratified_and_deterministic():
    labels = ["a"] * 10 + ["b"] * 20 + ["c"] * 1
    s = split_profiles(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(s, split_profiles(labels, val_fraction=0.1,
                                                    test_fraction=0.2, seed=3))
    assert list(s[:10]).count("test") == 2 and list(s[10:30]).count("test") == 4
    assert s[30] == "train"  # a label with one profile keeps it for training
    held = split_profiles(labels, split_by="label", test_fraction=0.3, seed=0)
    test_labels = {labels[i] for i in np.flatnonzero(held == "test")}
    assert len(test_labels) == 1
    assert not test_labels & {labels[i] for i in np.flatnonzero(held != "test")}


@pytest.mark.parametrize("content, match", [
    ("id,g1,g1\ns1,1,2\ns2,3,4\n", "duplicate gene names.*'g1'"),
    ("id,g1,g2\ns1,1,2\ns1,3,4\n", "duplicate sample names.*'s1'"),
    ("id,g1,g2\ns1,1,x\ns2,3,4\n", "non-numeric values in column 'g2'.*'x'"),
    ("gene,s1,s2,s3\ng1,1,2,3\ng2,3,oops,4\n", "non-numeric values in column 's2'.*'oops' in row 'g2'"),
    ("id,g1,g2\ns1,1,\ns2,3,4\n", "NaN .*sample 's1', gene 'g2'"),
])
def test_bad_tables_name_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ExpressionError, match=match) as e:
        read_expression(str(path), orientation="genes_x_samples" if content.startswith("gene")
                        else "samples_x_genes")
    assert str(path) in str(e.value)


def test_missing_label_column_and_empty_selection(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"g1": [1, 2, 3, 4], "g2": [5, 5, 5, 5], "type": list("aabb")},
                 index=pd.Index(list("pqrs"), name="id")).to_csv(path)
    with pytest.raises(ExpressionError, match="no label or group column 'cell_type'; columns: .'g1', 'g2', 'type'."):
        ingest_expression(ExpressionIngestConfig(path=str(path), out=str(tmp_path / "o"),
                                                 label_column="cell_type"))
    flat = tmp_path / "flat.csv"
    pd.DataFrame({"g1": [2, 2, 2, 2], "type": list("aabb")},
                 index=pd.Index(list("pqrs"), name="id")).to_csv(flat)
    with pytest.raises(ExpressionError, match="empty gene selection"):
        ingest_expression(ExpressionIngestConfig(path=str(flat), out=str(tmp_path / "o2"),
                                                 label_column="type", normalize="none",
                                                 val_fraction=0, test_fraction=0))


def test_pbmc68k_ingests_and_cic_trains(tmp_path):
    """The real file (700 blood cells, 765 genes, 10 types): ingest, then a few steps of
    the cic autoencoder on its records lower the reconstruction loss."""
    pytest.importorskip("anndata")
    from conftest import shared_data_path

    from ish_tf.families import ModelConfig, make_task
    from ish_tf.families.cic.config import CicConfig
    from ish_tf.train import TrainConfig
    from ish_tf.train.trainer import train

    path = shared_data_path("expression", "pbmc68k_reduced.h5ad")
    out = tmp_path / "pbmc"
    result = ingest_expression(ExpressionIngestConfig(
        path=path, out=str(out), label_column="bulk_labels", group_column="phase",
        n_genes=1000, seed=0))
    assert result.n_profiles == 700 and result.n_genes == 765  # capped at the genes there
    assert len(result.labels) == 10
    assert sum(result.split_counts.values()) == 700 and result.split_counts["test"] > 100

    model_config = ModelConfig("cic", seed=0, family=CicConfig(hidden=(128,), code_size=16,
                                                               batch_size=32))
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), records_dir=result.records_dir, steps=150,
                      decay_start=150, checkpoint_every=150, log_every=1, image_summaries=False,
                      learning_rate=3e-3, seed=0, strategy="default")
    run = train(make_task(model_config, cfg), cfg)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    first, last = float(metrics["loss"].iloc[0]), float(metrics["loss"].iloc[-10:].mean())
    print(f"pbmc68k cic: loss {first:.4f} at step 1 -> {last:.4f} (mean of the last 10 of "
          f"{run.step} steps)")
    assert run.step == 150 and last < 0.8 * first
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert saved["config"]["family"]["dim"] == 765
    assert len(saved["config"]["family"]["classes"]) == 10
    assert os.path.exists(run.model_path)


def test_bin_synth_expression_then_bin_ingest(tmp_path, capsys):
    """bin/synth --modality=expression writes counts + obs that bin/ingest --expression
    turns into records; a missing label column exits 1 naming it."""
    from ish_tf import cli
    from ish_tf.data import shards

    synth = tmp_path / "synth"
    assert cli.invoke("synth", ["--modality=expression", f"--out={synth}", "--n_genes=80",
                                "--synth_cells=90", "--synth_cell_types=3", "--seed=2"]) == 0
    counts = pd.read_csv(synth / "counts.csv", index_col=0)
    assert counts.shape == (90, 80)
    out = tmp_path / "ingested"
    argv = [f"--expression={synth / 'counts.csv'}", f"--obs={synth / 'obs.csv'}",
            "--label_column=cell_type", "--group_column=batch", "--n_genes=40", f"--out={out}"]
    assert cli.invoke("ingest", argv) == 0
    printed = capsys.readouterr().out
    assert "90 profiles x 80 genes, 3 label(s); counts, log1p-normalised; 40" in printed
    spec = shards.records_input_spec(str(out / "records"))
    assert spec.kind == "vector" and spec.dim == 40
    assert (out / "ingest_flags.cfg").exists() and (out / "genes.csv").exists()
    assert cli.invoke("ingest", [*argv[:2], "--label_column=kind", f"--out={tmp_path / 'x'}"]) == 1
    assert "no label column 'kind'" in capsys.readouterr().err
