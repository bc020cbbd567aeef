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
        return self._fit_to_input(ds)

    def _fit_to_input(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """Resizes (images, ...) elements to the model's input size when they differ,
        saying so once per run with both sizes (`note_resize`)."""
        from ish_tf.train.tasks import note_resize

        size = self.model_config.input_size
        height, width = ds.element_spec[0].shape[1:3]
        if (height, width) != (size, size):
            note_resize(self.train_config.records_dir, (height, width), size)
            # Patches stored at another size (or of unknown static size): resize in
            # the pipeline, where it overlaps with training.
            ds = ds.map(lambda x, *rest: (tf.image.resize(x, (size, size)), *rest),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    #: Validation records embedded per pass (a seeded-free prefix of the split, in
    #: shard order, so every pass scores the same records).
    validation_max_records: int = 4096

    def validation_metrics(self, model):
        """Other-donor re-identification on the validation split: rank-1, mAP and their
        chance, with images the mean of their patches' embeddings (as `bin/evaluate`
        scores the image level), through `ish_tf.evaluate.reid.evaluate_reid`.

        Inference only (no flips, no shuffle): the training random streams are untouched.
        {} without a validation split, or when it has no gene seen from two donors.
        """
        import numpy as np
        import pandas as pd

        from ish_tf.data.pipeline import patch_dataset
        from ish_tf.evaluate.reid import ReidError, evaluate_reid
        from ish_tf.train.tasks import has_split

        cfg = self.train_config
        if self._dataset_fn is not None or not cfg.records_dir or getattr(
                self, "_validation_off", False):
            return {}
        if not has_split(cfg.records_dir, self.validation_split):
            self._validation_off = True
            return {}
        if getattr(self, "_validation_embed", None) is None:
            self._validation_embed = tf.function(
                lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)
        ds = patch_dataset(cfg.records_dir, self.validation_split, batch_size=256,
                           training=False, with_keys=True, deterministic=True)
        ds = self._fit_to_input(ds).unbatch().take(self.validation_max_records).batch(256)
        values, image_ids, genes, donors = [], [], [], []
        for images, keys in ds:
            values.append(self._validation_embed(images).numpy())
            image_ids.append(keys["image_id"].numpy())
            genes.append(keys["gene_symbol"].numpy())
            donors.append(keys["donor_id"].numpy())
        if not values:
            return {}
        frame = pd.DataFrame({"image_id": np.concatenate(image_ids),
                              "gene": np.concatenate(genes), "donor": np.concatenate(donors)})
        emb = np.concatenate(values)
        codes, first = np.unique(frame["image_id"].to_numpy(), return_index=True)
        inverse = np.searchsorted(codes, frame["image_id"].to_numpy())
        sums = np.zeros((len(codes), emb.shape[1]), np.float64)
        np.add.at(sums, inverse, emb)
        image_values = sums / np.bincount(inverse)[:, None]
        try:
            row = evaluate_reid(image_values, frame["gene"].to_numpy()[first],
                                frame["donor"].to_numpy()[first], metric=self.metric
                                if self.metric in ("euclidean", "sqeuclidean", "cosine")
                                else "euclidean", candidate_sets=("other_donor",),
                                progress=False).iloc[0]
        except ReidError:
            return {}
        if not row["n_answerable"]:
            self._validation_off = True
            return {}
        return {"rank1_other_donor": float(row["rank1"]), "map_other_donor": float(row["map"]),
                "chance_rank1_other_donor": float(row["chance"])}

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
