"""ArcFace (additive angular margin, Deng et al. 2019): a cosine classifier and its margin.

The layer maps features (B, D) to `s * cos(theta_j)` (B, n): the cosine between the
L2-normalised feature and the L2-normalised weight column of class j, times the scale
s. That is the head's output at inference (its softmax gives class probabilities). In
training the target class's logit is replaced by `s * cos(theta_y + m)`
(`arcface_margin_logits`), which is what makes the classes' angular clusters tight;
keeping the margin out of the layer keeps the exported model free of labels.

DeepNoise (arXiv 2209.05772) uses s = 30, m = 0.1 over 1,139 classes.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ish_tf")
class ArcFace(keras.layers.Layer):
    """Cosine classifier: (B, D) -> (B, n) logits `scale * cos(theta)`, float32.

    Args:
      units: number of classes n.
      scale: s.
      margin: m in radians (used by `margin_logits` in training, stored for the loss).
      kernel_initializer: initialiser of the (D, n) class weights.
    """

    def __init__(self, units: int, scale: float = 30.0, margin: float = 0.1,
                 kernel_initializer="glorot_uniform", epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"ArcFace needs >= 1 class, got {units}")
        if scale <= 0 or not 0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace needs scale > 0 and 0 <= margin < pi/2, got "
                             f"s={scale}, m={margin}")
        self.units = int(units)
        self.scale = float(scale)
        self.margin = float(margin)
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.units),
                                      initializer=self.kernel_initializer, trainable=True)

    def cosine(self, inputs):
        """cos(theta): (B, D) -> (B, n) in [-1, 1]."""
        x = keras.ops.cast(inputs, "float32")
        x = x * keras.ops.rsqrt(keras.ops.maximum(
            keras.ops.sum(keras.ops.square(x), axis=-1, keepdims=True), self.epsilon))
        w = keras.ops.cast(self.kernel, "float32")
        w = w * keras.ops.rsqrt(keras.ops.maximum(
            keras.ops.sum(keras.ops.square(w), axis=0, keepdims=True), self.epsilon))
        return keras.ops.clip(keras.ops.matmul(x, w), -1.0, 1.0)

    def call(self, inputs):
        return self.scale * self.cosine(inputs)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale,
                "margin": self.margin, "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


def arcface_margin_logits(logits: tf.Tensor, labels: tf.Tensor, scale: float,
                          margin: float) -> tf.Tensor:
    """Training logits: the target's `s cos(theta)` -> `s cos(theta + m)`.

    Follows insightface's "easy margin off" form: where theta + m would pass pi
    (cos(theta) <= cos(pi - m)) the logit becomes `s (cos(theta) - m sin(m))`, which
    keeps it decreasing in theta. Rows with a negative label (unlabelled) are unchanged.

    Args:
      logits: (B, n) `s * cos(theta)` from `ArcFace`.
      labels: (B,) int class index, or -1.
      scale, margin: the layer's s and m.

    Returns:
      (B, n) float32.

    Example: s = 30, m = 0.1, cos(theta_y) = 0.8 (theta_y = 0.6435) gives
    30 cos(0.7435) = 30 * 0.7361 = 22.08 for the target instead of 24.
    """
    logits = tf.cast(logits, tf.float32)
    cos = logits / scale
    sin = tf.sqrt(tf.clip_by_value(1.0 - tf.square(cos), 0.0, 1.0))
    cos_m = cos * math.cos(margin) - sin * math.sin(margin)
    cos_m = tf.where(cos > math.cos(math.pi - margin), cos_m, cos - margin * math.sin(margin))
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    target = tf.one_hot(tf.maximum(labels, 0), tf.shape(logits)[-1]) > 0.5
    target = tf.logical_and(target, (labels >= 0)[:, None])
    return tf.where(target, scale * cos_m, logits)
