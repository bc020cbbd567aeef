"""A small U-Net tissue segmenter: builder, (image, mask) training pairs, a training loop.

The model takes downsampled whole section images (B, R, R, 3) float32 in [0, 255]
(the package-wide input convention; rescaling is a layer inside the model) and
outputs the tissue probability (B, R, R, 1) through a sigmoid. Images are resized to
R×R without keeping the aspect ratio, identically in `mask_pair_dataset` and in
`ish_tf.data.segment.UNetSegmenter`, so training and inference see the same geometry.

`train_unet` is a plain `model.fit` on a handful of pairs (the paper used 40); the
training stage's `bin/train --model=unet` can route to `build_unet_model` (registry
signature `fn(ModelConfig) -> keras.Model`) and `mask_pair_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from PIL import Image

from ish_tf.io_utils import atomic_path


def _conv_block(x, filters: int, name: str):
    for i in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"{name}_conv{i}")(x)
        # Group norm, not batch norm: no moving statistics, so a segmenter trained for a
        # few dozen steps on a handful of images behaves the same in training and inference.
        x = keras.layers.GroupNormalization(groups=min(4, filters), name=f"{name}_gn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(input_size: int = 256, base_filters: int = 16, depth: int = 4) -> keras.Model:
    """Builds a U-Net with `depth` down/up levels and a sigmoid tissue output.

    Args:
      input_size: side R of the square input; must be divisible by 2**depth.
      base_filters: filters of the first level (doubled at each level down).
      depth: number of 2× downsamplings.

    Returns:
      keras.Model mapping (B, R, R, 3) float32 in [0, 255] to (B, R, R, 1) in (0, 1).

    Raises:
      ValueError: input_size not divisible by 2**depth, or non-positive sizes.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base_filters must be >= 1, got {depth}, {base_filters}")
    if input_size % (2 ** depth):
        raise ValueError(f"input_size {input_size} must be divisible by 2**depth = {2 ** depth}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2 ** level, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, base_filters * 2 ** depth, "bottom")
    for level in reversed(range(depth)):
        x = keras.layers.Conv2DTranspose(base_filters * 2 ** level, 2, strides=2,
                                         name=f"up{level}_tconv")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, base_filters * 2 ** level, f"up{level}")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="tissue")(x)
    return keras.Model(inputs, outputs, name="unet")


def build_unet_model(config: Any) -> keras.Model:
    """Registry builder: `ModelConfig` (input_size, `UnetConfig` filters and depth) -> U-Net.

    The training task builds through it too, so `build_model(load_model_config(
    RUN/model_config.json))` rebuilds the architecture that was trained.
    """
    return build_unet(input_size=int(config.input_size), base_filters=int(config.family.filters),
                      depth=int(config.family.depth))


# --------------------------------------------------------------------------- data
PairLike = tuple[Any, Any]


def _load_pair(image: Any, mask: Any, size: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One (image, mask) pair resized to size×size: float32 (R, R, 3) in [0, 255], (R, R, 1) 0/1."""
    try:
        img = Image.open(image).convert("RGB") if isinstance(image, str) else \
            Image.fromarray(np.asarray(image, dtype=np.uint8))
        msk = Image.open(mask).convert("L") if isinstance(mask, str) else \
            Image.fromarray(np.asarray(mask, dtype=np.uint8) * (255 if np.asarray(mask).max() <= 1
                                                                  else 1))
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot read image/mask pair: {e}") from e
    if img.size != msk.size:
        raise ValueError(f"{source}: image is {img.size} but mask is {msk.size}")
    x = np.asarray(img.resize((size, size), Image.BILINEAR, reducing_gap=2.0), np.float32)
    y = (np.asarray(msk.resize((size, size), Image.BILINEAR, reducing_gap=2.0)) > 127)
    return x, y[..., None].astype(np.float32)


def load_mask_pairs(manifest_or_pairs: str | Sequence[PairLike], input_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Loads training pairs into memory at the model's resolution.

    Args:
      manifest_or_pairs: a manifest CSV path whose directory holds `masks/{image_id}.png`
        (as `bin/synth` writes; a `mask_path` column, relative to the manifest, wins when
        present), or a sequence of (image, mask) with paths or arrays ((H, W, 3) uint8,
        (H, W) bool/0-1/0-255).
      input_size: side R.

    Returns:
      (images float32 (N, R, R, 3) in [0, 255], masks float32 (N, R, R, 1) in {0, 1}).

    Raises:
      ValueError: no pairs, or a pair that cannot be read (naming it).
    """
    if isinstance(manifest_or_pairs, str):
        from ish_tf.data import manifest as mf

        df = mf.read_manifest(manifest_or_pairs)
        base = os.path.dirname(os.path.abspath(manifest_or_pairs))
        pairs: list[PairLike] = []
        for row in df.itertuples(index=False):
            mask_rel = getattr(row, "mask_path", None)
            mask_file = (mf.image_path(manifest_or_pairs, str(mask_rel))
                         if isinstance(mask_rel, str) and mask_rel
                         else os.path.join(base, "masks", f"{int(row.image_id)}.png"))
            pairs.append((mf.image_path(manifest_or_pairs, str(row.path)), mask_file))
    else:
        pairs = list(manifest_or_pairs)
    if not pairs:
        raise ValueError("no (image, mask) pairs to train the U-Net on")
    xs, ys = [], []
    for i, (image, mask) in enumerate(pairs):
        source = f"pair {i} ({image if isinstance(image, str) else 'array'})"
        x, y = _load_pair(image, mask, input_size, source)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


def mask_pair_dataset(manifest_or_pairs: str | Sequence[PairLike], input_size: int = 256,
                      batch_size: int = 4, augment: bool = True, shuffle: bool = True,
                      repeat: bool = True, seed: int = 0):
    """A tf.data pipeline of (image, mask) batches for U-Net training.

    Args:
      manifest_or_pairs: see `load_mask_pairs`.
      input_size: side R.
      batch_size: B.
      augment: random flips and 90° rotations (both applied to image and mask).
      shuffle, repeat: dataset options.
      seed: seed of shuffling and augmentation.

    Returns:
      tf.data.Dataset of (float32 (B, R, R, 3) in [0, 255], float32 (B, R, R, 1)).
    """
    import tensorflow as tf

    images, masks = load_mask_pairs(manifest_or_pairs, input_size)
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        def _aug(x, y, s):
            both = tf.concat([x, y], axis=-1)
            both = tf.image.stateless_random_flip_left_right(both, s)
            both = tf.image.stateless_random_flip_up_down(both, s + 1)
            k = tf.random.stateless_uniform([], s + 2, 0, 4, dtype=tf.int32)
            both = tf.image.rot90(both, k)
            return both[..., :3], both[..., 3:]

        seeds = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.stack([r, r // 7]))
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: _aug(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- training
def dice_loss(y_true, y_pred, eps: float = 1.0):
    """Soft Dice loss over each image, averaged over the batch; inputs (B, R, R, 1)."""
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    inter = keras.ops.sum(y_true * y_pred, axis=(1, 2, 3))
    denom = keras.ops.sum(y_true, axis=(1, 2, 3)) + keras.ops.sum(y_pred, axis=(1, 2, 3))
    return 1.0 - keras.ops.mean((2.0 * inter + eps) / (denom + eps))


@keras.saving.register_keras_serializable(package="ish_tf")
def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy plus soft Dice: BCE for calibrated pixels, Dice for the shape."""
    bce = keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    return bce + dice_loss(y_true, y_pred)


def train_unet(pairs: str | Sequence[PairLike], out_path: str, steps: int = 200,
               input_size: int = 256, base_filters: int = 16, depth: int = 4,
               batch_size: int = 4, learning_rate: float = 1e-3, seed: int = 0,
               validation_pairs: str | Sequence[PairLike] | None = None) -> dict:
    """Trains a U-Net on (image, mask) pairs and saves it as a `.keras` file (atomically).

    Args:
      pairs: training pairs (see `load_mask_pairs`).
      out_path: destination `.keras` file, loadable by `UNetSegmenter.load`.
      steps: optimisation steps.
      input_size, base_filters, depth: model shape (see `build_unet`).
      batch_size: B.
      learning_rate: Adam learning rate.
      seed: seed of weights, shuffling and augmentation.
      validation_pairs: optional held-out pairs, evaluated at the end.

    Returns:
      {"loss": final training loss, "val_loss"/"val_iou": on validation pairs if given,
       "path": out_path}.
    """
    keras.utils.set_random_seed(seed)
    model = build_unet(input_size, base_filters, depth)
    # No XLA: compiling a conv net for a few hundred CPU steps costs more than it saves.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=bce_dice_loss,
                  jit_compile=False)
    ds = mask_pair_dataset(pairs, input_size, batch_size, seed=seed)
    epochs = max(1, min(steps, 10))
    per_epoch = int(np.ceil(steps / epochs))
    history = model.fit(ds, epochs=epochs, steps_per_epoch=per_epoch, shuffle=False, verbose=0)
    result: dict = {"loss": float(history.history["loss"][-1]), "path": out_path}
    if validation_pairs is not None:
        x, y = load_mask_pairs(validation_pairs, input_size)
        prob = model.predict(x, verbose=0)
        pred, truth = prob > 0.5, y > 0.5
        result["val_loss"] = float(keras.ops.convert_to_numpy(bce_dice_loss(y, prob)))
        result["val_iou"] = float(np.logical_and(pred, truth).sum()
                                  / max(np.logical_or(pred, truth).sum(), 1))
    with atomic_path(out_path) as tmp:
        # Keras insists on the .keras suffix; the temp name gets it too.
        tmp_keras = tmp + ".keras"
        model.save(tmp_keras)
        os.replace(tmp_keras, tmp)
    return result
