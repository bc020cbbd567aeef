"""Pooling with switches and unpooling (Zeiler & Fergus 2014; Noh et al. 2015).

`MaxPoolWithArgmax` max-pools and also returns the *switches*: for every pooled value,
the flat position of the input element it came from. `MaxUnpool` scatters values back
to those positions and leaves zeros elsewhere, so a decoder can put each feature back
exactly where the encoder found it. `CropToLike` + `keras.layers.UpSampling2D` is the
plain alternative (`--unpool=nearest`).

Odd sizes. Pooling uses 'SAME' padding: an (H, W) input gives (ceil(H/p), ceil(W/p))
outputs, and the last row/column windows only cover the real pixels (TensorFlow pads
with -inf, so a padded position is never the maximum and switches always point into the
unpadded input). Unpooling takes the pre-pool tensor as a shape reference and returns
exactly (H, W), so an encoder/decoder pair round-trips odd sizes.

Switches are int64 indices into the flattened (B, H, W, C) input *including* the batch
(`include_batch_in_index=True`), which makes unpooling a single `scatter_nd`. Both
layers are registered for `model.keras` serialisation and use only TensorFlow ops that
a SavedModel (and TF Serving) can run; gradients flow through the pooled values
(`MaxPoolGradWithArgmax`) and through the unpooled values (a gather).

Two implementations of the pooling give identical values and switches (ties go to the
first window position in row-major order, padding as above): "kernel",
`tf.nn.max_pool_with_argmax`, the faster one in plain TensorFlow, which XLA cannot
compile (no tf2xla kernel); and "window", reshapes, `argmax` and a gather, which XLA
compiles (`bin/train --jit_compile` selects it). bench/bench_switch_pooling.py measures
both.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value}")
    return value  # type: ignore[return-value]


def _pooled(size: int | None, pool: int) -> int | None:
    return None if size is None else -(-size // pool)


POOL_IMPLEMENTATIONS: tuple[str, ...] = ("kernel", "window")


def max_pool_with_switches(x: tf.Tensor, ph: int, pw: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`tf.nn.max_pool_with_argmax` ('SAME', stride = window, batch in the index) from
    ops XLA can compile.

    The input is padded with -inf as TensorFlow pads for 'SAME' (the extra row or column
    split with the smaller half on top/left), cut into (p_h * p_w)-element windows, and
    each window's first maximum is taken with `argmax` and a gather (so the gradient goes
    to that element alone, as `MaxPoolGradWithArgmax` sends it).

    Args:
      x: float (B, H, W, C).
      ph, pw: window and stride.

    Returns:
      (pooled (B, ceil(H/p_h), ceil(W/p_w), C), switches int64 of the same shape).
    """
    shape = tf.shape(x, out_type=tf.int64)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    ho, wo = -(-h // ph), -(-w // pw)
    pad_h, pad_w = ho * ph - h, wo * pw - w
    top, left = pad_h // 2, pad_w // 2
    padded = tf.pad(x, [[0, 0], [top, pad_h - top], [left, pad_w - left], [0, 0]],
                    constant_values=tf.constant(float("-inf"), x.dtype))
    windows = tf.reshape(padded, tf.stack([b, ho, ph, wo, pw, c]))
    windows = tf.reshape(tf.transpose(windows, [0, 1, 3, 5, 2, 4]),
                         tf.stack([b, ho, wo, c, ph * pw]))
    k = tf.argmax(windows, axis=-1, output_type=tf.int64)
    pooled = tf.gather(windows, k[..., None], batch_dims=4)[..., 0]
    rows = tf.range(ho)[None, :, None, None] * ph + k // pw - top
    cols = tf.range(wo)[None, None, :, None] * pw + k % pw - left
    batch = tf.range(b)[:, None, None, None]
    channel = tf.range(c)[None, None, None, :]
    switches = ((batch * h + rows) * w + cols) * c + channel
    pooled.set_shape([x.shape[0], _pooled(x.shape[1], ph), _pooled(x.shape[2], pw), x.shape[3]])
    switches.set_shape(pooled.shape)
    return pooled, switches


@keras.saving.register_keras_serializable(package="ish_tf")
class MaxPoolWithArgmax(keras.layers.Layer):
    """Non-overlapping max pooling that also returns the argmax switches.

    Args:
      pool_size: window (and stride) p or (p_h, p_w).
      implementation: "kernel" (`tf.nn.max_pool_with_argmax`) or "window"
        (`max_pool_with_switches`, which XLA can compile); the same outputs.
      **kwargs: keras.layers.Layer arguments (name, dtype).

    Call args:
      inputs: float (B, H, W, C).

    Returns:
      (pooled (B, ceil(H/p_h), ceil(W/p_w), C) same dtype,
       switches int64 of the same shape: flat indices into the (B, H, W, C) input).
    """

    def __init__(self, pool_size: int | tuple[int, int] = 2, implementation: str = "kernel",
                 **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        if implementation not in POOL_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {POOL_IMPLEMENTATIONS}, got "
                             f"{implementation!r}")
        self.implementation = implementation

    def call(self, inputs):
        ph, pw = self.pool_size
        if self.implementation == "window":
            pooled, switches = max_pool_with_switches(inputs, ph, pw)
        else:
            pooled, switches = tf.nn.max_pool_with_argmax(
                inputs, ksize=[1, ph, pw, 1], strides=[1, ph, pw, 1], padding="SAME",
                include_batch_in_index=True, output_dtype=tf.int64)
        # Switches are an index, not a differentiable output.
        return pooled, tf.stop_gradient(switches)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        shape = (b, _pooled(h, self.pool_size[0]), _pooled(w, self.pool_size[1]), c)
        return shape, shape

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape(tuple(inputs.shape))[0]
        return (keras.KerasTensor(shape, dtype=inputs.dtype),
                keras.KerasTensor(shape, dtype="int64"))

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": list(self.pool_size),
                "implementation": self.implementation}


@keras.saving.register_keras_serializable(package="ish_tf")
class MaxUnpool(keras.layers.Layer):
    """Puts each value back at its switch position; zeros everywhere else.

    Call args:
      inputs: [values (B, h, w, C), switches int64 (B, h, w, C) from
        `MaxPoolWithArgmax`, like (B, H, W, C) the pre-pool tensor (only its shape is
        used)].

    Returns:
      (B, H, W, C) with the dtype of `values`.
    """

    def call(self, inputs):
        values, switches, like = inputs
        shape = tf.shape(like, out_type=tf.int64)
        size = tf.reduce_prod(shape)
        flat = tf.scatter_nd(tf.reshape(switches, [-1, 1]), tf.reshape(values, [-1]),
                             tf.reshape(size, [1]))
        out = tf.reshape(flat, shape)
        out.set_shape(like.shape)
        return out

    def compute_output_shape(self, input_shapes):
        values, _, like = input_shapes
        return tuple(like[:3]) + (values[3],)

    def compute_output_spec(self, inputs):
        values, _, like = inputs
        return keras.KerasTensor(tuple(like.shape[:3]) + (values.shape[3],), dtype=values.dtype)


@keras.saving.register_keras_serializable(package="ish_tf")
class CropToLike(keras.layers.Layer):
    """Crops (B, H', W', C) to the height and width of a reference (B, H, W, C'), H <= H'.

    Used after `UpSampling2D` when the pre-pool size was odd (upsampling gives 2*ceil(H/2)).

    Call args:
      inputs: [x (B, H', W', C), like (B, H, W, C')].

    Returns:
      (B, H, W, C).
    """

    def call(self, inputs):
        x, like = inputs
        shape = tf.shape(like)
        out = x[:, :shape[1], :shape[2], :]
        out.set_shape([x.shape[0], like.shape[1], like.shape[2], x.shape[3]])
        return out

    def compute_output_shape(self, input_shapes):
        x, like = input_shapes
        return (x[0], like[1], like[2], x[3])

    def compute_output_spec(self, inputs):
        x, like = inputs
        return keras.KerasTensor((x.shape[0], like.shape[1], like.shape[2], x.shape[3]),
                                 dtype=x.dtype)


def unpool_nearest(values, like, pool_size: int | tuple[int, int] = 2, name: str | None = None):
    """Plain upsampling (nearest neighbour, each value copied p x p times) to `like`'s size.

    Args:
      values: KerasTensor (B, h, w, C).
      like: KerasTensor (B, H, W, C'), the pre-pool tensor.
      pool_size: the pooling factor to undo.
      name: prefix of the layer names.

    Returns:
      KerasTensor (B, H, W, C).
    """
    up = keras.layers.UpSampling2D(_pair(pool_size, "pool_size"), interpolation="nearest",
                                   name=f"{name}_upsample" if name else None)(values)
    return CropToLike(name=f"{name}_crop" if name else None)([up, like])
