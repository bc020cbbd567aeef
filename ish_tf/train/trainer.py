"""The shared training loop: any `Task`, any strategy, checkpoints, TensorBoard, resume.

Layout of a run directory RUN::

    RUN/flags.cfg            resolved flags (written by bin/train; replay with --flagfile)
    RUN/train_config.json    the TrainConfig of the latest (re)start
    RUN/model_config.json    builder name + ModelConfig, to rebuild the model
    RUN/checkpoints/         tf.train.CheckpointManager: model, optimizer, step, and the
                             task's `checkpoint_items()` (an EMA teacher)
    RUN/logs/train/          TensorBoard scalars, grouped so the loss comes first:
                             loss/train (loss/validation), train/lr, train/<task stat>,
                             train/grad_norm, train/images_per_sec, validation/<metric>
    RUN/logs/projector/      the embedding projector (written by the quickstart / bin/embed)
    RUN/metrics.csv          the training scalars every log interval
    RUN/validation.csv       the validation scores every --validate_every steps
    RUN/model.keras          the final model (written when the run reaches --steps, after
                             the task's `finalize_model`)

Rerunning with the same RUN resumes from the latest checkpoint; a run that already
reached its step count only (re)writes model.keras if it is missing.

One step: each replica computes the task's global-batch loss on its slice (tasks
gather across replicas where they mine across the batch), divides it by the number
of replicas, differentiates, and the optimizer sums the replicas' gradients: the
result equals the single-device gradient of the global batch. The logged grad_norm is
that global gradient's norm (on logging steps the replicas' shares are all-reduced once
more to measure it).

Task hooks (defaults change nothing; see `ish_tf.train.tasks.Task`), in the order the
trainer uses them:

1. `task.global_step` is set to the checkpointed step counter (a `tf.Variable`
   int64, created in the strategy scope) before `build_model`, the datasets and the
   step function, so `compute_loss` can read it inside the compiled step: it holds the
   number of steps completed before the current one (0 in the first step).
2. `task.build_model()` and `task.make_optimizer(config)` run in the strategy scope; an
   optimizer of the task's (e.g. SGD with its own schedule) replaces the default Adam
   with `HoldThenExponentialDecay`. mixed_float16 wraps either in a
   `LossScaleOptimizer`. The logged lr is that optimizer's: its schedule at the
   iteration of the last update (`iterations - 1`), or its constant rate.
3. `task.checkpoint_items()` join model, optimizer and step in the checkpoint, so a
   resumed run restores them too (and a checkpoint without them does not fit).
4. `task.after_apply()` runs in the replica step right after `optimizer.apply`, on every
   replica (e.g. an EMA teacher update through `ish_tf.train.ema.ema_update`, which
   updates mirrored variables correctly).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import keras
import tensorflow as tf
from absl import logging

from ish_tf.io_utils import atomic_path, atomic_write_text, remove_stale_tmp
from ish_tf.progress import Progress
from ish_tf.train import TrainConfig
from ish_tf.train.schedules import HoldThenExponentialDecay
from ish_tf.train.strategy import make_strategy, set_precision
from ish_tf.train.tasks import Task

MODEL_NAME = "model.keras"
MODEL_CONFIG_NAME = "model_config.json"
TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.csv"
VALIDATION_NAME = "validation.csv"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, unreadable data)."""


class RunWriteError(TrainingError):
    """The run directory cannot be written (read-only, full disk); names the path.

    Checkpoints written before are left as they are.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot write ({reason})")
        self.path = path


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turns a failed write (OSError, or TensorFlow's file errors) into `RunWriteError`."""
    try:
        yield
    except OSError as e:
        raise RunWriteError(path, e.strerror or str(e)) from e
    except tf.errors.OpError as e:
        lines = (e.message or "").strip().splitlines()
        raise RunWriteError(path, lines[0] if lines else type(e).__name__) from e


UNREADABLE_DIR = "unreadable"


def _set_aside(prefix: str) -> str:
    """Moves a checkpoint's files (`prefix.index`, `prefix.data-*`) into
    `checkpoints/unreadable/`, so a later save of the same step cannot overwrite them;
    returns their new prefix."""
    directory = os.path.join(os.path.dirname(prefix), UNREADABLE_DIR)
    os.makedirs(directory, exist_ok=True)
    moved = os.path.join(directory, os.path.basename(prefix))
    for path in tf.io.gfile.glob(prefix + ".*"):
        os.replace(path, os.path.join(directory, os.path.basename(path)))
    return moved


def restore_checkpoint(checkpoint: tf.train.Checkpoint, directory: str, run_dir: str,
                       chief: bool = True) -> str | None:
    """Restores the newest checkpoint of `directory` that reads back, falling back to
    older ones.

    A checkpoint that does not restore (truncated by a crash or a full disk) is named in
    a warning and, by the chief, moved into `checkpoints/unreadable/` (never deleted);
    the checkpoint state then lists the good ones only.

    Returns:
      The restored checkpoint's path, or None when the directory has none.

    Raises:
      TrainingError: checkpoints exist but none restores (naming the run directory).
    """
    state = tf.train.get_checkpoint_state(directory)
    if state is None or not state.model_checkpoint_path:
        return None
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    failures: list[tuple[str, BaseException]] = []
    for path in reversed(paths):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, IndexError, OSError, tf.errors.OpError) as e:
            failures.append((path, e))
            continue
        if failures and chief:
            for bad, e in failures:
                with writing(directory):
                    moved = _set_aside(bad)
                logging.warning("checkpoint %s does not restore (%s: %s); resuming from the "
                                "previous one, %s; the unreadable checkpoint is kept as %s",
                                bad, type(e).__name__, _first_line(e), path, moved)
            good = paths[:paths.index(path) + 1]
            with writing(directory):
                tf.compat.v1.train.update_checkpoint_state(directory, path, good)
        return path
    latest, error = failures[0]
    raise TrainingError(
        f"{run_dir}: no checkpoint in {directory} restores; the latest, {latest}, "
        f"does not fit this model/optimizer or is damaged ({type(error).__name__}: "
        f"{_first_line(error)}); if --backbone or sizes changed, use a new --run_dir")


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", "") or e).strip()
    return text.splitlines()[0] if text else ""


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did.

    Attributes:
      run_dir: the run directory.
      step: the step reached.
      start_step: the step it started from (> 0 after a resume).
      loss: the last logged loss (nan if no step ran in this call).
      images_per_sec: throughput of the last log interval (0 if none).
      model_path: RUN/model.keras, or "" when the run has not reached its steps.
      checkpoint: path of the latest checkpoint.
    """

    run_dir: str
    step: int
    start_step: int
    loss: float
    images_per_sec: float
    model_path: str
    checkpoint: str


def run_paths(run_dir: str) -> dict[str, str]:
    """Paths of everything under a run directory (keys: model, model_config, ...)."""
    return {"model": os.path.join(run_dir, MODEL_NAME),
            "model_config": os.path.join(run_dir, MODEL_CONFIG_NAME),
            "train_config": os.path.join(run_dir, TRAIN_CONFIG_NAME),
            "metrics": os.path.join(run_dir, METRICS_NAME),
            "validation": os.path.join(run_dir, VALIDATION_NAME),
            "checkpoints": os.path.join(run_dir, CHECKPOINT_DIR),
            "logs": os.path.join(run_dir, LOG_DIR),
            "flags": os.path.join(run_dir, "flags.cfg")}


class _JitForward:
    """Calls a model through XLA-compiled functions (one per training mode).

    Used under multi-replica strategies, where the whole step cannot be compiled
    because the cross-replica collectives must stay outside XLA.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self._fns = {mode: tf.function(lambda x, m=mode: model(x, training=m), jit_compile=True)
                     for mode in (True, False)}

    def __call__(self, x, training: bool = False):
        return self._fns[bool(training)](x)


def replica_gradients(task: Task, model: keras.Model | Callable, batch,
                      variables: Sequence[tf.Variable], num_replicas: int,
                      optimizer: keras.optimizers.Optimizer | None = None):
    """One replica's share of a step: global-batch loss, stats and gradients.

    Must run in a replica context (inside `strategy.run`, or directly with no
    strategy). Summing the returned gradients over replicas gives the gradient of
    the global-batch loss.

    Args:
      task: supplies `compute_loss`.
      model: the model (or a callable wrapper of it).
      batch: this replica's batch.
      variables: the trainable variables to differentiate.
      num_replicas: replicas in sync (the loss is divided by it; see module doc).
      optimizer: when a LossScaleOptimizer, the loss is scaled for float16 and the
        gradients come back scaled (its `apply` unscales them).

    Returns:
      (loss float32 scalar over the global batch, stats dict, list of gradients).
    """
    with tf.GradientTape() as tape:
        loss, stats = task.compute_loss(model, batch, training=True)
        loss = tf.cast(loss, tf.float32)
        objective = loss / float(num_replicas)
        if optimizer is not None:
            objective = optimizer.scale_loss(objective)
    grads = tape.gradient(objective, variables)
    return loss, stats, grads


def _read_metrics(path: str, up_to_step: int) -> list[dict[str, str]]:
    """Rows of an existing metrics.csv with step <= up_to_step (rows after the last
    checkpoint belong to steps that the resumed run will redo)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if int(row.get("step", 0) or 0) <= up_to_step]


def _write_metrics(path: str, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_keras_model(model: keras.Model, path: str) -> None:
    """`model.save(path)` atomically (Keras insists on a `.keras` file name)."""
    with atomic_path(path) as tmp:
        tmp_keras = tmp + ".keras"
        try:
            model.save(tmp_keras)
            os.replace(tmp_keras, tmp)
        finally:
            if os.path.exists(tmp_keras):
                os.remove(tmp_keras)


def _write_image_summaries(task: Task, strategy: tf.distribute.Strategy, batch,
                           writer, step: int) -> None:
    """Writes the task's images for this batch (replica 0's slice) at `step`."""
    local = (strategy.experimental_local_results(batch)[0]
             if strategy.num_replicas_in_sync > 1 else batch)
    with writer.as_default(step=step):
        for name, images in task.image_summaries(local).items():
            tf.summary.image(name, images, max_outputs=8)
    writer.flush()


def _scalar(x) -> float:
    return float(x.numpy()) if hasattr(x, "numpy") else float(x)


def learning_rate_of_last_update(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer used in its last update (eagerly, between steps).

    A schedule is evaluated at `iterations - 1`: Keras evaluates it at the iteration
    count before incrementing it, and a float16 step skipped for non-finite gradients
    does not count. A constant (or callable) rate is read as it is.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    # Keras keeps the schedule itself only privately; `learning_rate` evaluates it at
    # the current iteration, one past the update that was made.
    rate = getattr(inner, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return _scalar(rate(tf.maximum(inner.iterations - 1, 0)))
    return _scalar(inner.learning_rate)


def train(task: Task, config: TrainConfig, *, strategy: tf.distribute.Strategy | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Trains `task` as configured, resuming from RUN/checkpoints when present.

    Args:
      task: the model family (builds model and data, computes the loss).
      config: the run's settings (`config.run_dir` is created if needed).
      strategy: overrides `config.strategy` (tests pass a MirroredStrategy over
        logical CPUs).
      stop_after: stop (with a checkpoint) once this step is reached, as if killed
        there; None runs to `config.steps`. Used to test resume.

    Returns:
      TrainResult.

    Raises:
      TrainingError: the loss became non-finite, no checkpoint restores, or the
        training data cannot be read (naming the shard where it can).
      RunWriteError: the run directory cannot be written (naming the path).
      ValueError: bad configuration.
    """
    config.validate()
    paths = run_paths(config.run_dir)
    with writing(config.run_dir):
        os.makedirs(config.run_dir, exist_ok=True)
    # First: MultiWorkerMirroredStrategy must exist before the runtime runs any op.
    strategy = strategy or make_strategy(config.strategy)
    chief, worker_dir = worker_role(strategy, config.run_dir)
    if chief:
        remove_stale_tmp(config.run_dir)
        with writing(paths["train_config"]):
            atomic_write_text(paths["train_config"],
                              json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        with writing(paths["model_config"]):
            atomic_write_text(paths["model_config"], task.model_config.to_json() + "\n")

    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    caller_policy = keras.mixed_precision.global_policy()
    policy = set_precision(config.mixed_precision)
    try:
        keras.utils.set_random_seed(config.seed)
        replicas = strategy.num_replicas_in_sync
        if task.global_batch_size % replicas:
            raise ValueError(f"global batch {task.global_batch_size} (P*K) is not divisible by "
                             f"the {replicas} replicas")

        with strategy.scope():
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            task.global_step = step  # readable in compute_loss / after_apply
            model = task.build_model()
            task.model = model  # for image summaries that show the model's current predictions
            optimizer = task.make_optimizer(config)
            if optimizer is None:
                schedule = HoldThenExponentialDecay(config.learning_rate, config.decay_start,
                                                    config.steps, config.final_lr_fraction)
                optimizer = keras.optimizers.Adam(schedule, epsilon=config.adam_epsilon)
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
    finally:
        # The layers keep the policy they were built with; models built later in this
        # process (an untrained baseline, the next tuning trial) get the caller's again.
        keras.mixed_precision.set_global_policy(caller_policy)

    # The data position is not checkpointed: tasks produce batches as a function of
    # (seed, step) and restart at the restored step (generator-backed and distributed
    # iterators cannot be saved, and shuffle buffers would bloat checkpoints).
    extra = dict(task.checkpoint_items())
    clash = sorted(set(extra) & {"model", "optimizer", "step"})
    if clash:
        raise ValueError(f"{type(task).__name__}.checkpoint_items() uses reserved names {clash}")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, **extra)
    restored = restore_checkpoint(checkpoint, paths["checkpoints"], config.run_dir, chief)
    if restored:
        logging.info("resumed from %s at step %d", restored, int(step.numpy()))
    # Created after the restore, which may have set an unreadable checkpoint aside.
    # Multi-worker: every worker saves (saving is collective), the chief into RUN,
    # the others into a scratch directory removed at the end; all restore from RUN.
    manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(worker_dir, CHECKPOINT_DIR) if worker_dir else paths["checkpoints"],
        max_to_keep=config.keep_checkpoints)
    start_step = int(step.numpy())
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    if replicas > 1:
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx: task.make_dataset(ctx, start_step))
    else:
        dataset = task.make_dataset(None, start_step)
    iterator = None

    def next_batch():
        try:
            return next(iterator)
        except tf.errors.OpError as e:
            from ish_tf.data.input_checks import describe_input_error

            raise TrainingError(
                f"reading the training data for step {current + 1} failed: "
                f"{describe_input_error(e, config.records_dir or None, config.split)}") from e

    loss_scale = optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None
    variables = model.trainable_variables
    forward = _JitForward(model) if (config.jit_compile and replicas > 1) else model

    # MultiWorkerMirroredStrategy with one device per worker passes the batch in as
    # function inputs without a device, and all_gather of such a tensor (the triplet
    # labels) fails with "destinations can not be empty": copy it onto the device.
    pin = (strategy.extended.worker_devices[0]
           if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
           and len(strategy.extended.worker_devices) == 1 else None)

    def replica_step(batch, exact_norm):
        if pin is not None:
            with tf.device(pin):
                batch = tf.nest.map_structure(tf.identity, batch)
        return _replica_step(batch, exact_norm)

    def _replica_step(batch, exact_norm):
        loss, stats, grads = replica_gradients(task, forward, batch, variables, replicas, loss_scale)
        present = [g for g in grads if g is not None]
        if exact_norm and replicas > 1:
            # The norm of the global gradient (the sum of the replicas' shares): one
            # more all-reduce, so only on the steps that log it.
            present = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, present)
        # Otherwise this replica's share: exact with one replica, and with several
        # enough for the every-step check that the gradients are finite.
        grad_norm = tf.linalg.global_norm(present)
        if loss_scale is not None:  # float16 loss scaling: divide the scale out
            grad_norm = grad_norm / tf.cast(loss_scale.dynamic_scale, tf.float32)
        optimizer.apply(grads, variables)
        task.after_apply()
        return loss, stats, grad_norm

    if config.jit_compile and replicas == 1:
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_step(batch, exact_norm):
        """One step; `exact_norm` (a Python bool: one trace each way) on logging steps."""
        loss, stats, grad_norm = strategy.run(replica_step, args=(batch, exact_norm))
        # Every replica holds the same global-batch values; take replica 0's.
        loss = strategy.experimental_local_results(loss)[0]
        stats = {k: strategy.experimental_local_results(v)[0] for k, v in stats.items()}
        # A NaN anywhere must be seen: the triplet loss masks NaN distances, so NaN
        # weights can leave the loss finite while every gradient is NaN.
        nonfinite = strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            strategy.run(lambda g: tf.cast(tf.logical_not(tf.math.is_finite(g)), tf.float32),
                         args=(grad_norm,)),
            axis=None)
        stats["grad_norm"] = strategy.experimental_local_results(grad_norm)[0]
        step.assign_add(1)
        return loss, stats, nonfinite

    with writing(os.path.join(paths["logs"], "train")):
        writer = (tf.summary.create_file_writer(os.path.join(paths["logs"], "train")) if chief
                  else tf.summary.create_noop_writer())
    columns = ["step", "loss", "lr", *task.stat_names, "grad_norm", "images_per_sec", "elapsed_s"]
    rows = _read_metrics(paths["metrics"], start_step)
    validation_rows = _read_metrics(paths["validation"], start_step)
    logging.info("run %s: %s steps %d..%d, global batch %d on %d replica(s), policy %s",
                 config.run_dir, task.name or getattr(task.model_config, "model", "model"),
                 start_step, end_step,
                 task.global_batch_size, replicas, policy)
    if chief and end_step > start_step:
        # The one place this line is printed (bin/quickstart does not repeat it).
        print(f"train: watch it with  tensorboard --logdir {paths['logs']}", flush=True)

    validation_failed = False

    def validate(at_step: int) -> None:
        """Scores the validation split (`task.validation_metrics`) into TensorBoard
        (`validation/...`, the loss as `loss/validation`) and RUN/validation.csv."""
        nonlocal validation_failed
        if validation_failed:
            return
        try:
            scores = task.validation_metrics(model)
        except Exception as e:  # noqa: BLE001 - an aid: say why, then train on without it
            validation_failed = True
            logging.warning("validation at step %d failed (%s: %s); training goes on "
                            "without it", at_step, type(e).__name__, _first_line(e))
            return
        if not scores:
            return
        validation_rows.append({"step": at_step, **scores})
        names = sorted({k for r in validation_rows for k in r if k != "step"})
        with writing(paths["validation"]):
            _write_metrics(paths["validation"], ["step", *names], validation_rows)
        with writing(os.path.join(paths["logs"], "train")):
            with writer.as_default(step=at_step):
                for k, v in scores.items():
                    tf.summary.scalar("loss/validation" if k == "loss" else f"validation/{k}", v)
            writer.flush()
        text = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
        logging.info("step %d validation: %s", at_step, text, extra={"detail": True})
        bar.set_postfix(f"loss {last_loss:.4f} | validation {text}")

    last_loss, last_rate = float("nan"), 0.0
    current = start_step
    t_start = t_last = time.monotonic()
    step_last = start_step
    bar = Progress(end_step - start_step, "train", enabled=None if chief else False,
                   unit="steps")
    try:
        iterator = iter(dataset)
        while current < end_step:
            task.before_step(current)
            batch = next_batch()
            # Images at the start and at every checkpoint, so predictions (U-Net masks,
            # ISH CNN classes) can be watched improving.
            if config.image_summaries and chief and current == start_step == 0:
                with writing(os.path.join(paths["logs"], "train")):
                    _write_image_summaries(task, strategy, batch, writer, 0)
            is_log = (current + 1) % config.log_every == 0 or current + 1 == end_step
            # One replica's norm is already exact: one trace (and XLA compile), not two.
            loss, stats, nonfinite = train_step(batch, is_log and replicas > 1)
            current += 1
            bar.update()
            is_ckpt = current % config.checkpoint_every == 0 or current == end_step
            if is_log or is_ckpt:
                last_loss = _scalar(loss)
                # float16 loss scaling skips steps with inf gradients by design.
                bad_grads = loss_scale is None and _scalar(nonfinite) > 0
                if not math.isfinite(last_loss) or bad_grads:
                    what = f"loss is {last_loss}" if not math.isfinite(last_loss) else "non-finite gradients"
                    raise TrainingError(
                        f"{what} at step {current}; the last good checkpoint is "
                        f"{manager.latest_checkpoint} (lower --learning_rate, or check the data "
                        "for NaN/inf pixels)")
            if is_log:
                now = time.monotonic()
                last_rate = task.global_batch_size * (current - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, current
                lr = learning_rate_of_last_update(optimizer)
                values = {k: _scalar(v) for k, v in stats.items()}
                row = {"step": current, "loss": last_loss, "lr": lr, **values,
                       "images_per_sec": last_rate, "elapsed_s": now - t_start}
                rows.append(row)
                if chief:
                    with writing(paths["metrics"]):
                        _write_metrics(paths["metrics"], columns, rows)
                with writing(os.path.join(paths["logs"], "train")):
                    # Groups sort by name in TensorBoard: loss/ first, then train/,
                    # then validation/.
                    with writer.as_default(step=current):
                        tf.summary.scalar("loss/train", last_loss)
                        tf.summary.scalar("train/lr", lr)
                        for k, v in values.items():
                            tf.summary.scalar(f"train/{k}", v)
                        tf.summary.scalar("train/images_per_sec", last_rate)
                    writer.flush()
                bar.set_postfix(f"loss {last_loss:.4f}")
                # Per-step detail: in RUN/train.log and with --verbosity; the console has
                # the progress bar.
                logging.info("step %d/%d loss %.4f lr %.3g %s %.1f img/s", current, config.steps,
                             last_loss, lr, " ".join(f"{k} {v:.3f}" for k, v in values.items()),
                             last_rate, extra={"detail": True})
            if chief and config.validate_every and (current % config.validate_every == 0
                                                    or current == end_step):
                validate(current)
            if is_ckpt:
                with writing(manager.directory):
                    manager.save(checkpoint_number=current)
                if config.image_summaries and chief:
                    with writing(os.path.join(paths["logs"], "train")):
                        _write_image_summaries(task, strategy, batch, writer, current)
    except KeyboardInterrupt:
        if current > start_step:
            with writing(manager.directory):
                path = manager.save(checkpoint_number=current)
            logging.warning("interrupted at step %d; saved %s, rerun to resume", current, path)
        raise
    finally:
        # Stop the input pipeline's threads now, whatever happened: an iterator left to
        # the interpreter's shutdown (held by an exception's traceback) can wait forever
        # on reader threads that need the GIL, and the process never exits.
        iterator = dataset = batch = None
        bar.close()
        with contextlib.suppress(Exception):  # never hide the error that brought us here
            writer.close()

    model_path = ""
    try:
        if current >= config.steps:
            model_path = paths["model"]
            if current > start_step or not os.path.exists(model_path):
                done = task.finalize_model(model)
                if done:
                    logging.info("%s", done)
                target = model_path if chief else os.path.join(worker_dir, MODEL_NAME)
                with writing(target):
                    save_keras_model(model, target)
    finally:
        if worker_dir:
            shutil.rmtree(worker_dir, ignore_errors=True)
    return TrainResult(run_dir=config.run_dir, step=current, start_step=start_step, loss=last_loss,
                       images_per_sec=last_rate, model_path=model_path,
                       checkpoint=tf.train.latest_checkpoint(paths["checkpoints"]) or "")


def worker_role(strategy: tf.distribute.Strategy, run_dir: str) -> tuple[bool, str]:
    """Whether this process writes the run (the chief), and else its scratch directory.

    Under MultiWorkerMirroredStrategy every worker runs the same program; only the
    chief ("chief" task, else worker 0) writes RUN. The others write what must be
    written collectively (checkpoints, the final model) to RUN/.workertemp_<type>_<id>,
    deleted at the end of `train`.

    Returns:
      (is_chief, "" for the chief or the worker's scratch directory).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, ""
    task_type, task_id = resolver.task_type, resolver.task_id
    cluster = resolver.cluster_spec().as_dict()
    if task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster):
        return True, ""
    return False, os.path.join(run_dir, f".workertemp_{task_type}_{task_id}")
