"""Hyperparameter search with KerasTuner: a trial is an ordinary `bin/train` run.

`bin/tune` builds the same `ModelConfig` / `TrainConfig` as `bin/train` from the same
flags, lets a KerasTuner oracle (grid, random, Bayesian or Hyperband) choose the
hyperparameters of each trial, trains with `ish_tf.train.trainer.train` into
OUT/runs/trial_<id>/e<i>/ (ordinary run directories), and scores the trial on the
validation split (triplet: other-donor, image-level rank-1). Results:

    OUT/trials.csv       one row per trial: hyperparameters, objective, metrics, seconds, status
    OUT/best.cfg         the best trial as a flagfile for `bin/train --flagfile=OUT/best.cfg`
    OUT/runs/            TensorBoard logdir: trials' training scalars + HParams
    OUT/tuner/           KerasTuner's project (oracle state; rerun to resume)

This module holds the configuration dataclasses (no TensorFlow import);
`ish_tf.tune.hypermodels` the per-family HyperModels and `ish_tf.tune.search` the
tuner and `run_search`.
"""

from __future__ import annotations

import dataclasses

TUNERS = ("grid", "random", "bayesian", "hyperband")

#: The paper's search space (Abed-Esfahani et al. 2022), used by the flag defaults.
PAPER_P = (5, 10, 12, 14, 16, 17, 18, 20, 40, 50, 60)
PAPER_MARGINS = ("soft", "0.5", "1")
PAPER_LEARNING_RATES = (1e-4, 9e-5, 8e-5, 7e-5, 6e-5, 5e-5, 1e-5)
PAPER_METRICS = ("euclidean", "sqeuclidean", "cityblock")
PAPER_STEPS = (10000, 15000, 20000, 30000)


class TuneError(ValueError):
    """The search cannot run as configured (bad space, no validation data)."""


@dataclasses.dataclass(frozen=True)
class TuneSpace:
    """Values each hyperparameter may take; a single value makes it fixed.

    Attributes:
      flips: random flips on/off.
      P: genes per batch; K = batch_images // P patches per gene.
      batch_images: images per global batch (300 in the paper).
      margin: triplet margins ("soft" or numbers as text).
      learning_rate: initial learning rates.
      metric: embedding distances of the loss (and of the validation rank-1).
      steps: training steps before `TuneConfig.steps_scale`.
    """

    flips: tuple[bool, ...] = (True, False)
    P: tuple[int, ...] = PAPER_P
    batch_images: int = 300
    margin: tuple[str, ...] = PAPER_MARGINS
    learning_rate: tuple[float, ...] = PAPER_LEARNING_RATES
    metric: tuple[str, ...] = PAPER_METRICS
    steps: tuple[int, ...] = PAPER_STEPS

    def validate(self) -> TuneSpace:
        """Checks the space; returns self.

        Raises:
          TuneError: an empty list, or a P that leaves K < 2 (no positives).
        """
        for name in ("flips", "P", "margin", "learning_rate", "metric", "steps"):
            if not getattr(self, name):
                raise TuneError(f"--tune_{name} must list at least one value")
        bad = [p for p in self.P if p < 2 or self.batch_images // p < 2]
        if bad:
            raise TuneError(f"--tune_P values {bad} leave fewer than 2 genes or fewer than 2 "
                            f"patches per gene in a batch of --tune_batch_images="
                            f"{self.batch_images}")
        if any(s < 1 for s in self.steps) or any(lr <= 0 for lr in self.learning_rate):
            raise TuneError("--tune_steps and --tune_learning_rate must be positive")
        return self


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Settings of one search.

    Attributes:
      out_dir: OUT (trials.csv, best.cfg, runs/, tuner/).
      tuner: "grid", "random", "bayesian" or "hyperband".
      max_trials: most trials (for hyperband: the oracle's own budget applies too).
      executions_per_trial: trainings per trial (seeds seed, seed+1, ...); the
        objective is their mean.
      steps_scale: multiplies every trial's step count (and decay start) for small runs;
        best.cfg keeps the unscaled value.
      validation_split: split of the records the objective is computed on.
      val_batch_size: patches per inference batch while scoring.
      val_batches: batches of the task's loss for families scored by validation loss.
      space: the hyperparameter values.
      overwrite: discard an existing search in OUT instead of resuming it.
      hyperband_max_epochs: hyperband's largest budget, in units of
        max(steps) * steps_scale / hyperband_max_epochs steps.
      hyperband_factor: hyperband's reduction factor.
      small_run: shrink each trial like `bin/train --small_run`.
      seed: oracle seed and first training seed.
    """

    out_dir: str
    tuner: str = "random"
    max_trials: int = 20
    executions_per_trial: int = 1
    steps_scale: float = 1.0
    validation_split: str = "validation"
    val_batch_size: int = 64
    val_batches: int = 20
    space: TuneSpace = dataclasses.field(default_factory=TuneSpace)
    overwrite: bool = False
    hyperband_max_epochs: int = 9
    hyperband_factor: int = 3
    small_run: bool = False
    seed: int = 0

    def validate(self) -> TuneConfig:
        """Checks ranges; returns self.

        Raises:
          TuneError: naming the offending flag.
        """
        if not self.out_dir:
            raise TuneError("--out is required: the directory of the search")
        if self.tuner not in TUNERS:
            raise TuneError(f"--tuner={self.tuner!r} is not one of {TUNERS}")
        for name in ("max_trials", "executions_per_trial", "val_batch_size", "val_batches"):
            if getattr(self, name) < 1:
                raise TuneError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.steps_scale > 0:
            raise TuneError(f"--steps_scale must be > 0, got {self.steps_scale}")
        if self.hyperband_max_epochs < 1 or self.hyperband_factor < 2:
            raise TuneError("--hyperband_max_epochs must be >= 1 and --hyperband_factor >= 2")
        self.space.validate()
        return self

    def scaled_steps(self, steps: int) -> int:
        """Steps a trial actually trains for (at least 1)."""
        return max(1, int(round(steps * self.steps_scale)))
