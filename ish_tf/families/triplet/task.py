"""The triplet family's training task: P genes x K patches, triplet loss over the global batch."""

from __future__ import annotations

import tensorflow as tf

from ish_tf.train.tasks import DatasetFn, Task, gather_across_replicas


class TripletTask(Task):
    """Gene re-identification: P genes x K patches, triplet loss over the global batch.

    Batches are `(images (b, R, R, 3) float32 in [0, 255], labels (b,) int32)`.
    """

    stat_names = ("active_fraction", "mean_d_pos", "mean_d_neg", "top1", "embedding_norm")

    def __init__(self, model_config, train_config,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        from ish_tf.losses.triplet import check_margin, check_metric, check_mining

        # Fail at construction, not at the first traced step.
        family = model_config.family
        family.validate()
        if model_config.input_size < 1:
            raise ValueError(f"--input_size must be >= 1, got {model_config.input_size}")
        self.mining = check_mining(family.mining)
        self.margin = check_margin(family.margin)
        self.metric = check_metric(family.metric)

    def make_records_dataset(self, input_context: tf.distribute.InputContext | None,
                             start_step: int = 0) -> tf.data.Dataset:
        """P x K batches from the records, resized to the model's input size if needed.

        Raises:
          ValueError: `records_dir` is not set.
          RecordsError: the split has no records, or fewer than max(P, 2) identities
            with at least K records (naming the split and the counts).
        """
        from ish_tf.data.input_checks import check_pk_identities
        from ish_tf.data.pipeline import pk_dataset

        cfg, family = self.train_config, self.model_config.family
        if not cfg.records_dir:
            raise ValueError("--records_dir is required: the directory of TFRecord shards "
                             "and index.json written by bin/extract")
        # Before training starts: P identities of K records each must exist.
        check_pk_identities(cfg.records_dir, cfg.split, family.P, family.K)
        ds = pk_dataset(cfg.records_dir, cfg.split, P=family.P, K=family.K, flips=cfg.flips,
                        seed=cfg.seed, input_context=input_context, start_batch=start_step)
        size = self.model_config.input_size
        height, width = ds.element_spec[0].shape[1:3]
        if (height, width) != (size, size):
            # Patches stored at another size (or of unknown static size): resize in
            # the pipeline, where it overlaps with training.
            ds = ds.map(lambda x, y: (tf.image.resize(x, (size, size)), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    def compute_loss(self, model, batch, training):
        """Embeds this replica's images, gathers all replicas, mines the global batch."""
        from ish_tf.losses.triplet import triplet_loss

        images, labels = batch
        embeddings = model(images, training=training)
        embeddings, labels = gather_across_replicas(tf.cast(embeddings, tf.float32), labels)
        return triplet_loss(labels, embeddings, mining=self.mining, margin=self.margin,
                            metric=self.metric)

    def image_summaries(self, batch):
        """The first 8 patches of the batch (two genes at K >= 4)."""
        images, _ = batch
        return {"input_patches": tf.clip_by_value(tf.cast(images[:8], tf.float32) / 255.0, 0.0, 1.0)}
