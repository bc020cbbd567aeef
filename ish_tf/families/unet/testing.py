"""The U-Net's tiny setup for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

from ish_tf.families import ModelConfig
from ish_tf.families.testing import image_mask_pairs
from ish_tf.families.unet.config import UnetConfig


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A depth-2 U-Net on four 32x32 image/mask pairs."""
    manifest = image_mask_pairs(os.path.join(workdir, "pairs"), n=4, size=32, seed=seed)
    family = UnetConfig(mask_manifest=manifest, val_fraction=0.0, batch_size=2, filters=4, depth=2)
    return ModelConfig("unet", input_size=32, seed=seed, family=family), {}
