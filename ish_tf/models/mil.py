"""Attention-based multiple-instance pooling (Ilse, Tomczak & Welling, ICML 2018).

A bag is a set of instance embeddings h_1..h_N (patches of a section, of a gene in a
donor, of a gene); the gated attention pooling weighs them

    a_k = softmax_k( wᵀ (tanh(V h_k) ⊙ sigmoid(U h_k)) ),   z = Σ_k a_k h_k

and *sums* (as the authors' reference AMLab-Amsterdam/AttentionDeepMIL does), so the
bag embedding z does not depend on the bag's size or order. Bags are padded to a fixed
N with a mask: padded instances get logit -inf (weight exactly 0), so a short bag is
pooled over its real patches only. (The keras.io MIL example concatenates a fixed bag
of 3 instead: its bag embedding depends on size and order; not copied.)
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ish_tf")
class GatedAttentionPooling(keras.layers.Layer):
    """(B, N, D) instances + (B, N) mask -> ((B, D) weighted sum, (B, N) weights).

    Args:
      attention_dim: width L of V and U (128 in the paper; smaller for small data).
      gated: use the gate sigmoid(U h) (the paper's gated variant); False gives the
        plain tanh attention.
      seed: initialiser seed.
    """

    def __init__(self, attention_dim: int = 32, gated: bool = True, seed: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.attention_dim = int(attention_dim)
        self.gated = bool(gated)
        self.seed = seed
        init = keras.initializers.GlorotUniform(seed=seed)
        self.V = keras.layers.Dense(self.attention_dim, activation="tanh", kernel_initializer=init,
                                    name="V")
        self.U = (keras.layers.Dense(self.attention_dim, activation="sigmoid",
                                     kernel_initializer=keras.initializers.GlorotUniform(
                                         seed=None if seed is None else seed + 1), name="U")
                  if self.gated else None)
        self.w = keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers
                                    .GlorotUniform(seed=None if seed is None else seed + 2),
                                    name="w")

    def build(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and \
            isinstance(input_shape[0], (list, tuple)) else input_shape
        self.V.build(shape)
        if self.U is not None:
            self.U.build(shape)
        self.w.build(tuple(shape[:-1]) + (self.attention_dim,))
        self.built = True

    def call(self, instances, mask=None):
        h = self.V(instances)
        if self.U is not None:
            h = h * self.U(instances)
        logits = tf.squeeze(self.w(h), axis=-1)  # (B, N)
        if mask is not None:
            mask = tf.cast(mask, tf.bool)
            logits = tf.where(mask, logits, tf.fill(tf.shape(logits), -1e9))
        weights = tf.nn.softmax(logits, axis=-1)
        if mask is not None:
            # An all-padded bag pools to 0 instead of an average of padding.
            weights = weights * tf.cast(mask, weights.dtype)
        pooled = tf.einsum("bn,bnd->bd", weights, tf.cast(instances, weights.dtype))
        return pooled, weights

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {**super().get_config(), "attention_dim": self.attention_dim,
                "gated": self.gated, "seed": self.seed}


def build_attention_mil(n_instances: int, dim: int, *, hidden: int = 32,
                        attention_dim: int = 32, dropout: float = 0.0, gated: bool = True,
                        seed: int | None = 0) -> keras.Model:
    """Instance projection -> gated attention pooling -> bag logit.

    Args:
      n_instances: N, the padded bag size.
      dim: D, the instance (patch embedding) width.
      hidden: width of the per-instance projection (Dense + ReLU); 0 pools the inputs.
      attention_dim: width of the attention network.
      dropout: dropout on the projected instances while training.
      gated: gated attention (the paper's) or plain tanh attention.
      seed: initialiser seed.

    Returns:
      keras.Model with inputs `instances` (B, N, D) float32 and `mask` (B, N) bool, and
      outputs `logit` (B, 1) and `attention` (B, N) (0 on padded instances).
    """
    instances = keras.Input((n_instances, dim), name="instances")
    mask = keras.Input((n_instances,), dtype="bool", name="mask")
    h = instances
    if hidden:
        h = keras.layers.Dense(hidden, activation="relu", name="project",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(h)
    if dropout:
        h = keras.layers.Dropout(dropout, seed=seed, name="dropout")(h)
    pooled, weights = GatedAttentionPooling(attention_dim, gated=gated, seed=seed,
                                            name="attention_pool")(h, mask=mask)
    logit = keras.layers.Dense(1, name="logit",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(pooled)
    weights = keras.layers.Identity(name="attention")(weights)
    return keras.Model([instances, mask], [logit, weights], name="attention_mil")
