"""Re-estimating batch-normalisation statistics (ish_tf.models.batch_norm)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ish_tf.models.batch_norm import batch_norm_layers, batch_norm_moments, recalibrate_batch_norm


def _model() -> keras.Model:
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", kernel_initializer=keras.initializers.HeNormal(1),
                            bias_initializer=keras.initializers.Constant(0.3), name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.HeNormal(2),
                            name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2", gamma_initializer="ones")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def _batches(n=3, size=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(2.0, 1.5, (size, 6, 6, 2)).astype(np.float32) for _ in range(n)]


def _channel_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), flat.var(axis=0)


def test_moments_are_the_population_statistics_of_each_layers_input():
    model = _model()
    batches = _batches()
    moments, used = batch_norm_moments(model, batches)
    assert used == 15 and list(moments) == ["bn1", "bn2"]
    # The first layer's input does not depend on any batch norm: exact statistics of the
    # convolution over all 15 images.
    conv = keras.Model(model.inputs[0], model.get_layer("c1").output)
    want_mean, want_var = _channel_stats(np.concatenate([conv(b).numpy() for b in batches]))
    np.testing.assert_allclose(moments["bn1"][0], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments["bn1"][1], want_var, rtol=1e-5, atol=1e-6)
    # The second's input is computed with the first normalising by each batch's own
    # statistics, as in training.
    probe = keras.Model(model.inputs[0], model.get_layer("bn2").input)
    want_mean, want_var = _channel_stats(
        np.concatenate([probe(b, training=True).numpy() for b in batches]))
    np.testing.assert_allclose(moments["bn2"][0], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments["bn2"][1], want_var, rtol=1e-5, atol=1e-6)


def test_recalibration_sets_only_the_moving_statistics():
    model = _model()
    bn1 = model.get_layer("bn1")
    before = {w.path: np.array(w.numpy()) for w in model.weights}
    used = recalibrate_batch_norm(model, _batches(), max_images=7)
    assert used == 7
    # The first 7 images: all of the first batch and 2 of the second.
    b = _batches()
    first7 = np.concatenate([b[0], b[1][:2]])
    conv = keras.Model(model.inputs[0], model.get_layer("c1").output)
    want_mean, want_var = _channel_stats(conv(first7).numpy())
    np.testing.assert_allclose(bn1.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), want_var, rtol=1e-5, atol=1e-6)
    moving = {v.path for layer in batch_norm_layers(model)
              for v in (layer.moving_mean, layer.moving_variance)}
    for w in model.weights:
        changed = not np.array_equal(before[w.path], w.numpy())
        assert changed == (w.path in moving), w.path
    # In inference mode the first layer now standardises these images' convolutions.
    normalised = keras.Model(model.inputs[0], bn1.output)(first7, training=False).numpy()
    mean, var = _channel_stats(normalised)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(var, 1.0, atol=1e-2)


def test_one_batch_of_everything_makes_inference_standardise_every_layer():
    """With all images in one batch, the training-mode pass is the inference-mode pass
    of the recalibrated model: every layer's input has exactly the stored statistics."""
    model = _model()
    everything = np.concatenate(_batches())
    recalibrate_batch_norm(model, [everything])
    for layer in batch_norm_layers(model):
        got = keras.Model(model.inputs[0], layer.input)(everything, training=False).numpy()
        mean, var = _channel_stats(got)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)


def test_no_batch_norm_or_no_images_is_an_error():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    with pytest.raises(ValueError, match="'plain' has no BatchNormalization"):
        recalibrate_batch_norm(plain, [np.zeros((2, 4), np.float32)])
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batch_norm(_model(), [])


def test_batches_combine_without_cancellation():
    """Large means against a small spread, different per batch: the combined variance is
    the population one (E[x^2] - E[x]^2 in float32 would be all rounding error)."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    rng = np.random.default_rng(0)
    batches = [(1000.0 + 0.05 * k + rng.normal(0, 0.01, (50, 3))).astype(np.float32)
               for k in range(4)]
    moments, used = batch_norm_moments(model, batches)
    everything = np.concatenate(batches).astype(np.float64)
    assert used == 200
    np.testing.assert_allclose(moments["bn"][0], everything.mean(axis=0), rtol=1e-7)
    # Within the float32 rounding of the per-batch means (~6e-5 at 1000); squares of
    # float32 values near 1000 are only resolved to ~0.06, twenty times the variance.
    np.testing.assert_allclose(moments["bn"][1], everything.var(axis=0), rtol=1e-2)
    x32 = np.concatenate(batches)
    naive = (np.square(x32).mean(axis=0, dtype=np.float32)
             - np.square(x32.mean(axis=0, dtype=np.float32)))
    assert np.abs(naive - everything.var(axis=0)).max() > 10 * np.abs(
        moments["bn"][1] - everything.var(axis=0)).max()
