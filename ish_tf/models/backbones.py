"""Backbones: image (B, R, R, 3) float32 in [0, 255] -> feature vector (B, F).

Every backbone carries the input preprocessing that matches its weights as ordinary
registered layers inside the model, so a saved model (`model.keras`, SavedModel)
takes raw pixel values and no caller has to remember which normalisation applies.

Registry: `BACKBONES[name] = builder(input_size, weights) -> keras.Model`; add a
backbone with `@register_backbone("name")`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np

# ImageNet channel means in BGR order, as used by keras.applications "caffe" mode.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

BackboneBuilder = Callable[[int, str | None], keras.Model]
BACKBONES: dict[str, BackboneBuilder] = {}


class BackboneWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or loaded."""


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator adding `builder(input_size, weights) -> keras.Model` to `BACKBONES`."""

    def wrap(builder: BackboneBuilder) -> BackboneBuilder:
        BACKBONES[name] = builder
        return builder

    return wrap


@keras.saving.register_keras_serializable(package="ish_tf")
class CaffePreprocess(keras.layers.Layer):
    """keras.applications "caffe" preprocessing: RGB -> BGR, minus the ImageNet mean.

    Same result as `keras.applications.resnet50.preprocess_input` on channels-last
    float input, but as a plain layer (no Lambda) so it survives `model.keras` and
    SavedModel export.

    Input: (B, H, W, 3) RGB in [0, 255]. Output: (B, H, W, 3) BGR, zero-centred.
    """

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        bgr = keras.ops.flip(x, axis=-1)
        mean = keras.ops.convert_to_tensor(np.asarray(CAFFE_BGR_MEAN, np.float32), self.compute_dtype)
        return bgr - mean

    def compute_output_shape(self, input_shape):
        return input_shape


def _resolve_weights(weights: str | None) -> str | None:
    """Normalises the `--backbone_weights` value: "imagenet", None or an existing file.

    Raises:
      BackboneWeightsError: a path was given that does not exist.
    """
    if weights is None or str(weights).lower() in ("", "none"):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    if not os.path.isfile(weights):
        raise BackboneWeightsError(
            f"--backbone_weights={weights}: no such file (expected imagenet, none or a "
            "path to a .weights.h5 / .h5 file)")
    return weights


@register_backbone("resnet50")
def resnet50(input_size: int = 256, weights: str | None = None) -> keras.Model:
    """ResNet50 (keras.applications, no top, global average pooling), caffe preprocessing.

    Args:
      input_size: side R of the square input.
      weights: "imagenet", None/"none" (random init) or a weights file of this backbone
        (as written by `backbone.save_weights(...)`, or the keras.applications notop h5).

    Returns:
      keras.Model named "resnet50_backbone": (B, R, R, 3) [0, 255] -> (B, 2048).

    Raises:
      BackboneWeightsError: ImageNet weights cannot be downloaded (offline), or the
        weights file does not exist or does not fit the architecture.
    """
    weights = _resolve_weights(weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    try:
        base = keras.applications.ResNet50(
            include_top=False, weights="imagenet" if weights == "imagenet" else None,
            input_shape=(input_size, input_size, 3), pooling="avg")
    except Exception as e:  # download errors come as URLError, OSError, Exception(...)
        if weights != "imagenet":
            raise
        raise BackboneWeightsError(
            "could not obtain the ImageNet weights for resnet50 "
            f"({type(e).__name__}: {e}). This machine is probably offline: pass "
            "--backbone_weights=none to train from scratch, or "
            "--backbone_weights=/path/to/resnet50.weights.h5, or place "
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/.") from e
    features = base(x)
    model = keras.Model(inputs, features, name="resnet50_backbone")
    if weights not in (None, "imagenet"):
        _load_weights_file(model, base, weights)
    return model


def _load_weights_file(model: keras.Model, base: keras.Model, path: str) -> None:
    """Loads `path` into the wrapped backbone, or into the bare keras.applications net.

    Both layouts occur: files written by `backbone.save_weights` (this wrapper) and
    the keras.applications notop h5 files (the bare network).
    """
    errors = []
    for target in (model, base):
        try:
            target.load_weights(path)
            return
        except Exception as e:  # structure mismatch; try the other layout
            errors.append(f"{target.name}: {type(e).__name__}: {e}")
    raise BackboneWeightsError(
        f"--backbone_weights={path} does not fit the {model.name} architecture: "
        + " | ".join(errors))


@register_backbone("small_cnn")
def small_cnn(input_size: int = 64, weights: str | None = None,
              widths: tuple[int, ...] = (32, 64, 128)) -> keras.Model:
    """A small CNN for the quickstart and tests: [0, 255] -> [-1, 1], 3 strided conv blocks.

    Group normalisation instead of batch normalisation: no per-replica batch
    statistics, so one training step is identical on one device and under
    MirroredStrategy.

    Args:
      input_size: side R of the square input (any size >= 8).
      weights: None/"none", or a weights file written by `backbone.save_weights`.
        ("imagenet" is not available for this backbone.)
      widths: filters of each block; each block is conv3x3 stride 2 + conv3x3, each followed by
        GroupNorm and ReLU.

    Returns:
      keras.Model named "small_cnn_backbone": (B, R, R, 3) -> (B, widths[-1]).

    Raises:
      BackboneWeightsError: "imagenet" was requested or the file does not fit.
    """
    weights = _resolve_weights(weights)
    if weights == "imagenet":
        raise BackboneWeightsError("--backbone=small_cnn has no ImageNet weights; use none or a file")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # [0, 255] -> [-1, 1]: ISH patches are mostly near-white, so centring matters.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_pm1")(inputs)
    for i, width in enumerate(widths):
        for j, stride in ((1, 2), (2, 1)):
            x = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                                    name=f"block{i + 1}_conv{j}")(x)
            # Group norm: per-sample statistics keep faint stain differences from vanishing
            # (without it, near-white patches give near-constant features and the triplet
            # embedding collapses), and no batch statistics means one step is identical on
            # one device and under MirroredStrategy.
            x = keras.layers.GroupNormalization(groups=min(8, width), name=f"block{i + 1}_gn{j}")(x)
            x = keras.layers.ReLU(name=f"block{i + 1}_relu{j}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name="small_cnn_backbone")
    if weights is not None:
        try:
            model.load_weights(weights)
        except Exception as e:
            raise BackboneWeightsError(
                f"--backbone_weights={weights} does not fit small_cnn: {type(e).__name__}: {e}") from e
    return model


def build_backbone(name: str, input_size: int, weights: str | None = None) -> keras.Model:
    """Builds a registered backbone by name.

    Args:
      name: a key of `BACKBONES` ("resnet50", "small_cnn").
      input_size: side of the square input.
      weights: "imagenet", None/"none" or a weights file.

    Returns:
      keras.Model (B, R, R, 3) float32 [0, 255] -> (B, F).

    Raises:
      ValueError: unknown backbone name.
      BackboneWeightsError: see the individual builders.
    """
    if name not in BACKBONES:
        raise ValueError(f"--backbone={name!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[name](input_size, weights)
