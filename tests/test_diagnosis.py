"""Diagnosis prediction on synthetic donors whose answer is known."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ish_tf.data.embeddings import EmbeddingTable, EmbeddingTableError
from ish_tf.evaluate import diagnosis as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DONORS = 50


def _manifest(seed: int = 0) -> pd.DataFrame:
    """Donors d00..d49 (even = schizophrenia); SIG and NOISE assayed in all, FEW in 20."""
    rng = np.random.default_rng(seed)
    donors = [f"d{i:02d}" for i in range(N_DONORS)]
    info = pd.DataFrame({
        "donor_id": donors,
        "diagnosis": ["schizophrenia" if i % 2 == 0 else "control" for i in range(N_DONORS)],
        "donor_age": rng.uniform(20, 80, N_DONORS).round(1),
        "donor_sex": rng.choice(["M", "F"], N_DONORS),
        "smoker": rng.choice(["yes", "no", None], N_DONORS),
        "pmi": rng.uniform(5, 40, N_DONORS),
        "tissue_ph": np.nan,
        "donor_race": "white",
    })
    rows, image_id = [], 1
    for gene, n in (("SIG", N_DONORS), ("NOISE", N_DONORS), ("FEW", 20)):
        for d in donors[:n]:
            for _ in range(2):  # two images per (gene, donor)
                rows.append({"image_id": image_id, "experiment_id": image_id, "study": "synthetic",
                             "gene_symbol": gene, "donor_id": d, "width": 10, "height": 10,
                             "path": f"images/{image_id}.jpg"})
                image_id += 1
    return pd.DataFrame(rows).merge(info, on="donor_id")


def _image_table(manifest: pd.DataFrame, seed: int = 1) -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(manifest), 6)).astype(np.float32)
    sz = (manifest["diagnosis"] == "schizophrenia").to_numpy()
    sig = (manifest["gene_symbol"] == "SIG").to_numpy()
    x[sig, 0] += np.where(sz[sig], 3.0, -3.0)  # only SIG carries the diagnosis
    return EmbeddingTable(manifest[["image_id"]].reset_index(drop=True), x, "images.csv")


def test_signal_gene_wins_noise_gene_is_chance_and_small_gene_skipped():
    m = _manifest()
    labels = D.donor_labels(m)
    assert labels.sum() == 25 and len(labels) == N_DONORS
    demo = D.donor_demographics(m, D.DEMOGRAPHICS)
    assert "donor_age" in demo.columns and "donor_sex_M" in demo.columns
    assert "tissue_ph" not in demo.columns  # entirely empty: left out
    donor_table = D.donor_level_table(_image_table(m), m)
    assert len(donor_table) == 2 * N_DONORS + 20
    per_gene, skipped = D.predict_diagnosis(donor_table, labels, demo,
                                          D.DiagnosisConfig(max_iter=200, n_jobs=2))
    assert list(per_gene["gene_symbol"]) == ["SIG", "NOISE"]  # sorted by embedding AUC
    sig = per_gene.set_index("gene_symbol").loc["SIG"]
    noise = per_gene.set_index("gene_symbol").loc["NOISE"]
    assert sig["auc_embedding"] > 0.95 and sig["auc_combined"] > 0.8
    assert noise["auc_embedding"] < 0.8
    for col in ("auc_demographics", "auc_random"):
        assert per_gene[col].between(0.1, 0.9).all(), per_gene[col]
    assert skipped.set_index("gene_symbol").loc["FEW", "reason"].startswith("20 labelled donors")
    summary = D.summarize_diagnosis(per_gene)
    assert list(summary["features"]) == list(D.FEATURE_SETS)


def test_labels_from_any_column_and_clear_errors():
    m = _manifest()
    sex = D.donor_labels(m, "donor_sex", positive="m", negative="")
    assert set(sex.unique()) <= {0, 1} and len(sex) == N_DONORS
    with pytest.raises(D.DiagnosisError, match="no column 'disease'"):
        D.donor_labels(m, "disease")
    with pytest.raises(D.DiagnosisError, match=r"diagnosis='bipolar'.*\['control', 'schizophrenia'\]"):
        D.donor_labels(m, positive="bipolar")
    bad = m.copy()
    bad.loc[bad.index[0], "diagnosis"] = "control"  # d00 is schizophrenia elsewhere
    with pytest.raises(D.DiagnosisError, match="donor d00 has conflicting 'diagnosis'"):
        D.donor_labels(bad, source="manifest.csv")


def test_donor_level_table_needs_keys():
    t = EmbeddingTable(pd.DataFrame({"x": [1]}), np.ones((1, 2), np.float32), "e.csv")
    with pytest.raises(EmbeddingTableError, match="e.csv: needs gene_symbol and donor_id"):
        D.donor_level_table(t)


def test_bin_evaluate_diagnosis(tmp_path):
    from ish_tf.data.manifest import write_manifest

    m = _manifest()
    man_path = str(tmp_path / "manifest.csv")
    write_manifest(m, man_path)
    t = _image_table(m)
    frame = t.to_frame()
    # gene_symbol and donor_id keys too, so the same table serves re-identification.
    frame.insert(1, "gene_symbol", m["gene_symbol"].to_numpy())
    frame.insert(2, "donor_id", m["donor_id"].to_numpy())
    emb_path = str(tmp_path / "images.csv")
    frame.to_csv(emb_path, index=False)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ish_tf.cli.evaluate", "--task=diagnosis,reid",
         f"--manifest={man_path}", f"--embedding={emb_path}", f"--out={out}", "--top_genes=1",
         "--n_jobs=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reid = pd.read_csv(out / "reid.csv")
    assert set(reid["candidates"]) >= {"other_donor"} and (reid["embedding"] == "images").all()
    html = (out / "report.html").read_text()
    assert "Diagnosis prediction" in html and "Gene re-identification" in html
    per_gene = pd.read_csv(out / "diagnosis.csv")
    assert list(per_gene["gene_symbol"]) == ["SIG", "NOISE"]
    assert (per_gene["embedding"] == "images").all()
    top = pd.read_csv(out / "diagnosis_top.csv")
    assert list(top["gene_symbol"]) == ["SIG"]
    assert "diagnosis: images: mean AUC" in proc.stdout
