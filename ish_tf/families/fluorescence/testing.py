"""The fluorescence families' tiny setups for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.fluorescence.config import FluorescenceConfig
from ish_tf.families.testing import tiny_records

_TINY = dict(widths=(8, 8), batch_size=4, unlabelled_batch_size=4, consistency_rampup=2,
             ema_steps=(0, 1))
_TINY_DECAYS = (0.5, 0.9)


def _records(workdir: str, seed: int) -> str:
    return tiny_records(os.path.join(workdir, "records"), InputSpec.image(6, 16, 16), seed)


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A two-block CNN with an ArcFace head on 16x16x6 sites of 4 siRNAs x 2 experiments."""
    family = FluorescenceConfig(**_TINY, ema_decays=_TINY_DECAYS)
    return (ModelConfig("fluorescence", input_size=16, seed=seed, family=family),
            {"records_dir": _records(workdir, seed)})


def tiny_mean_teacher(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """The same network as student and EMA teacher; the test split's sites unlabelled."""
    family = FluorescenceConfig(**_TINY, ema_decays=_TINY_DECAYS)
    return (ModelConfig("mean_teacher", input_size=16, seed=seed, family=family),
            {"records_dir": _records(workdir, seed)})
