"""The fluorescence network (ish_tf.families.fluorescence.model) and ArcFace (ish_tf.models.arcface)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ish_tf.families import ModelConfig
from ish_tf.families.fluorescence.config import FluorescenceConfig
from ish_tf.families.fluorescence.model import (
    BackboneWeightsError,
    adapt_stem_kernel,
    build_fluorescence_model,
    transfer_rgb_weights,
)
from ish_tf.models.arcface import ArcFace, arcface_margin_logits


def test_arcface_margin_worked_example():
    """s = 30, m = 0.1, cos(theta_y) = 0.8: theta_y = 0.6435, the target logit becomes
    30 cos(0.7435) = 22.083; other classes and unlabelled rows keep s cos = 24 / 0."""
    logits = tf.constant([[24.0, 0.0, -6.0], [24.0, 0.0, -6.0]])
    out = arcface_margin_logits(logits, tf.constant([0, -1]), 30.0, 0.1).numpy()
    assert out[0, 0] == pytest.approx(30 * math.cos(math.acos(0.8) + 0.1), abs=1e-4)
    assert out[0, 0] == pytest.approx(22.083, abs=1e-3)
    np.testing.assert_allclose(out[0, 1:], [0.0, -6.0])
    np.testing.assert_allclose(out[1], [24.0, 0.0, -6.0])  # label -1: no margin
    # Past pi - m the logit keeps decreasing: cos = -1 -> s (-1 - m sin m).
    far = arcface_margin_logits(tf.constant([[-30.0, 0.0]]), tf.constant([0]), 30.0, 0.1)
    assert far.numpy()[0, 0] == pytest.approx(30 * (-1 - 0.1 * math.sin(0.1)), abs=1e-4)


def test_arcface_layer_is_scaled_cosine_and_round_trips():
    layer = ArcFace(3, scale=30.0, margin=0.1)
    x = np.array([[3.0, 4.0], [0.0, -2.0]], "float32")
    out = layer(x).numpy()
    w = layer.kernel.numpy()
    want = 30 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.abs(out).max() <= 30 + 1e-4
    clone = ArcFace.from_config(layer.get_config())
    assert (clone.units, clone.scale, clone.margin) == (3, 30.0, 0.1)
    with pytest.raises(ValueError, match="margin"):
        ArcFace(3, margin=2.0)


def test_adapt_stem_kernel_keeps_a_gray_response():
    """RGB weights (1, 2, 3) for one 1x1 filter -> six weights of 2 * 3/6 = 1.0: a constant
    image v gives 6 v in both networks."""
    kernel = np.array([1.0, 2.0, 3.0], "float32").reshape(1, 1, 3, 1)
    adapted = adapt_stem_kernel(kernel, 6)
    assert adapted.shape == (1, 1, 6, 1)
    np.testing.assert_allclose(adapted.ravel(), np.ones(6))
    assert float((kernel * 2.0).sum()) == pytest.approx(float((adapted * 2.0).sum()))
    with pytest.raises(ValueError, match="RGB stem"):
        adapt_stem_kernel(np.zeros((3, 3, 4, 2)), 6)


def _tiny_net(channels: int, seed: int) -> keras.Model:
    x = keras.Input((8, 8, channels))
    y = keras.layers.Conv2D(4, 3, name="stem", kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(2)(y))


def test_transfer_rgb_weights_adapts_only_the_stem():
    rgb, six = _tiny_net(3, 1), _tiny_net(6, 2)
    assert transfer_rgb_weights(six, rgb) == 1
    np.testing.assert_allclose(six.get_layer("stem").kernel.numpy(),
                               adapt_stem_kernel(rgb.get_layer("stem").kernel.numpy(), 6))
    for a, b in zip(six.get_weights()[1:], rgb.get_weights()[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    # Equal channels: the C-channel net answers as the RGB net does to the gray image.
    gray = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(six(np.repeat(gray, 6, -1)), rgb(np.repeat(gray, 3, -1)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(BackboneWeightsError):
        transfer_rgb_weights(six, _tiny_net(3, 1).layers[1] and keras.Sequential(
            [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)]))


@pytest.mark.parametrize("head", ["arcface", "softmax"])
def test_model_outputs(head):
    family = FluorescenceConfig(widths=(8, 8), head=head, n_classes=5, embedding_dim=6)
    model = build_fluorescence_model(ModelConfig("fluorescence", input_size=16, seed=0,
                                                 family=family))
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 6)).astype("float32")
    embedding, probs, logits = (np.asarray(t) for t in model(x, training=False))
    assert embedding.shape == (3, 6) and probs.shape == (3, 5) and logits.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, tf.nn.softmax(logits).numpy(), rtol=1e-4, atol=1e-6)
    if head == "arcface":
        assert np.abs(logits).max() <= 30.0 + 1e-4
    with pytest.raises(ValueError, match=">= 2 classes"):
        build_fluorescence_model(ModelConfig("fluorescence", input_size=16,
                                             family=FluorescenceConfig(n_classes=1)))


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="ema_steps"):
        FluorescenceConfig(ema_decays=(0.5, 0.9), ema_steps=(0, 0)).validate()
    with pytest.raises(ValueError, match="one step per decay"):
        FluorescenceConfig(ema_decays=(0.5,), ema_steps=(0, 5)).validate()
    with pytest.raises(ValueError, match="xception needs --input_size >= 71"):
        build_fluorescence_model(ModelConfig("fluorescence", input_size=32, family=FluorescenceConfig(
            backbone="xception", n_classes=3)))


def test_hypermodel_space_and_trial_configs(tmp_path):
    import keras_tuner

    from ish_tf.families.fluorescence.hypermodel import FluorescenceHyperModel
    from ish_tf.train import TrainConfig
    from ish_tf.tune import TuneConfig, TuneSpace
    from ish_tf.tune.hypermodels import make_hypermodel

    space = TuneSpace(flips=(True,), learning_rate=(1e-3, 3e-4), steps=(10,))
    tune = TuneConfig(out_dir=str(tmp_path), space=space)
    base = TrainConfig(run_dir=str(tmp_path / "run"), records_dir="recs", steps=10, decay_start=5)
    names = {}
    for model in ("fluorescence", "mean_teacher"):
        hm = make_hypermodel(ModelConfig(model, input_size=16, family=FluorescenceConfig()),
                             base, tune)
        assert isinstance(hm, FluorescenceHyperModel)
        assert hm.objective.name == "val_accuracy" and hm.objective.direction == "max"
        hp = keras_tuner.HyperParameters()
        hm.declare_hyperparameters(hp)
        names[model] = {p.name for p in hp.space}
    assert names["fluorescence"] == {"flips", "learning_rate", "steps", "head", "arcface_scale",
                                     "arcface_margin"}
    assert names["mean_teacher"] == names["fluorescence"] | {"consistency_weight",
                                                             "pseudo_label_weight"}
    values = {"learning_rate": 3e-4, "steps": 10, "head": "softmax", "arcface_scale": 16.0,
              "arcface_margin": 0.2, "consistency_weight": 10.0, "pseudo_label_weight": 0.0}
    mc, tc = hm.trial_configs(values, run_dir=str(tmp_path / "t"))
    assert (mc.family.head, mc.family.arcface_scale, mc.family.arcface_margin,
            mc.family.consistency_weight, mc.family.pseudo_label_weight) == (
        "softmax", 16.0, 0.2, 10.0, 0.0)
    assert tc.learning_rate == 3e-4
    assert hm.flag_overrides(values)["fluorescence_consistency_weight"] == 10.0
    # Plate-assignment pseudo-labels need a weight: 0 is not offered.
    hm = make_hypermodel(ModelConfig("mean_teacher", input_size=16, family=FluorescenceConfig(
        pseudo_labels="plate_assignment")), base, tune)
    hp = keras_tuner.HyperParameters()
    hm.declare_hyperparameters(hp)
    assert hp.space[[p.name for p in hp.space].index("pseudo_label_weight")].values == [1.0, 0.3]
