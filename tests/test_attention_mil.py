"""Tests of attention-MIL pooling (ish_tf.models.mil, ish_tf.evaluate.attention_mil).

Embeddings are synthesized directly (no CNN): a bag-level label moves 2 of a bag's
patches along one dimension, so the mean dilutes the signal and attention can find it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ish_tf import cli  # noqa: E402
from ish_tf.data.embeddings import (  # noqa: E402
    EmbeddingTableError,
    aggregate,
    from_frame,
    write_embedding_table,
)
from ish_tf.evaluate import attention_mil as am  # noqa: E402
from ish_tf.evaluate.annotations import cross_validate_binary  # noqa: E402
from ish_tf.models.mil import GatedAttentionPooling, build_attention_mil  # noqa: E402

D = 4


def _table(n_donors: int = 24, seed: int = 0, shift: float = 3.0):
    """Patch table: 2 genes x n_donors bags of 10-30 patches; cases move 2 patches of G0."""
    rng = np.random.default_rng(seed)
    keys, values = [], []
    for d in range(n_donors):
        case = d % 2 == 1
        for g in range(2):
            n = int(rng.integers(10, 31))
            v = rng.normal(0, 1, (n, D))
            changed = np.zeros(n, bool)
            if case and g == 0:
                changed[rng.choice(n, 2, replace=False)] = True
                v[changed, 0] += shift
            values.append(v)
            keys += [{"image_id": 100 * d + g, "patch_index": i, "gene_symbol": f"G{g}",
                      "donor_id": f"D{d:02d}", "diagnosis": "case" if case else "control",
                      "changed": bool(changed[i])} for i in range(n)]
    frame = pd.DataFrame(keys)
    truth = frame.pop("changed")
    frame = pd.concat([frame, pd.DataFrame(np.concatenate(values), columns=list("0123"))],
                      axis=1)
    return from_frame(frame, source="patches.csv"), truth.to_numpy()


def test_pooling_masks_padding_and_ignores_order_and_bag_size():
    layer = GatedAttentionPooling(8, seed=1)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    pooled, weights = layer(x, mask=mask)
    w = weights.numpy()
    assert np.all(w[0, 3:] == 0) and np.allclose(w.sum(1), 1, atol=1e-6)
    # The weighted SUM of the real patches: padding values and length do not matter.
    x_other = x.copy()
    x_other[0, 3:] = 99.0
    np.testing.assert_allclose(layer(x_other, mask=mask)[0].numpy()[0], pooled.numpy()[0],
                               atol=1e-5)
    short, _ = layer(x[:1, :3], mask=mask[:1, :3])
    np.testing.assert_allclose(short.numpy()[0], pooled.numpy()[0], atol=1e-5)
    perm = [2, 0, 1, 3, 4]
    np.testing.assert_allclose(layer(x[:1, perm], mask=mask[:1, perm])[0].numpy()[0],
                               pooled.numpy()[0], atol=1e-5)
    np.testing.assert_allclose(pooled.numpy()[0], (w[0, :3, None] * x[0, :3]).sum(0), atol=1e-5)
    # Serialisable (a Keras archive round trip gives the same outputs).
    model = build_attention_mil(5, 3, hidden=4, attention_dim=4)
    restored = keras.Model.from_config(model.get_config())
    restored.set_weights(model.get_weights())
    np.testing.assert_allclose(restored([x, mask])[1].numpy(), model([x, mask])[1].numpy())


def test_make_bags_caps_and_pads():
    table, _ = _table(4)
    bags = am.make_bags(table, "donor", max_patches=12, seed=0)
    assert len(bags) == 8 and bags.x.shape == (8, 12, D)
    assert (bags.keys["n_patches"] == np.minimum(bags.keys["n_total"], 12)).all()
    assert bags.keys["diagnosis"].notna().all()  # constant per bag: kept as a key
    real = bags.rows[bags.mask]
    assert len(np.unique(real)) == len(real)
    np.testing.assert_array_equal(bags.x[bags.mask], table.values[real])
    # The other levels: a section's patches (one image per gene x donor here) and a gene's.
    assert len(am.make_bags(table, "image")) == 8
    genes = am.make_bags(table, "gene", max_patches=50, seed=0)
    assert list(genes.keys["gene_symbol"]) == ["G0", "G1"]
    assert (genes.keys["n_patches"] == 50).all() and "donor_id" not in genes.keys.columns
    with pytest.raises(EmbeddingTableError, match="patch-level"):
        am.make_bags(aggregate(table, ("image_id",)), "image")


def test_attention_beats_mean_on_the_same_folds_and_finds_the_changed_patches(tmp_path):
    table, truth = _table(24)
    g0 = (table.keys["gene_symbol"] == "G0").to_numpy()
    table = type(table)(table.keys[g0].reset_index(drop=True), table.values[g0], table.source)
    truth = truth[g0]
    cfg = am.MILConfig(n_splits=3, epochs=40, seed=0)
    scores, attention = am.compare_poolings(table, "donor", "diagnosis", "case", "control",
                                            config=cfg)
    assert list(scores["scope"]) == ["G0", "G0"]
    by = scores.set_index(["scope", "pooling"])["auc"]
    # The mean-pooled path is cross_validate_binary on the per-donor means, same folds.
    donor = aggregate(table, ("gene_symbol", "donor_id"))
    ref = cross_validate_binary(donor.values, (donor.keys["diagnosis"] == "case")
                                .to_numpy().astype(int), n_splits=3, seed=0)
    assert by["G0", "mean"] == pytest.approx(ref["auc"])
    assert by["G0", "attention"] >= 0.9 > by["G0", "mean"]
    # Attention weights: the top patch of a case bag of G0 is a changed one.
    attention["bag"] = attention["image_id"]
    check = attention[(attention["gene_symbol"] == "G0") & (attention["label"] == 1)]
    changed = truth[table.keys.reset_index().merge(
        check[["image_id", "patch_index"]], on=["image_id", "patch_index"])["index"]]
    p1, chance = am.precision_at_k(check, changed, 1)
    assert p1 >= 0.8 and chance < 0.2
    np.testing.assert_allclose(attention.groupby("image_id")["attention"].sum(), 1, atol=1e-5)


def test_bin_evaluate_pooling_writes_both_poolings(tmp_path, capsys):
    table, _ = _table(16, seed=1)
    path = str(tmp_path / "patch_embeddings.csv")
    write_embedding_table(path, table)
    out = tmp_path / "eval"
    args = [f"--embedding={path}", "--task=reid", "--noreport", f"--out={out}",
            f"--patch_embeddings={path}", "--pooling=attention", "--pooling_epochs=5",
            "--folds=2", "--diagnosis_positive=case", "--diagnosis_negative=control"]
    assert cli.invoke("evaluate", args) == 0
    text = capsys.readouterr().out
    assert "pooling: mean: mean AUC" in text and "pooling: attention: mean AUC" in text
    scores = pd.read_csv(out / "pooling.csv")
    assert sorted(scores["pooling"].unique()) == ["attention", "mean"]
    assert set(scores["scope"]) == {"G0", "G1"}
    weights = pd.read_csv(out / "attention_weights.csv")
    assert len(weights) == len(table)  # every patch of every scored bag (all under 50)
    assert {"attention", "rank_in_bag", "label"} <= set(weights.columns)
    # Without a patch table the option is a usage error.
    assert cli.invoke("evaluate", args[:4] + ["--pooling=attention"]) == 2
    assert "--patch_embeddings" in capsys.readouterr().err
