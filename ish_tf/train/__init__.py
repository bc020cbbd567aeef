"""Training: one trainer for every model family, driven by a `Task`.

`TrainConfig` (this module, no TensorFlow import) holds the stage's settings;
`ish_tf.train.tasks` defines the `Task` interface (each family's task lives in its
package, `ish_tf.families`);
`ish_tf.train.trainer.train(task, config)` runs the custom loop with checkpoints,
TensorBoard scalars, metrics.csv and the final `model.keras`.
"""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting

STRATEGIES: tuple[str, ...] = ("auto", "mirrored", "one_device", "default", "multi_worker")


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (defaults: the paper's configuration); `bin/train`'s
    runtime flags are generated from these fields (`ish_tf.config.define_flags`).

    Attributes:
      run_dir: output directory RUN (flags.cfg, checkpoints/, logs/, metrics.csv,
        model.keras, model_config.json).
      records_dir: directory of TFRecord shards + index.json (from bin/extract).
      split: split of the records to train on.
      flips: random horizontal/vertical flips in the input pipeline.
      learning_rate: initial Adam learning rate lr0.
      adam_epsilon: Adam epsilon.
      steps: total optimizer steps t1.
      decay_start: step t0 after which lr decays exponentially to
        final_lr_fraction * lr0 at t1.
      final_lr_fraction: lr(t1) / lr0.
      strategy: one of `STRATEGIES`.
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: checkpoints kept on disk.
      log_every: steps between log lines / TensorBoard scalars / metrics.csv rows.
      validate_every: steps between validation passes (`Task.validation_metrics` on the
        validation split, TensorBoard `validation/...`); 0 = none.
      image_summaries: write a few input images to TensorBoard at the first step.
      mixed_precision: mixed_float16 (GPU, loss scaling) or mixed_bfloat16 (CPU).
      jit_compile: XLA-compile the train step (the model's forward pass under
        a multi-replica strategy, where collectives stay outside XLA).
      deterministic: enable TensorFlow op determinism (slower; exact reruns).
      seed: seed of model initialisation and the input pipeline.
    """

    run_dir: str = setting("runs/triplet", "Run directory: flags.cfg, checkpoints/, logs/, "
                           "metrics.csv, model.keras. Rerunning with the same directory resumes.")
    records_dir: str = setting("", "TFRecord shards + index.json written by bin/extract.")
    split: str = setting("train", "Split of the records to train on.")
    flips: bool = setting(True, "Random horizontal and vertical flips.")
    learning_rate: float = setting(7e-5, "Initial Adam learning rate.")
    adam_epsilon: float = setting(1e-8, "Adam epsilon.")
    steps: int = setting(30000, "Total optimizer steps.")
    decay_start: int = setting(25000, "Hold the learning rate until this step, then decay it "
                               "exponentially.")
    final_lr_fraction: float = setting(0.001, "Learning rate at --steps as a fraction of the "
                                       "initial one.")
    strategy: str = setting("auto", "tf.distribute strategy; auto = mirrored when more than "
                            "one GPU is visible; multi_worker = MultiWorkerMirroredStrategy "
                            "from TF_CONFIG.", choices=STRATEGIES)
    checkpoint_every: int = setting(1000, "Steps between checkpoints.")
    keep_checkpoints: int = setting(3, "Checkpoints kept on disk.")
    log_every: int = setting(100, "Steps between log lines, TensorBoard scalars and "
                             "metrics.csv rows.")
    validate_every: int = setting(1000, "Steps between validation passes on the records' "
                                  "validation split (triplet: other-donor rank-1 and mAP; "
                                  "other families: validation loss), also at the last "
                                  "step; 0 = no validation.")
    image_summaries: bool = setting(True, "Write a few input patches to TensorBoard at step 0.")
    mixed_precision: bool = setting(False, "Mixed precision: float16 with loss scaling on "
                                    "GPU, bfloat16 on CPU.")
    jit_compile: bool = setting(False, "XLA-compile the train step.")
    deterministic: bool = setting(False, "Enable TensorFlow op determinism (slower).")
    seed: int = setting(0, "Seed for every random choice of the stage.")

    def validate(self) -> TrainConfig:
        """Checks ranges; returns self.

        Raises:
          ValueError: naming the offending field.
        """
        for name in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.validate_every < 0:
            raise ValueError(f"--validate_every must be >= 0, got {self.validate_every}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"--final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")
        if self.decay_start < 0:
            raise ValueError(f"--decay_start must be >= 0, got {self.decay_start}")
        return self

    def shrunk_for_small_run(self, steps: int = 20) -> TrainConfig:
        """A copy for a smoke run: at most `steps` steps, frequent logs (the family config
        shrinks its own batch: `shrunk_for_small_run`).

        The decay start keeps its fraction of the run, so the schedule's shape is
        exercised too.
        """
        new_steps = min(self.steps, steps)
        decay = int(round(self.decay_start * new_steps / max(self.steps, 1)))
        return dataclasses.replace(
            self, steps=new_steps, decay_start=min(decay, new_steps),
            checkpoint_every=min(self.checkpoint_every, max(new_steps // 2, 1)),
            log_every=min(self.log_every, 5),
            validate_every=min(self.validate_every, max(new_steps // 2, 1)))
