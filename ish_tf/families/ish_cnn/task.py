"""The `ish_cnn` training task: softmax cross-entropy over the patch classes of `bin/spatial`.

Records: one record set per patch size (`OUT/p{R}` from `bin/spatial`), each record's
gene_symbol is its class name and gene_index = label its class index. The task reads
the set matching `--input_size` (`--records_dir` may be the set itself or the
`bin/spatial` output directory holding `p{R}/`), takes the class names from its
index (stored in `IshCnnConfig.classes`, hence in model_config.json), and
draws class-balanced batches with the P×K reader: P classes x K patches, batch t a
pure function of (seed, t), so resumed runs see exactly the same batches.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean, replicas_per_pipeline


def resolve_records_dir(records_dir: str, patch_size: int) -> str:
    """The record set of one patch size: `records_dir` itself or `records_dir/p{R}`.

    Raises:
      ValueError: neither holds an index.json.
    """
    from ish_tf.data.shards import INDEX_NAME

    for cand in (records_dir, os.path.join(records_dir, f"p{int(patch_size)}")):
        if os.path.exists(os.path.join(cand, INDEX_NAME)):
            return cand
    raise ValueError(f"--records_dir={records_dir}: no {INDEX_NAME} there or in "
                     f"p{patch_size}/ (run bin/spatial with --patch_sizes including "
                     f"{patch_size}, or set --input_size to one of its sizes)")


def jitter_intensity(ds: tf.data.Dataset, amount: float, seed: int,
                     start_element: int = 0) -> tf.data.Dataset:
    """Multiplies each image by its own factor in [1 - amount, 1 + amount] (clipped to 255).

    Sections differ in stain strength and slide brightness; without this, classifiers
    of small patches (which see little context) learn the training section's absolute
    grey levels. Factors are stateless functions of (seed, element number), so a
    resumed run draws the same ones.

    Args:
      ds: dataset of (images (b, R, R, 3) float32 in [0, 255], labels).
      amount: largest relative change.
      seed: seed of the factors.
      start_element: number of the first element (resume).

    Returns:
      The dataset with jittered images.
    """

    def apply(i, batch):
        images, labels = batch
        n = tf.shape(images)[0]
        factor = tf.random.stateless_uniform([n, 1, 1, 1], tf.stack([tf.cast(seed, tf.int64) + 7, i]),
                                             1.0 - amount, 1.0 + amount)
        return tf.clip_by_value(images * factor, 0.0, 255.0), labels

    return ds.enumerate(start_element).map(apply, num_parallel_calls=tf.data.AUTOTUNE)


# Frame colours per class index (RGB in [0, 1]); classes beyond the palette reuse it.
_PALETTE = tf.constant([[0.89, 0.10, 0.11], [0.22, 0.49, 0.72], [0.30, 0.69, 0.29],
                        [0.60, 0.60, 0.60], [0.60, 0.31, 0.64], [1.00, 0.50, 0.00]], tf.float32)


def _framed(patches: tf.Tensor, classes: tf.Tensor, width: int = 2) -> tf.Tensor:
    """Patches (N, H, W, 3) in [0, 1] with a frame coloured by class (N,) int."""
    colours = tf.gather(_PALETTE, tf.math.floormod(classes, tf.shape(_PALETTE)[0]))
    h, w = tf.shape(patches)[1], tf.shape(patches)[2]
    inner = tf.pad(tf.ones([h - 2 * width, w - 2 * width, 1]),
                   [[width, width], [width, width], [0, 0]])
    return patches * inner + colours[:, None, None, :] * (1.0 - inner)


class IshCnnTask(Task):
    """Patch classification (genes, tissue, background) with class-balanced P×K batches.

    Batches are `(images (b, R, R, 3) float32 in [0, 255], labels (b,) int32)`.

    Args:
      model_config: `input_size` = patch size; `family.classes` filled from the
        records when `train_config.records_dir` is set (a given list must match);
        `family.P` classes per batch (at most the number of classes), `family.K`
        patches per class.
      train_config: runtime settings (records_dir, split, flips, seed).
      dataset_fn: optional in-memory dataset (tests).

    Raises:
      ValueError: records of another patch size, classes that disagree with the
        records, or P larger than the number of classes.
    """

    stat_names = ("accuracy",)

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.records_dir = ""
        if train_config.records_dir and dataset_fn is None:
            from ish_tf.data import shards

            self.records_dir = resolve_records_dir(train_config.records_dir,
                                                   model_config.input_size)
            info = shards.load_dataset_info(self.records_dir)
            if info is None:
                raise ValueError(f"{self.records_dir}: index.json has no dataset info")
            if info.patch_size != model_config.input_size:
                raise ValueError(f"{self.records_dir} holds {info.patch_size} px patches but "
                                 f"--input_size={model_config.input_size}")
            classes = [g.gene_symbol for g in sorted(info.genes, key=lambda g: g.gene_index)]
            given = model_config.family.classes
            if given and list(given) != classes:
                raise ValueError(f"--ish_cnn_classes={','.join(given)} but the records in "
                                 f"{self.records_dir} have classes {classes}")
            # Persisted in model_config.json: prediction needs the class names.
            model_config.family.classes = tuple(classes)
        from ish_tf.families.ish_cnn.model import ish_cnn_classes

        n_classes = len(ish_cnn_classes(model_config))
        family = model_config.family.validate()
        if family.P > n_classes:
            raise ValueError(f"--ish_cnn_P={family.P} classes per batch but there are only "
                             f"{n_classes} classes; set --ish_cnn_P={n_classes}")

    def make_records_dataset(self, input_context: tf.distribute.InputContext | None,
                             start_step: int = 0) -> tf.data.Dataset:
        """Class-balanced P×K batches of the patch size's record set.

        Raises:
          ValueError: `records_dir` is not set.
        """
        from ish_tf.data.pipeline import pk_dataset

        cfg, family = self.train_config, self.model_config.family
        if not self.records_dir:
            raise ValueError("--records_dir is required: the output of bin/spatial (or one "
                             "of its p{R}/ record sets)")
        ds = pk_dataset(self.records_dir, cfg.split, P=family.P, K=family.K, flips=cfg.flips,
                        seed=cfg.seed, input_context=input_context, start_batch=start_step)
        jitter = float(self.model_config.family.intensity_jitter or 0.0)
        if jitter > 0:
            ds = jitter_intensity(ds, jitter, cfg.seed, start_step * replicas_per_pipeline(
                input_context))
        return ds

    def compute_loss(self, model, batch, training):
        """Mean softmax cross-entropy and accuracy over the global batch."""
        images, labels = batch
        probs = tf.cast(model(images, training=training), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(labels, probs)
        correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32),
                                   tf.cast(labels, tf.int32)), tf.float32)
        return global_mean(losses), {"accuracy": global_mean(correct)}

    def image_summaries(self, batch):
        """The first 8 patches, framed by their true class and by the predicted class.

        Frame colours follow the class order (gene classes, tissue, background), so a
        patch whose two frames differ is misclassified.
        """
        images, labels = batch
        patches = tf.clip_by_value(tf.cast(images[:8], tf.float32) / 255.0, 0.0, 1.0)
        out = {"input_patches": patches,
               "true_class": _framed(patches, tf.cast(tf.reshape(labels[:8], [-1]), tf.int32))}
        if self.model is not None:
            probs = self.model(tf.cast(images[:8], tf.float32), training=False)
            out["predicted_class"] = _framed(patches, tf.argmax(probs, axis=-1, output_type=tf.int32))
        return out
