"""The CDAE families' tiny setups for the shared harness (`ish_tf.families.testing`)."""

from __future__ import annotations

import os

import pandas as pd

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.cdae.config import CdaeConfig
from ish_tf.families.testing import tiny_records

_TINY = dict(depth=2, filters=(4, 8), code_size=4, batch_size=4, image_every=0, bn_images=8)


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A 2-block CDAE on 16x16 grayscale sections."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.image(1, 16, 16), seed)
    return (ModelConfig("cdae", input_size=16, seed=seed, family=CdaeConfig(**_TINY)),
            {"records_dir": records, "flips": False})


def tiny_supervised(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """The supervised twin on the same sections, predicting two annotation groups."""
    records = tiny_records(os.path.join(workdir, "records"), InputSpec.image(1, 16, 16), seed)
    table = os.path.join(workdir, "annotations.csv")
    pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(4)] + ["T0", "T1"],
                  "group": ["a", "a", "b", "b", "a", "b"]}).to_csv(table, index=False)
    family = CdaeConfig(**_TINY, annotations=table, term_min_genes=1, term_max_genes=10)
    return (ModelConfig("cdae_supervised", input_size=16, seed=seed, family=family),
            {"records_dir": records, "flips": False})
