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

Families name their HyperModel in their registry entry (`ish_tf.families`):
`triplet`'s (`ish_tf.families.triplet.hypermodel.TripletHyperModel`: the paper's space,
validation other-donor image-level rank-1); any family without one (CDAE, ISH CNN,
...) gets `TaskHyperModel`: learning rate, steps and flips, scored by the task's own
loss on the validation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras_tuner
import numpy as np

from ish_tf.families import ModelConfig, build_model
from ish_tf.train import TrainConfig
from ish_tf.tune import TuneConfig, TuneError

#: KerasTuner's Hyperband bookkeeping hyperparameters (not ours, never flags).
HYPERBAND_EPOCHS = "tuner/epochs"
HYPERBAND_PREVIOUS = "tuner/trial_id"


def hp_choice(hp: keras_tuner.HyperParameters, name: str, values) -> Any:
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
        hp_choice(hp, "learning_rate", space.learning_rate)
        hp_choice(hp, "flips", space.flips)
        if not self.hyperband:
            hp_choice(hp, "steps", space.steps)

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

    def family_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Fields of the family's typed config set by the trial's values (none here)."""
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
        family = dataclasses.replace(self.model_config.family, **self.family_overrides(values))
        if self.tune_config.small_run:
            train_config = train_config.shrunk_for_small_run()
            shrink = getattr(family, "shrunk_for_small_run", None)
            family = shrink() if callable(shrink) else family
        model_seed = None if self.model_config.seed is None else self.model_config.seed + execution
        model_config = dataclasses.replace(self.model_config, family=family, seed=model_seed)
        return model_config, train_config.validate()

    def flag_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`bin/train` flag values reproducing a trial at full length (best.cfg).

        Args:
          values: the trial's hyperparameter values.

        Returns:
          {flag name: value} (bools as bools; rendered by `search.flag_line`).
        """
        from ish_tf.config import flag_name

        prefix = self.model_config.spec.prefix
        family = {flag_name(prefix, k): v for k, v in self.family_overrides(values).items()}
        return {**family, **self.train_overrides(values)}

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

        from ish_tf.families import make_task

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


def make_hypermodel(model_config: ModelConfig, train_config: TrainConfig,
                    tune_config: TuneConfig) -> FamilyHyperModel:
    """The HyperModel of `model_config.model`: the family's own (its registry entry's
    `hypermodel`), else `TaskHyperModel` (learning rate, steps, flips; validation loss).
    """
    cls = model_config.spec.hypermodel_cls or TaskHyperModel
    return cls(model_config, train_config, tune_config)
