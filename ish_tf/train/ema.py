"""Exponential moving averages of variables that are correct under any tf.distribute strategy.

A mean teacher keeps `teacher = decay * teacher + (1 - decay) * student` after every
optimizer step. Under MirroredStrategy or MultiWorkerMirroredStrategy both models'
variables are mirrored (one copy per replica) and, after the optimizer's update, the
student's copies are equal on every replica. `ema_update` therefore updates each
copy of the teacher from the student's copy on the same device, the way Keras
optimizers apply their updates (`merge_call` + `strategy.extended.update`): no
cross-device traffic, and the copies stay identical whatever the variables'
aggregation. A plain `assign` in a replica context depends on it: NONE (Keras
variables) updates the local copy, MEAN all-reduces, SUM adds up the replicas' values
(wrong here), ONLY_FIRST_REPLICA broadcasts replica 0's.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


def _tf_variable(variable) -> tf.Variable:
    """The tf.Variable (possibly distributed) behind a Keras or TensorFlow variable."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    if not isinstance(variable, tf.Variable):
        raise TypeError(f"ema_update needs variables, got {type(variable).__name__}")
    return variable


def ema_update(target_variables: Sequence, source_variables: Sequence,
               decay: float | tf.Tensor) -> None:
    """`target = decay * target + (1 - decay) * source`, variable by variable.

    Works in a replica context (inside `strategy.run`, e.g. a Task's `after_apply`)
    under any strategy, with no strategy, and in a cross-replica context (e.g. eagerly
    between steps, inside or outside the strategy's scope). Under a multi-replica
    strategy the sources must hold the same value on every replica (true of model
    weights right after an optimizer step); each replica's copy of a target is updated
    from the source's copy on its device.

    Args:
      target_variables: the averages (Keras or tf variables, e.g. `teacher.weights`).
      source_variables: the averaged variables, in the same order and shapes (e.g.
        `student.weights`).
      decay: the weight of the old average, a Python number or a scalar tensor (a decay
        ramped by the global step); the same value on every replica.

    Raises:
      ValueError: the lists differ in length or a pair in shape.
      TypeError: an element is not a variable.
    """
    targets = [_tf_variable(v) for v in target_variables]
    sources = [_tf_variable(v) for v in source_variables]
    if len(targets) != len(sources):
        raise ValueError(f"ema_update: {len(targets)} targets but {len(sources)} sources")
    for t, s in zip(targets, sources, strict=True):
        if not t.shape.is_compatible_with(s.shape):
            raise ValueError(f"ema_update: {t.name} {t.shape} does not match {s.name} {s.shape}")
    if not isinstance(decay, (int, float)):
        decay = tf.convert_to_tensor(decay)

    def update_one(target, source, decay):
        # Inside `extended.update` reading the (mirrored) source gives its copy on the
        # target copy's device.
        d = tf.cast(decay, target.dtype)
        return target.assign(d * target + (1 - d) * tf.cast(source, target.dtype))

    def merged(strategy, targets, sources, decay):
        # A per-replica decay (a tensor computed on each replica) is split by replica.
        for target, source in zip(targets, sources, strict=True):
            strategy.extended.update(target, update_one, args=(source, decay), group=False)

    owner = getattr(targets[0], "distribute_strategy", None) if targets else None
    if not tf.distribute.has_strategy() and owner is not None:
        # Distributed variables used outside their strategy's scope (eagerly, between
        # steps): update them in that strategy's cross-replica context.
        with owner.scope():
            merged(owner, targets, sources, decay)
        return
    strategy = tf.distribute.get_strategy()
    if tf.distribute.in_cross_replica_context():
        merged(strategy, targets, sources, decay)
    else:
        # What Keras optimizers do: merge_call, unless the strategy runs without it
        # (XLA-compiled steps on GPUs), where `update` works in the replica context.
        tf.__internal__.distribute.interim.maybe_merge_call(merged, strategy, targets, sources,
                                                            decay)
