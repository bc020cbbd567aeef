"""The cell-identity-code autoencoder (and classifier-autoencoder).

profiles (B, D) float32 -> code (B, C), reconstruction (B, D)
                           [, probabilities (B, classes) for the classifier variant].
"""

from __future__ import annotations

import dataclasses

import keras


def _dense(units: int, name: str, seed: int | None, k: int) -> keras.layers.Dense:
    init = keras.initializers.GlorotUniform(seed=None if seed is None else seed + k)
    return keras.layers.Dense(units, kernel_initializer=init, name=name)


def build_cic(config) -> keras.Model:
    """Builds profile -> [Dense -> activation]* -> code -> mirrored decoder -> profile.

    Args:
      config: `ish_tf.families.ModelConfig` with a `CicConfig` whose `dim` (D) is set
        (the task fills it from the records). `input_size` is unused.

    Returns:
      keras.Model "cic" with input "profile" (B, D) float32 and outputs
      [code (B, C), reconstruction (B, D)] (+ probabilities (B, classes) when
      `classifier`): layers "code", "reconstruction", "probabilities".

    Raises:
      ValueError: D not set, no classes for the classifier, or a bad setting.
    """
    family = config.family.validate()
    if family.dim < 1:
        raise ValueError("the cic model needs its input dimension: CicConfig.dim is set from "
                         "the records' genes by the task (or give it when building in code)")
    seed, k = config.seed, 0
    act = keras.activations.get(family.activation)
    inputs = keras.Input((family.dim,), name="profile", dtype="float32")
    x = inputs
    for i, units in enumerate(family.hidden):
        x = keras.layers.Activation(act, name=f"encoder_act{i}")(
            _dense(int(units), f"encoder_dense{i}", seed, k := k + 1)(x))
    code = _dense(family.code_size, "code", seed, k := k + 1)(x)
    x = code
    for i, units in enumerate(reversed(family.hidden)):
        x = keras.layers.Activation(act, name=f"decoder_act{i}")(
            _dense(int(units), f"decoder_dense{i}", seed, k := k + 1)(x))
    recon = _dense(family.dim, "reconstruction", seed, k := k + 1)(x)
    outputs = [code, recon]
    if family.classifier:
        n = family.num_classes
        if n < 2:
            raise ValueError(f"the classifier-autoencoder needs >= 2 classes, got {n} "
                             "(set from the records' identities by the task)")
        h = code
        if family.classifier_hidden:
            h = keras.layers.Activation(act, name="classifier_act")(
                _dense(family.classifier_hidden, "classifier_dense", seed, k := k + 1)(h))
        logits = _dense(n, "logits", seed, k := k + 1)(h)
        outputs.append(keras.layers.Softmax(name="probabilities", dtype="float32")(logits))
    return keras.Model(inputs, outputs, name="cic_classifier" if family.classifier else "cic")


def build_cic_classifier(config) -> keras.Model:
    """`build_cic` with `classifier=True` (the `cic_classifier` registry entry)."""
    family = dataclasses.replace(config.family, classifier=True)
    return build_cic(dataclasses.replace(config, family=family))
