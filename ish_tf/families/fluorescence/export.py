"""The fluorescence families' in-graph input normalisation for exports (`bin/export`).

The networks take sites normalised per (experiment, plate, channel) (`data`), but a
client (bin/embed, TF Serving) has raw pixels. `export_transform` reads the training
run's statistics (the records' channel_stats.csv, or computed from its sites) and the
export stores them in the SavedModel as constants:

* `tf_example` parses each record's experiment (`donor_id`) and `plate` besides the
  image and standardises the image with that plate's mean and std;
* `serving_default` takes `images` float32 (B, H, W, C) raw pixels (the stored values)
  plus `experiment` tf.string (B,) and `plate` int64 (B,), and does the same;
* the pixel signature (`classify_images`) takes the model's own input: sites already
  normalised (for tests, or clients that normalise themselves).

A plate the statistics do not hold (a new experiment) stops the call with an
InvalidArgumentError naming the key ("HEPG2-09/3"): there is no silent fallback;
compute the new plates' statistics (bin/extract writes them) and export again.
With `--fluorescence_normalization=experiment` the key is the experiment; with
"none" the pixels are divided by the dtype's maximum, as in training.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ish_tf.data import records

EXPERIMENT_INPUT = "experiment"
PLATE_INPUT = "plate"


@dataclasses.dataclass(frozen=True)
class SiteNormalisation:
    """Per-plate standardisation as an export input transform (see the module docstring).

    Attributes:
      normalization: "plate", "experiment" or "none".
      keys: statistics keys ("experiment/plate" or "experiment"); () for "none".
      mean, std: float32 (K, C).
      scale: the divisor of "none" (255 or 65535).
    """

    normalization: str
    keys: tuple[str, ...] = ()
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    scale: float = 255.0

    #: Record features `from_records` reads (besides the image).
    @property
    def record_keys(self) -> tuple[str, ...]:
        return (records.GROUP_KEY, "plate")

    def extra_inputs(self) -> list:
        """TensorSpecs of `serving_default`'s inputs after the images."""
        import tensorflow as tf

        return [tf.TensorSpec([None], tf.string, name=EXPERIMENT_INPUT),
                tf.TensorSpec([None], tf.int64, name=PLATE_INPUT)]

    def apply(self, images, experiment, plate):
        """float32 (B, H, W, C) raw pixels -> the model's input (normalised sites).

        Raises (when run):
          InvalidArgumentError: a key the statistics do not hold, named.
        """
        import tensorflow as tf

        images = tf.cast(images, tf.float32)
        if self.normalization == "none":
            return images / self.scale
        experiment = tf.reshape(tf.convert_to_tensor(experiment, tf.string), [-1])
        if self.normalization == "experiment":
            key = experiment
        else:
            plate = tf.reshape(tf.cast(plate, tf.int64), [-1])
            key = tf.strings.join([experiment, tf.strings.as_string(plate)], "/")
        keys = tf.constant(self.keys)
        hits = tf.equal(key[:, None], keys[None, :])  # (B, K)
        found = tf.reduce_any(hits, axis=1)
        missing = tf.boolean_mask(key, tf.logical_not(found))
        check = tf.debugging.Assert(
            tf.reduce_all(found),
            [tf.strings.join(["no per-plate normalisation statistics in this export for ",
                              tf.strings.reduce_join(missing[:5], separator=", "),
                              f" (it holds {len(self.keys)} {self.normalization}s of the "
                              "training records); compute them (bin/extract) and export "
                              "again"])])
        with tf.control_dependencies([check]):
            index = tf.argmax(tf.cast(hits, tf.int32), axis=1)
        mean = tf.gather(tf.constant(self.mean, tf.float32), index)[:, None, None, :]
        std = tf.gather(tf.constant(self.std, tf.float32), index)[:, None, None, :]
        return (images - mean) / std

    def from_records(self, images, feats: dict):
        """`apply` with the experiment and plate of batched parsed records."""
        return self.apply(images, feats[records.GROUP_KEY], feats["plate"])

    def describe(self) -> dict:
        """The sidecar's "input_transform" entry."""
        out = {"kind": "site_normalisation", "normalization": self.normalization,
               "serving_default_inputs": ["images (raw pixels)", EXPERIMENT_INPUT, PLATE_INPUT],
               "decoded_signature_takes": "sites already normalised (the model's input)",
               "unknown_plate": "error"}
        if self.normalization == "none":
            out["scale"] = self.scale
        else:
            out["keys"] = len(self.keys)
        return out


def export_transform(run_dir: str, model_config: dict | None) -> SiteNormalisation | None:
    """The normalisation of a fluorescence training run, for `export_run`.

    Statistics: the run's records (train_config.json's records_dir): their
    channel_stats.csv, else computed from their sites.

    Raises:
      ValueError: no model config or no readable records to take the statistics from.
    """
    from ish_tf.data import shards
    from ish_tf.families.fluorescence.data import load_plate_stats

    family = ((model_config or {}).get("config") or {}).get("family") or {}
    normalization = family.get("normalization", "plate")
    path = os.path.join(run_dir, "train_config.json")
    records_dir = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            records_dir = json.load(f).get("records_dir", "")
    if not records_dir or not os.path.isdir(records_dir):
        raise ValueError(f"{run_dir}: the fluorescence model takes sites normalised per plate, "
                         f"and the export needs the statistics of its records, but the run's "
                         f"records_dir ({records_dir or 'not in ' + path}) is not there")
    if normalization == "none":
        spec = shards.records_input_spec(records_dir)
        return SiteNormalisation("none", scale=65535.0 if spec.dtype == "uint16" else 255.0)
    level = "plate" if normalization == "plate" else "experiment"
    stats = load_plate_stats(records_dir, level)
    return SiteNormalisation(normalization, tuple(stats.keys), np.asarray(stats.mean, np.float32),
                             np.asarray(stats.std, np.float32))
