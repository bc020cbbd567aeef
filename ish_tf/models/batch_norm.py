"""Re-estimating a trained model's batch-normalisation statistics on the inputs it will see.

A denoising autoencoder trains on corrupted inputs, so its batch-normalisation layers'
moving averages describe corrupted images (masking noise at 25% lowers the first
convolution's mean response by about a quarter), while the encoder is used on clean
ones. `recalibrate_batch_norm` replaces each layer's moving mean and variance by the
statistics of its inputs over a set of clean images (AdaBN, Li et al. 2016; the same
one-pass procedure as `torch.optim.swa_utils.update_bn`): one forward pass per batch in
training mode, so each layer normalises with its batch's statistics as in training, and
the per-channel first and second moments of every layer's input are accumulated over all
batches; the population mean and variance then replace the moving averages.

Only the moving statistics change; the trained scale and offset (gamma, beta) and all
other weights are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's top-level BatchNormalization layers, in graph order."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def batch_norm_moments(model: keras.Model, batches: Iterable, max_images: int = 0
                       ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Population mean and variance of each batch-norm layer's input over `batches`.

    Args:
      model: a functional Keras model (its top-level BatchNormalization layers count;
        those inside nested models are not reached).
      batches: inputs as the model takes them (arrays or tensors of a batch each).
      max_images: stop after this many images (the last batch is cut); 0 = all.

    Returns:
      ({layer name: (mean float64 (C,), variance float64 (C,))}, images used).

    Raises:
      ValueError: the model has no top-level BatchNormalization layer, or `batches`
        holds no image.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no BatchNormalization layer")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, [layer.input for layer in layers])

    @tf.function(reduce_retracing=True)
    def batch_moments(batch):
        # Training mode: each layer normalises with this batch's statistics, as it did
        # while the model trained (the moving averages it updates are overwritten later).
        outs = probe(batch, training=True)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        result = []
        for layer, out in zip(layers, outs, strict=True):
            out = tf.cast(out, tf.float32)
            channel = layer.axis % len(out.shape)
            axes = [i for i in range(len(out.shape)) if i != channel]
            mean, variance = tf.nn.moments(out, axes)
            count = tf.reduce_prod(tf.gather(tf.shape(out), axes))
            result.append((count, mean, variance))
        return result

    # Per-batch (count, mean, centred variance), combined in float64 (Chan et al.'s
    # pairwise update): no cancellation however large the mean is against the spread.
    totals: list[tuple[float, np.ndarray, np.ndarray] | None] = [None] * len(layers)
    used = 0
    for batch in batches:
        if max_images and used >= max_images:
            break
        if max_images:
            batch = batch[:max_images - used]
        n = int(batch.shape[0])
        if n == 0:
            continue
        used += n
        for i, (count, mean, variance) in enumerate(batch_moments(batch)):
            count, mean = float(count), mean.numpy().astype(np.float64)
            m2 = variance.numpy().astype(np.float64) * count
            if totals[i] is None:
                totals[i] = (count, mean, m2)
                continue
            n_a, mean_a, m2_a = totals[i]
            total = n_a + count
            delta = mean - mean_a
            totals[i] = (total, mean_a + delta * count / total,
                         m2_a + m2 + np.square(delta) * n_a * count / total)
    if used == 0:
        raise ValueError("no images to estimate the batch-normalisation statistics from")
    return {layer.name: (t[1], t[2] / t[0]) for layer, t in zip(layers, totals, strict=True)}, used


def recalibrate_batch_norm(model: keras.Model, batches: Iterable, max_images: int = 0) -> int:
    """Sets each top-level batch-norm layer's moving mean and variance from `batches`.

    See the module docstring; `batch_norm_moments` for the arguments.

    Returns:
      The number of images the statistics were estimated from.
    """
    moments, used = batch_norm_moments(model, batches, max_images)
    for layer in batch_norm_layers(model):
        mean, variance = moments[layer.name]
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    return used


__all__: Sequence[str] = ("batch_norm_layers", "batch_norm_moments", "recalibrate_batch_norm")
