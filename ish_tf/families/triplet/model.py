"""The triplet (gene re-identification) model: backbone + embedding head.

images (B, R, R, 3) float32 in [0, 255] -> embeddings (B, D) float32.
"""

from __future__ import annotations

import keras

from ish_tf.models.backbones import build_backbone
from ish_tf.models.heads import embedding_head


def build_triplet_model(config) -> keras.Model:
    """Builds backbone -> Dense 1024 -> BN -> ReLU -> Dense D (orthogonal) [-> L2 norm].

    Args:
      config: `ish_tf.families.ModelConfig` with a `TripletConfig` (backbone, weights,
        head sizes) and the input size.

    Returns:
      keras.Model named "triplet_<backbone>" with input "image" (B, R, R, 3) and output
      (B, D) float32. Layer "backbone" is the backbone, "embedding_head" the head.

    Raises:
      ValueError: unknown backbone or batch-norm mode.
      ish_tf.models.backbones.BackboneWeightsError: weights unavailable.
    """
    family = config.family
    backbone = build_backbone(family.backbone, config.input_size, family.backbone_weights)
    features = int(backbone.output.shape[-1])
    head = embedding_head(features, family.head_units, family.embedding_dim,
                          l2_normalize=family.l2_normalize, batch_norm=family.head_batch_norm,
                          seed=config.seed)
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    x = backbone(inputs)
    x = head(x)
    return keras.Model(inputs, x, name=f"triplet_{family.backbone}")
