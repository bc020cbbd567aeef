"""Training tasks of the cell-identity-code family (`--model=cic`, `--model=cic_classifier`).

Batches are `(profiles float32 (b, D), labels int32 (b,))` read from a vector record
set (`bin/ingest --expression`, or `write_record_set` with `InputSpec.vector`); a
label is the record's identity index (its cell type). The task reads D and the class
names from the records into `CicConfig.dim` / `CicConfig.classes` (hence into
RUN/model_config.json). Loss: per-profile MSE of the reconstruction, averaged over the
global batch; the classifier-autoencoder adds `class_weight` x the softmax
cross-entropy of the cell type.

The classes are the record set's whole identity vocabulary (all splits), so a cell type
held out as the test split (`bin/ingest --split_by=label`) keeps a softmax unit that
training never targets: its profiles are then classified among the seen types.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean, replicas_per_pipeline


class CicTask(Task):
    """The autoencoder: reconstruction MSE over the global batch (stat: mse).

    Args:
      model_config: a `ModelConfig` with a `CicConfig`; `dim` (and `classes`) are
        filled from `train_config.records_dir` (given values must match).
      train_config: runtime settings (records_dir, split, seed).
      dataset_fn: optional in-memory dataset (tests).

    Raises:
      ValueError: records that are not vectors, a dimension or classes that disagree
        with the config, or (classifier) fewer than 2 classes.
    """

    stat_names = ("mse",)
    classifier = False

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        family = model_config.family
        if family.classifier and not self.classifier:
            raise ValueError("CicConfig.classifier is set: train it with --model=cic_classifier")
        family.classifier = self.classifier
        if train_config.records_dir and dataset_fn is None:
            self._read_records_facts(train_config.records_dir)
        family.validate()
        if self.classifier and family.num_classes < 2:
            raise ValueError(f"--model=cic_classifier needs >= 2 classes (cell types), got "
                             f"{family.num_classes}")

    def _read_records_facts(self, records_dir: str) -> None:
        from ish_tf.data import shards

        family = self.model_config.family
        spec = shards.records_input_spec(records_dir)
        if spec.kind != "vector":
            raise ValueError(f"--records_dir={records_dir} holds {spec.describe()} records; "
                             f"--model={self.model_config.model} reads expression vectors "
                             "(bin/ingest --expression)")
        if family.dim and spec.dim and family.dim != spec.dim:
            raise ValueError(f"the model takes {family.dim} genes but {records_dir} holds "
                             f"vectors of {spec.dim}")
        family.dim = int(spec.dim or family.dim)
        info = shards.load_dataset_info(records_dir)
        if info is not None:
            classes = tuple(g.gene_symbol for g in sorted(info.genes, key=lambda g: g.gene_index))
            if family.classes and tuple(family.classes) != classes:
                raise ValueError(f"the model's classes {list(family.classes)} differ from the "
                                 f"identities of {records_dir}: {list(classes)}")
            # Persisted in model_config.json: predictions name their classes.
            family.classes = classes

    def make_records_dataset(self, input_context: tf.distribute.InputContext | None,
                             start_step: int = 0) -> tf.data.Dataset:
        """Shuffled (profiles, labels) batches, deterministic given the seed.

        Raises:
          ValueError: `records_dir` is not set.
        """
        from ish_tf.data.inputs import InputSpec
        from ish_tf.data.pipeline import patch_dataset

        cfg, family = self.train_config, self.model_config.family
        if not cfg.records_dir:
            raise ValueError("--records_dir is required: vector records of expression "
                             "profiles (bin/ingest --expression)")
        ds = patch_dataset(cfg.records_dir, cfg.split, batch_size=family.batch_size,
                           training=True, deterministic=True, seed=cfg.seed,
                           input_context=input_context, input_spec=InputSpec.vector(family.dim))
        # The stream is a function of the seed alone, so skipping resumes exactly.
        return ds.skip(start_step * replicas_per_pipeline(input_context))

    def compute_loss(self, model, batch, training):
        """Mean per-profile reconstruction MSE over the global batch."""
        profiles, labels = batch
        profiles = tf.cast(profiles, tf.float32)
        outputs = model(profiles, training=training)
        recon = tf.cast(outputs[1], tf.float32)
        mse = global_mean(tf.reduce_mean(tf.square(recon - profiles), axis=-1))
        if not self.classifier:
            return mse, {"mse": mse}
        probs = tf.cast(outputs[2], tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        xent = global_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
        correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels),
                          tf.float32)
        weight = float(self.model_config.family.class_weight)
        return mse + weight * xent, {"mse": mse, "cross_entropy": xent,
                                     "accuracy": global_mean(correct)}


class CicClassifierTask(CicTask):
    """The classifier-autoencoder: MSE + class_weight x cross-entropy of the cell type
    (stats: mse, cross_entropy, accuracy)."""

    stat_names = ("mse", "cross_entropy", "accuracy")
    classifier = True
