"""Choosing the tf.distribute strategy and the mixed-precision policy.

`auto` picks MirroredStrategy whenever more than one GPU is visible, one device
otherwise; `multi_worker` builds MultiWorkerMirroredStrategy from TF_CONFIG (one
process per machine, each with its GPUs as local replicas). Under MirroredStrategy every step's global batch is split across
replicas; tasks that mine across the batch gather first (see `ish_tf.train.tasks`).
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "one_device", "default", "multi_worker")


def tf_config() -> dict:
    """The parsed TF_CONFIG environment variable ({} when unset).

    Raises:
      ValueError: TF_CONFIG is not JSON with a "cluster" and a "task".
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise ValueError('TF_CONFIG needs "cluster" and "task", e.g. {"cluster": {"worker": '
                         '["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}')
    return config


def is_chief(config: dict | None = None) -> bool:
    """Whether this process is the chief of a multi-worker cluster (True when alone).

    The chief is the "chief" task when the cluster has one, otherwise worker 0 (the
    convention of tf.distribute and Keras).
    """
    config = tf_config() if config is None else config
    if not config:
        return True
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})


def make_multi_worker_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy from TF_CONFIG (collectives: RING on CPU, NCCL on GPU).

    Must run before any other TensorFlow op of the process (TensorFlow configures the
    collectives when the runtime starts).

    Raises:
      ValueError: TF_CONFIG is missing or malformed.
    """
    if not tf_config():
        raise ValueError("--strategy=multi_worker needs TF_CONFIG (cluster and task of this "
                         "worker); see README 'Multi-worker training'")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def make_strategy(name: str = "auto", devices: list[str] | None = None) -> tf.distribute.Strategy:
    """Builds a distribution strategy.

    Args:
      name: "auto" (mirrored if > 1 GPU, else one_device), "mirrored" (all GPUs, or
        `devices`), "one_device" (the first GPU, else the CPU), "default" (no
        strategy: TensorFlow places ops itself) or "multi_worker"
        (MultiWorkerMirroredStrategy from TF_CONFIG; create it first in the process).
      devices: explicit device list for "mirrored" (e.g. two logical CPUs in tests).

    Returns:
      The strategy; `num_replicas_in_sync` is the number of replicas.

    Raises:
      ValueError: unknown name.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}")
    if name == "multi_worker":
        return make_multi_worker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "mirrored":
        if devices is None and len(gpus) <= 1:
            # One GPU or none: MirroredStrategy would run one replica; fine, but say so.
            return tf.distribute.MirroredStrategy(
                devices=[d.name for d in gpus] or ["/cpu:0"])
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def mixed_precision_policy(enabled: bool) -> str:
    """The Keras dtype policy for `--mixed_precision`.

    Args:
      enabled: whether mixed precision was requested.

    Returns:
      "mixed_float16" on a GPU (with loss scaling in the trainer), "mixed_bfloat16"
      on CPU, "float32" when disabled.
    """
    if not enabled:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def set_precision(enabled: bool) -> str:
    """Sets the global Keras dtype policy (before building the model); returns its name."""
    policy = mixed_precision_policy(enabled)
    keras.mixed_precision.set_global_policy(policy)
    return policy
