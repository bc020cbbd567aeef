"""Embedding heads: feature vector (B, F) -> embedding (B, D).

The triplet head follows the reference implementation (Hermans et al. 2017 "fc1024",
used by Abed-Esfahani et al. 2022): Dense 1024 -> BatchNorm -> ReLU -> Dense D with
orthogonal initialisation, optionally followed by L2 normalisation.
"""

from __future__ import annotations

import keras

BATCH_NORM_MODES = ("batch", "sync", "none")


@keras.saving.register_keras_serializable(package="ish_tf")
class L2Normalize(keras.layers.Layer):
    """Scales each row to unit Euclidean norm: (B, D) -> (B, D).

    Computed in float32 whatever the mixed-precision policy, because the squared norm
    of a 128-d float16 vector loses most of its precision.

    Args:
      epsilon: floor of the squared norm, so an all-zero row stays finite.
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        sq = keras.ops.sum(keras.ops.square(x), axis=-1, keepdims=True)
        return x * keras.ops.rsqrt(keras.ops.maximum(sq, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def head_parameter_count(features: int, units: int = 1024, embedding_dim: int = 128,
                         batch_norm: str = "batch") -> int:
    """Number of weights (trainable and not) of `embedding_head` for a given input width.

    Args:
      features: width F of the backbone output.
      units: hidden width.
      embedding_dim: output width D.
      batch_norm: "batch", "sync" (4 weights per unit: gamma, beta, moving mean and
        variance) or "none".

    Returns:
      The total count, e.g. 2,233,472 for F=2048, 1024, 128 with batch norm.
    """
    bn = 4 * units if batch_norm != "none" else 0
    return features * units + units + bn + units * embedding_dim + embedding_dim


def embedding_head(features: int, units: int = 1024, embedding_dim: int = 128,
                   l2_normalize: bool = False, batch_norm: str = "batch",
                   seed: int | None = None, name: str = "embedding_head") -> keras.Model:
    """The triplet embedding head as a small functional model.

    Args:
      features: width F of its input (the backbone output).
      units: hidden width (1024 in the reference).
      embedding_dim: embedding width D (128 in the reference).
      l2_normalize: append `L2Normalize` so embeddings lie on the unit sphere.
      batch_norm: "batch" (plain BatchNormalization), "sync" (synchronised across
        replicas: statistics over the global batch under MirroredStrategy) or "none".
      seed: seed of the initialisers (None: Keras' global seed).
      name: model name.

    Returns:
      keras.Model (B, F) -> (B, D) float32.

    Raises:
      ValueError: unknown `batch_norm` mode.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm={batch_norm!r} is not one of {BATCH_NORM_MODES}")
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(units, name="fc1",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(inputs)
    if batch_norm != "none":
        # Keras' default momentum 0.99 vs TF1's 0.999: statistics only matter at inference.
        x = keras.layers.BatchNormalization(synchronized=batch_norm == "sync", name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    x = keras.layers.Dense(embedding_dim, name="embedding",
                           kernel_initializer=keras.initializers.Orthogonal(seed=seed))(x)
    if l2_normalize:
        x = L2Normalize(name="l2_normalize")(x)
    else:
        # Embeddings leave the model as float32 even under a mixed-precision policy.
        x = keras.layers.Activation("linear", dtype="float32", name="embedding_float32")(x)
    return keras.Model(inputs, x, name=name)
