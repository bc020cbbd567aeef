"""Input pipeline of the fluorescence families: multi-channel sites, normalised per plate.

Records: a multi-channel image set (`InputSpec.image(C)`, raw uint8/uint16 records)
whose identity is the siRNA and whose group is the experiment; the plate comes from
the record's `plate` feature where the schema has one (the RxRx1 records), else every
experiment counts as one plate.

Normalisation (DeepNoise): each image is standardised with the mean and standard
deviation of its (experiment, plate, channel) over all sites of that plate, labelled or
not (statistics of pixels, never of labels, so computing them on held-out plates is
fair); in training each image's mean and std are jittered by U(1 - j, 1 + j) per
channel. `normalization="experiment"` pools the plates of an experiment; "none" feeds
pixels / the dtype's maximum (the component table's first row).

Augmentation: a random dihedral transform (flips and 90 degree rotations) per view,
seeded by (seed, record position, view), so the student's and the teacher's views of
a site differ and a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ish_tf.data import plate_norm, records, shards
from ish_tf.data.inputs import InputSpec
from ish_tf.data.pipeline import list_shards
from ish_tf.data.records import RecordsError

PLATE_KEY = "plate"
WELL_KEY = "well"
STATS_NAME = "channel_stats.csv"  # ish_tf.data.plate_norm's table, written at extraction


def schema_has(key: str) -> bool:
    """Whether the fluorescence record schema defines `key` (required or optional)."""
    return key in records.FEATURE_KEYS or key in getattr(records, "OPTIONAL_KEYS", ())


def has_plate_feature() -> bool:
    """Whether the record schema carries a plate (the RxRx1 records do)."""
    return schema_has(PLATE_KEY)


@dataclasses.dataclass(frozen=True)
class PlateStats:
    """Per-key channel statistics: keys (K,) "experiment/plate" (or "experiment"),
    mean and std (K, C) float32."""

    keys: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    level: str  # "plate" | "experiment"


def _meta_keys(spec: InputSpec) -> list[str]:
    keys = [*records.image_keys(spec), "image_id", records.IDENTITY_INDEX_KEY,
            records.GROUP_KEY]
    keys += [k for k in (PLATE_KEY, WELL_KEY) if schema_has(k)]
    return keys


def _plate_string(feats: dict) -> tf.Tensor:
    if not has_plate_feature():
        return tf.constant("")
    value = feats[PLATE_KEY]
    return value if value.dtype == tf.string else tf.strings.as_string(value)


def norm_key(feats: dict, level: str) -> tf.Tensor:
    """The statistics key of a parsed record: "experiment/plate" or "experiment"."""
    experiment = feats[records.GROUP_KEY]
    if level == "experiment":
        return experiment
    return tf.strings.join([experiment, _plate_string(feats)], "/")


def _raw_reader(records_dir: str, splits: Sequence[str], spec: InputSpec) -> tf.data.Dataset:
    files = [f for s in splits for f in list_shards(records_dir, s)]
    compression = shards.compression_of(files[0]) or ""
    keys = _meta_keys(spec)
    return tf.data.TFRecordDataset(files, compression_type=compression).map(
        lambda r: records.parse_example(r, keys, "image"), num_parallel_calls=tf.data.AUTOTUNE)


def compute_plate_stats(records_dir: str, level: str = "plate",
                        splits: Sequence[str] | None = None) -> PlateStats:
    """Mean and std per (key, channel) over every site of the given splits (all).

    Raises:
      RecordsError: no image records, or a key with constant pixels in some channel.
    """
    if level not in ("plate", "experiment"):
        raise ValueError(f"statistics level must be plate or experiment, got {level!r}")
    spec = shards.records_input_spec(records_dir)
    if spec.kind != "image":
        raise RecordsError(f"{records_dir}: {spec.describe()} records are not images")
    if splits is None:
        index = shards.load_index(records_dir)
        splits = sorted({s["split"] for s in index["shards"]})
    sums: dict[str, np.ndarray] = {}
    ds = _raw_reader(records_dir, splits, spec).map(
        lambda f: (norm_key(f, level), tf.cast(records.decode_image(f, spec=spec), tf.float64)),
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda k, x: (k, tf.reduce_sum(x, [0, 1]), tf.reduce_sum(tf.square(x), [0, 1]),
                              tf.cast(tf.shape(x)[0] * tf.shape(x)[1], tf.float64)))
    for key, s, sq, n in ds.as_numpy_iterator():
        acc = sums.setdefault(key.decode(), np.zeros((3, spec.channels)))
        acc[0] += s
        acc[1] += sq
        acc[2] += n
    if not sums:
        raise RecordsError(f"{records_dir}: no records in splits {list(splits)}")
    keys = tuple(sorted(sums))
    mean = np.stack([sums[k][0] / sums[k][2] for k in keys])
    var = np.stack([sums[k][1] / sums[k][2] for k in keys]) - mean ** 2
    std = np.sqrt(np.maximum(var, 0.0))
    flat = np.argwhere(std < 1e-6)
    if len(flat):
        k, c = flat[0]
        raise RecordsError(f"{records_dir}: {keys[k]} has constant pixels in channel {c}; "
                           "cannot standardise it")
    return PlateStats(keys, mean.astype(np.float32), std.astype(np.float32), level)


def stats_from_table(table, level: str) -> PlateStats:
    """`PlateStats` from a channel stats table (experiment, plate, channel, mean, std,
    n_pixels: `ish_tf.data.plate_norm`); "experiment" pools its plates by pixel count."""
    import pandas as pd

    t = pd.DataFrame(table).copy()
    t["key"] = (t["experiment"].astype(str) if level == "experiment"
                else t["experiment"].astype(str) + "/" + t["plate"].astype(int).astype(str))
    w = t["n_pixels"].astype(float) if "n_pixels" in t else pd.Series(1.0, index=t.index)
    t = t.assign(w=w, wm=w * t["mean"], wsq=w * (t["std"] ** 2 + t["mean"] ** 2))
    g = t.groupby(["key", "channel"])[["w", "wm", "wsq"]].sum().reset_index()
    g["mean"] = g["wm"] / g["w"]
    g["std"] = np.sqrt(np.maximum(g["wsq"] / g["w"] - g["mean"] ** 2, 0.0))
    keys = tuple(sorted(g["key"].unique()))
    mean = g.pivot(index="key", columns="channel", values="mean").loc[list(keys)].to_numpy()
    std = g.pivot(index="key", columns="channel", values="std").loc[list(keys)].to_numpy()
    if (std < 1e-6).any():
        k, c = np.argwhere(std < 1e-6)[0]
        raise RecordsError(f"channel stats: {keys[k]} has std 0 in channel {c + 1}")
    return PlateStats(keys, mean.astype(np.float32), std.astype(np.float32), level)


def load_plate_stats(records_dir: str, level: str) -> PlateStats:
    """The record set's channel stats table when it has one, else computed from its sites."""
    import os

    path = os.path.join(records_dir, STATS_NAME)
    if os.path.exists(path):
        import pandas as pd

        return stats_from_table(pd.read_csv(path), level)
    return compute_plate_stats(records_dir, level)


def _lookup(keys: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    hits = tf.where(tf.equal(keys, key))[:, 0]
    tf.debugging.assert_equal(tf.size(hits), 1, message=tf.strings.join(
        ["no normalisation statistics for ", key]))
    return hits[0]


@dataclasses.dataclass(frozen=True)
class SitePipeline:
    """How sites become model inputs (see the module docstring).

    Attributes:
      spec: the records' input spec (channels, size, dtype).
      normalization: "plate", "experiment" or "none".
      stats: statistics for "plate"/"experiment" (None for "none").
      jitter: training jitter j of mean and std.
      size: model input side (images of another size are resized).
    """

    spec: InputSpec
    normalization: str
    stats: PlateStats | None
    jitter: float = 0.1
    size: int | None = None

    def normalise(self, image: tf.Tensor, feats: dict, seed: tf.Tensor | None) -> tf.Tensor:
        """(H, W, C) pixels -> float32 model input; `seed` (stateless) jitters."""
        x = tf.cast(image, tf.float32)
        if self.normalization == "none":
            top = 65535.0 if self.spec.dtype == "uint16" else 255.0
            x = x / top
        else:
            i = _lookup(tf.constant(self.stats.keys), norm_key(feats, self.stats.level))
            mean = tf.gather(tf.constant(self.stats.mean), i)
            std = tf.gather(tf.constant(self.stats.std), i)
            x = plate_norm.standardise(x, mean, std, self.jitter if seed is not None else 0.0,
                                       seed)
        if self.size and (self.spec.height != self.size or self.spec.width != self.size):
            x = tf.image.resize(x, (self.size, self.size), antialias=True)
        return x


def dihedral(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One of the 8 flips/rotations of a square image, chosen by a stateless seed."""
    k = tf.random.stateless_uniform([], seed, 0, 8, dtype=tf.int32)
    image = tf.image.rot90(image, k % 4)
    return tf.cond(k >= 4, lambda: tf.image.flip_left_right(image), lambda: image)


def training_sites(records_dir: str, split: str, pipeline: SitePipeline, *, batch_size: int,
                   seed: int, views: int = 1, unlabelled: bool = False,
                   input_context: tf.distribute.InputContext | None = None,
                   start_step: int = 0, augment: bool = True,
                   slots: Sequence[int] | None = None) -> tf.data.Dataset:
    """An infinite, seeded stream of batches: (view_1, ..., view_V, labels int32 (b,)).

    Args:
      records_dir, split: the records.
      pipeline: normalisation.
      batch_size: GLOBAL batch size (per replica with an input context).
      seed: seed of the order, the views and the jitter.
      views: differently augmented views of each site (1 supervised, 2 mean teacher).
      unlabelled: labels are -1 (the split's identities are never read).
      slots: with `unlabelled`, image ids whose sites carry their position k in this
        list as the label -2 - k (a slot of a pseudo-label table: `unlabelled_slot`);
        other sites keep -1.
      start_step: global batches to skip (resume).
      augment: dihedral augmentation and jitter.
    """
    files = list_shards(records_dir, split)
    per_pipeline = 1
    if input_context is not None:
        per_pipeline = max(input_context.num_replicas_in_sync
                           // max(input_context.num_input_pipelines, 1), 1)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if n > 1:
            if len(files) < n:
                raise RecordsError(f"cannot split {len(files)} shard(s) of {split} over {n} "
                                   "input pipelines")
            files = files[i::n]
    spec = pipeline.spec
    keys = _meta_keys(spec)
    ds = tf.data.TFRecordDataset(files, compression_type=shards.compression_of(files[0]) or "")
    ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True).repeat().enumerate()
    ds = ds.skip(int(start_step) * per_pipeline * batch_size)
    salt = 7919 if unlabelled else 0
    table = None
    if unlabelled and slots is not None:
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant([int(k) for k in slots], tf.int64),
            tf.range(len(slots), dtype=tf.int32)), -1)

    def parse(i, serialized):
        feats = records.parse_example(serialized, keys, "image")
        image = records.decode_image(feats, spec=spec)
        out = []
        for v in range(views):
            s = tf.stack([tf.cast(seed + salt, tf.int64), i * 4 + v])
            x = pipeline.normalise(image, feats, s if augment else None)
            out.append(dihedral(x, s + 1) if augment else x)
        if table is not None:
            label = -2 - table.lookup(tf.cast(feats["image_id"], tf.int64))
        elif unlabelled:
            label = tf.constant(-1, tf.int32)
        else:
            label = tf.cast(feats[records.IDENTITY_INDEX_KEY], tf.int32)
        return (*out, label)

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def unlabelled_slot(labels: tf.Tensor) -> tf.Tensor:
    """The pseudo-label slot k of labels -2 - k from `training_sites(slots=...)`; -1 for
    labelled sites and unlabelled ones without a slot."""
    labels = tf.cast(labels, tf.int32)
    return tf.where(labels <= -2, -2 - labels, -1)


def evaluation_sites(records_dir: str, split: str, pipeline: SitePipeline,
                     batch_size: int = 64) -> tf.data.Dataset:
    """Every site of a split in file order, once: (images, {image_id, label, experiment,
    plate}) with label the identity index (-1 where the record has none)."""
    spec = pipeline.spec

    def parse(feats):
        image = pipeline.normalise(records.decode_image(feats, spec=spec), feats, None)
        meta = {"image_id": feats["image_id"],
                "label": tf.cast(feats[records.IDENTITY_INDEX_KEY], tf.int32),
                "experiment": feats[records.GROUP_KEY], "plate": _plate_string(feats),
                "well": feats[WELL_KEY] if schema_has(WELL_KEY) else tf.constant("")}
        return image, meta

    ds = _raw_reader(records_dir, [split], spec)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_pipeline(records_dir: str, normalization: str, jitter: float, size: int | None,
                  stats: PlateStats | None = None) -> SitePipeline:
    """The `SitePipeline` of a record set (statistics computed over all its splits)."""
    spec = shards.records_input_spec(records_dir)
    if spec.kind != "image":
        raise RecordsError(f"{records_dir} holds {spec.describe()} records; the fluorescence "
                           "families read multi-channel images")
    if normalization != "none" and stats is None:
        level = "plate" if normalization == "plate" else "experiment"
        stats = load_plate_stats(records_dir, level)
    return SitePipeline(spec, normalization, stats if normalization != "none" else None,
                        jitter, size)
