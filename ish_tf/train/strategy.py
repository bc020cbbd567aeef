"""Choosing the tf.distribute strategy and the mixed-precision policy.

`auto` picks MirroredStrategy whenever more than one GPU is visible, one device
otherwise. Under MirroredStrategy every step's global batch is split across
replicas; tasks that mine across the batch gather first (see `ish_tf.train.tasks`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "one_device", "default")


def make_strategy(name: str = "auto", devices: list[str] | None = None) -> tf.distribute.Strategy:
    """Builds a distribution strategy.

    Args:
      name: "auto" (mirrored if > 1 GPU, else one_device), "mirrored" (all GPUs, or
        `devices`), "one_device" (the first GPU, else the CPU) or "default" (no
        strategy: TensorFlow places ops itself).
      devices: explicit device list for "mirrored" (e.g. two logical CPUs in tests).

    Returns:
      The strategy; `num_replicas_in_sync` is the number of replicas.

    Raises:
      ValueError: unknown name.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}")
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
