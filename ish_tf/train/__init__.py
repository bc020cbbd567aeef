"""Training: one trainer for every model family, driven by a `Task`.

`TrainConfig` (this module, no TensorFlow import) holds the stage's settings;
`ish_tf.train.tasks` defines the `Task` interface (each family's task lives in its
package, `ish_tf.families`);
`ish_tf.train.trainer.train(task, config)` runs the custom loop with checkpoints,
TensorBoard scalars, metrics.csv and the final `model.keras`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (defaults: the paper's configuration).

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
      strategy: "auto", "mirrored", "one_device" or "default".
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: checkpoints kept on disk.
      log_every: steps between log lines / TensorBoard scalars / metrics.csv rows.
      image_summaries: write a few input images to TensorBoard at the first step.
      mixed_precision: mixed_float16 (GPU, loss scaling) or mixed_bfloat16 (CPU).
      jit_compile: XLA-compile the train step (the model's forward pass under
        a multi-replica strategy, where collectives stay outside XLA).
      deterministic: enable TensorFlow op determinism (slower; exact reruns).
      seed: seed of model initialisation and the input pipeline.
    """

    run_dir: str = "runs/triplet"
    records_dir: str = ""
    split: str = "train"
    flips: bool = True
    learning_rate: float = 7e-5
    adam_epsilon: float = 1e-8
    steps: int = 30000
    decay_start: int = 25000
    final_lr_fraction: float = 0.001
    strategy: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 100
    image_summaries: bool = True
    mixed_precision: bool = False
    jit_compile: bool = False
    deterministic: bool = False
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Checks ranges; returns self.

        Raises:
          ValueError: naming the offending field.
        """
        for name in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
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
            log_every=min(self.log_every, 5))
