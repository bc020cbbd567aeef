"""Pooling with switches and unpooling (ish_tf.models.layers)."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ish_tf.models.layers import (
    CropToLike,
    MaxPoolWithArgmax,
    MaxUnpool,
    max_pool_with_switches,
    unpool_nearest,
)


def _reference_unpool(x: np.ndarray, p: int = 2) -> np.ndarray:
    """Each p x p window's maximum kept in place (per channel), zeros elsewhere; edge windows
    of odd sizes cover only the real pixels."""
    b, h, w, c = x.shape
    out = np.zeros_like(x)
    for i in range(0, h, p):
        for j in range(0, w, p):
            win = x[:, i:i + p, j:j + p, :]
            flat = win.reshape(b, -1, c)
            arg = flat.argmax(axis=1)  # (b, c)
            wh, ww = win.shape[1:3]
            for bi in range(b):
                for ci in range(c):
                    yy, xx = divmod(int(arg[bi, ci]), ww)
                    out[bi, i + yy, j + xx, ci] = win[bi, yy, xx, ci]
    return out


@pytest.mark.parametrize("shape", [(3, 6, 8, 4), (2, 5, 7, 3), (2, 1, 3, 2)])
def test_unpool_of_pool_keeps_window_maxima_in_place(shape):
    rng = np.random.default_rng(1)
    # Distinct values: no ties, so the argmax is unique.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32) - 9.5  # never 0
    pooled, switches = MaxPoolWithArgmax(2)(x)
    assert pooled.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])
    assert switches.dtype == tf.int64
    out = MaxUnpool()([pooled, switches, x]).numpy()
    want = _reference_unpool(x)
    np.testing.assert_array_equal(out, want)
    # Exactly one non-zero per window and channel, equal to the window's max.
    assert np.count_nonzero(out) == np.prod(pooled.shape)
    np.testing.assert_array_equal(np.sort(out[out != 0]), np.sort(pooled.numpy().ravel()))


def test_unpool_puts_other_values_at_switch_positions():
    x = tf.constant(np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2))
    pooled, switches = MaxPoolWithArgmax(2)(x)
    values = tf.ones_like(pooled) * 7.0
    out = MaxUnpool()([values, switches, x]).numpy()
    # Arange: each window's max is its bottom-right element.
    assert (out[:, 1::2, 1::2, :] == 7.0).all()
    assert out.sum() == 7.0 * np.prod(pooled.shape)


def test_gradients_flow_through_pool_and_unpool():
    x = tf.Variable(np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32))
    w = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        pooled, switches = MaxPoolWithArgmax(2)(x)
        out = MaxUnpool()([pooled * 2.0, switches, x])
        loss = tf.reduce_sum(out * w)
    grad = tape.gradient(loss, x).numpy()
    mask = _reference_unpool(x.numpy()) != 0
    np.testing.assert_allclose(grad[mask], 2.0 * w.numpy()[mask], rtol=1e-6)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("shape,pool", [((3, 6, 8, 4), (2, 2)), ((2, 5, 7, 3), (2, 2)),
                                        ((2, 7, 8, 2), (3, 3)), ((1, 5, 4, 1), (3, 2)),
                                        ((2, 1, 3, 2), (2, 2))])
def test_window_implementation_matches_the_kernel_and_compiles_under_xla(shape, pool):
    """The "window" pooling gives tf.nn.max_pool_with_argmax's values and switches, ties
    (first in row-major order) and the 'SAME' padding split (top/left for p = 3) included,
    the same gradients, and it compiles under XLA, where the kernel cannot."""
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 3, shape).astype(np.float32)  # small integers: many ties
    ph, pw = pool
    ref_pooled, ref_switches = tf.nn.max_pool_with_argmax(
        x, [1, ph, pw, 1], [1, ph, pw, 1], "SAME", include_batch_in_index=True,
        output_dtype=tf.int64)
    for got in (max_pool_with_switches(tf.constant(x), ph, pw),
                MaxPoolWithArgmax(pool, implementation="window")(x),
                tf.function(lambda t: max_pool_with_switches(t, ph, pw),
                            jit_compile=True)(tf.constant(x))):
        np.testing.assert_array_equal(got[0].numpy(), ref_pooled.numpy())
        np.testing.assert_array_equal(got[1].numpy(), ref_switches.numpy())
    # Gradients through pooling and unpooling are the kernel's (ties included: all of a
    # window's gradient goes to its switch).
    w = tf.constant(rng.normal(size=ref_pooled.shape).astype(np.float32))
    grads = []
    for impl in ("kernel", "window"):
        xv = tf.Variable(x)
        with tf.GradientTape() as tape:
            pooled, switches = MaxPoolWithArgmax(pool, implementation=impl)(xv)
            out = MaxUnpool()([pooled * w, switches, xv])
            loss = tf.reduce_sum(out * out)
        grads.append(tape.gradient(loss, xv).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)
    assert np.count_nonzero(grads[0]) > 0
    assert MaxPoolWithArgmax.from_config(
        MaxPoolWithArgmax(pool, implementation="window").get_config()).implementation == "window"
    with pytest.raises(ValueError, match="implementation"):
        MaxPoolWithArgmax(2, implementation="fast")


def test_nearest_unpool_crops_odd_sizes():
    x = tf.random.uniform((2, 7, 5, 3), seed=0)
    pooled, _ = MaxPoolWithArgmax(2)(x)
    up = keras.layers.UpSampling2D(2)(pooled)
    out = CropToLike()([up, x])
    assert out.shape == (2, 7, 5, 3)
    np.testing.assert_array_equal(out.numpy()[:, ::2, ::2], pooled.numpy())


def test_bad_pool_size_is_rejected():
    with pytest.raises(ValueError, match="pool_size"):
        MaxPoolWithArgmax(0)


def _tiny_model(unpool: str = "switches") -> keras.Model:
    inp = keras.Input((7, 6, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inp)
    pooled, switches = MaxPoolWithArgmax(2, name="pool")(x)
    if unpool == "switches":
        up = MaxUnpool(name="unpool")([pooled, switches, x])
    else:
        up = unpool_nearest(pooled, x, 2, name="near")
    return keras.Model(inp, [pooled, up])


@pytest.mark.parametrize("unpool", ["switches", "nearest"])
def test_model_survives_keras_save_load_and_saved_model(tmp_path, unpool):
    model = _tiny_model(unpool)
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 7, 6, 1)).astype(np.float32)
    want = [o.numpy() for o in model(x)]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    for a, b in zip(want, loaded(x), strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-6)
    # Plain tf.saved_model.save of a tf.function over the model.
    module = tf.Module()
    module.model = loaded
    module.f = tf.function(lambda t: loaded(t, training=False)[1],
                           input_signature=[tf.TensorSpec([None, 7, 6, 1], tf.float32)])
    sm = str(tmp_path / "sm")
    tf.saved_model.save(module, sm)
    restored = tf.saved_model.load(sm)
    np.testing.assert_allclose(restored.f(x).numpy(), want[1], rtol=1e-6, atol=1e-6)


def test_model_exports_through_ish_tf_exporter(tmp_path):
    from ish_tf.export.saved_model import export_saved_model

    model = _tiny_model("switches")
    out = export_saved_model(model, str(tmp_path / "exp"), family="t",
                             outputs=["pooled", "unpooled"])
    assert os.path.isfile(os.path.join(out, "saved_model.pb"))
    served = tf.saved_model.load(out)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 7, 6, 1)).astype(np.float32)
    got = served.signatures["predict_images"](images=tf.constant(x))
    np.testing.assert_allclose(got["unpooled"].numpy(), model(x)[1].numpy(), rtol=1e-5, atol=1e-5)
