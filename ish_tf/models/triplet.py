"""The triplet (gene re-identification) model: backbone + embedding head.

images (B, R, R, 3) float32 in [0, 255] -> embeddings (B, D) float32.
"""

from __future__ import annotations

import keras

from ish_tf.models import ModelConfig
from ish_tf.models.backbones import build_backbone
from ish_tf.models.heads import embedding_head


def build_triplet_model(config: ModelConfig) -> keras.Model:
    """Builds backbone -> Dense 1024 -> BN -> ReLU -> Dense D (orthogonal) [-> L2 norm].

    Args:
      config: model configuration (backbone, weights, sizes; see `ModelConfig`).

    Returns:
      keras.Model named "triplet_<backbone>" with input "image" (B, R, R, 3) and output
      (B, D) float32. Layer "backbone" is the backbone, "embedding_head" the head.

    Raises:
      ValueError: unknown backbone or batch-norm mode.
      ish_tf.models.backbones.BackboneWeightsError: weights unavailable.
    """
    backbone = build_backbone(config.backbone, config.input_size, config.backbone_weights)
    features = int(backbone.output.shape[-1])
    head = embedding_head(features, config.head_units, config.embedding_dim,
                          l2_normalize=config.l2_normalize, batch_norm=config.head_batch_norm,
                          seed=config.seed)
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    x = backbone(inputs)
    x = head(x)
    return keras.Model(inputs, x, name=f"triplet_{config.backbone}")
