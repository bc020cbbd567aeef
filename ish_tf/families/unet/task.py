"""`bin/train --model=unet`: the U-Net tissue segmenter under the shared trainer.

The task trains `ish_tf.families.unet.model.build_unet` on (section image, true tissue mask)
pairs listed by a manifest (`--unet_mask_manifest`; masks are `{image_id}.png` in
`--unet_mask_dir`, by default `masks/` beside the manifest, as `bin/synth` writes). A
seeded fraction of the pairs (`--unet_val_fraction`) is held out; RUN/unet_split.csv lists
every pair's split (train, validation, or skipped with the reason). The resulting
RUN/model.keras is what `bin/extract --segmenter=unet --unet_path=RUN/model.keras`
loads (`ish_tf.data.segment.UNetSegmenter`).

Settings: `ish_tf.families.unet.config.UnetConfig` (flags --unet_*).

The pairs are small (a handful of downsampled sections), so they are loaded into
memory once at the model's resolution. Batches are a pure function of (seed, step):
example number i = step * B + j is pair `perm_e[i mod N]` of the permutation of epoch
e = i // N, augmented with flips and 90° rotations seeded by i. A resumed run thus sees
exactly the batches of an uninterrupted one, and replica r of a MirroredStrategy gets
examples [r*b, (r+1)*b) of each global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from ish_tf.io_utils import atomic_write_text
from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean, replicas_per_pipeline

SPLIT_NAME = "unet_split.csv"
SPLIT_COLUMNS = ("image_id", "split", "image_path", "mask_path", "reason")


# --------------------------------------------------------------------------- pairs
def list_mask_pairs(manifest_path: str, mask_dir: str = "") -> pd.DataFrame:
    """The (image, mask) file pairs of a manifest.

    Args:
      manifest_path: manifest CSV (`ish_tf.data.manifest` schema).
      mask_dir: directory of `{image_id}.png` masks; "" = `masks/` beside the manifest,
        or the row's `mask_path` column (relative to the manifest) when present.

    Returns:
      DataFrame with columns image_id (int), image_path, mask_path (absolute), in
      manifest order.

    Raises:
      FileNotFoundError: the manifest does not exist.
      ish_tf.data.manifest.ManifestError: the manifest is malformed (naming row/column).
    """
    from ish_tf.data import manifest as mf

    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"--unet_mask_manifest {manifest_path}: no such file")
    df = mf.read_manifest(manifest_path)
    default_dir = mask_dir or os.path.join(os.path.dirname(os.path.abspath(manifest_path)), "masks")
    rows = []
    for row in df.itertuples(index=False):
        own = getattr(row, "mask_path", None)
        if not mask_dir and isinstance(own, str) and own:
            mask_file = mf.image_path(manifest_path, own)
        else:
            mask_file = os.path.join(default_dir, f"{int(row.image_id)}.png")
        rows.append({"image_id": int(row.image_id),
                     "image_path": mf.image_path(manifest_path, str(row.path)),
                     "mask_path": os.path.abspath(mask_file)})
    return pd.DataFrame(rows, columns=["image_id", "image_path", "mask_path"])


def split_pairs(pairs: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Assigns each pair to "train" or "validation" (a seeded, order-independent draw).

    Args:
      pairs: rows with an image_id column.
      val_fraction: fraction in [0, 1) held out; when > 0 at least one pair is held
        out and at least one is kept for training.
      seed: seed of the draw.

    Returns:
      A copy of `pairs` with a `split` column.

    Raises:
      ValueError: val_fraction outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--unet_val_fraction must be in [0, 1), got {val_fraction}")
    out = pairs.copy()
    n = len(out)
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(int(round(val_fraction * n)), 1), n - 1)
    # Permute the sorted ids, so the split depends on the set of images, not on row order.
    ids = np.sort(out["image_id"].to_numpy())
    held = set(np.random.default_rng(seed).permutation(ids)[:n_val].tolist())
    out["split"] = ["validation" if i in held else "train" for i in out["image_id"]]
    return out


def load_pairs(pairs: pd.DataFrame, input_size: int
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Reads pairs at the model's resolution, skipping (not failing on) unreadable ones.

    Args:
      pairs: rows with image_id, image_path, mask_path.
      input_size: side R (images are resized to R x R, as `UNetSegmenter` does).

    Returns:
      (images uint8 (N, R, R, 3), masks uint8 (N, R, R, 1) in {0, 1} of the readable
      rows in order, skipped [(image_id, reason)] of the others).
    """
    from ish_tf.families.unet.model import load_mask_pairs

    images, masks, skipped = [], [], []
    for row in pairs.itertuples(index=False):
        try:
            x, y = load_mask_pairs([(row.image_path, row.mask_path)], input_size)
        except ValueError as e:  # unreadable/missing file or size mismatch
            skipped.append((int(row.image_id), str(e).replace("pair 0 ", f"image {row.image_id} ")))
            continue
        images.append(x[0])
        masks.append(y[0])
    r = int(input_size)
    if not images:
        return (np.zeros((0, r, r, 3), np.uint8), np.zeros((0, r, r, 1), np.uint8), skipped)
    # PIL resizes uint8 images, so the values are already integers: uint8 is exact.
    return (np.stack(images).round().astype(np.uint8), np.stack(masks).astype(np.uint8), skipped)


def pair_batches(images: np.ndarray, masks: np.ndarray, batch_size: int, *, seed: int = 0,
                 augment: bool = True,
                 input_context: tf.distribute.InputContext | None = None,
                 start_step: int = 0) -> tf.data.Dataset:
    """Infinite (image, mask) batches as a pure function of (seed, step).

    Args:
      images: uint8 (N, R, R, 3).
      masks: uint8 or float (N, R, R, 1) in {0, 1}.
      batch_size: global batch B (divisible by the replica count).
      seed: seed of the per-epoch permutations and the augmentation.
      augment: random flips and 90° rotations, the same for image and mask.
      input_context: None -> global batches (B, ...); otherwise this input pipeline's
        per-replica batches (B / replicas, ...), one per replica it feeds, in order.
      start_step: first global step to produce (resume; costs nothing to skip).

    Returns:
      tf.data.Dataset of (float32 (b, R, R, 3) in [0, 255], float32 (b, R, R, 1)).

    Raises:
      ValueError: no pairs, mismatched arrays, or B not divisible by the replicas.
    """
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("no (image, mask) pairs to train the U-Net on")
    if masks.shape[:3] != images.shape[:3]:
        raise ValueError(f"images {images.shape} and masks {masks.shape} do not match")
    replicas = input_context.num_replicas_in_sync if input_context is not None else 1
    if batch_size % replicas:
        raise ValueError(f"U-Net batch {batch_size} is not divisible by the {replicas} replicas")
    per_pipeline = replicas_per_pipeline(input_context)
    first_replica = input_context.input_pipeline_id * per_pipeline if input_context is not None else 0
    b = batch_size // replicas
    images_t = tf.constant(images, dtype=tf.uint8)
    masks_t = tf.constant(np.asarray(masks, np.uint8))
    seed = int(seed)

    def example_numbers(t):
        # Element t of this pipeline is replica (first + t % per_pipeline) of step t // per_pipeline.
        step = t // per_pipeline
        replica = first_replica + t % per_pipeline
        start = step * batch_size + replica * b
        return tf.data.Dataset.range(start, start + b)

    def load(i):
        epoch, pos = i // n, i % n
        keys = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        k = tf.argsort(keys)[pos]
        x = tf.cast(images_t[k], tf.float32)
        y = tf.cast(masks_t[k], tf.float32)
        if augment:
            both = tf.concat([x, y], axis=-1)
            both = tf.image.stateless_random_flip_left_right(both, tf.stack([i, seed * 3 + 1]))
            both = tf.image.stateless_random_flip_up_down(both, tf.stack([i, seed * 3 + 2]))
            quarter = tf.random.stateless_uniform([], tf.stack([i, seed * 3 + 3]), 0, 4, tf.int32)
            both = tf.image.rot90(both, quarter)
            x, y = both[..., :3], both[..., 3:]
        return x, y

    ds = tf.data.Dataset.range(start_step * per_pipeline, np.iinfo(np.int64).max)
    ds = ds.flat_map(example_numbers).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                          deterministic=True)
    return ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- loss, scores
def per_image_terms(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image binary cross-entropy and soft Dice coefficient.

    Their batch means give `ish_tf.families.unet.model.bce_dice_loss` = mean BCE + 1 - mean Dice
    (images have equal sizes, so the mean of per-image pixel means is the pixel mean).

    Args:
      y_true: (B, R, R, 1) in {0, 1}.
      y_pred: (B, R, R, 1) probabilities.

    Returns:
      (bce (B,), dice (B,)) float32.
    """
    y_pred = tf.cast(y_pred, tf.float32)
    y_true = tf.cast(y_true, tf.float32)
    bce = tf.reduce_mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=[1, 2])
    inter = tf.reduce_sum(y_true * y_pred, axis=[1, 2, 3])
    denom = tf.reduce_sum(y_true, axis=[1, 2, 3]) + tf.reduce_sum(y_pred, axis=[1, 2, 3])
    dice = (2.0 * inter + 1.0) / (denom + 1.0)  # eps = 1, as unet.dice_loss
    return bce, dice


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def score_segmenter(segment: Callable[[np.ndarray], np.ndarray],
                    pairs: Sequence[tuple[str, str]] | pd.DataFrame) -> pd.DataFrame:
    """IoU of a segmenter against true masks at full resolution.

    Args:
      segment: rgb uint8 (H, W, 3) -> bool (H, W) (e.g. `UNetSegmenter`, or
        `ish_tf.data.segment.classical_mask`).
      pairs: (image path, mask path) tuples, or a DataFrame with image_path, mask_path.

    Returns:
      DataFrame with image_path, iou, tissue_fraction (of the prediction), truth_fraction.
    """
    from PIL import Image

    if isinstance(pairs, pd.DataFrame):
        pairs = list(zip(pairs["image_path"], pairs["mask_path"], strict=True))
    rows = []
    for image_path, mask_file in pairs:
        with Image.open(image_path) as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(mask_file) as im:
            truth = np.asarray(im.convert("L")) > 127
        pred = np.asarray(segment(rgb), bool)
        rows.append({"image_path": image_path, "iou": mask_iou(pred, truth),
                     "tissue_fraction": float(pred.mean()), "truth_fraction": float(truth.mean())})
    return pd.DataFrame(rows, columns=["image_path", "iou", "tissue_fraction", "truth_fraction"])


# --------------------------------------------------------------------------- task
class UNetTask(Task):
    """Tissue segmentation: BCE + soft Dice over the global batch of (image, mask) pairs.

    Batches are `(images (b, R, R, 3) float32 in [0, 255], masks (b, R, R, 1) float32)`.

    Args:
      model_config: input_size and the options (see the module docstring).
      train_config: seed, flips (augmentation), run_dir (for RUN/unet_split.csv).
      dataset_fn: optional in-memory replacement of the dataset.

    Raises:
      ValueError: invalid options (batch size, depth, filters, input size).
    """

    stat_names = ("bce", "dice", "iou", "tissue_fraction")

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        family = model_config.family.validate()  # fail at construction, not after building
        self.batch_size = int(family.batch_size)
        self.base_filters = int(family.filters)
        self.depth = int(family.depth)
        self.mask_manifest = str(family.mask_manifest or "")
        self.mask_dir = str(family.mask_dir or "")
        self.val_fraction = float(family.val_fraction)
        if model_config.input_size % (2 ** self.depth):
            raise ValueError(f"--input_size {model_config.input_size} must be divisible by "
                             f"2**--unet_depth = {2 ** self.depth}")
        self.split: pd.DataFrame | None = None

    @property
    def global_batch_size(self) -> int:
        """--unet_batch_size pairs per step (P and K do not apply)."""
        return self.batch_size

    def load_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Lists, splits and loads the pairs; writes RUN/unet_split.csv.

        Returns:
          (images uint8 (N, R, R, 3), masks uint8 (N, R, R, 1)) of the training split.

        Raises:
          ValueError: --unet_mask_manifest is unset, or no training pair could be read.
          FileNotFoundError: the manifest does not exist.
        """
        if not self.mask_manifest:
            raise ValueError("--unet_mask_manifest is required for --model=unet: a manifest whose "
                             "images have masks/{image_id}.png beside it (bin/synth writes one)")
        pairs = split_pairs(list_mask_pairs(self.mask_manifest, self.mask_dir),
                            self.val_fraction, self.train_config.seed)
        train_rows = pairs[pairs["split"] == "train"]
        images, masks, skipped = load_pairs(train_rows, self.model_config.input_size)
        reasons = dict(skipped)
        pairs["reason"] = [reasons.get(i, "") for i in pairs["image_id"]]
        pairs.loc[pairs["image_id"].isin(list(reasons)), "split"] = "skipped"
        self.split = pairs[list(SPLIT_COLUMNS)]
        run_dir = self.train_config.run_dir
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_text(os.path.join(run_dir, SPLIT_NAME), self.split.to_csv(index=False))
        for image_id, reason in skipped:
            logging.warning("unet: skipped image %d: %s", image_id, reason)
        if len(images) == 0:
            raise ValueError(f"{self.mask_manifest}: none of the {len(train_rows)} training pairs "
                             f"could be read (masks expected in "
                             f"{self.mask_dir or 'masks/ beside the manifest'}); see "
                             f"{os.path.join(run_dir, SPLIT_NAME)}")
        logging.info("unet: %d training pairs, %d held out, %d skipped (%s)", len(images),
                     int((pairs["split"] == "validation").sum()), len(skipped),
                     os.path.join(run_dir, SPLIT_NAME))
        return images, masks

    def make_records_dataset(self, input_context: tf.distribute.InputContext | None,
                             start_step: int = 0) -> tf.data.Dataset:
        """Batches of the training pairs (see `pair_batches`); `records_dir` is not used."""
        images, masks = self.load_split()
        return pair_batches(images, masks, self.batch_size, seed=self.train_config.seed,
                            augment=self.train_config.flips, input_context=input_context,
                            start_step=start_step)

    def compute_loss(self, model, batch, training):
        """BCE + (1 - Dice) averaged over the global batch; IoU at 0.5 as a stat."""
        images, masks = batch
        prob = tf.cast(model(images, training=training), tf.float32)
        bce, dice = per_image_terms(masks, prob)
        loss = global_mean(bce + (1.0 - dice))
        pred = tf.cast(prob > 0.5, tf.float32)
        truth = tf.cast(masks > 0.5, tf.float32)
        inter = tf.reduce_sum(pred * truth, axis=[1, 2, 3])
        union = tf.reduce_sum(tf.maximum(pred, truth), axis=[1, 2, 3])
        # Pooled over the global batch: sum of intersections / sum of unions.
        iou = global_mean(inter) / tf.maximum(global_mean(union), 1.0)
        stats = {"bce": global_mean(bce), "dice": global_mean(dice), "iou": iou,
                 "tissue_fraction": global_mean(pred)}
        return loss, {k: tf.stop_gradient(v) for k, v in stats.items()}

    def image_summaries(self, batch):
        """Up to 4 inputs, their true masks and the model's current predicted masks."""
        images, masks = batch
        images = tf.cast(images[:4], tf.float32)
        out = {"unet_inputs": tf.clip_by_value(images / 255.0, 0.0, 1.0),
               "unet_true_masks": tf.image.grayscale_to_rgb(tf.cast(masks[:4], tf.float32))}
        if self.model is not None:
            prob = tf.cast(self.model(images, training=False), tf.float32)
            out["unet_predicted_masks"] = tf.image.grayscale_to_rgb(prob)
        return out
