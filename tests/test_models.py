"""Backbones, heads and the triplet model builder (ish_tf.models)."""

from __future__ import annotations

import json
import os
import warnings

import keras
import numpy as np
import pytest

from ish_tf.families import ModelConfig, build_model, family_names, get_family, load_model_config
from ish_tf.families.triplet.config import TripletConfig
from ish_tf.models import backbones as bb
from ish_tf.models.heads import L2Normalize, embedding_head, head_parameter_count


def _small(**kw) -> ModelConfig:
    base = dict(backbone="small_cnn", backbone_weights="none", head_units=64, embedding_dim=16)
    base.update(kw)
    return ModelConfig("triplet", input_size=32, seed=0, family=TripletConfig(**base))


def test_head_parameter_count_exact():
    # Dense 2048->1024 (+bias), BN (gamma, beta, mean, var), Dense 1024->128 (+bias).
    expected = 2048 * 1024 + 1024 + 4 * 1024 + 1024 * 128 + 128
    assert expected == 2_233_472
    head = embedding_head(2048)
    assert head.count_params() == expected == head_parameter_count(2048)
    assert head.output.shape[-1] == 128
    no_bn = embedding_head(100, units=10, embedding_dim=4, batch_norm="none")
    assert no_bn.count_params() == 100 * 10 + 10 + 10 * 4 + 4 == head_parameter_count(100, 10, 4, "none")


def test_head_layers_and_orthogonal_init():
    head = embedding_head(64, units=32, embedding_dim=16, seed=1)
    names = [layer.name for layer in head.layers]
    assert names == ["features", "fc1", "fc1_bn", "fc1_relu", "embedding", "embedding_float32"]
    kernel = head.get_layer("embedding").kernel.numpy()  # (32, 16): orthonormal columns
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(16), atol=1e-5)
    with pytest.raises(ValueError, match="batch_norm"):
        embedding_head(8, batch_norm="group")


def test_small_cnn_parameter_count_exact():
    model = bb.small_cnn(32)
    # conv1/conv2 of blocks 32, 64, 128: 3x3 x in x out kernels (no bias), each followed
    # by a GroupNorm with gamma and beta (2 x out).
    expected = sum(9 * i * o + 2 * o for i, o in [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)])
    assert expected == 287_456
    assert model.count_params() == expected
    assert model.output.shape[-1] == 128


def test_caffe_preprocess_matches_keras_applications():
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    ours = bb.CaffePreprocess()(x).numpy()
    ref = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-4)


def test_l2_normalize_unit_rows_and_zero_row():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], "float32")
    y = L2Normalize()(x).numpy()
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)
    model = build_model(_small(l2_normalize=True))
    out = model(np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_resnet50_builds_at_256_and_loads_weights_file(tmp_path):
    backbone = bb.resnet50(256, "none")
    out = backbone(np.random.default_rng(0).uniform(0, 255, (2, 256, 256, 3)).astype("float32"))
    assert out.shape == (2, 2048)
    assert backbone.get_layer("caffe_preprocess") is not None
    path = str(tmp_path / "resnet50.weights.h5")
    backbone.save_weights(path)
    # Weights do not depend on the input size; a smaller input keeps the test quick.
    loaded = bb.build_backbone("resnet50", 64, path)
    for a, b in zip(backbone.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = bb.build_backbone("resnet50", 64, "none")
    assert any(not np.array_equal(a, b) for a, b in zip(backbone.get_weights(), fresh.get_weights(), strict=True))


def test_small_cnn_weights_file_roundtrip(tmp_path):
    model = bb.small_cnn(32)
    path = str(tmp_path / "small.weights.h5")
    model.save_weights(path)
    loaded = bb.build_backbone("small_cnn", 32, path)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = bb.small_cnn(32, widths=(8, 8, 8))
    other_path = str(tmp_path / "other.weights.h5")
    other.save_weights(other_path)
    with warnings.catch_warnings(), pytest.raises(bb.BackboneWeightsError, match="does not fit"):
        warnings.simplefilter("ignore")  # Keras warns about each mismatched sublayer first
        bb.build_backbone("small_cnn", 32, other_path)


def test_weights_errors_are_clear(monkeypatch, tmp_path):
    with pytest.raises(bb.BackboneWeightsError, match="no such file"):
        bb.build_backbone("resnet50", 64, str(tmp_path / "missing.weights.h5"))
    with pytest.raises(bb.BackboneWeightsError, match="no ImageNet weights"):
        bb.build_backbone("small_cnn", 32, "imagenet")
    with pytest.raises(ValueError, match="--backbone='vgg'"):
        bb.build_backbone("vgg", 32)

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(bb.BackboneWeightsError, match="--backbone_weights=none"):
        bb.build_backbone("resnet50", 64, "imagenet")


def test_triplet_model_shapes_dtype_and_names():
    model = build_model(_small())
    assert model.name == "triplet_small_cnn"
    assert model.input.shape[1:] == (32, 32, 3)
    out = model(np.zeros((4, 32, 32, 3), "float32"))
    assert out.shape == (4, 16) and str(out.dtype) == "<dtype: 'float32'>"
    assert [layer.name for layer in model.layers[1:]] == ["small_cnn_backbone", "embedding_head"]


def test_model_get_config_from_config_roundtrip():
    model = build_model(_small(l2_normalize=True))
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), atol=1e-6)
    for layer in (bb.CaffePreprocess(name="p"), L2Normalize(epsilon=1e-6, name="n")):
        again = type(layer).from_config(layer.get_config())
        assert again.get_config() == layer.get_config()


def test_model_keras_save_load_identical_outputs(tmp_path):
    model = build_model(_small(l2_normalize=True))
    x = np.random.default_rng(3).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    # One training call moves the BN statistics away from their initial values.
    model(x, training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_resnet_model_keras_roundtrip_keeps_preprocessing(tmp_path):
    model = build_model(ModelConfig("triplet", input_size=32, seed=0, family=TripletConfig(
        backbone="resnet50", backbone_weights="none", head_units=8, embedding_dim=4)))
    path = str(tmp_path / "resnet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)
    assert isinstance(loaded.get_layer("resnet50_backbone").get_layer("caffe_preprocess"),
                      bb.CaffePreprocess)


def test_model_config_json_roundtrip_and_registry(tmp_path):
    cfg = _small(l2_normalize=True)
    path = tmp_path / "model_config.json"
    path.write_text(cfg.to_json())
    assert json.loads(path.read_text())["builder"] == "triplet"
    assert load_model_config(str(path)) == cfg
    path.write_text(json.dumps({"builder": "triplet", "config": {"bogus": 1}}))
    with pytest.raises(ValueError, match=f"{os.path.basename(str(path))}.*bogus"):
        load_model_config(str(path))
    assert "triplet" in family_names()
    with pytest.raises(ValueError, match="--model='no_such_family'"):
        get_family("no_such_family")


def test_model_config_json_of_runs_before_the_typed_configs(tmp_path):
    """A run written with the old layout (triplet settings at the top, others in an untyped
    `options` dict) still loads, into the family's typed config; an option that is not a
    setting of the family is an error, not dropped."""
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"builder": "triplet", "config": {
        "model": "triplet", "backbone": "small_cnn", "backbone_weights": "none",
        "input_size": 32, "embedding_dim": 16, "head_units": 64, "l2_normalize": True,
        "head_batch_norm": "batch", "seed": 0, "options": {}}}))
    assert load_model_config(str(path)) == _small(l2_normalize=True)
    path.write_text(json.dumps({"builder": "unet", "config": {
        "model": "unet", "backbone": "resnet50", "input_size": 64, "seed": 1,
        "options": {"base_filters": 8, "depth": 3, "batch_size": 4}}}))
    cfg = load_model_config(str(path))
    assert (cfg.family.filters, cfg.family.depth, cfg.family.batch_size) == (8, 3, 4)
    path.write_text(json.dumps({"builder": "cdae", "config": {
        "model": "cdae", "input_size": 64, "options": {"depth": 3, "colour": "red"}}}))
    with pytest.raises(ValueError, match="'colour' is not a setting of --model=cdae"):
        load_model_config(str(path))
