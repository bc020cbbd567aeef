"""The ISH CNN: a compact patch classifier that also runs fully convolutionally.

Architecture (input (B, R, R, 3) float32 in [0, 255], grey patches replicated to
three channels by the record decoder)::

    Rescaling to [-1, 1]
    n_blocks x [convs_per_block x (Conv 3x3 "valid" -> [BatchNorm] -> ReLU) -> MaxPool 2]
    Conv 1x1 (head_units) -> ReLU
    GlobalAveragePooling  (or Flatten, `pooling="flatten"`)
    Dropout -> Dense(n_classes) -> Softmax          -> (B, n_classes) "probabilities"

Only "valid" convolutions and stride-2 pooling are used, so the network is a
function of its window alone and is equivariant to shifts by its total stride
s = 2 ** n_blocks. `dense_model(model)` rebuilds the same layers (shared weights)
on images of any size, replacing the global pooling by a k x k average pooling of
stride 1 (k = side of the last feature map) and a Flatten + Dense by the equivalent
k x k convolution: output cell (i, j) is then exactly the classifier's output on the
R x R window with top-left corner (i s, j s). `n_blocks` is chosen per patch size:
as many blocks (up to `max_blocks`) as leave a final map of at least 1 x 1.

Settings (`ish_tf.families.ish_cnn.config.IshCnnConfig`, flags `--ish_cnn_*`):
  classes (list[str]) or n_classes (int); filters (list[int], one per block, the
  last repeated); convs_per_block (int, 2); max_blocks (int, 5); batch_norm (bool,
  True); bn_momentum (float, 0.9); dropout (float, 0.3); pooling ("avg" | "flatten");
  intensity_jitter (float, training augmentation of `ish_tf.families.ish_cnn.task`).
`ModelConfig.input_size` is the patch size R, `head_units` the 1x1 conv width.
"""

from __future__ import annotations

import keras
import numpy as np

POOLINGS = ("avg", "flatten")
DEFAULT_FILTERS = (16, 32, 64, 64, 96)


def plan_blocks(size: int, convs_per_block: int = 2, max_blocks: int = 5) -> tuple[int, int]:
    """Number of conv blocks for a patch size and the side of the last feature map.

    Each block shrinks the side by 2 per 3x3 valid conv and then halves it (floor).
    Blocks are added while the result keeps at least one pixel.

    Args:
      size: patch side R.
      convs_per_block: 3x3 convolutions per block.
      max_blocks: upper bound.

    Returns:
      (n_blocks >= 1, final side k >= 1).

    Raises:
      ValueError: the patch is too small for even one block.
    """
    side, blocks = size, 0
    while blocks < max_blocks:
        nxt = (side - 2 * convs_per_block) // 2
        if nxt < 1:
            break
        side, blocks = nxt, blocks + 1
    if blocks == 0:
        raise ValueError(f"patch size {size} is too small for one block of {convs_per_block} "
                         f"3x3 convolutions and a 2x2 pooling (need >= {2 * convs_per_block + 2})")
    return blocks, side


def ish_cnn_classes(config) -> list[str]:
    """Class names of a config (`classes`, else `class_0..` from `n_classes`).

    Raises:
      ValueError: neither option is set, or fewer than two classes.
    """
    classes = config.family.classes
    if classes:
        names = [str(c) for c in classes]
    else:
        n = int(config.family.n_classes or 0)
        names = [f"class_{i}" for i in range(n)]
    if len(names) < 2:
        raise ValueError("ish_cnn needs at least two classes: set the config's classes (read "
                         "from the records by the training task) or n_classes")
    return names


def build_ish_cnn(config) -> keras.Model:
    """Builds the ISH CNN patch classifier described in the module docstring.

    Args:
      config: `input_size` = patch size R, `seed`, and the `IshCnnConfig`.

    Returns:
      keras.Model (B, R, R, 3) float32 [0, 255] -> (B, n_classes) softmax probabilities.

    Raises:
      ValueError: bad options (unknown pooling, no classes, patch too small).
    """
    family = config.family.validate()
    n_classes = len(ish_cnn_classes(config))
    convs = int(family.convs_per_block)
    max_blocks = int(family.max_blocks)
    filters = [int(f) for f in family.filters]
    pooling = str(family.pooling)
    if pooling not in POOLINGS:
        raise ValueError(f"--ish_cnn_pooling must be one of {POOLINGS}, got {pooling!r}")
    batch_norm = bool(family.batch_norm)
    # Keras' 0.99 lets the moving statistics lag far behind the weights in runs of a
    # few hundred steps (inference then disagrees with training); 0.9 tracks them.
    bn_momentum = float(family.bn_momentum)
    dropout = float(family.dropout)
    blocks, _ = plan_blocks(config.input_size, convs, max_blocks)
    seed = config.seed

    def init(i: int):
        return keras.initializers.HeNormal(seed=None if seed is None else seed + i)

    size = config.input_size
    inputs = keras.Input((size, size, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    k = 0
    for b in range(blocks):
        f = filters[min(b, len(filters) - 1)]
        for c in range(convs):
            x = keras.layers.Conv2D(f, 3, padding="valid", use_bias=not batch_norm,
                                    kernel_initializer=init(k), name=f"block{b}_conv{c}")(x)
            k += 1
            if batch_norm:
                x = keras.layers.BatchNormalization(momentum=bn_momentum,
                                                    name=f"block{b}_bn{c}")(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    x = keras.layers.Conv2D(family.head_units, 1, kernel_initializer=init(k), name="head_conv")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    x = keras.layers.Dense(n_classes, kernel_initializer=keras.initializers.GlorotUniform(
        seed=None if seed is None else seed + 1000), name="logits")(x)
    outputs = keras.layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"ish_cnn_p{size}")


# --------------------------------------------------------------------------- dense
_CHAIN_TYPES = (keras.layers.Rescaling, keras.layers.Conv2D, keras.layers.BatchNormalization,
                keras.layers.ReLU, keras.layers.Activation, keras.layers.MaxPooling2D,
                keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
                keras.layers.Flatten, keras.layers.Dropout, keras.layers.Dense,
                keras.layers.Softmax)


def _chain_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers in order, checking that each is a supported chain element.

    Layers that merge branches (Add, Concatenate, ...) are not supported types, so a
    model that is not a single chain is rejected here.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
        if not isinstance(layer, _CHAIN_TYPES):
            raise ValueError(f"dense_model: layer {layer.name} ({type(layer).__name__}) is not "
                             "supported; the classifier must be a chain of conv/pool/dense layers")
    return layers


def patch_size_of(model: keras.Model) -> int:
    """The square input side R of a patch classifier.

    Raises:
      ValueError: the input is not square with a static size.
    """
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"expected a (B, R, R, C) patch classifier, got input {shape}")
    return int(shape[1])


def stride_of(model: keras.Model) -> int:
    """Total stride s of the classifier's trunk (product of pooling/conv strides)."""
    s = 1
    for layer in model.layers:
        for attr in ("strides",):
            st = getattr(layer, attr, None)
            if st is not None and isinstance(layer, (keras.layers.MaxPooling2D,
                                                     keras.layers.AveragePooling2D,
                                                     keras.layers.Conv2D)):
                s *= int(st[0] if isinstance(st, (tuple, list)) else st)
    return s


def dense_model(model: keras.Model) -> keras.Model:
    """The fully convolutional twin of a chain patch classifier (weights shared).

    Args:
      model: a classifier built by `build_ish_cnn` (or any chain of Rescaling, Conv2D,
        BatchNormalization, ReLU/Activation, pooling, Dropout, Dense, Softmax layers
        with a GlobalAveragePooling2D or a Flatten before the dense head).

    Returns:
      keras.Model (B, H, W, 3) -> (B, H', W', n_classes) with
      H' = (H - R) // s + 1 (s = `stride_of(model)`), cell (i, j) = the classifier's
      output on the window whose top-left corner is (i s, j s).

    Raises:
      ValueError: the model is not such a chain.
    """
    layers = _chain_layers(model)
    channels = int(model.input_shape[-1])
    inputs = keras.Input((None, None, channels), name="images")
    x = inputs
    # The classifier's own shapes, traced alongside (layer.input is ambiguous once the
    # layers have been called on the dense graph too).
    shape: tuple = tuple(model.input_shape)
    pending_flatten: tuple[int, int, int] | None = None
    for layer in layers:
        in_shape, shape = shape, tuple(layer.compute_output_shape(shape))
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            x = keras.layers.AveragePooling2D(pool_size=(int(in_shape[1]), int(in_shape[2])),
                                              strides=1, padding="valid",
                                              name=f"{layer.name}_dense")(x)
        elif isinstance(layer, keras.layers.Flatten):
            pending_flatten = (int(in_shape[1]), int(in_shape[2]), int(in_shape[3]))
        elif isinstance(layer, keras.layers.Dense) and pending_flatten is not None:
            kh, kw, c = pending_flatten
            kernel, bias = layer.get_weights()
            conv = keras.layers.Conv2D(kernel.shape[1], (kh, kw), padding="valid",
                                       activation=layer.activation, name=f"{layer.name}_dense")
            x = conv(x)
            # Flatten is row-major over (kh, kw, c): the Dense kernel reshapes into the conv's.
            conv.set_weights([kernel.reshape(kh, kw, c, -1), bias])
            pending_flatten = None
        else:
            if pending_flatten is not None and not isinstance(layer, keras.layers.Dropout):
                raise ValueError(f"dense_model: {layer.name} between Flatten and Dense is not "
                                 "supported")
            x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_dense")


def output_side(side: int, patch: int, stride: int) -> int:
    """Cells along one axis of `dense_model`'s output for an input of `side` pixels."""
    return max(0, (side - patch) // stride + 1)


def predict_windows(model: keras.Model, windows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Classifier probabilities of grey or 3-channel windows.

    Args:
      model: patch classifier.
      windows: (N, R, R) or (N, R, R, 3), uint8 or float in [0, 255].
      batch_size: windows per call.

    Returns:
      float32 (N, n_classes).
    """
    w = np.asarray(windows, np.float32)
    if w.ndim == 3:
        w = np.repeat(w[..., None], 3, axis=-1)
    out = [np.asarray(model(w[i:i + batch_size], training=False))
           for i in range(0, len(w), batch_size)]
    n_classes = int(model.output_shape[-1])
    return np.concatenate(out, 0) if out else np.zeros((0, n_classes), np.float32)
