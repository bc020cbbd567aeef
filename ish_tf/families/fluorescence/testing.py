"""The fluorescence families' tiny setups for the shared harness (`ish_tf.families.testing`).

As small as the harness allows (it is run for every family): 8x8x6 sites, a one-block CNN,
2 + 2 sites per step, and the records' channel stats table written once beside the shards
(as bin/extract does for plate records), so the task, the export and the evaluation read
it instead of each recomputing the statistics from the sites.
"""

from __future__ import annotations

import os

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig
from ish_tf.families.fluorescence.config import FluorescenceConfig
from ish_tf.families.testing import tiny_records

SIZE = 8
_TINY = dict(widths=(4,), batch_size=2, unlabelled_batch_size=2, consistency_rampup=2,
             ema_steps=(0, 1))
_TINY_DECAYS = (0.5, 0.9)


def write_channel_stats(records_dir: str) -> str:
    """Writes RECORDS/channel_stats.csv (`ish_tf.data.plate_norm`) from the records' sites."""
    import pandas as pd

    from ish_tf.data import plate_norm, shards
    from ish_tf.families.fluorescence.data import compute_plate_stats
    from ish_tf.families.fluorescence.evaluation import plate_labels

    spec = shards.records_input_spec(records_dir)
    stats = compute_plate_stats(records_dir, "plate")
    index = shards.load_index(records_dir)
    sites = pd.concat([plate_labels(records_dir, s)
                       for s in sorted({x["split"] for x in index["shards"]})])
    counts = (sites["experiment"] + "/" + sites["plate"]).value_counts()
    rows = []
    for k, key in enumerate(stats.keys):
        experiment, plate = key.rsplit("/", 1)
        for c in range(spec.channels):
            rows.append({"experiment": experiment, "plate": int(plate), "channel": c + 1,
                         "mean": float(stats.mean[k, c]), "std": float(stats.std[k, c]),
                         "n_sites": int(counts[key]),
                         "n_pixels": int(counts[key]) * spec.height * spec.width})
    path = os.path.join(records_dir, plate_norm.STATS_NAME)
    plate_norm.write_channel_stats(path, pd.DataFrame(rows, columns=list(plate_norm.STATS_COLUMNS)))
    return path


def _records(workdir: str, seed: int) -> str:
    out = tiny_records(os.path.join(workdir, "records"), InputSpec.image(6, SIZE, SIZE), seed)
    write_channel_stats(out)
    return out


def tiny(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """A one-block CNN with an ArcFace head on 8x8x6 sites of 4 siRNAs x 2 experiments."""
    family = FluorescenceConfig(**_TINY, ema_decays=_TINY_DECAYS)
    return (ModelConfig("fluorescence", input_size=SIZE, seed=seed, family=family),
            {"records_dir": _records(workdir, seed)})


def tiny_mean_teacher(workdir: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    """The same network as student and EMA teacher; the test split's sites unlabelled."""
    family = FluorescenceConfig(**_TINY, ema_decays=_TINY_DECAYS)
    return (ModelConfig("mean_teacher", input_size=SIZE, seed=seed, family=family),
            {"records_dir": _records(workdir, seed)})
