"""Tests of ish_tf.attribution (integrated gradients, Grad-CAM) and bin/attribute."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ish_tf import attribution as at  # noqa: E402
from ish_tf import cli  # noqa: E402
from ish_tf.data.embeddings import from_frame  # noqa: E402
from ish_tf.families import ModelConfig, build_model  # noqa: E402
from ish_tf.families.triplet.config import TripletConfig  # noqa: E402

S = 16


@pytest.fixture(scope="module")
def triplet(tmp_path_factory):
    """A tiny triplet-family model (small_cnn, L2-normalised) saved as a run directory."""
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(model="triplet", input_size=S, seed=0,
                      family=TripletConfig(backbone="small_cnn", backbone_weights="none",
                                           embedding_dim=4, head_units=8, l2_normalize=True))
    model = build_model(cfg)
    run = tmp_path_factory.mktemp("attr") / "run"
    run.mkdir()
    model.save(str(run / "model.keras"))
    (run / "model_config.json").write_text(cfg.to_json())
    return model, run


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, S, S, 3)).astype(np.float32)


def test_attribution_model_strips_l2_and_keeps_the_weights(triplet):
    model, _ = triplet
    amodel, removed = at.attribution_model(model)
    assert removed
    act, emb = amodel(_images(2), training=False)
    assert len(act.shape) == 4 and emb.shape == (2, 4)
    # Pre-normalisation: not unit norm, but normalised it is the model's output.
    norms = np.linalg.norm(emb.numpy(), axis=1)
    assert not np.allclose(norms, 1.0)
    np.testing.assert_allclose(emb.numpy() / norms[:, None], model(_images(2)).numpy(),
                               atol=1e-5)


def test_integrated_gradients_exact_on_a_linear_model_and_complete_on_the_triplet(triplet):
    keras.utils.set_random_seed(1)
    inp = keras.Input((S, S, 3))
    conv = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inp)
    out = keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(conv))
    linear = keras.Model(inp, out)
    amodel, removed = at.attribution_model(linear)
    assert not removed
    x = _images(2, 1)
    attr, check = at.integrated_gradients(amodel, x, 1, "black", steps=4)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = linear(xt)[:, 1]
    # Linear: IG = x * gradient exactly, and complete.
    np.testing.assert_allclose(attr, x * tape.gradient(y, xt).numpy(), rtol=1e-4, atol=1e-4)
    assert check["completeness_error"].max() < 1e-3
    model, _ = triplet
    amodel, _ = at.attribution_model(model)
    _, check = at.integrated_gradients(amodel, _images(2, 2), 0, "black", steps=64)
    assert np.median(check["completeness_error"]) < 0.1
    with pytest.raises(at.AttributionError, match="out of range"):
        at.integrated_gradients(amodel, _images(1), 9)


def test_grad_cam_follows_the_signal_and_maps_change_with_randomised_weights(triplet):
    keras.utils.set_random_seed(2)
    inp = keras.Input((S, S, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv",
                               kernel_initializer="ones")(inp)
    out = keras.layers.Dense(2, kernel_initializer="ones")(
        keras.layers.GlobalAveragePooling2D()(conv))
    amodel, _ = at.attribution_model(keras.Model(inp, out))
    x = np.zeros((1, S, S, 3), np.float32)
    x[:, :S // 2, :S // 2] = 200.0  # signal in the top-left quadrant only
    cam = at.grad_cam(amodel, x, 0)[0]
    assert cam[:S // 2, :S // 2].mean() > 3 * cam[S // 2:, S // 2:].mean()
    model, _ = triplet
    amodel, _ = at.attribution_model(model)
    random_model, _ = at.attribution_model(at.randomised_copy(model))
    x = _images(3, 3)
    same = at.rank_correlation(at.maps(amodel, x, 0, steps=16)[0],
                               at.maps(amodel, x, 0, steps=16)[0])
    other = at.rank_correlation(at.maps(amodel, x, 0, steps=16)[0],
                                at.maps(random_model, x, 0, steps=16)[0])
    np.testing.assert_allclose(same, 1.0)
    assert other.mean() < 0.9
    region = np.zeros((1, S, S), bool)
    region[:, :4] = True
    ratio = at.layer_concentration(np.where(region, 1.0, 0.5), region, np.ones_like(region))
    assert ratio[0] == pytest.approx(2.0)


def test_bin_attribute_and_the_report_maps(triplet, tmp_path, monkeypatch, capsys):
    _, run = triplet
    paths = []
    for i, img in enumerate(_images(2, 4).astype(np.uint8)):
        p = tmp_path / f"p{i}.png"
        p.write_bytes(tf.io.encode_png(img).numpy())
        paths.append(str(p))
    out = tmp_path / "out"
    assert cli.invoke("attribute", [f"--model_dir={run}", f"--images={','.join(paths)}",
                                    "--dims=0,2", "--steps=16", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    assert "median completeness error" in text and "rank correlation" in text
    checks = pd.read_csv(out / "attribution_checks.csv")
    assert len(checks) == 2 * 2 * 2  # patches x dims x methods
    ig = checks[checks["method"] == "integrated_gradients"]
    assert ig["completeness_error"].notna().all() and ig["output_change"].abs().gt(0).all()
    assert (out / "attribution_dim0.png").stat().st_size > 1000
    assert cli.invoke("attribute", [f"--model_dir={run}", f"--out={out}"]) == 2

    # The report's extreme-patches figure gains maps (records read through a stub).
    from ish_tf.evaluate import figures

    encoded = {(1, k): (tmp_path / f"p{k % 2}.png").read_bytes() for k in range(4)}
    monkeypatch.setattr(figures, "read_patches",
                        lambda records_dir, gene, wanted: {w: encoded[w] for w in wanted})
    table = from_frame(pd.DataFrame({"image_id": [1] * 4, "patch_index": range(4),
                                     "gene_symbol": ["G"] * 4, "0": [0.1, 0.4, 0.3, 0.2],
                                     "1": [1.0, 2.0, 3.0, 4.0]}))
    path = tmp_path / "maps.png"
    caption = at.extreme_patch_maps("records", table, "G", 0, str(run), str(path), k=2,
                                    steps=8)
    assert path.stat().st_size > 1000
    assert "completeness error" in caption and "rank correlation" in caption
    json.dumps(caption)
