"""TensorBoard extras beyond the trainer's scalars: HParams, embedding projector, reading back.

* `write_hparams_config` / `write_hparams_session`: the HParams dashboard for tuned runs
  (`bin/tune` writes the config into OUT/runs and one session per trial, with the
  objective as a scalar, so `tensorboard --logdir OUT/runs` compares trials).
* `write_projector`: the embedding projector for a sample of gene-level embeddings
  with their labels (a checkpoint holding the embedding variable, metadata.tsv and
  projector_config.pbtxt); `write_projector_from_table` takes an `EmbeddingTable`.
* `event_tags`: the tags present in a log directory's event files (tests, debugging).

The training scalars (`loss/train`, `train/lr`, `train/<task stat>`, `train/grad_norm`,
`train/images_per_sec`), the validation scores (`loss/validation`, `validation/<metric>`)
and the input
images (patches after their flips; families add reconstructions or predictions
through `Task.image_summaries`) are written by `ish_tf.train.trainer`.
"""

from __future__ import annotations

import collections
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import api as hparams_api

PROJECTOR_TENSOR = "embedding"
METADATA_NAME = "metadata.tsv"


def _domain(values: Sequence[Any]) -> hparams_api.Discrete:
    """A Discrete domain of the values (ints become floats: HParams has no int type)."""
    vals = list(dict.fromkeys(values))
    if all(isinstance(v, bool) for v in vals):
        return hparams_api.Discrete([bool(v) for v in vals])
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return hparams_api.Discrete([float(v) for v in vals])
    return hparams_api.Discrete([str(v) for v in vals])


def _value(v: Any) -> Any:
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return str(v)


def write_hparams_config(logdir: str, domains: Mapping[str, Sequence[Any]],
                         metrics: Sequence[str]) -> None:
    """Declares the HParams experiment (hyperparameters and metrics) at `logdir`.

    Args:
      logdir: the top log directory (sessions are its subdirectories).
      domains: hyperparameter name -> the values it may take.
      metrics: scalar tags each session writes (e.g. "val_rank1").
    """
    hparams = [hparams_api.HParam(name, _domain(values)) for name, values in domains.items()]
    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(hparams=hparams,
                                   metrics=[hparams_api.Metric(m) for m in metrics])


def write_hparams_session(session_dir: str, values: Mapping[str, Any],
                          metrics: Mapping[str, float], trial_id: str | None = None,
                          step: int = 0) -> None:
    """Writes one HParams session: the trial's hyperparameters and its metrics.

    Args:
      session_dir: the session's directory (e.g. OUT/runs/trial_03).
      values: hyperparameter name -> value.
      metrics: metric tag -> value (written as scalars at `step`).
      trial_id: name of the session in the dashboard.
      step: step of the metric scalars.
    """
    with tf.summary.create_file_writer(session_dir).as_default():
        hparams_api.hparams({k: _value(v) for k, v in values.items()}, trial_id=trial_id)
        for tag, value in metrics.items():
            if value is not None and np.isfinite(value):
                tf.summary.scalar(tag, float(value), step=step)


def _tsv_cell(value: Any) -> str:
    # The projector's TSV has no quoting: tabs and newlines would shift columns.
    return str(value).replace("\t", " ").replace("\n", " ")


def write_projector(logdir: str, values: np.ndarray, labels: Mapping[str, Sequence[Any]],
                    *, max_points: int = 5000, seed: int = 0,
                    tensor_name: str = PROJECTOR_TENSOR) -> int:
    """Writes an embedding-projector view of `values` with their labels.

    Args:
      logdir: directory for the checkpoint, metadata.tsv and projector_config.pbtxt
        (open with `tensorboard --logdir logdir`, Projector tab).
      values: (N, D) embeddings.
      labels: column name -> N labels (e.g. gene_symbol, a GO group); the first
        column names the points.
      max_points: a seeded random sample of at most this many rows is written.
      seed: seed of the sample.
      tensor_name: name of the embedding variable.

    Returns:
      The number of points written.

    Raises:
      ValueError: values is not 2-D, labels are missing or of another length.
    """
    values = np.asarray(values, np.float32)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"projector values must be (N, D) with N > 0, got {values.shape}")
    if not labels:
        raise ValueError("projector needs at least one label column")
    n = values.shape[0]
    for name, col in labels.items():
        if len(col) != n:
            raise ValueError(f"projector label column {name!r} has {len(col)} values for "
                             f"{n} embeddings")
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    os.makedirs(logdir, exist_ok=True)
    columns = list(labels)
    lines = ["\t".join(columns)] if len(columns) > 1 else []
    for i in keep:
        lines.append("\t".join(_tsv_cell(labels[c][i]) for c in columns))
    with open(os.path.join(logdir, METADATA_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    variable = tf.Variable(values[keep], name=tensor_name)
    checkpoint = tf.train.Checkpoint(embedding=variable)
    checkpoint.save(os.path.join(logdir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    # The checkpoint stores the variable under the attribute path of the Checkpoint.
    embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = METADATA_NAME
    projector.visualize_embeddings(logdir, config)
    # TensorBoard's projector looks only in its runs, the directories holding event
    # files: one event here makes this directory a run, so the projector is found from
    # any --logdir above it (RUN/logs, which bin/train prints), not only from logdir.
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.text("projector", f"{int(keep.size)} points of {n}, labelled by "
                        f"{', '.join(columns)}: open the Projector tab", step=0)
    writer.close()
    return int(keep.size)


def write_projector_from_table(logdir: str, table, label_columns: Sequence[str] = ("gene_symbol",),
                               *, max_points: int = 5000, seed: int = 0) -> int:
    """`write_projector` for an `ish_tf.data.embeddings.EmbeddingTable` (e.g. gene level).

    Args:
      logdir: output directory.
      table: EmbeddingTable with `keys` (DataFrame) and `values` (N, D).
      label_columns: key columns used as labels (missing ones are skipped).
      max_points: sample size cap.
      seed: sample seed.

    Returns:
      The number of points written.

    Raises:
      ValueError: none of `label_columns` is a key column of the table.
    """
    cols = [c for c in label_columns if c in table.keys.columns]
    if not cols:
        raise ValueError(f"none of the label columns {list(label_columns)} is in the table's "
                         f"keys {list(table.keys.columns)}")
    labels = {c: table.keys[c].astype(str).tolist() for c in cols}
    return write_projector(logdir, table.values, labels, max_points=max_points, seed=seed)


def event_tags(logdir: str, recursive: bool = True) -> dict[str, int]:
    """Counts the summary tags in the event files under `logdir`.

    Args:
      logdir: a log directory.
      recursive: also read subdirectories.

    Returns:
      {tag: number of values written}.
    """
    pattern = os.path.join(logdir, "**", "events.out.tfevents.*") if recursive else \
        os.path.join(logdir, "events.out.tfevents.*")
    counts: collections.Counter[str] = collections.Counter()
    for path in glob.glob(pattern, recursive=recursive):
        for event in tf.compat.v1.train.summary_iterator(path):
            counts.update(v.tag for v in event.summary.value)
    return dict(counts)
