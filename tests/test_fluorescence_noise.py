"""The technical-noise augmentation of the fluorescence tasks (`--fluorescence_noise_augment`)."""

import numpy as np
import tensorflow as tf

from ish_tf.families.fluorescence.task import noisy_batches, technical_noise


def _images():
    rng = np.random.default_rng(0)
    # Smooth z-scored sites: blur must barely change them, the illumination field must.
    base = rng.normal(size=(4, 8, 8, 3)).repeat(4, 1).repeat(4, 2)
    return tf.constant(base, tf.float32)


def test_strength_zero_is_the_identity_and_noise_is_seeded_per_site():
    x = _images()
    seed = tf.constant([3, 5], tf.int64)
    assert technical_noise(x, seed, 0.0) is x
    a, b = technical_noise(x, seed, 1.0), technical_noise(x, seed, 1.0)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    c = technical_noise(x, tf.constant([3, 6], tf.int64), 1.0)
    assert not np.allclose(a.numpy(), c.numpy())
    assert a.shape == x.shape
    # Each site gets its own field: the relative change differs between sites.
    change = np.abs(a.numpy() - x.numpy()).mean(axis=(1, 2, 3))
    assert change.min() > 0 and np.ptp(change) > 0


def test_illumination_field_is_a_bounded_gain():
    x = tf.ones((64, 16, 16, 2))
    y = technical_noise(x, tf.constant([1, 2], tf.int64), 1.0).numpy()
    # Gradient 0.35, vignetting 0.3 / 2 * 2 and edge dimming 0.35 at most; blur keeps a
    # constant image constant away from the zero-padded border.
    inner = y[:, 4:-4, 4:-4]
    assert inner.min() >= 1 - 0.35 - 0.3 - 0.35 - 1e-5 and inner.max() <= 1.35 + 1e-5
    assert np.ptp(inner.mean(axis=(1, 2, 3))) > 0.1


def test_noisy_batches_draw_different_noise_for_each_view_and_keep_labels():
    x = _images()
    labels = tf.constant([0, 1, -1, -1])
    ds = tf.data.Dataset.from_tensors((x, x, labels)).repeat(2)
    out = list(noisy_batches(ds, 1.0, seed=0, views=2))
    assert len(out) == 2
    (s0, t0, y0), (s1, _, _) = out
    np.testing.assert_array_equal(y0.numpy(), labels.numpy())
    assert not np.allclose(s0.numpy(), t0.numpy())
    assert not np.allclose(s0.numpy(), s1.numpy())
    assert noisy_batches(ds, 0.0, seed=0, views=2) is ds


def test_a_resumed_stream_draws_the_noise_of_the_uninterrupted_one():
    x = _images()
    ds = tf.data.Dataset.from_tensors((x, tf.constant([0, 1, 2, 3]))).repeat(3)
    whole = [b[0].numpy() for b in noisy_batches(ds, 1.0, seed=4, views=1)]
    resumed = [b[0].numpy() for b in noisy_batches(ds.skip(2), 1.0, seed=4, views=1,
                                                  start_step=2)]
    np.testing.assert_array_equal(whole[2], resumed[0])
