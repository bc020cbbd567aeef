"""The triplet family's tiny setup for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.testing import tiny_records
from ish_tf.families.triplet.config import TripletConfig


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A small CNN on 16x16 RGB patches of 4 genes x 2 donors, P=2 x K=2."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.image(3, 16, 16), seed)
    family = TripletConfig(backbone="small_cnn", backbone_weights="none", embedding_dim=4,
                           head_units=8, P=2, K=2)
    return ModelConfig("triplet", input_size=16, seed=seed, family=family), {"records_dir": records}
