"""The cic families' tiny setups for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.cic.config import CicConfig
from ish_tf.families.testing import tiny_records

_TINY = dict(hidden=(16,), code_size=4, batch_size=8)


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A 12 -> 16 -> 4 autoencoder on 12-gene profiles of 4 types x 2 batches."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.vector(12), seed)
    return ModelConfig("cic", seed=seed, family=CicConfig(**_TINY)), {"records_dir": records}


def tiny_classifier(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """The classifier-autoencoder on the same profiles, with one hidden classifier layer."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.vector(12), seed)
    family = CicConfig(**_TINY, classifier=True, classifier_hidden=8)
    return ModelConfig("cic_classifier", seed=seed, family=family), {"records_dir": records}
