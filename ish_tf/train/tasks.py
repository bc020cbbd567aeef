"""The `Task` interface the trainer drives, and the collectives tasks use.

A model family plugs into the one trainer as a `Task` (its package's `task.py`, named
in the family registry `ish_tf.families`): it builds its model, makes its dataset, and
computes its loss.

Loss contract (what makes MirroredStrategy exact): `compute_loss` runs in a replica
context on that replica's slice of the global batch and returns the loss of the
WHOLE global batch, the same value on every replica. Tasks that mine across the
batch (triplet) `gather_across_replicas` their outputs first; per-example losses
use `global_mean`. Both collectives pass gradients back by summing the replicas'
upstream gradients, so each replica's gradient is `R x` its share; the trainer
divides the loss by the replica count R before differentiating, and the optimizer's
cross-replica SUM then equals the single-device gradient of the global batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from ish_tf.train import TrainConfig

Batch = Any
DatasetFn = Callable[[tf.distribute.InputContext | None], tf.data.Dataset]


def replicas_per_pipeline(input_context: tf.distribute.InputContext | None) -> int:
    """How many replicas one input pipeline feeds (1 without an input context)."""
    if input_context is None:
        return 1
    return max(input_context.num_replicas_in_sync // max(input_context.num_input_pipelines, 1), 1)


def gather_across_replicas(*tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Concatenates each tensor over replicas along axis 0 (identity with one replica).

    Must be called in a replica context (inside `strategy.run`) by every replica.
    Replica r's slice comes r-th, so the result is the global batch in input order.

    Args:
      *tensors: per-replica tensors (b, ...) with equal trailing shapes.

    Returns:
      Tensors (R*b, ...) in the same order as the arguments.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return tuple(ctx.all_gather(t, axis=0) for t in tensors)


def global_mean(values: tf.Tensor) -> tf.Tensor:
    """Mean of per-example values over the global batch (all replicas).

    Args:
      values: (b, ...) per-example values on this replica.

    Returns:
      float32 scalar, equal on every replica.
    """
    values = tf.cast(values, tf.float32)
    total = tf.reduce_sum(values)
    count = tf.cast(tf.size(values), tf.float32)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    return total / tf.maximum(count, 1.0)


class Task(abc.ABC):
    """One model family's contribution to training.

    Required: `make_records_dataset` and `compute_loss`. Optional hooks for families
    whose step differs (a mean teacher, its own optimizer); their defaults change
    nothing, and the trainer uses them in this order:

    - `global_step`: set by the trainer, before `build_model`, to the checkpointed step
      counter (`tf.Variable` int64, mirrored under a strategy). Read it inside
      `compute_loss` / `after_apply` (e.g. a consistency-weight or EMA-decay ramp); it
      holds the steps completed before the current one (0 in the first step). Never
      assign it: the trainer increments it after each step.
    - `build_model()`: in the strategy scope; build extra models here too (a teacher:
      its variables are then mirrored like the student's).
    - `make_optimizer(train_config)`: in the strategy scope; a Keras optimizer (with
      its own learning rate or schedule) or None for the trainer's default (Adam with
      `HoldThenExponentialDecay`). mixed_float16 wraps it in a `LossScaleOptimizer`;
      metrics.csv logs its learning rate.
    - `checkpoint_items()`: {name: trackable} saved and restored with the model,
      optimizer and step (e.g. `{"teacher": self.teacher}`), so resuming is exact.
    - `before_step(step)`: eagerly, between steps, on every worker, before the batch of
      global step `step` is used (also the first step of a resumed run); for work on
      the whole data set that the step reads through variables (pseudo-labels).
    - `after_apply()`: in the replica context, on every replica, right after each
      `optimizer.apply` (also after a float16 step that the loss scaling skipped).
      Update variables through the strategy, e.g. `ish_tf.train.ema.ema_update(
      self.teacher.weights, self.model.weights, decay)`.

    Args:
      model_config: how to build the model (`ish_tf.families.ModelConfig`; the family's
        typed settings in `model_config.family`).
      train_config: runtime settings: records_dir, split, schedule, seed.
      dataset_fn: optional replacement of `make_dataset` (in-memory data in tests
        and notebooks): `fn(input_context | None) -> Dataset`.
    """

    name: str = ""
    #: Names of the scalar stats `compute_loss` returns (metrics.csv columns).
    stat_names: tuple[str, ...] = ()

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        self.model_config = model_config
        self.train_config = train_config
        self._dataset_fn = dataset_fn

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step over all replicas (the family config's)."""
        return self.model_config.family.global_batch_size

    def build_model(self) -> keras.Model:
        """Builds the model (called inside the strategy scope)."""
        return self.model_config.spec.build(self.model_config)

    def make_dataset(self, input_context: tf.distribute.InputContext | None = None,
                     start_step: int = 0) -> tf.data.Dataset:
        """An infinite dataset of batches, starting at global step `start_step`.

        The stream must be a deterministic function of (seed, step) so that a resumed
        run sees exactly the batches an uninterrupted one would have.

        Args:
          input_context: None -> global batches; otherwise this input pipeline's
            per-replica batches, one element per replica it feeds, in replica order.
          start_step: the first global batch to produce (resume).

        Returns:
          tf.data.Dataset of batches in the structure `compute_loss` expects.
        """
        if self._dataset_fn is not None:
            # In-memory data is cheap to skip through.
            return self._dataset_fn(input_context).skip(start_step * replicas_per_pipeline(input_context))
        return self.make_records_dataset(input_context, start_step)

    @abc.abstractmethod
    def make_records_dataset(self, input_context: tf.distribute.InputContext | None,
                             start_step: int = 0) -> tf.data.Dataset:
        """The dataset read from `train_config.records_dir` (see `make_dataset`)."""

    @abc.abstractmethod
    def compute_loss(self, model: Callable, batch: Batch, training: bool
                     ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Loss of the global batch and scalar stats (see the module docstring).

        Args:
          model: the model (or a callable with its `__call__(x, training=)`).
          batch: this replica's batch.
          training: training mode (batch norm, dropout).

        Returns:
          (float32 scalar loss over the global batch, {name: float32 scalar}).
        """

    # The model being trained, set by the trainer after `build_model` (None before).
    model: keras.Model | None = None
    # The checkpointed step counter, set by the trainer before `build_model` (see the
    # class docstring; None outside the trainer).
    global_step: tf.Variable | None = None

    def make_optimizer(self, train_config: TrainConfig) -> keras.optimizers.Optimizer | None:
        """The task's own optimizer, or None for the trainer's default.

        Called inside the strategy scope, after `build_model` (`self.model` is set).

        Args:
          train_config: the run's settings (steps, learning_rate, ...).

        Returns:
          A Keras optimizer (not yet built, not wrapped for loss scaling), or None:
          Adam with `HoldThenExponentialDecay` over `train_config`.
        """
        return None

    def before_step(self, step: int) -> None:
        """Called eagerly before global step `step` (steps completed so far).

        Outside the compiled step and the replica context, on every worker (so it must
        be a deterministic function of the variables and the data), after the
        checkpoint is restored. The batch of the step may already have been read:
        change what the step computes through variables (assigned here, in the
        cross-replica context), never through the dataset.
        """
        return None

    def after_apply(self) -> None:
        """Called in the replica step right after the optimizer applied the gradients.

        Runs inside the compiled step, in the replica context, on every replica; what
        it updates must go through the strategy (`ish_tf.train.ema.ema_update` does).
        `self.model` holds the updated weights; `self.global_step` still reads the
        number of steps before this one.
        """
        return None

    def checkpoint_items(self) -> dict[str, Any]:
        """Trackables checkpointed next to the model, optimizer and step.

        Called once per `train` call, after `build_model`. Names must not be "model",
        "optimizer" or "step". A resumed run restores them; a checkpoint that lacks one
        is reported as not fitting.

        Returns:
          {name: trackable} (Keras models, tf.Variables, ...); {} by default.
        """
        return {}

    def finalize_model(self, model: keras.Model) -> str:
        """Last changes to the trained model before the trainer writes RUN/model.keras.

        Called once the run has reached its steps (again when a finished run's
        model.keras is rewritten, so it must be a deterministic function of the
        weights and the data). The checkpoints keep the weights as trained.

        Returns:
          A line for the log saying what was done ("" for nothing).
        """
        return ""

    def image_summaries(self, batch: Batch) -> dict[str, tf.Tensor]:
        """Images to show in TensorBoard: {name: (N, H, W, C) float in [0, 1]}.

        Called at step 0 and at every checkpoint; `self.model` holds the current model,
        so a task can show its predictions.
        """
        return {}

    #: Batches of the validation split scored by the default `validation_metrics`.
    validation_batches: int = 4

    def validation_metrics(self, model: keras.Model) -> dict[str, float]:
        """Scores of the current model on the validation split (TensorBoard `validation/`).

        Called by the trainer every `--validate_every` steps, between steps, outside the
        compiled step and the strategy's replica context. It must not draw from the
        training random streams (inference only, datasets with explicit seeds), so
        training is the same with and without validation.

        The default: the loss and stats of `compute_loss(training=False)`, averaged over
        the first `validation_batches` batches the family's own reader makes from
        `train_config.split = "validation"` without flips ("loss" is drawn with the
        training loss as `loss/validation`). Families override it with their own
        measure (the triplet family: other-donor re-identification).

        Returns:
          {name: value}; {} when there is nothing to score (in-memory data, no
          validation split, or a split the family's reader refuses).
        """
        if self._dataset_fn is not None or not self.train_config.records_dir:
            return {}
        if getattr(self, "_validation_off", False):
            return {}
        import dataclasses

        saved = self.train_config
        self.train_config = dataclasses.replace(saved, split=self.validation_split,
                                                flips=False)
        try:
            if not has_split(self.train_config.records_dir, self.validation_split):
                self._validation_off = True
                return {}
            dataset = self.make_records_dataset(None, 0).take(self.validation_batches)
            sums: dict[str, float] = {}
            n = 0
            for batch in dataset:
                loss, stats = self.compute_loss(model, batch, training=False)
                for key, value in {"loss": loss, **stats}.items():
                    sums[key] = sums.get(key, 0.0) + float(tf.cast(value, tf.float32).numpy())
                n += 1
        except (ValueError, tf.errors.OpError) as e:
            # A split too small for the family's batches (e.g. fewer than P genes):
            # said once, then no validation for the run.
            self._validation_off = True
            from absl import logging

            logging.warning("no validation scores: the %s split cannot be read as training "
                            "batches (%s)", self.validation_split,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            return {}
        finally:
            self.train_config = saved
        return {k: v / n for k, v in sums.items()} if n else {}

    #: The split `validation_metrics` scores.
    validation_split: str = "validation"


def has_split(records_dir: str, split: str) -> bool:
    """Whether a records directory lists any shard of `split` in its index."""
    from ish_tf.data import shards

    try:
        return bool(shards.completed_shards(records_dir, split))
    except Exception:  # noqa: BLE001 - no readable index: nothing to validate on
        return False


_RESIZES_NOTED: set[tuple] = set()


def note_resize(records_dir: str, stored: tuple, size: int) -> None:
    """Says once per process and records set that images are resized for the model.

    Records stored at another size than the model's input are resized in the input
    pipeline (bilinear); the line names both sizes, so a mismatch is never silent.

    Args:
      records_dir: the records set (named in the line).
      stored: (height, width) of the stored images (None where not static).
      size: the model's square input size (--input_size).
    """
    key = (records_dir, tuple(stored), size)
    if key in _RESIZES_NOTED:
        return
    _RESIZES_NOTED.add(key)
    h, w = stored
    have = f"{h}x{w}" if h and w else "of varying size"
    from absl import logging

    logging.warning("records in %s are %s px and the model takes %dx%d: every image is "
                    "resized to %dx%d in the input pipeline (extract with --patch_size=%d, "
                    "or train with --input_size=%s, to avoid it)", records_dir or "memory",
                    have, size, size, size, size, size, h if h and h == w else "R")
