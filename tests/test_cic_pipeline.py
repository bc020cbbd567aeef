"""Cell identity codes after training: `bin/embed --expression` (genes aligned by name,
.h5ad out), codes of vector records as .h5ad, `bin/evaluate --task=expression`, and the
`bin/quickstart --family=cic` recipe. One tiny synthetic pipeline (120 profiles x 60
genes, 3 types; 16 -> 4 autoencoder, 30 steps) is shared by the module."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest

from ish_tf import cli

pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """synth -> ingest -> train cic_classifier -> export, through the commands (its export
    gives code and reconstruction as the cic one does, plus probabilities)."""
    root = tmp_path_factory.mktemp("cic")
    data, profiles = root / "data", root / "profiles"
    assert cli.invoke("synth", ["--modality=expression", f"--out={data}", "--n_genes=60",
                                "--synth_cells=120", "--synth_cell_types=3", "--seed=1"]) == 0
    assert cli.invoke("ingest", [f"--expression={data / 'counts.csv'}",
                                 f"--obs={data / 'obs.csv'}", "--label_column=cell_type",
                                 "--group_column=batch", "--n_genes=40",
                                 f"--out={profiles}"]) == 0
    tiny = ["--cic_hidden=16", "--cic_code_size=4", "--cic_batch_size=16", "--steps=30",
            "--decay_start=20", "--checkpoint_every=30", "--log_every=10",
            "--learning_rate=3e-3", "--noimage_summaries", "--strategy=default"]
    assert cli.invoke("train", ["--model=cic_classifier", f"--records_dir={profiles / 'records'}",
                                f"--run_dir={root / 'runs' / 'cic'}", *tiny]) == 0
    assert cli.invoke("export", [f"--model_dir={root / 'runs' / 'cic'}",
                                 f"--export_dir={root / 'export' / 'cic'}"]) == 0
    return root


def test_embed_expression_aligns_genes_by_name(pipeline, tmp_path, capsys):
    """Columns shuffled and an extra gene give the same codes; missing genes are filled with
    the training mean and counted in a warning; the .h5ad keeps every obs column."""
    import anndata

    counts = pd.read_csv(pipeline / "data" / "counts.csv", index_col=0).iloc[:10]
    obs = pd.read_csv(pipeline / "data" / "obs.csv", index_col=0).iloc[:10]
    genes = pd.read_csv(pipeline / "profiles" / "genes.csv")["gene"].tolist()
    shuffled = counts[counts.columns[::-1]].copy()
    shuffled["extra_gene"] = 0  # dropped; 0 keeps each profile's total (normalisation)
    shuffled.to_csv(tmp_path / "shuffled.csv")
    counts.to_csv(tmp_path / "plain.csv")
    obs.to_csv(tmp_path / "obs.csv")
    model = str(pipeline / "export" / "cic")
    for name, extra in (("plain", []), ("shuffled", ["--table_format=parquet"])):
        assert cli.invoke("embed", [f"--saved_model={model}", f"--obs={tmp_path / 'obs.csv'}",
                                    f"--expression={tmp_path / (name + '.csv')}",
                                    f"--out={tmp_path / name}", *extra]) == 0
    plain = pd.read_csv(tmp_path / "plain" / "codes.csv")
    shuffled_codes = pd.read_parquet(tmp_path / "shuffled" / "codes.parquet")
    code_cols = [f"code_{i}" for i in range(4)]
    assert list(plain.columns) == ["sample_id", "cell_type", "batch", *code_cols]
    np.testing.assert_allclose(plain[code_cols], shuffled_codes[code_cols], atol=1e-5)
    summary = json.loads((tmp_path / "shuffled" / "embed_summary.json").read_text())
    assert (summary["genes_missing"], summary["genes_dropped"]) == (0, 21)  # 20 unselected + 1
    adata = anndata.read_h5ad(tmp_path / "plain" / "codes.h5ad")
    assert adata.obsm["X_cic"].shape == (10, 4) and adata.shape == (10, 40)
    assert list(adata.obs.columns) == ["cell_type", "batch"]
    assert list(adata.var_names) == genes
    np.testing.assert_allclose(adata.obsm["X_cic"], plain[code_cols], atol=1e-5)
    capsys.readouterr()

    # Five model genes missing: filled with the training mean (0 standardised), warned.
    counts.drop(columns=genes[:5]).to_csv(tmp_path / "missing.csv")
    assert cli.invoke("embed", [f"--saved_model={model}", f"--expression={tmp_path / 'missing.csv'}",
                                f"--preprocessing={pipeline / 'profiles'}",
                                f"--out={tmp_path / 'missing'}"]) == 0
    err = capsys.readouterr().err
    assert "5 of the model's 40 genes are missing and were filled with the training mean" in err
    adata = anndata.read_h5ad(tmp_path / "missing" / "codes.h5ad")
    assert np.all(adata.X[:, :5] == 0) and not np.allclose(adata.obsm["X_cic"], plain[code_cols])

    # Annotation columns inside the table: named with --obs_columns, kept as obs.
    counts.join(obs).to_csv(tmp_path / "annotated.csv")
    assert cli.invoke("embed", [f"--saved_model={model}", "--obs_columns=cell_type,batch",
                                f"--expression={tmp_path / 'annotated.csv'}",
                                f"--out={tmp_path / 'annotated'}"]) == 0
    annotated = pd.read_csv(tmp_path / "annotated" / "codes.csv")
    assert list(annotated.columns) == list(plain.columns)
    np.testing.assert_allclose(annotated[code_cols], plain[code_cols], atol=1e-5)

    # No gene in common: an error naming the file, not codes of nothing.
    pd.DataFrame({"other": [1, 2]}, index=["a", "b"]).to_csv(tmp_path / "alien.csv")
    assert cli.invoke("embed", [f"--saved_model={model}", f"--expression={tmp_path / 'alien.csv'}",
                                f"--out={tmp_path / 'alien'}"]) == 1
    assert "none of the model's 40 genes" in capsys.readouterr().err


def test_embed_vector_records_writes_h5ad_with_profiles_obs(pipeline, tmp_path):
    import anndata

    out = tmp_path / "records_codes"
    assert cli.invoke("embed", [f"--saved_model={pipeline / 'export' / 'cic'}",
                                f"--records_dir={pipeline / 'profiles' / 'records'}",
                                f"--out={out}", "--levels=image"]) == 0
    adata = anndata.read_h5ad(out / "codes.h5ad")
    profiles = pd.read_csv(pipeline / "profiles" / "profiles.csv")
    assert adata.n_obs == len(profiles) and adata.obsm["X_cic"].shape == (len(profiles), 4)
    assert {"split", "label", "cell_type", "batch"} <= set(adata.obs.columns)
    assert set(adata.obs_names) == set(profiles["sample_id"])


def test_reconstruction_metrics_by_hand():
    """A perfect reconstruction: MSE 0, Pearson 1, every profile its own nearest (rank 1);
    reconstructions handed to the wrong profiles (rolled by one) rank worse than first."""
    from ish_tf.evaluate.expression import reconstruction_metrics

    x = np.random.default_rng(0).normal(size=(8, 20))
    m = reconstruction_metrics(x, x)
    assert m["mse"] == pytest.approx(0.0) and m["pearson"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(1.0) and m["own_rank1"] == 1.0
    rolled = reconstruction_metrics(x, np.roll(x, 1, axis=0))
    assert rolled["own_rank1"] == 0.0 and rolled["own_rank_mean"] > 1.0
    # x + 1 is perfectly correlated but off by one everywhere: MSE exactly 1.
    assert reconstruction_metrics(x, x + 1.0)["mse"] == pytest.approx(1.0)


def test_evaluate_expression_against_baselines(pipeline, tmp_path, capsys):
    """bin/evaluate --task=expression with every part: baselines, the classifier's softmax,
    noise, and the unseen-type test (--split_by=label ingest + a model trained on it)."""
    from ish_tf.evaluate.expression import ExpressionEvalConfig, evaluate_expression

    unseen, data = tmp_path / "unseen", pipeline / "data"
    assert cli.invoke("ingest", [f"--expression={data / 'counts.csv'}", f"--obs={data / 'obs.csv'}",
                                 "--label_column=cell_type", "--n_genes=40", "--split_by=label",
                                 "--holdout_labels=type2", f"--out={unseen}"]) == 0
    assert cli.invoke("train", ["--model=cic", f"--records_dir={unseen / 'records'}",
                                f"--run_dir={tmp_path / 'run'}", "--cic_hidden=16",
                                "--cic_code_size=4", "--steps=5", "--decay_start=5",
                                "--noimage_summaries", "--strategy=default"]) == 0
    assert cli.invoke("export", [f"--model_dir={tmp_path / 'run'}",
                                 f"--export_dir={tmp_path / 'export'}"]) == 0
    out, model = tmp_path / "eval", str(pipeline / "export" / "cic")
    assert cli.invoke("evaluate", [
        "--task=expression", f"--profiles={pipeline / 'profiles'}", f"--saved_model={model}",
        f"--classifier_model={model}", "--expression_baselines=pca,nmf,kpca_rbf",
        "--noise_levels=0.5", f"--unseen_profiles={unseen}",
        f"--unseen_model={tmp_path / 'export'}", f"--out={out}"]) == 0
    s = json.loads((out / "expression_summary.json").read_text())
    assert s["n_test"] == 24 and s["code_size"] == 4 and s["n_genes"] == 40
    assert set(s["reconstruction"]) == {"cic", "training_mean", "pca", "nmf", "kpca_rbf"}
    assert s["reconstruction"]["training_mean"]["mse"] == pytest.approx(1.0, abs=0.3)
    assert s["reconstruction_chance"]["own_rank_mean"] == 12.5
    for key in ("cic_codes_lr", "pca_lr", "svm_genes", "classifier_ae"):
        assert 0.0 <= s["classification"][key]["accuracy"] <= 1.0
    assert s["classification_baselines"]["chance"]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    # The synthetic cell types are easy: an SVM on all genes is far above chance.
    assert s["classification"]["svm_genes"]["accuracy"] > 0.8
    noise = pd.read_csv(out / "noise.csv")
    assert set(noise["noise_sd"]) == {0.0, 0.5} and set(noise["codes"]) == {"cic", "pca"}
    assert (noise.loc[noise["noise_sd"] == 0, "relative_code_change"] == 0).all()
    table = pd.DataFrame(s["unseen"])
    placed = table[table["profiles"] == "unseen placement"]
    assert set(placed["codes"]) == {"cic", "pca"} and (placed["n"] == 40).all()
    assert table.loc[table["profiles"].str.startswith("unseen ("), "labels"].iloc[0] == "type2"
    assert (out / "figures" / "codes_map.png").stat().st_size > 1000
    assert "Unseen cell types" in (out / "report.md").read_text()
    assert "reconstruction pca" in capsys.readouterr().out

    # A model of other genes, an unseen set sharing labels, codes missing: refused.
    cfg = ExpressionEvalConfig(profiles_dir=str(pipeline / "profiles"), saved_model=model,
                               out_dir=str(tmp_path / "e2"), baselines=("pca",), report=False)
    with pytest.raises(ValueError, match="was trained on the genes of"):
        evaluate_expression(dataclasses.replace(cfg, saved_model=str(tmp_path / "export")))
    pd.DataFrame({"sample_id": ["x"], "code_0": [1.0]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="profiles have no codes"):
        evaluate_expression(dataclasses.replace(cfg, embedding=str(tmp_path / "c.csv")))
    with pytest.raises(ValueError, match="--split_by=label"):
        evaluate_expression(dataclasses.replace(cfg, unseen_profiles=str(pipeline / "profiles"),
                                                unseen_model=model))


@pytest.mark.parametrize("kwargs", [{}, {"expression": "cells.h5ad", "label_column": "kind",
                                         "use_raw": True, "steps": 50}])
def test_quickstart_recipe_commands_parse(tmp_path, kwargs):
    """Every command of `bin/quickstart --family=cic` parses with its command's flags."""
    from ish_tf.families.cic.quickstart import recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commands = recipe(str(tmp_path), root=root, **kwargs)
    assert [c for _, c, _ in commands][-2:] == ["embed", "evaluate"]
    assert sum(c == "train" for _, c, _ in commands) == 3
    assert ("synth" in [c for _, c, _ in commands]) == (not kwargs)
    for _, command, argv in commands:
        cli.parse(command, argv)
    assert cli.invoke("quickstart", ["--family=cdae", "--expression=x.h5ad",
                                     "--label_column=y"]) == 2


def test_interpret_units_and_enrichment(pipeline, tmp_path, capsys):
    """bin/cic interpret: decoder(encoder(x)) is the model's reconstruction (classifier
    layers left out); top genes per unit; GMT enrichment with Bonferroni."""
    import keras

    from ish_tf.families.cic.interpret import split_model

    run = pipeline / "runs" / "cic"
    model = keras.models.load_model(run / "model.keras", compile=False)
    encoder, decoder = split_model(model)
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    np.testing.assert_allclose(decoder(encoder(x)), model(x)[1], atol=1e-5)

    out = tmp_path / "interpret"
    assert cli.invoke("cic", ["interpret", f"--run_dir={run}", f"--profiles={pipeline / 'profiles'}",
                              f"--gmt={pipeline / 'data' / 'programs.gmt'}", "--top_genes=10",
                              f"--out={out}"]) == 0
    genes = pd.read_csv(out / "unit_genes.csv")
    assert sorted(set(genes["unit"])) == [0, 1, 2, 3] and (genes.groupby("unit").size() == 10).all()
    assert len(os.listdir(out / "units")) == 4
    first = genes[genes["unit"] == 0]["change"].abs().to_numpy()
    assert np.all(np.diff(first) <= 1e-12)  # ranked by the size of the change
    enrichment = pd.read_csv(out / "enrichment.csv")
    tested = enrichment.groupby("unit").size()
    for u, part in enrichment.groupby("unit"):
        np.testing.assert_allclose(part["p_bonferroni"], np.minimum(1, part["p"] * tested[u]))
    assert "units with a set at Bonferroni p < 0.05" in capsys.readouterr().out
    summary = json.loads((out / "interpret_summary.json").read_text())
    assert summary["pca_baseline"]["units"] == 4 and (out / "pca_enrichment.csv").exists()
    (tmp_path / "bad.gmt").write_text("only_a_name\tdescription\n")
    assert cli.invoke("cic", ["interpret", f"--run_dir={run}", f"--profiles={pipeline / 'profiles'}",
                              f"--gmt={tmp_path / 'bad.gmt'}", f"--out={out}"]) == 1
    assert "bad.gmt:1: a GMT line needs" in capsys.readouterr().err


def test_hypergeometric_enrichment_by_hand():
    """Universe of 10 genes, a set of 4, a top list of 3 all in the set:
    P(X >= 3) = C(4,3) C(6,0) / C(10,3) = 4 / 120 = 0.0333; a set of 1 is not tested
    (min_size 2), so Bonferroni multiplies by the 2 sets tested."""
    from ish_tf.families.cic.interpret import hypergeometric_enrichment

    universe = [f"g{i}" for i in range(10)]
    sets = {"a": ["g0", "g1", "g2", "g3", "not_in_universe"], "b": ["g5", "g6"], "tiny": ["g9"]}
    e = hypergeometric_enrichment(["g0", "g1", "g2"], sets, universe, min_size=2)
    a = e.set_index("gene_set").loc["a"]
    assert (a["overlap"], a["set_size"], a["top_n"], a["universe"]) == (3, 4, 3, 10)
    assert a["p"] == pytest.approx(4 / 120) and a["p_bonferroni"] == pytest.approx(8 / 120)
    assert e.set_index("gene_set").loc["b", "p"] == pytest.approx(1.0)
    assert "tiny" not in set(e["gene_set"])


def test_pbmc68k_codes_in_obsm_and_evaluated(tmp_path):
    """The real file (700 blood cells, 10 types; skipped without ../shared/data): ingest
    .raw, a tiny classifier-autoencoder, then the .h5ad itself through bin/embed keeps all
    its obs columns with the codes in obsm["X_cic"], and the evaluation's baselines see
    real structure (an SVM on the genes far above the majority class)."""
    import anndata
    from conftest import shared_data_path

    path = shared_data_path("expression", "pbmc68k_reduced.h5ad")
    data = tmp_path / "pbmc"
    assert cli.invoke("ingest", [f"--expression={path}", "--use_raw", "--label_column=bulk_labels",
                                 "--n_genes=200", f"--out={data}"]) == 0
    assert cli.invoke("train", ["--model=cic_classifier", f"--records_dir={data / 'records'}",
                                f"--run_dir={tmp_path / 'run'}", "--cic_hidden=32",
                                "--cic_code_size=8", "--steps=20", "--decay_start=15",
                                "--learning_rate=3e-3", "--noimage_summaries",
                                "--strategy=default"]) == 0
    assert cli.invoke("export", [f"--model_dir={tmp_path / 'run'}",
                                 f"--export_dir={tmp_path / 'export'}"]) == 0
    assert cli.invoke("embed", [f"--saved_model={tmp_path / 'export'}", f"--expression={path}",
                                "--use_raw", f"--out={tmp_path / 'codes'}"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file is in the older AnnData layout
        source = anndata.read_h5ad(path)
    codes = anndata.read_h5ad(tmp_path / "codes" / "codes.h5ad")
    assert codes.obsm["X_cic"].shape == (700, 8) and codes.n_vars == 200
    assert list(codes.obs.columns) == list(map(str, source.obs.columns))
    assert list(codes.obs_names) == list(source.obs_names)
    assert cli.invoke("evaluate", ["--task=expression", f"--profiles={data}",
                                   f"--saved_model={tmp_path / 'export'}",
                                   f"--embedding={tmp_path / 'codes' / 'codes.csv'}",
                                   "--expression_baselines=pca", "--noise_levels=1.0",
                                   "--noreport", f"--out={tmp_path / 'eval'}"]) == 0
    s = json.loads((tmp_path / "eval" / "expression_summary.json").read_text())
    assert s["n_test"] == 142 and len(s["labels"]) == 10
    assert s["classification"]["svm_genes"]["accuracy"] > s["classification_baselines"][
        "majority"]["accuracy"] + 0.2
