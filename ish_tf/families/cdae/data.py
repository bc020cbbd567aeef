"""The CDAE's whole-section records as batches: grayscale (b, S_h, S_w, 1) in [0, 255].

Whole-section records are written by `bin/extract --whole_images` (`ish_tf.families.cdae.whole`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ish_tf.train.tasks import replicas_per_pipeline


def to_gray(images: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) -> (B, H, W, 1) float32: the channel mean (exact for gray stored as RGB)."""
    images = tf.cast(images, tf.float32)
    if images.shape[-1] == 1:
        return images
    return tf.reduce_mean(images, axis=-1, keepdims=True)



def unpack_batch(batch) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
    """(images, step or None, labels or None) from a dict, tuple or bare image batch."""
    if isinstance(batch, dict):
        return batch["images"], batch.get("step"), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return batch[0], None, (batch[1] if len(batch) > 1 else None)
    return batch, None, None


def whole_dataset(records_dir: str, split: str, *, batch_size: int, height: int, width: int,
                  seed: int = 0, flips: bool = False,
                  input_context: tf.distribute.InputContext | None = None, start_step: int = 0,
                  label_matrix: np.ndarray | None = None,
                  shuffle_buffer: int = 2048) -> tf.data.Dataset:
    """Infinite shuffled batches of whole sections for training, starting at `start_step`.

    The order is deterministic given the seed (so skipping `start_step` batches
    resumes exactly); sections stored at another size are resized to (height, width).

    Args:
      records_dir: records written by `bin/extract --whole_images`.
      split: split to read.
      batch_size: GLOBAL batch size.
      height, width: model input size.
      seed: shuffle (and flip) seed.
      flips: random left-right and up-down flips.
      input_context: per-replica pipelines (see `patch_dataset`).
      start_step: first global step (resume).
      label_matrix: float32 (G, T) labels per gene_index, for cdae_supervised.
      shuffle_buffer: records in the shuffle buffer.

    Returns:
      Dataset of {"images": float32 (b, height, width, 1) in [0, 255], "step": int64 ()}
      (+ "labels": float32 (b, T) with a label matrix).

    Raises:
      RecordsError: no shards of the split.
    """
    from ish_tf.data.pipeline import patch_dataset

    ds = patch_dataset(records_dir, split, batch_size=batch_size, training=True, flips=flips,
                       seed=seed, input_context=input_context, deterministic=True,
                       shuffle_buffer=shuffle_buffer,
                       label_key="gene_index" if label_matrix is not None else None)
    rpp = replicas_per_pipeline(input_context)
    ds = ds.skip(start_step * rpp).enumerate()
    labels = None if label_matrix is None else tf.constant(label_matrix, tf.float32)

    def fit(images):
        images = to_gray(images)
        if tuple(images.shape[1:3]) != (height, width):
            images = tf.image.resize(images, (height, width), antialias=True)
        return tf.ensure_shape(images, [None, height, width, 1])

    def element(k, item):
        step = tf.cast(start_step, tf.int64) + k // rpp
        if labels is None:
            return {"images": fit(item), "step": step}
        images, gene_index = item
        return {"images": fit(images), "step": step, "labels": tf.gather(labels, gene_index)}

    return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def invert_mismatch(records_dir: str, invert: bool) -> str | None:
    """Says when --cdae_invert does not suit the slides the records were extracted from.

    The CDAE works in a space where the bare slide is near 0 and tissue (stain or light)
    above it: `--cdae_invert` (1 - x/255) for brightfield sections on a white slide, no
    inversion for fluorescence sections on a black one; masking noise sets pixels to 0,
    which should look like bare slide. The records' key says which slide `bin/extract`
    segmented (`--mask_background`).

    Args:
      records_dir: whole-section records.
      invert: the model's --cdae_invert.

    Returns:
      The warning, or None where the setting suits the records or they do not say.
    """
    from ish_tf.data import records, shards

    try:
        info = shards.load_dataset_info(records_dir)
    except (records.RecordsError, OSError):
        return None
    if info is None:
        return None
    mask = (info.extra.get("sampling") or {}).get("mask") or {}
    background = mask.get("background", "bright")
    if (background == "dark") != invert:
        return None
    kind = ("fluorescence (dark slide, --mask_background=dark)" if background == "dark"
            else "brightfield (white slide)")
    fix = "--nocdae_invert" if invert else "--cdae_invert"
    return (f"{records_dir}: extracted from {kind} sections, but --cdae_invert is "
            f"{'on' if invert else 'off'}: the model would see the bare slide near 1 and the "
            f"tissue near 0, so masking noise (pixels set to 0) would look like tissue; "
            f"pass {fix}")


