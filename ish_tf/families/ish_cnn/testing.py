"""The ISH CNN's tiny setup for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.ish_cnn.config import IshCnnConfig
from ish_tf.families.testing import tiny_records


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A one-block classifier of 16x16 patches in 4 classes, P=2 x K=2."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.image(3, 16, 16), seed)
    family = IshCnnConfig(filters=(4,), convs_per_block=1, max_blocks=1, head_units=8,
                          dropout=0.0, P=2, K=2, intensity_jitter=0.0)
    return ModelConfig("ish_cnn", input_size=16, seed=seed, family=family), {"records_dir": records}
