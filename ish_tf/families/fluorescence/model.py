"""The fluorescence network, shared by `--model=fluorescence` and `--model=mean_teacher`.

image (B, R, R, C) float32, normalised per (experiment, plate, channel)
  -> backbone with a C-channel stem -> global average pooling (B, F)
  [-> Dense (B, embedding_dim)] -> L2 normalisation: "embedding" (B, D)
  -> ArcFace (s * cos) or Dense: "logits" (B, n) -> softmax: "probabilities" (B, n)

Outputs, in order: embedding, probabilities, logits. The model takes images already
normalised (z-scores per plate and channel, `ish_tf.families.fluorescence.data`): the
statistics belong to the plate, not to the image, so they cannot live in the network.

Backbones: `small_cnn` (CPU-sized, batch norm) and `resnet50` / `xception` from
keras.applications built for C channels. Given the notop ImageNet weights file of the
RGB network, the C-channel network gets every weight unchanged except the stem's
kernel (k, k, 3, F), which becomes the RGB mean tiled C times and scaled by 3/C
(`adapt_stem_kernel`): an image whose C channels are equal then gives the stem the
response the RGB network gives a gray image.
"""

from __future__ import annotations

import keras
import numpy as np

from ish_tf.models.arcface import ArcFace
from ish_tf.models.heads import L2Normalize

OUTPUTS = ("embedding", "probabilities", "logits")


class BackboneWeightsError(RuntimeError):
    """A weights file that is missing or does not fit the backbone."""


def adapt_stem_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """An RGB stem kernel (k, k, 3, F) -> (k, k, C, F): RGB mean, tiled, times 3/C.

    Example: a 1x1 kernel with RGB weights (1, 2, 3) for one filter becomes, for C = 6,
    six weights of 2 * 3/6 = 1.0, so a constant image of value v gives 6 v in both.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected an RGB stem kernel (k, k, 3, F), got {kernel.shape}")
    mean = kernel.mean(axis=2, keepdims=True)
    return (np.repeat(mean, channels, axis=2) * (3.0 / channels)).astype(kernel.dtype)


def transfer_rgb_weights(target: keras.Model, source: keras.Model) -> int:
    """Copies `source`'s (RGB network) weights into `target` (C-channel twin).

    Weights are matched in order; a pair that differs only in a kernel's input-channel
    axis (3 vs C) is the stem and goes through `adapt_stem_kernel`.

    Returns:
      The number of adapted kernels (1 for the keras.applications networks).

    Raises:
      BackboneWeightsError: the networks do not pair up.
    """
    tw, sw = target.get_weights(), source.get_weights()
    if len(tw) != len(sw):
        raise BackboneWeightsError(f"{target.name} has {len(tw)} weights, the RGB network "
                                   f"{len(sw)}")
    out, adapted = [], 0
    for i, (t, s) in enumerate(zip(tw, sw, strict=True)):
        if t.shape == s.shape:
            out.append(s)
        elif t.ndim == 4 and s.shape[2] == 3 and t.shape[:2] + t.shape[3:] == s.shape[:2] + s.shape[3:]:
            out.append(adapt_stem_kernel(s, t.shape[2]))
            adapted += 1
        else:
            raise BackboneWeightsError(f"weight {i}: {target.name} {t.shape} vs RGB {s.shape}")
    target.set_weights(out)
    return adapted


def _applications(name: str, input_size: int, channels: int, weights: str) -> keras.Model:
    app = {"resnet50": keras.applications.ResNet50,
           "xception": keras.applications.Xception}[name]
    if name == "xception" and input_size < 71:
        raise ValueError(f"--fluorescence_backbone=xception needs --input_size >= 71, got "
                         f"{input_size}")
    if name == "resnet50" and input_size < 32:
        raise ValueError(f"--fluorescence_backbone=resnet50 needs --input_size >= 32, got "
                         f"{input_size}")
    net = app(include_top=False, weights=None, input_shape=(input_size, input_size, channels),
              pooling="avg")
    if weights and weights.lower() != "none":
        if weights.lower() == "imagenet":
            raise BackboneWeightsError("give the notop ImageNet weights as a file (this "
                                       "machine may be offline): --fluorescence_backbone_weights"
                                       "=/path/to/..._notop.h5")
        try:
            rgb = app(include_top=False, weights=weights, input_shape=(input_size, input_size, 3),
                      pooling="avg")
        except Exception as e:  # missing file, wrong architecture
            raise BackboneWeightsError(f"--fluorescence_backbone_weights={weights} does not "
                                       f"load into {name}: {type(e).__name__}: {e}") from e
        transfer_rgb_weights(net, rgb)
    return net


def small_cnn(input_size: int, channels: int, widths=(32, 64, 96), seed: int | None = None
              ) -> keras.Model:
    """A CPU-sized backbone: per block conv3x3 stride 2 + conv3x3, batch norm, ReLU; GAP.

    Batch norm (not group norm) on purpose: the mean teacher's handling of batch-norm
    statistics is then exercised by the CPU runs too. Synchronised across replicas, so
    under MirroredStrategy the moving statistics (and the teacher's average of them)
    are the same on every replica.
    """
    inputs = keras.Input((input_size, input_size, channels), name="image")
    x, k = inputs, 0
    for i, width in enumerate(widths):
        for j, stride in ((1, 2), (2, 1)):
            k += 1
            init = keras.initializers.HeNormal(seed=None if seed is None else seed + k)
            x = keras.layers.Conv2D(int(width), 3, strides=stride, padding="same", use_bias=False,
                                    kernel_initializer=init, name=f"block{i + 1}_conv{j}")(x)
            x = keras.layers.BatchNormalization(momentum=0.9, synchronized=True, name=f"block{i + 1}_bn{j}")(x)
            x = keras.layers.ReLU(name=f"block{i + 1}_relu{j}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name="small_cnn_backbone")


def build_backbone(family, input_size: int, seed: int | None = None) -> keras.Model:
    """The configured backbone: (B, R, R, C) -> (B, F)."""
    if family.backbone == "small_cnn":
        if family.backbone_weights not in ("", "none"):
            raise BackboneWeightsError("--fluorescence_backbone=small_cnn has no pretrained "
                                       "weights; use none")
        return small_cnn(input_size, family.channels, tuple(family.widths), seed)
    return _applications(family.backbone, input_size, family.channels, family.backbone_weights)


def build_fluorescence_model(config) -> keras.Model:
    """Builds the network (see the module docstring).

    Args:
      config: `ish_tf.families.ModelConfig` with a `FluorescenceConfig` whose classes are
        set (the task reads them from the records).

    Returns:
      keras.Model "fluorescence" with input "image" and outputs [embedding (B, D),
      probabilities (B, n), logits (B, n)].

    Raises:
      ValueError: fewer than 2 classes or a bad setting.
      BackboneWeightsError: a weights file that does not fit.
    """
    family = config.family.validate()
    n = family.num_classes
    if n < 2:
        raise ValueError(f"the fluorescence model needs >= 2 classes, got {n} (set from the "
                         "records' identities by the task)")
    seed = config.seed
    size = int(config.input_size)
    inputs = keras.Input((size, size, family.channels), name="image", dtype="float32")
    x = build_backbone(family, size, seed)(inputs)
    if family.embedding_dim:
        init = keras.initializers.GlorotUniform(seed=None if seed is None else seed + 101)
        x = keras.layers.Dense(family.embedding_dim, kernel_initializer=init, name="features")(x)
    embedding = L2Normalize(name="embedding")(x)
    init = keras.initializers.GlorotUniform(seed=None if seed is None else seed + 102)
    if family.head == "arcface":
        logits = ArcFace(n, family.arcface_scale, family.arcface_margin, kernel_initializer=init,
                         name="logits")(embedding)
    else:
        logits = keras.layers.Dense(n, kernel_initializer=init, dtype="float32",
                                    name="logits")(embedding)
    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(logits)
    return keras.Model(inputs, [embedding, probabilities, logits], name="fluorescence")
