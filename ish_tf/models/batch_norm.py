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
    axis = [layer.axis for layer in layers]
    sums = [None] * len(layers)
    squares = [None] * len(layers)
    counts = [0] * len(layers)
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
        # Training mode: each layer normalises with this batch's statistics, as it did
        # while the model trained (the moving averages it updates are overwritten later).
        outs = probe(batch, training=True)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, out in enumerate(outs):
            values = np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)
            channel = axis[i] % values.ndim
            values = np.moveaxis(values, channel, -1).reshape(-1, values.shape[channel])
            s, q = values.sum(axis=0), np.square(values).sum(axis=0)
            sums[i] = s if sums[i] is None else sums[i] + s
            squares[i] = q if squares[i] is None else squares[i] + q
            counts[i] += values.shape[0]
    if used == 0:
        raise ValueError("no images to estimate the batch-normalisation statistics from")
    moments = {}
    for i, layer in enumerate(layers):
        mean = sums[i] / counts[i]
        moments[layer.name] = (mean, np.maximum(squares[i] / counts[i] - np.square(mean), 0.0))
    return moments, used


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
