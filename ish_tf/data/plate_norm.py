"""Per-plate channel normalisation of fluorescence sites: the stats table (schema) and the
input-pipeline functions that apply it.

Interface (stable; the mean-teacher family builds on it)::

    stats = read_channel_stats(RECORDS_DIR)          # DataFrame, STATS_COLUMNS
    norm = normaliser(stats, jitter=0.1)
    x = norm(image, experiment, plate, training=False, seed=None)   # float32, same shape
    ds = plate_dataset(RECORDS_DIR, "train", batch_size=32, training=True, seed=0)

Two differently jittered views of the same sites (a student's and a teacher's): read
with `plate_dataset(..., normalise=False)` and call the normaliser twice with different
seeds.

`image` is (H, W, C) or a batch (B, H, W, C) of stored pixel values; `experiment` a
tf.string scalar or (B,), `plate` an integer scalar or (B,). The result is
(image - mean) / std with the mean and std of the site's own (experiment, plate,
channel), computed over all its sites at extraction (`ish_tf.data.plate_records`; the
test plates' own stats too: they use no label). With `training=True` and `jitter` > 0,
mean and std are each scaled by a factor drawn uniformly from [1 - jitter, 1 + jitter]
per site and channel (DeepNoise's +-10%), from `seed` (a shape-[2] integer tensor, for
the stateless draw) or from TensorFlow's global generator when None. A plate that the
table does not hold stops the pipeline with an error naming it.

The stats table (``RECORDS_DIR/channel_stats.csv``; one row per experiment, plate and
channel): experiment, plate, channel (1..C), mean, std, n_sites, n_pixels.

DeepNoise (arXiv 2209.05772) found this step the largest single gain: ~40% -> ~70%
top-1 on RxRx1, because the experiment and plate effects are mostly per-channel gains
and offsets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_write_text

STATS_NAME = "channel_stats.csv"
STATS_COLUMNS: tuple[str, ...] = ("experiment", "plate", "channel", "mean", "std", "n_sites",
                                  "n_pixels")
#: Record features `plate_dataset` returns besides the image (see `ish_tf.data.records`).
SITE_KEYS: tuple[str, ...] = ("image_id", "label", "donor_id", "plate", "well", "site",
                              "cell_type", "well_type", "gene_symbol")


class StatsError(ValueError):
    """A missing or malformed channel stats table (naming the file, line and column)."""


# --------------------------------------------------------------------------- the table
def stats_table(sums: Mapping[tuple[str, int], Mapping[str, np.ndarray | int]]) -> pd.DataFrame:
    """The stats table from per-plate sums.

    Args:
      sums: (experiment, plate) -> {"sum": (C,), "sumsq": (C,), "n_pixels": pixels per
        channel, "n_sites": sites}.
    """
    rows = []
    for (experiment, plate), s in sorted(sums.items()):
        n = float(s["n_pixels"])
        mean = np.asarray(s["sum"], np.float64) / n
        var = np.maximum(np.asarray(s["sumsq"], np.float64) / n - mean**2, 0.0)
        for c in range(len(mean)):
            rows.append({"experiment": experiment, "plate": int(plate), "channel": c + 1,
                         "mean": float(mean[c]), "std": float(np.sqrt(var[c])),
                         "n_sites": int(s["n_sites"]), "n_pixels": int(s["n_pixels"])})
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def write_channel_stats(path: str, table: pd.DataFrame) -> None:
    """Writes a stats table atomically (validated first)."""
    validate_channel_stats(table, path)
    atomic_write_text(path, table.to_csv(index=False, float_format="%.6f"))


def validate_channel_stats(table: pd.DataFrame, source: str = "<stats>") -> pd.DataFrame:
    """Checks columns and values; returns the table typed.

    Raises:
      StatsError: a missing column, a non-numeric or negative value, a repeated
        (experiment, plate, channel), or plates with different channel counts.
    """
    missing = [c for c in STATS_COLUMNS if c not in table.columns]
    if missing:
        raise StatsError(f"{source}: missing column(s) {', '.join(map(repr, missing))}; a "
                         f"channel stats table has {', '.join(STATS_COLUMNS)}")
    out = table.copy().reset_index(drop=True)
    out["experiment"] = out["experiment"].astype(str)
    for col in ("plate", "channel", "mean", "std", "n_sites", "n_pixels"):
        values = pd.to_numeric(out[col], errors="coerce")
        bad = values.isna() | ((values < 0) if col != "plate" else False)
        if col == "std":
            bad |= values <= 0
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise StatsError(f"{source}: line {i + 2}: column {col!r} has {table[col].iloc[i]!r}"
                             + ("; a plate channel with zero spread cannot be normalised"
                                if col == "std" else ""))
        out[col] = values.astype(np.int64 if col in ("plate", "channel", "n_sites",
                                                     "n_pixels") else np.float64)
    dup = out.duplicated(["experiment", "plate", "channel"])
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise StatsError(f"{source}: line {i + 2}: experiment {out['experiment'].iloc[i]!r}, "
                         f"plate {out['plate'].iloc[i]}, channel {out['channel'].iloc[i]} "
                         "appears twice")
    counts = out.groupby(["experiment", "plate"])["channel"].agg(["count", "max"])
    if len(counts) and (counts["count"].nunique() > 1 or (counts["count"] != counts["max"]).any()):
        raise StatsError(f"{source}: every plate needs channels 1..C once; got "
                         f"{counts.head(4).to_dict('index')}")
    return out


def read_channel_stats(path: str) -> pd.DataFrame:
    """Reads a stats table: a CSV, or a records folder holding `STATS_NAME`.

    Raises:
      StatsError: the file is missing or malformed.
    """
    if os.path.isdir(path):
        path = os.path.join(path, STATS_NAME)
    if not os.path.exists(path):
        raise StatsError(f"{path}: channel stats table not found (bin/extract writes it "
                         "beside the records of fluorescence plates)")
    try:
        table = pd.read_csv(path, dtype={"experiment": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise StatsError(f"{path}: cannot be read as CSV ({e})") from e
    return validate_channel_stats(table, path)


def stats_arrays(table: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys "experiment/plate" and their mean and std, (K, C) float32 each."""
    table = validate_channel_stats(table)
    keys, means, stds = [], [], []
    for (experiment, plate), part in table.groupby(["experiment", "plate"], sort=True):
        part = part.sort_values("channel")
        keys.append(f"{experiment}/{int(plate)}")
        means.append(part["mean"].to_numpy(np.float32))
        stds.append(part["std"].to_numpy(np.float32))
    return keys, np.stack(means), np.stack(stds)


# --------------------------------------------------------------------------- normalising
def normaliser(stats: pd.DataFrame | str, jitter: float = 0.1,
               eps: float = 1e-3) -> Callable[..., object]:
    """A function normalising sites by their plate's channel stats (module docstring).

    Args:
      stats: the stats table, or a path to it (or to the records folder).
      jitter: relative jitter of mean and std in training (0.1 = +-10%).
      eps: least std divided by.

    Returns:
      fn(image, experiment, plate, training=False, seed=None) -> float32 image of the
      same shape: usable eagerly and inside `tf.data` / `tf.function`.

    Raises:
      StatsError: a bad table; ValueError: jitter outside [0, 1).
    """
    import tensorflow as tf

    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    table = read_channel_stats(stats) if isinstance(stats, str) else stats
    keys, means, stds = stats_arrays(table)
    init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys),
                                               tf.range(len(keys), dtype=tf.int64))
    lookup = tf.lookup.StaticHashTable(init, default_value=-1)
    mean_t = tf.constant(means)
    std_t = tf.constant(np.maximum(stds, eps))

    def normalise(image, experiment, plate, training: bool = False, seed=None):
        image = tf.cast(image, tf.float32)
        experiment = tf.convert_to_tensor(experiment, tf.string)
        key = tf.strings.join([experiment, tf.strings.as_string(tf.cast(plate, tf.int64))],
                              separator="/")
        index = lookup.lookup(key)
        missing = tf.reduce_any(index < 0)
        tf.debugging.Assert(tf.logical_not(missing), [
            "no channel stats for plate(s) (experiment/plate):",
            tf.boolean_mask(tf.reshape(key, [-1]), tf.reshape(index < 0, [-1]))], summarize=8)
        index = tf.maximum(index, 0)
        mean, std = tf.gather(mean_t, index), tf.gather(std_t, index)  # (C,) or (B, C)
        if training and jitter > 0:
            shape = tf.shape(mean)
            if seed is None:
                f_mean = tf.random.uniform(shape, 1 - jitter, 1 + jitter)
                f_std = tf.random.uniform(shape, 1 - jitter, 1 + jitter)
            else:
                seed = tf.cast(seed, tf.int64)
                f_mean = tf.random.stateless_uniform(shape, seed, 1 - jitter, 1 + jitter)
                f_std = tf.random.stateless_uniform(shape, seed + [0, 1], 1 - jitter,
                                                    1 + jitter)
            mean, std = mean * f_mean, std * f_std
        if mean.shape.rank == 2:
            mean, std = mean[:, None, None, :], std[:, None, None, :]
        return (image - mean) / std

    return normalise


def plate_dataset(records_dir: str, split: str, *, batch_size: int, training: bool,
                  stats: pd.DataFrame | str | None = None, jitter: float = 0.1,
                  normalise: bool = True, seed: int = 0, shuffle_buffer: int = 2048,
                  labelled_only: bool = False, repeat: bool | None = None,
                  drop_remainder: bool | None = None):
    """Batches of normalised fluorescence sites from a plate record set.

    Args:
      records_dir: written by `bin/extract` from an RxRx1 manifest.
      split: train | validation | test.
      batch_size: sites per batch.
      training: shuffle, repeat, jitter the stats and drop the last partial batch
        (each overridable by `repeat` / `drop_remainder`).
      stats: the stats table (default: the one in `records_dir`).
      jitter: see `normaliser`.
      normalise: False gives the stored pixel values as float32 (the no-normalisation
        baseline).
      seed: file order, shuffling and jitter.
      labelled_only: drop unlabelled sites (label -1).

    Returns:
      tf.data.Dataset of dicts: image float32 (B, H, W, C); label int64 (B,) (the siRNA
      class, -1 unlabelled); experiment (the group, string); plate, site int64; well,
      cell_type, well_type, sirna_identity string; image_id int64.
    """
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.input_checks import check_shard_counts
    from ish_tf.data.pipeline import list_shards

    spec = shards.DatasetInfo.from_dict(shards.load_index(records_dir)["dataset"]).spec()
    files = list_shards(records_dir, split)
    check_shard_counts(records_dir, split, files)
    compression = shards.compression_of(files[0]) or ""
    norm = normaliser(records_dir if stats is None else stats, jitter) if normalise else None
    keys = ["image/encoded", *[k for k in SITE_KEYS]]
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                       cycle_length=min(4, len(files)))

    def parse(serialized):
        f = records.parse_example(serialized, keys)
        image = records.decode_image(f, spec=spec)
        return {"image": image, "label": f["label"], "experiment": f["donor_id"],
                "plate": f["plate"], "well": f["well"], "site": f["site"],
                "cell_type": f["cell_type"], "well_type": f["well_type"],
                "sirna_identity": f["gene_symbol"], "image_id": f["image_id"]}

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if labelled_only:
        ds = ds.filter(lambda x: x["label"] >= 0)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if norm is not None:
        if training:
            # A per-element seed from a counter keeps the jitter reproducible.
            counter = tf.data.Dataset.counter()
            ds = tf.data.Dataset.zip((ds, counter)).map(
                lambda x, i: {**x, "image": norm(x["image"], x["experiment"], x["plate"],
                                                 training=True, seed=tf.stack(
                                                     [tf.cast(seed, tf.int64), i]))},
                num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x: {**x, "image": norm(x["image"], x["experiment"],
                                                      x["plate"])},
                        num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x: {**x, "image": tf.cast(x["image"], tf.float32)})
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
