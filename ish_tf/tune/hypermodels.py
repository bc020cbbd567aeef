"""KerasTuner HyperModels, one per model family, over the same builders as `bin/train`.

A HyperModel here does three things for the tuner:

* `declare_hyperparameters(hp)`: the search space (one flag-controlled value list per
  hyperparameter; a single value becomes `hp.Fixed`);
* `trial_configs(hp, run_dir, execution)`: the base `ModelConfig` / `TrainConfig`
  (built from `bin/train`'s flags) with the trial's values applied, so a trial is an
  ordinary training run;
* `score(model, model_config, train_config)`: the objective on the validation split.

`build(hp)` returns the Keras model of a trial (the KerasTuner contract), and
`flag_overrides(values)` the `bin/train` flags that reproduce a trial (best.cfg).

Families: `triplet` (`TripletHyperModel`: the paper's space, validation other-donor
image-level rank-1) is registered here; any other registered training task (CDAE,
ISH CNN, ...) gets `TaskHyperModel`: learning rate, steps and flips, scored by the
task's own loss on the validation split. A family can register a richer HyperModel
with `register_hypermodel(name, "module:Class")`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import keras_tuner
import numpy as np

from ish_tf.models import ModelConfig, build_model
from ish_tf.train import TrainConfig
from ish_tf.tune import TuneConfig, TuneError

#: KerasTuner's Hyperband bookkeeping hyperparameters (not ours, never flags).
HYPERBAND_EPOCHS = "tuner/epochs"
HYPERBAND_PREVIOUS = "tuner/trial_id"


def _choice(hp: keras_tuner.HyperParameters, name: str, values) -> Any:
    """hp.Fixed for one value, hp.Boolean for {True, False}, hp.Choice otherwise."""
    values = list(dict.fromkeys(values))  # unique, order kept (grid order)
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    if all(isinstance(v, bool) for v in values):
        return hp.Boolean(name, default=values[0])
    return hp.Choice(name, values, ordered=False)


class FamilyHyperModel(keras_tuner.HyperModel):
    """Common part: learning rate, steps, flips; configs of a trial; flag overrides.

    Args:
      model_config: the base model configuration (from bin/train's flags).
      train_config: the base training configuration (records_dir, strategy, ...).
      tune_config: the search settings (space, steps scale, validation split).
    """

    #: Name and direction of the objective reported by `score`.
    objective_name = "val_loss"
    objective_direction = "min"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 tune_config: TuneConfig):
        super().__init__(name=f"{model_config.model}_hypermodel", tunable=True)
        self.model_config = model_config
        self.train_config = train_config
        self.tune_config = tune_config

    @property
    def objective(self) -> keras_tuner.Objective:
        """The KerasTuner objective `score` reports."""
        return keras_tuner.Objective(self.objective_name, direction=self.objective_direction)

    @property
    def hyperband(self) -> bool:
        """Whether Hyperband owns the step budget (then `steps` is not a hyperparameter)."""
        return self.tune_config.tuner == "hyperband"

    def hyperband_unit(self) -> float:
        """Unscaled steps per Hyperband epoch: max(steps) / hyperband_max_epochs."""
        return max(self.tune_config.space.steps) / self.tune_config.hyperband_max_epochs

    # ------------------------------------------------------------------ space
    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        """Declares the family's search space (see the subclasses)."""
        space = self.tune_config.space
        _choice(hp, "learning_rate", space.learning_rate)
        _choice(hp, "flips", space.flips)
        if not self.hyperband:
            _choice(hp, "steps", space.steps)

    def build(self, hp: keras_tuner.HyperParameters):
        """The trial's Keras model (untrained), built by the family's builder."""
        self.declare_hyperparameters(hp)
        model_config, _ = self.trial_configs(hp, run_dir=self.train_config.run_dir)
        return build_model(model_config)

    def unscaled_steps(self, values: Mapping[str, Any]) -> int:
        """The trial's step count before `steps_scale` (what best.cfg records)."""
        if self.hyperband and HYPERBAND_EPOCHS in values:
            return max(1, int(round(values[HYPERBAND_EPOCHS] * self.hyperband_unit())))
        return int(values.get("steps", self.train_config.steps))

    def _decay_start(self, steps: int) -> int:
        # Keep the base run's hold fraction (the paper holds 25k of 30k steps).
        base = self.train_config
        return min(steps, int(round(steps * base.decay_start / max(base.steps, 1))))

    def train_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """TrainConfig fields set by the trial's values (unscaled steps)."""
        steps = self.unscaled_steps(values)
        out: dict[str, Any] = {"steps": steps, "decay_start": self._decay_start(steps)}
        for name in ("learning_rate", "flips"):
            if name in values:
                out[name] = values[name]
        return out

    def model_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """ModelConfig fields set by the trial's values (none for the common part)."""
        return {}

    def trial_configs(self, hp: keras_tuner.HyperParameters | Mapping[str, Any], run_dir: str,
                      execution: int = 0) -> tuple[ModelConfig, TrainConfig]:
        """The configs of one training run of a trial.

        Args:
          hp: the trial's hyperparameters (or their values).
          run_dir: the run directory of this execution.
          execution: index of the execution; seeds are base seed + execution.

        Returns:
          (ModelConfig, TrainConfig), validated, with steps scaled by `steps_scale`.
        """
        values = dict(hp) if isinstance(hp, Mapping) else dict(hp.values)
        overrides = self.train_overrides(values)
        steps = self.tune_config.scaled_steps(overrides.pop("steps"))
        overrides.pop("decay_start")
        base = self.train_config
        seed = base.seed + execution
        train_config = dataclasses.replace(
            base, **overrides, steps=steps, decay_start=self._decay_start(steps),
            checkpoint_every=min(base.checkpoint_every, steps),
            log_every=min(base.log_every, steps), run_dir=run_dir, seed=seed)
        if self.tune_config.small_run:
            train_config = train_config.shrunk_for_small_run()
        model_seed = None if self.model_config.seed is None else self.model_config.seed + execution
        model_config = dataclasses.replace(self.model_config, **self.model_overrides(values),
                                           seed=model_seed)
        return model_config, train_config.validate()

    def flag_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`bin/train` flag values reproducing a trial at full length (best.cfg).

        Args:
          values: the trial's hyperparameter values.

        Returns:
          {flag name: value} (bools as bools; rendered by `search.flag_line`).
        """
        return {**self.model_overrides(values), **self.train_overrides(values)}

    def hparams(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's values for TensorBoard HParams (KerasTuner bookkeeping dropped)."""
        return {k: v for k, v in values.items() if not k.startswith("tuner/")}

    def hparam_domains(self, domains: Mapping[str, list]) -> dict[str, list]:
        """The values of each HParams column, from the search space's value lists."""
        return {k: list(v) for k, v in domains.items() if not k.startswith("tuner/")}

    # ------------------------------------------------------------------ objective
    def check_data(self) -> None:
        """Fails early when the validation split cannot score a trial.

        Raises:
          TuneError: the split has no records.
        """
        from ish_tf.data.pipeline import list_shards
        from ish_tf.data.records import RecordsError

        try:
            list_shards(self.train_config.records_dir, self.tune_config.validation_split)
        except (RecordsError, OSError) as e:
            raise TuneError(f"--validation_split={self.tune_config.validation_split}: {e}") from e

    def score(self, model, model_config: ModelConfig, train_config: TrainConfig
              ) -> dict[str, float]:
        """Mean task loss over `val_batches` batches of the validation split.

        Args:
          model: the trained model.
          model_config: its config.
          train_config: the trial's training config.

        Returns:
          {"val_loss": float}.
        """
        import keras

        from ish_tf.train.tasks import make_task

        cfg = dataclasses.replace(train_config, split=self.tune_config.validation_split)
        task = make_task(model_config, cfg)
        # tf.data's seeded shuffles also take the global seed: fix it as the trainer does,
        # so the batches scored depend on the execution's seed alone.
        keras.utils.set_random_seed(cfg.seed)
        losses = []
        for batch in task.make_records_dataset(None, 0).take(self.tune_config.val_batches):
            loss, _ = task.compute_loss(model, batch, training=False)
            losses.append(float(loss))
        if not losses:
            raise TuneError(f"validation split '{cfg.split}' yielded no batch")
        return {"val_loss": float(np.mean(losses))}


class TaskHyperModel(FamilyHyperModel):
    """Any registered training task: learning rate, steps, flips; validation loss."""


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
        _choice(hp, "flips", space.flips)
        _choice(hp, "P", space.P)
        _choice(hp, "margin", space.margin)
        _choice(hp, "learning_rate", space.learning_rate)
        _choice(hp, "metric", space.metric)
        if not self.hyperband:
            _choice(hp, "steps", space.steps)

    def train_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Common overrides plus P, K = batch_images // P, margin and metric."""
        out = super().train_overrides(values)
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
                            metric=train_config.metric, candidate_sets=("other_donor",)).iloc[0]
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
_HYPERMODELS: dict[str, str | type[FamilyHyperModel]] = {
    "triplet": TripletHyperModel,
}


def register_hypermodel(name: str, cls: str | type[FamilyHyperModel]) -> None:
    """Registers the HyperModel of model family `name` (a class or "module:Class")."""
    _HYPERMODELS[name] = cls


def hypermodel_names() -> list[str]:
    """Families with a HyperModel: registered ones plus every registered training task."""
    from ish_tf.train.tasks import task_names

    return sorted(set(_HYPERMODELS) | set(task_names()))


def make_hypermodel(model_config: ModelConfig, train_config: TrainConfig,
                    tune_config: TuneConfig) -> FamilyHyperModel:
    """The HyperModel of `model_config.model`.

    Raises:
      TuneError: the family has neither a HyperModel nor a training task.
    """
    name = model_config.model
    cls: str | type[FamilyHyperModel] | Callable | None = _HYPERMODELS.get(name)
    if cls is None:
        if name not in hypermodel_names():
            raise TuneError(f"--model={name!r} cannot be tuned: no HyperModel or training "
                            f"task; known: {hypermodel_names()}")
        cls = TaskHyperModel
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _HYPERMODELS[name] = cls
    return cls(model_config, train_config, tune_config)
