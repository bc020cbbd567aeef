"""The triplet family's KerasTuner HyperModel: the paper's space, scored by validation
other-donor image-level rank-1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras_tuner
import numpy as np

from ish_tf.families import ModelConfig
from ish_tf.train import TrainConfig
from ish_tf.tune import TuneError
from ish_tf.tune.hypermodels import FamilyHyperModel, hp_choice


class TripletHyperModel(FamilyHyperModel):
    """The paper's triplet space; objective: validation other-donor image rank-1.

    Hyperparameters: flips, P (K = batch_images // P), margin, learning_rate, metric,
    steps. The objective `val_rank1` is the rank-1 over answerable queries (images
    whose gene was imaged in another donor of the validation split), with candidates
    restricted to other donors, on image-level means of the patch embeddings.
    """

    objective_name = "val_rank1"
    objective_direction = "max"

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        """flips, P, margin, learning_rate, metric and (not with hyperband) steps."""
        space = self.tune_config.space
        hp_choice(hp, "flips", space.flips)
        hp_choice(hp, "P", space.P)
        hp_choice(hp, "margin", space.margin)
        hp_choice(hp, "learning_rate", space.learning_rate)
        hp_choice(hp, "metric", space.metric)
        if not self.hyperband:
            hp_choice(hp, "steps", space.steps)

    def family_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """P, K = batch_images // P, margin and metric (`TripletConfig` fields)."""
        out: dict[str, Any] = {}
        if "P" in values:
            out["P"] = int(values["P"])
            out["K"] = self.tune_config.space.batch_images // int(values["P"])
        for name in ("margin", "metric"):
            if name in values:
                out[name] = str(values[name])
        return out

    def hparams(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """HParams with K added (it follows from P)."""
        out = super().hparams(values)
        if "P" in out:
            out["K"] = self.tune_config.space.batch_images // int(out["P"])
        return out

    def hparam_domains(self, domains: Mapping[str, list]) -> dict[str, list]:
        """Search-space values plus K's (it follows from P)."""
        out = super().hparam_domains(domains)
        if "P" in out:
            out["K"] = sorted({self.tune_config.space.batch_images // int(p) for p in out["P"]})
        return out

    def check_data(self) -> None:
        """The validation split must hold a gene imaged in two donors.

        Raises:
          TuneError: no records, or no gene with images from two donors (rank-1 across
            donors would be undefined).
        """
        super().check_data()
        keys = validation_keys(self.train_config.records_dir, self.tune_config.validation_split)
        donors = keys.groupby("gene_symbol")["donor_id"].nunique()
        if not (donors >= 2).any():
            raise TuneError(
                f"{self.train_config.records_dir}: no gene of split "
                f"'{self.tune_config.validation_split}' has images from two donors, so "
                "other-donor rank-1 is undefined; extract with more donors per gene")

    def score(self, model, model_config: ModelConfig, train_config: TrainConfig
              ) -> dict[str, float]:
        """Other-donor image-level rank-1 (and mAP, chance) on the validation split.

        Returns:
          {"val_rank1": rank-1 over answerable queries, "val_rank1_all": over all
          images, "val_map", "val_chance", "val_images"}.
        """
        from ish_tf.evaluate.reid import evaluate_reid

        frame, values = image_embeddings(model, train_config.records_dir,
                                          self.tune_config.validation_split,
                                          batch_size=self.tune_config.val_batch_size,
                                          input_size=model_config.input_size)
        row = evaluate_reid(values, frame["gene_symbol"].to_numpy(), frame["donor_id"].to_numpy(),
                            metric=model_config.family.metric, candidate_sets=("other_donor",)).iloc[0]
        return {"val_rank1": float(row["rank1_answerable"]), "val_rank1_all": float(row["rank1"]),
                "val_map": float(row["map"]), "val_chance": float(row["chance_answerable"]),
                "val_images": float(len(frame))}


def validation_keys(records_dir: str, split: str):
    """(image_id, gene_symbol, donor_id) of every record of a split, images not decoded.

    Returns:
      pandas DataFrame with one row per record.
    """
    import pandas as pd
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards

    keys = ["image_id", "gene_symbol", "donor_id"]
    files = list_shards(records_dir, split)
    compression = shards.compression_of(files[0]) or ""
    ds = tf.data.TFRecordDataset(files, compression_type=compression).map(
        lambda s: records.parse_example(s, keys)).batch(4096)
    parts = [{k: v.numpy() for k, v in batch.items()} for batch in ds]
    frame = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in keys})
    for k in ("gene_symbol", "donor_id"):
        frame[k] = frame[k].map(lambda b: b.decode("utf-8"))
    return frame


def image_embeddings(model, records_dir: str, split: str, *, batch_size: int = 64,
                     input_size: int | None = None):
    """Image-level mean embeddings of a split, computed with a Keras model.

    Args:
      model: callable `(B, R, R, 3) float32 [0, 255] -> (B, D)`.
      records_dir: records written by bin/extract.
      split: split to embed.
      batch_size: patches per model call.
      input_size: the model's input side; patches of another size are resized.

    Returns:
      (frame with image_id, gene_symbol, donor_id per image, values float32 (N_images, D)).
    """
    import pandas as pd
    import tensorflow as tf

    from ish_tf.data.pipeline import patch_dataset

    ds = patch_dataset(records_dir, split, batch_size=batch_size, training=False, with_keys=True)
    chunks, ids, genes, donors = [], [], [], []
    for images, feats in ds:
        if input_size and tuple(images.shape[1:3]) != (input_size, input_size):
            images = tf.image.resize(images, (input_size, input_size))
        chunks.append(np.asarray(model(images, training=False), np.float32))
        ids.append(feats["image_id"].numpy())
        genes.append(feats["gene_symbol"].numpy())
        donors.append(feats["donor_id"].numpy())
    if not chunks:
        raise TuneError(f"{records_dir}: split '{split}' has no records to score")
    values = np.concatenate(chunks)
    frame = pd.DataFrame({"image_id": np.concatenate(ids),
                          "gene_symbol": [g.decode("utf-8") for g in np.concatenate(genes)],
                          "donor_id": [d.decode("utf-8") for d in np.concatenate(donors)]})
    # Mean over each image's patches, in first-seen order.
    codes, first = pd.factorize(frame["image_id"])
    sums = np.zeros((len(first), values.shape[1]), np.float64)
    np.add.at(sums, codes, values)
    counts = np.bincount(codes, minlength=len(first))[:, None]
    images = frame.groupby(codes, sort=True).first().reset_index(drop=True)
    return images, (sums / counts).astype(np.float32)


# name -> HyperModel class or "module:Class" (imported on first use).
