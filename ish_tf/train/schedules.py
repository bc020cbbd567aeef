"""Learning-rate schedules as pure functions of the step, serialisable with Keras.

The paper's schedule (Hermans et al. 2017, used by Abed-Esfahani et al. 2022): hold
lr0 until `decay_start`, then decay exponentially so that lr(total_steps) =
final_fraction * lr0:

    lr(t) = lr0                                                   t <= t0
    lr(t) = lr0 * final_fraction ** ((t - t0) / (t1 - t0))        t0 < t < t1
    lr(t) = lr0 * final_fraction                                  t >= t1
"""

from __future__ import annotations

import keras
import tensorflow as tf


def hold_then_exp_decay(step: float, initial_learning_rate: float, decay_start: int,
                        total_steps: int, final_fraction: float) -> float:
    """The schedule on a Python number (reference for tests and logs).

    Args:
      step: optimizer step t (0-based: the first update uses t=0).
      initial_learning_rate: lr0.
      decay_start: t0; lr is lr0 up to and including t0.
      total_steps: t1; lr reaches final_fraction * lr0 here and stays there.
      final_fraction: lr(t1) / lr0.

    Returns:
      The learning rate at `step`.
    """
    lr0 = float(initial_learning_rate)
    if total_steps <= decay_start:
        # Degenerate (a short run ending before the decay): a single step at the end.
        return lr0 * float(final_fraction) if step >= total_steps else lr0
    frac = min(max((step - decay_start) / (total_steps - decay_start), 0.0), 1.0)
    return lr0 * float(final_fraction) ** frac


@keras.saving.register_keras_serializable(package="ish_tf")
class HoldThenExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Keras schedule wrapping `hold_then_exp_decay` (graph/XLA friendly).

    Args:
      initial_learning_rate: lr0 (7e-5 in the paper).
      decay_start: t0 (25,000).
      total_steps: t1 (30,000).
      final_fraction: lr(t1) / lr0 (0.001).

    Raises:
      ValueError: non-positive rate or fraction, negative steps.
    """

    def __init__(self, initial_learning_rate: float, decay_start: int, total_steps: int,
                 final_fraction: float = 0.001, name: str | None = None):
        super().__init__()
        if initial_learning_rate <= 0 or final_fraction <= 0:
            raise ValueError("initial_learning_rate and final_fraction must be > 0, got "
                             f"{initial_learning_rate}, {final_fraction}")
        if decay_start < 0 or total_steps < 0:
            raise ValueError(f"decay_start and total_steps must be >= 0, got {decay_start}, {total_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_start = int(decay_start)
        self.total_steps = int(total_steps)
        self.final_fraction = float(final_fraction)
        self.name = name

    def __call__(self, step):
        lr0 = tf.constant(self.initial_learning_rate, tf.float32)
        t = tf.cast(step, tf.float32)
        t0 = float(self.decay_start)
        t1 = float(self.total_steps)
        if t1 <= t0:
            # Degenerate (e.g. a short run ending before the decay): a step at the end.
            return tf.where(t >= t1, lr0 * self.final_fraction, lr0)
        frac = tf.clip_by_value((t - t0) / (t1 - t0), 0.0, 1.0)
        return lr0 * tf.pow(tf.constant(self.final_fraction, tf.float32), frac)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_start": self.decay_start, "total_steps": self.total_steps,
                "final_fraction": self.final_fraction, "name": self.name}
