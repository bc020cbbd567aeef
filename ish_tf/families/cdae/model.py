"""Convolutional denoising autoencoder (CDAE) of whole ISH sections, and its supervised twin.

`build_cdae(ModelConfig)` (registry key "cdae"): grayscale whole sections
(B, S_h, S_w, 1) float32 in [0, 255] -> scaled to [0, 1] inside the model (inverted by
default, so the slide background is ~0 and stain is bright) -> `depth` blocks of
3x3 ReLU convolutions (batch-normalised with norm="batch") each followed by 2x2 max
pooling with switches -> flatten (or, code_pooling="average", the last block's features
averaged over positions) -> a linear dense "code" of `code_size` values -> a dense
layer back to the bottleneck shape -> the mirrored decoder: unpool with the encoder's
switches (or nearest upsampling, `unpool="nearest"`) then convolutions, down to a
1-channel sigmoid "reconstruction" in the model's [0, 1] scaled space (i.e. of
`scale_images(x)`).

Outputs, in order: [code (B, code_size), reconstruction (B, S_h, S_w, 1)] (the
export family "cdae" serves both, code first so `bin/embed` stores the code).

`build_cdae_supervised(ModelConfig)` ("cdae_supervised"): the same encoder (same layer
names, so a trained CDAE's weights load by name, `init_from`) with a multi-label sigmoid
head over the config's `terms`: outputs [probabilities (B, T), code (B, code_size)].

Settings (`ish_tf.families.cdae.config.CdaeConfig`, flags --cdae_*):
  depth (4), filters ([16, 32, 64, 64]; the last repeats if shorter than depth),
  convs_per_block (1), code_size (128), code_pooling ("flatten": the code is a dense
  layer of the flattened last pooled block; "average": of the last block's features
  averaged over all positions, so the code is translation-invariant and the decoder
  gets the layout only through the switches), norm ("none": conv + ReLU as in the
  papers; "batch": conv + batch normalisation + ReLU, which --cdae_norm defaults to),
  unpool ("switches" | "nearest"),
  pool_implementation ("kernel" | "window": the same switches; "window" compiles under
  XLA, and training with --jit_compile selects it),
  invert (True), aspect (1.0: S_w = round(S_h * aspect); S_h = input_size),
  supervised only: terms (list of term ids), dropout (0.0), init_from (a CDAE run
  directory or .keras file, or "").
Task-only options (noise, noise_level, loss, batch_size, image_every, gaf, ...) are
documented in `ish_tf.families.cdae.task`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from ish_tf.families.cdae.config import CODE_POOLING, NORMS, UNPOOL_MODES  # noqa: F401
from ish_tf.models.layers import (
    MaxPoolWithArgmax,
    MaxUnpool,
    unpool_nearest,
)


def cdae_options(config) -> dict[str, Any]:
    """The architecture of `config` (a ModelConfig with a `CdaeConfig`), checked, with the
    derived sizes.

    Returns:
      {"depth", "filters" (list of `depth` ints), "convs_per_block", "code_size",
       "code_pooling", "norm", "unpool", "invert", "aspect", "height", "width",
       "pool_implementation"}.

    Raises:
      ValueError: naming the offending flag.
    """
    family = config.family.validate()
    depth = int(family.depth)
    filters = [int(f) for f in family.filters]
    filters = (filters + [filters[-1]] * depth)[:depth]
    height = int(config.input_size)
    width = max(int(round(height * family.aspect)), 1)
    if min(height, width) < 2 ** depth:
        raise ValueError(f"input {height}x{width} is too small for --cdae_depth={depth} "
                         f"(each side must be >= 2**depth = {2 ** depth})")
    return {"depth": depth, "filters": filters, "convs_per_block": int(family.convs_per_block),
            "code_size": int(family.code_size), "unpool": family.unpool,
            "code_pooling": family.code_pooling, "norm": family.norm,
            "invert": bool(family.invert), "aspect": float(family.aspect),
            "height": height, "width": width, "pool_implementation": family.pool_implementation}


def scale_images(images, invert: bool = True):
    """Pixels [0, 255] -> the model's [0, 1] space (the reconstruction target).

    Args:
      images: float (..., 1) in [0, 255].
      invert: map white (255) to 0 and black to 1.

    Returns:
      Same shape, float32 in [0, 1].
    """
    images = tf.cast(images, tf.float32) / 255.0
    return 1.0 - images if invert else images


def unscale_images(scaled, invert: bool = True):
    """Inverse of `scale_images`: [0, 1] model space -> pixels in [0, 255]."""
    scaled = tf.cast(scaled, tf.float32)
    return 255.0 * ((1.0 - scaled) if invert else scaled)


def _initializer(seed: int | None, k: int):
    return keras.initializers.HeNormal(seed=None if seed is None else seed * 1000 + k)


def _glorot(seed: int | None, k: int):
    return keras.initializers.GlorotUniform(seed=None if seed is None else seed * 1000 + k)


def _conv_block(x, filters: int, opts: dict, seed: int | None, k: int, name: str):
    """3x3 convolution + ReLU, with batch normalisation in between when opts["norm"] says so."""
    if opts.get("norm", "none") == "batch":
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                kernel_initializer=_initializer(seed, k), name=name)(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.Activation("relu", name=f"{name}_relu")(x)
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                               kernel_initializer=_initializer(seed, k), name=name)(x)


def _encoder(inputs, opts: dict, seed: int | None):
    """Conv blocks with switch pooling down to the dense code.

    Returns:
      (code KerasTensor (B, code_size), skips [(pre_pool, switches), ...] top to bottom).
    """
    scale = -1.0 / 255.0 if opts["invert"] else 1.0 / 255.0
    x = keras.layers.Rescaling(scale, offset=1.0 if opts["invert"] else 0.0, name="scale")(inputs)
    skips = []
    k = 0
    for level, f in enumerate(opts["filters"]):
        for j in range(opts["convs_per_block"]):
            x = _conv_block(x, f, opts, seed, k, f"enc{level}_conv{j}")
            k += 1
        pre = x
        x, switches = MaxPoolWithArgmax(2, implementation=opts["pool_implementation"],
                                        name=f"enc{level}_pool")(x)
        skips.append((pre, switches))
    if opts["code_pooling"] == "average":
        # The mean of the last block's features over all positions: the code cannot hold
        # where things are (the decoder gets that from the switches), only what is there.
        x = keras.layers.GlobalAveragePooling2D(name="enc_global_pool")(pre)
    else:
        x = keras.layers.Flatten(name="enc_flatten")(x)
    code = keras.layers.Dense(opts["code_size"], kernel_initializer=_glorot(seed, 900),
                              name="code")(x)
    return code, skips


def _decoder(code, skips, opts: dict, seed: int | None):
    """Mirror of `_encoder`: dense to the bottleneck, then unpool + convs per level."""
    bottleneck = skips[-1][1].shape[1:]  # (h, w, C) of the last pooled tensor
    units = int(bottleneck[0]) * int(bottleneck[1]) * int(bottleneck[2])
    x = keras.layers.Dense(units, activation="relu", kernel_initializer=_initializer(seed, 901),
                           name="dec_dense")(code)
    x = keras.layers.Reshape(tuple(int(d) for d in bottleneck), name="dec_reshape")(x)
    filters = opts["filters"]
    k = 500
    for level in reversed(range(opts["depth"])):
        pre, switches = skips[level]
        if opts["unpool"] == "switches":
            x = MaxUnpool(name=f"dec{level}_unpool")([x, switches, pre])
        else:
            x = unpool_nearest(x, pre, 2, name=f"dec{level}")
        # Channels of the next (shallower) level's pooled tensor, so its switches fit.
        out_f = filters[level - 1] if level > 0 else filters[0]
        for j in range(opts["convs_per_block"]):
            x = _conv_block(x, out_f, opts, seed, k, f"dec{level}_conv{j}")
            k += 1
    return keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", dtype="float32",
                               kernel_initializer=_glorot(seed, 902), name="reconstruction")(x)


def build_cdae(config) -> keras.Model:
    """Builds the CDAE (see the module docstring).

    Args:
      config: input_size (S_h), seed and the `CdaeConfig`.

    Returns:
      keras.Model: images float32 (B, S_h, S_w, 1) in [0, 255] ->
      [code float32 (B, code_size), reconstruction float32 (B, S_h, S_w, 1) in [0, 1]].

    Raises:
      ValueError: bad settings.
    """
    opts = cdae_options(config)
    inputs = keras.Input((opts["height"], opts["width"], 1), name="images")
    code, skips = _encoder(inputs, opts, config.seed)
    recon = _decoder(code, skips, opts, config.seed)
    code = keras.layers.Activation("linear", dtype="float32", name="code_out")(code)
    return keras.Model(inputs, [code, recon], name="cdae")


def encoder_model(model: keras.Model) -> keras.Model:
    """The encoder of a CDAE or supervised CDAE: images -> code (B, code_size), shared weights."""
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.get_layer("code").output, name="cdae_encoder")


def build_cdae_supervised(config) -> keras.Model:
    """The CDAE's encoder with a multi-label sigmoid head over the config's `terms`.

    With the config's `init_from` (a CDAE run directory or .keras file), every encoder
    layer is initialised from the trained CDAE's layer of the same name.

    Args:
      config: as for `build_cdae`, plus the config's terms (non-empty), dropout, init_from.

    Returns:
      keras.Model: images -> [probabilities float32 (B, T), code float32 (B, code_size)].

    Raises:
      ValueError: no terms, bad settings, or an init_from model whose encoder does not fit.
      FileNotFoundError: init_from does not exist.
    """
    opts = cdae_options(config)
    terms = list(config.family.terms or [])
    if not terms:
        raise ValueError("cdae_supervised needs terms: give --cdae_gaf or --cdae_annotations "
                         "with groups of the records' training genes")
    inputs = keras.Input((opts["height"], opts["width"], 1), name="images")
    code, _ = _encoder(inputs, opts, config.seed)
    x = code
    dropout = float(config.family.dropout)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=config.seed, name="head_dropout")(x)
    probs = keras.layers.Dense(len(terms), activation="sigmoid", dtype="float32",
                               kernel_initializer=_glorot(config.seed, 903),
                               name="probabilities")(x)
    code = keras.layers.Activation("linear", dtype="float32", name="code_out")(code)
    model = keras.Model(inputs, [probs, code], name="cdae_supervised")
    init_from = str(config.family.init_from or "")
    if init_from:
        load_encoder_weights(model, init_from)
    return model


def cdae_model_path(source: str, flag: str) -> str:
    """The .keras file of a trained CDAE given as a run directory or as the file itself.

    Raises:
      FileNotFoundError: naming `flag`, the source and the path looked for.
    """
    path = source if source.endswith(".keras") else os.path.join(source, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={source}: {path} not found (train a CDAE first: "
                                "bin/train --model=cdae)")
    return path


def load_encoder_weights(model: keras.Model, source: str) -> list[str]:
    """Copies the encoder weights (scale, enc*, code) of a trained CDAE into `model`.

    Args:
      model: a CDAE or supervised CDAE.
      source: a run directory holding model.keras, or a .keras file.

    Returns:
      Names of the layers copied.

    Raises:
      FileNotFoundError: no model at `source`.
      ValueError: the source has no matching encoder or its shapes differ.
    """
    path = cdae_model_path(source, "--cdae_init_from")
    trained = keras.saving.load_model(path, compile=False)
    copied = []
    for layer in model.layers:
        name = layer.name
        if not (name == "code" or name.startswith("enc")) or not layer.weights:
            continue
        try:
            src = trained.get_layer(name)
        except ValueError as e:
            raise ValueError(f"{path}: has no encoder layer {name!r}; was it trained with the "
                             "same --cdae_depth?") from e
        shapes = [tuple(w.shape) for w in src.weights]
        if shapes != [tuple(w.shape) for w in layer.weights]:
            raise ValueError(f"{path}: layer {name!r} has weights {shapes}, the new model "
                             f"{[tuple(w.shape) for w in layer.weights]} (same --cdae_filters, "
                             "--cdae_code_size and --input_size needed)")
        layer.set_weights(src.get_weights())
        copied.append(name)
    if "code" not in copied:
        raise ValueError(f"{path}: no 'code' layer; not a CDAE model")
    return copied


def parameter_count(model: keras.Model) -> int:
    """Trainable parameters of a model."""
    return int(sum(int(tf.size(w)) for w in model.trainable_weights))


__all__: Sequence[str] = (
    "CODE_POOLING", "NORMS", "UNPOOL_MODES", "build_cdae", "build_cdae_supervised",
    "cdae_model_path", "cdae_options", "encoder_model", "load_encoder_weights", "parameter_count", "scale_images",
    "unscale_images",
)
