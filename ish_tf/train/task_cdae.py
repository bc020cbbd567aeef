"""Training tasks of the CDAE family, whole-section input pipeline, baselines and term AUCs.

Tasks (registered lazily through `ish_tf.train.tasks._LAZY_TASKS`):

* `cdae`: denoising reconstruction. Batches are `{"images": float32 (b, S_h, S_w, 1)
  in [0, 255], "step": int64 scalar}` (the global step of the batch: it seeds the
  corruption, so a resumed run corrupts exactly as an uninterrupted one, and times
  the reconstruction images). The clean image scaled to the model's [0, 1] space is
  the target; while training the input is corrupted in that space (options `noise`
  = none | gaussian (std = `noise_level`) | masking (a fraction `noise_level` of
  pixels set to 0, i.e. to background) | salt_pepper (a fraction set to 0 or 1)).
  Loss (`loss`): per-pixel mse or binary cross-entropy, averaged over the global batch.
  Stats: mse, mae (always, [0, 1] units, against the clean target) and code_rms.
  Before model.keras is written, the batch-norm statistics are re-estimated on
  `bn_images` clean training images (`finalize_model`; the checkpoints keep the moving
  averages of the corrupted inputs).
* `cdae_supervised`: the CDAE encoder + a sigmoid head over annotation terms
  (options `gaf` or `annotations`, terms with `term_min_genes`..`term_max_genes`
  training genes); labels joined to records by gene_index at dataset time. Loss: mean
  binary cross-entropy over terms; stats: bce, accuracy, positive_rate. After
  training, `term_auc` (`bin/cdae term_auc`) reports per-term AUC on held-out genes.

Both read whole-section records (`bin/extract --whole_images`) through
`whole_dataset`; the global batch is `options["batch_size"]` (not P*K).

TensorBoard: `image_summaries` (step 0) shows inputs, corrupted inputs and the
untrained reconstructions; every `image_every` steps the cdae task writes
[clean | corrupted | reconstruction] strips to RUN/logs/reconstruction.

Command line (after training; `write_term_auc`, `write_baselines`):
  bin/cdae term_auc --run_dir=RUN [--split=test] [--codes_run=CDAE_RUN]
  bin/cdae baselines --run_dir=RUN [--out=DIR] [--records_dir=R]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from ish_tf.io_utils import atomic_write_text
from ish_tf.models import ModelConfig
from ish_tf.models.batch_norm import recalibrate_batch_norm
from ish_tf.models.cdae import (
    cdae_model_path,
    cdae_options,
    encoder_model,
    scale_images,
    unscale_images,
)
from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean, register_task, replicas_per_pipeline

NOISES: tuple[str, ...] = ("none", "gaussian", "masking", "salt_pepper")
LOSSES: tuple[str, ...] = ("mse", "bce")
RECON_LOG = "reconstruction"
DEFAULT_BN_IMAGES = 2048
TERMS_NAME = "terms.csv"
_EPS = 1e-7


# --------------------------------------------------------------------------- pure pieces
def to_gray(images: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) -> (B, H, W, 1) float32: the channel mean (exact for gray stored as RGB)."""
    images = tf.cast(images, tf.float32)
    if images.shape[-1] == 1:
        return images
    return tf.reduce_mean(images, axis=-1, keepdims=True)


def corrupt(scaled: tf.Tensor, noise: str, level: float, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Corrupts images in the model's [0, 1] space.

    Args:
      scaled: float32 (B, H, W, 1) in [0, 1].
      noise: none | gaussian | masking | salt_pepper.
      level: gaussian std, or the fraction of pixels corrupted.
      seed: int (2,) stateless seed; None uses the stateful global generator.

    Returns:
      float32 (B, H, W, 1) in [0, 1].

    Raises:
      ValueError: unknown noise.
    """
    if noise not in NOISES:
        raise ValueError(f"--cdae_noise must be one of {NOISES}, got {noise!r}")
    if noise == "none" or level <= 0:
        return scaled
    shape = tf.shape(scaled)

    def uniform(k: int) -> tf.Tensor:
        if seed is None:
            return tf.random.uniform(shape)
        return tf.random.stateless_uniform(shape, tf.cast(seed, tf.int64) + [0, 7919 * k])

    if noise == "gaussian":
        if seed is None:
            gauss = tf.random.normal(shape)
        else:
            gauss = tf.random.stateless_normal(shape, tf.cast(seed, tf.int64) + [0, 104729])
        return tf.clip_by_value(scaled + level * gauss, 0.0, 1.0)
    hit = uniform(1) < level
    if noise == "masking":
        return tf.where(hit, tf.zeros_like(scaled), scaled)
    salt = tf.cast(uniform(2) < 0.5, scaled.dtype)
    return tf.where(hit, salt, scaled)


def reconstruction_loss(target: tf.Tensor, recon: tf.Tensor, loss: str) -> tf.Tensor:
    """Per-pixel loss (B, H, W, 1) of a [0, 1] reconstruction against a [0, 1] target.

    Raises:
      ValueError: unknown loss.
    """
    if loss == "mse":
        return tf.square(recon - target)
    if loss == "bce":
        r = tf.clip_by_value(recon, _EPS, 1.0 - _EPS)
        return -(target * tf.math.log(r) + (1.0 - target) * tf.math.log(1.0 - r))
    raise ValueError(f"--cdae_loss must be one of {LOSSES}, got {loss!r}")


def _replica_id() -> tf.Tensor:
    ctx = tf.distribute.get_replica_context()
    rid = 0 if ctx is None else ctx.replica_id_in_sync_group
    return tf.cast(rid, tf.int64)


def _unpack(batch) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
    """(images, step or None, labels or None) from a dict, tuple or bare image batch."""
    if isinstance(batch, dict):
        return batch["images"], batch.get("step"), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return batch[0], None, (batch[1] if len(batch) > 1 else None)
    return batch, None, None


def whole_dataset(records_dir: str, split: str, *, batch_size: int, height: int, width: int,
                  seed: int = 0, flips: bool = False,
                  input_context: tf.distribute.InputContext | None = None, start_step: int = 0,
                  label_matrix: np.ndarray | None = None,
                  shuffle_buffer: int = 2048) -> tf.data.Dataset:
    """Infinite shuffled batches of whole sections for training, starting at `start_step`.

    The order is deterministic given the seed (so skipping `start_step` batches
    resumes exactly); sections stored at another size are resized to (height, width).

    Args:
      records_dir: records written by `bin/extract --whole_images`.
      split: split to read.
      batch_size: GLOBAL batch size.
      height, width: model input size.
      seed: shuffle (and flip) seed.
      flips: random left-right and up-down flips.
      input_context: per-replica pipelines (see `patch_dataset`).
      start_step: first global step (resume).
      label_matrix: float32 (G, T) labels per gene_index, for cdae_supervised.
      shuffle_buffer: records in the shuffle buffer.

    Returns:
      Dataset of {"images": float32 (b, height, width, 1) in [0, 255], "step": int64 ()}
      (+ "labels": float32 (b, T) with a label matrix).

    Raises:
      RecordsError: no shards of the split.
    """
    from ish_tf.data.pipeline import patch_dataset

    ds = patch_dataset(records_dir, split, batch_size=batch_size, training=True, flips=flips,
                       seed=seed, input_context=input_context, deterministic=True,
                       shuffle_buffer=shuffle_buffer,
                       label_key="gene_index" if label_matrix is not None else None)
    rpp = replicas_per_pipeline(input_context)
    ds = ds.skip(start_step * rpp).enumerate()
    labels = None if label_matrix is None else tf.constant(label_matrix, tf.float32)

    def fit(images):
        images = to_gray(images)
        if tuple(images.shape[1:3]) != (height, width):
            images = tf.image.resize(images, (height, width), antialias=True)
        return tf.ensure_shape(images, [None, height, width, 1])

    def element(k, item):
        step = tf.cast(start_step, tf.int64) + k // rpp
        if labels is None:
            return {"images": fit(item), "step": step}
        images, gene_index = item
        return {"images": fit(images), "step": step, "labels": tf.gather(labels, gene_index)}

    return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def invert_mismatch(records_dir: str, invert: bool) -> str | None:
    """Says when --cdae_invert does not suit the slides the records were extracted from.

    The CDAE works in a space where the bare slide is near 0 and tissue (stain or light)
    above it: `--cdae_invert` (1 - x/255) for brightfield sections on a white slide, no
    inversion for fluorescence sections on a black one; masking noise sets pixels to 0,
    which should look like bare slide. The records' key says which slide `bin/extract`
    segmented (`--mask_background`).

    Args:
      records_dir: whole-section records.
      invert: the model's --cdae_invert.

    Returns:
      The warning, or None where the setting suits the records or they do not say.
    """
    from ish_tf.data import records, shards

    try:
        info = shards.load_dataset_info(records_dir)
    except (records.RecordsError, OSError):
        return None
    if info is None:
        return None
    mask = (info.extra.get("sampling") or {}).get("mask") or {}
    background = mask.get("background", "bright")
    if (background == "dark") != invert:
        return None
    kind = ("fluorescence (dark slide, --mask_background=dark)" if background == "dark"
            else "brightfield (white slide)")
    fix = "--nocdae_invert" if invert else "--cdae_invert"
    return (f"{records_dir}: extracted from {kind} sections, but --cdae_invert is "
            f"{'on' if invert else 'off'}: the model would see the bare slide near 1 and the "
            f"tissue near 0, so masking noise (pixels set to 0) would look like tissue; "
            f"pass {fix}")


# --------------------------------------------------------------------------- cdae task
class _WholeTask(Task):
    """Shared pieces: batch size from options, the model kept for image summaries."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.opts = cdae_options(model_config)  # fail at construction on bad options
        self.batch_size = int(model_config.option("batch_size", 32))
        if self.batch_size < 1:
            raise ValueError(f"--cdae_batch_size must be >= 1, got {self.batch_size}")
        self._model: keras.Model | None = None
        self._records_checked = False

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step (`--cdae_batch_size`)."""
        return self.batch_size

    def build_model(self) -> keras.Model:
        if self.train_config.jit_compile:
            # tf.nn.max_pool_with_argmax has no XLA kernel; the window implementation
            # gives the same switches from ops XLA compiles.
            self.model_config = dataclasses.replace(self.model_config, options={
                **self.model_config.options, "pool_implementation": "window"})
        self._model = super().build_model()
        return self._model

    def _require_records(self) -> str:
        if not self.train_config.records_dir:
            raise ValueError("--records_dir is required: whole-section records written by "
                             "bin/extract --whole_images")
        if not self._records_checked:
            self._records_checked = True
            message = invert_mismatch(self.train_config.records_dir, self.opts["invert"])
            if message:
                logging.warning("%s", message)
        return self.train_config.records_dir

    def _display(self, scaled: tf.Tensor) -> tf.Tensor:
        """Model-space images -> [0, 1] as they look on the slide (for TensorBoard)."""
        return tf.clip_by_value(unscale_images(scaled, self.opts["invert"]) / 255.0, 0.0, 1.0)


@register_task("cdae")
class CDAETask(_WholeTask):
    """Denoising reconstruction of whole sections (see the module docstring)."""

    stat_names = ("mse", "mae", "code_rms")

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.noise = str(model_config.option("noise", "masking"))
        self.noise_level = float(model_config.option("noise_level", 0.25))
        self.loss = str(model_config.option("loss", "bce"))
        if self.noise not in NOISES:
            raise ValueError(f"--cdae_noise must be one of {NOISES}, got {self.noise!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--cdae_loss must be one of {LOSSES}, got {self.loss!r}")
        if self.noise_level < 0 or (self.noise != "gaussian" and self.noise_level > 1):
            raise ValueError(f"--cdae_noise_level must be in [0, 1] for {self.noise}, got "
                             f"{self.noise_level}")
        self.image_every = int(model_config.option("image_every", 0))
        self.bn_images = int(model_config.option("bn_images", DEFAULT_BN_IMAGES))
        if self.bn_images < 0:
            raise ValueError(f"--cdae_bn_images must be >= 0, got {self.bn_images}")
        self._writer = None

    def build_model(self) -> keras.Model:
        model = super().build_model()
        # In-graph image summaries cannot be XLA-compiled; they are skipped with --jit_compile.
        if self.image_every > 0 and not self.train_config.jit_compile and self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.train_config.run_dir, "logs", RECON_LOG), max_queue=1)
        return model

    def finalize_model(self, model: keras.Model) -> str:
        """Re-estimates the batch-norm statistics on clean training images (`bn_images`).

        Training fed the model corrupted images, so its moving averages describe those;
        the encoder is used on clean ones. The images are the first `bn_images` of the
        run's own training stream (seeded: rewriting model.keras gives the same model),
        uncorrupted. Nothing is done with norm "none" or `bn_images` 0.
        """
        if self.opts["norm"] != "batch" or self.bn_images == 0:
            return ""
        batches = (to_gray(_unpack(element)[0]) for element in self.make_dataset(None, 0))
        used = recalibrate_batch_norm(model, batches, self.bn_images)
        return (f"batch-normalisation statistics re-estimated on {used} clean training "
                "images (--cdae_bn_images)")

    def make_records_dataset(self, input_context, start_step=0):
        """Whole-section batches from `records_dir` (see `whole_dataset`)."""
        cfg = self.train_config
        return whole_dataset(self._require_records(), cfg.split, batch_size=self.batch_size,
                             height=self.opts["height"], width=self.opts["width"], seed=cfg.seed,
                             flips=cfg.flips, input_context=input_context, start_step=start_step)

    def corrupted(self, images: tf.Tensor, step: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(clean target, corrupted input) in the model's [0, 1] space, (b, H, W, 1) each."""
        target = scale_images(to_gray(images), self.opts["invert"])
        seed = None
        if step is not None:
            seed = tf.stack([tf.cast(self.train_config.seed, tf.int64),
                             tf.cast(step, tf.int64) * 64 + _replica_id()])
        return target, corrupt(target, self.noise, self.noise_level, seed)

    def compute_loss(self, model, batch, training):
        """Reconstruction loss of the corrupted (training) or clean input against the clean one."""
        images, step, _ = _unpack(batch)
        target, noisy = self.corrupted(images, step)
        model_in = noisy if training else target
        code, recon = model(unscale_images(model_in, self.opts["invert"]), training=training)
        recon, code = tf.cast(recon, tf.float32), tf.cast(code, tf.float32)
        loss = global_mean(reconstruction_loss(target, recon, self.loss))
        stats = {"mse": global_mean(tf.square(recon - target)),
                 "mae": global_mean(tf.abs(recon - target)),
                 "code_rms": tf.sqrt(global_mean(tf.square(code)))}
        if training and step is not None and self._writer is not None:
            self._write_images(step, target, model_in, recon)
        return loss, {k: tf.stop_gradient(v) for k, v in stats.items()}

    def _write_images(self, step, target, noisy, recon) -> None:
        """[clean | corrupted | reconstruction] strips every `image_every` steps (replica 0)."""
        done = tf.cast(step, tf.int64) + 1  # the step count after this update, as in metrics.csv
        with self._writer.as_default(step=done), \
                tf.summary.record_if(tf.equal(done % self.image_every, 0)):
            strip = tf.concat([self._display(target[:4]), self._display(noisy[:4]),
                               self._display(tf.stop_gradient(recon[:4]))], axis=2)
            tf.summary.image("clean_noisy_reconstruction", strip, max_outputs=4)

    def image_summaries(self, batch):
        """Inputs, corrupted inputs and (with the model built) reconstructions at step 0."""
        images, step, _ = _unpack(batch)
        target, noisy = self.corrupted(images[:4], step)
        out = {"cdae_inputs": self._display(target), "cdae_noisy_inputs": self._display(noisy)}
        if self._model is not None:
            _, recon = self._model(unscale_images(noisy, self.opts["invert"]), training=False)
            out["cdae_reconstructions"] = self._display(tf.cast(recon, tf.float32))
        return out


# --------------------------------------------------------------------------- supervised
def load_term_groups(gaf: str = "", annotations: str = "") -> dict[str, set[str]]:
    """Term -> upper-case gene symbols, from a GAF or a categorical annotation CSV.

    Args:
      gaf: GAF 2.x file (terms are GO ids).
      annotations: CSV of gene_symbol + categorical columns (terms are "column=value").

    Returns:
      Term -> set of members' gene symbols (upper case); the key "" holds every
      annotated gene (the evaluation universe).

    Raises:
      ValueError: neither or both sources given.
      AnnotationError: unreadable file.
    """
    from ish_tf.evaluate import annotations as ann_lib

    if bool(gaf) == bool(annotations):
        raise ValueError("cdae_supervised: give exactly one of --cdae_gaf and --cdae_annotations")
    if gaf:
        from ish_tf.evaluate.go import load_go

        ann = load_go(gaf)
    else:
        ann = ann_lib.read_annotation_table(annotations)
    if "gene_symbol" not in ann.genes.columns:
        raise ValueError(f"{ann.source}: needs gene symbols to join to the records")
    symbols = ann_lib.normalize_symbols(ann.genes["gene_symbol"]).to_numpy()
    groups: dict[str, set[str]] = {"": {str(s) for s in symbols if isinstance(s, str)}}
    for k, row in enumerate(ann.groups.itertuples(index=False)):
        name = row.annotation if gaf else f"{row.category}={row.annotation}"
        groups[name] = {str(s) for s in symbols[ann.members[k]] if isinstance(s, str)}
    return groups


def term_matrix(records_dir: str, groups: dict[str, set[str]], terms: Sequence[str] | None = None,
                min_genes: int = 15, max_genes: int = 500) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Selects terms by their number of TRAINING genes and builds the label matrix.

    Args:
      records_dir: records with a dataset info (gene vocabulary and splits).
      groups: from `load_term_groups`.
      terms: use exactly these terms (a saved run) instead of selecting.
      min_genes, max_genes: inclusive bounds on a term's training genes.

    Returns:
      (terms, float32 (G, T) labels per gene_index, bool (G,) annotated genes).

    Raises:
      ValueError: no dataset info, or no term passes the bounds.
    """
    from ish_tf.data import shards

    info = shards.load_dataset_info(records_dir)
    if info is None:
        raise ValueError(f"{records_dir}: no dataset info in index.json; run bin/extract first")
    size = max(g.gene_index for g in info.genes) + 1
    symbols = np.array([""] * size, dtype=object)
    splits = np.array([""] * size, dtype=object)
    for g in info.genes:
        symbols[g.gene_index] = g.gene_symbol.strip().upper()
        splits[g.gene_index] = g.split
    if terms is None:
        train = {s for s, sp in zip(symbols, splits, strict=True) if sp == "train"}
        terms = sorted(t for t, members in groups.items()
                       if t and min_genes <= len(members & train) <= max_genes)
        if not terms:
            sizes = sorted((len(m & train) for t, m in groups.items() if t), reverse=True)[:5]
            raise ValueError(f"no annotation term has {min_genes}..{max_genes} training genes in "
                             f"{records_dir} (largest: {sizes}); adjust --cdae_term_min_genes/"
                             "--cdae_term_max_genes")
    matrix = np.zeros((size, len(terms)), dtype=np.float32)
    for j, t in enumerate(terms):
        members = groups.get(t, set())
        matrix[:, j] = [s in members for s in symbols]
    annotated = np.array([s in groups.get("", set()) for s in symbols], dtype=bool)
    return list(terms), matrix, annotated


@register_task("cdae_supervised")
class CDAESupervisedTask(_WholeTask):
    """Encoder + multi-label sigmoid head over annotation terms (see the module docstring).

    The selected terms are stored in `model_config.options["terms"]` (so the run's
    model_config.json rebuilds the same head) and in RUN/terms.csv.
    """

    stat_names = ("bce", "accuracy", "positive_rate")

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.label_matrix: np.ndarray | None = None
        if not model_config.option("terms") and dataset_fn is None:
            groups = load_term_groups(model_config.option("gaf", ""),
                                      model_config.option("annotations", ""))
            terms, self.label_matrix, _ = term_matrix(
                self._require_records(), groups,
                min_genes=int(model_config.option("term_min_genes", 15)),
                max_genes=int(model_config.option("term_max_genes", 500)))
            model_config.options["terms"] = terms
        elif model_config.option("terms") and dataset_fn is None:
            groups = load_term_groups(model_config.option("gaf", ""),
                                      model_config.option("annotations", ""))
            _, self.label_matrix, _ = term_matrix(self._require_records(), groups,
                                                  model_config.option("terms"))
        if not model_config.option("terms"):
            raise ValueError("cdae_supervised: options['terms'] is empty")

    def build_model(self) -> keras.Model:
        model = super().build_model()
        path = os.path.join(self.train_config.run_dir, TERMS_NAME)
        os.makedirs(self.train_config.run_dir, exist_ok=True)
        pd.DataFrame({"term": self.model_config.option("terms")}).to_csv(path, index=False)
        return model

    def make_records_dataset(self, input_context, start_step=0):
        """Whole-section batches with their genes' term labels."""
        cfg = self.train_config
        return whole_dataset(self._require_records(), cfg.split, batch_size=self.batch_size,
                             height=self.opts["height"], width=self.opts["width"], seed=cfg.seed,
                             flips=cfg.flips, input_context=input_context, start_step=start_step,
                             label_matrix=self.label_matrix)

    def compute_loss(self, model, batch, training):
        """Mean binary cross-entropy over terms and the global batch."""
        images, _, labels = _unpack(batch)
        probs, _ = model(to_gray(images), training=training)
        probs = tf.clip_by_value(tf.cast(probs, tf.float32), _EPS, 1.0 - _EPS)
        labels = tf.cast(labels, tf.float32)
        bce = -(labels * tf.math.log(probs) + (1.0 - labels) * tf.math.log(1.0 - probs))
        loss = global_mean(bce)
        stats = {"bce": loss,
                 "accuracy": global_mean(tf.cast(tf.equal(probs > 0.5, labels > 0.5), tf.float32)),
                 "positive_rate": global_mean(labels)}
        return loss, {k: tf.stop_gradient(v) for k, v in stats.items()}

    def image_summaries(self, batch):
        images, _, _ = _unpack(batch)
        return {"cdae_supervised_inputs": tf.clip_by_value(to_gray(images[:4]) / 255.0, 0.0, 1.0)}


# --------------------------------------------------------------------------- evaluation
def predict_records(model: keras.Model, records_dir: str, split: str | Sequence[str],
                    batch_size: int = 64, output: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Runs one model output over every record of the split(s), in record order.

    Args:
      model: a CDAE-family Keras model (or its encoder).
      records_dir: whole-section records.
      split: a split name or several.
      batch_size: images per call.
      output: index of the output to keep when the model has several.

    Returns:
      (keys DataFrame: image_id, gene_symbol, entrez_id, donor_id, split; float32 (N, D)).
    """
    from ish_tf.data.pipeline import patch_dataset

    height, width = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2])
    keys, values = [], []
    for sp in [split] if isinstance(split, str) else list(split):
        ds = patch_dataset(records_dir, sp, batch_size=batch_size, training=False, with_keys=True)
        for images, feats in ds:
            images = to_gray(images)
            if tuple(images.shape[1:3]) != (height, width):
                images = tf.image.resize(images, (height, width), antialias=True)
            out = model(images, training=False)
            out = out[output] if isinstance(out, (list, tuple)) else out
            values.append(np.asarray(out, dtype=np.float32).reshape(len(images), -1))
            keys.append(pd.DataFrame({
                "image_id": feats["image_id"].numpy(),
                "gene_symbol": [s.decode() for s in feats["gene_symbol"].numpy()],
                "entrez_id": feats["entrez_id"].numpy(),
                "donor_id": [s.decode() for s in feats["donor_id"].numpy()],
                "gene_index": feats["gene_index"].numpy(), "split": sp}))
    if not values:
        return pd.DataFrame(columns=["image_id", "gene_symbol"]), np.zeros((0, 0), np.float32)
    return pd.concat(keys, ignore_index=True), np.concatenate(values)


def term_auc(model: keras.Model, records_dir: str, terms: Sequence[str],
             groups: dict[str, set[str]], split: str = "test",
             batch_size: int = 64) -> pd.DataFrame:
    """Per-term AUC of a supervised CDAE on the annotated genes of a held-out split.

    Image probabilities are averaged per gene; a term is scored when the split has at
    least one positive and one negative annotated gene.

    Returns:
      Columns term, n_genes, n_positive, auc (NaN when not scorable); sorted by term.
    """
    from sklearn.metrics import roc_auc_score

    keys, probs = predict_records(model, records_dir, split, batch_size, output=0)
    _, matrix, annotated = term_matrix(records_dir, groups, terms)
    frame = pd.DataFrame(probs).assign(gene_index=keys["gene_index"].to_numpy())
    per_gene = frame.groupby("gene_index").mean()
    idx = per_gene.index.to_numpy()
    keep = annotated[idx]
    rows = []
    for j, t in enumerate(terms):
        y = matrix[idx[keep], j]
        s = per_gene.to_numpy()[keep, j]
        ok = 0 < y.sum() < len(y)
        rows.append({"term": t, "n_genes": int(len(y)), "n_positive": int(y.sum()),
                     "auc": float(roc_auc_score(y, s)) if ok else float("nan")})
    return pd.DataFrame(rows, columns=["term", "n_genes", "n_positive", "auc"])


def heldout_lr_auc(x: np.ndarray, labels: np.ndarray, fit: np.ndarray, test: np.ndarray
                   ) -> np.ndarray:
    """Per-label AUC of logistic regressions fit on some rows and scored on others.

    The model of `bin/evaluate --task=annotations` (`annotations.fit_and_score`: features
    z-scored with the fit rows' mean and deviation, one unpenalised logistic regression
    per label).

    Args:
      x: (n, D) features.
      labels: (n, T) in {0, 1}.
      fit, test: (n,) bool masks of the rows to fit on and to score.

    Returns:
      float64 (T,) AUCs; NaN where the fit or the test rows lack a positive or a negative.
    """
    from sklearn.metrics import roc_auc_score

    from ish_tf.evaluate.annotations import fit_and_score

    aucs = np.full(labels.shape[1], np.nan)
    for j in range(labels.shape[1]):
        y_fit, y_test = labels[fit, j], labels[test, j]
        if 0 < y_fit.sum() < len(y_fit) and 0 < y_test.sum() < len(y_test):
            scores, _ = fit_and_score(x[fit], y_fit, x[test])
            aucs[j] = roc_auc_score(y_test, scores)
    return aucs


def codes_term_auc(encoder: keras.Model, records_dir: str, terms: Sequence[str],
                   groups: dict[str, set[str]], split: str = "test",
                   fit_splits: Sequence[str] = ("train", "validation"),
                   batch_size: int = 64) -> pd.DataFrame:
    """Per-term AUC of codes + logistic regression on the same held-out genes as `term_auc`.

    The two-stage alternative to the supervised model: gene codes (image codes averaged
    per gene) of the annotated `fit_splits` genes fit `heldout_lr_auc`'s regressions,
    which score the annotated `split` genes.

    Returns:
      Columns term, n_genes, n_positive, auc (as `term_auc`).
    """
    keys, codes = predict_records(encoder, records_dir, [*fit_splits, split], batch_size)
    _, matrix, annotated = term_matrix(records_dir, groups, terms)
    frame = pd.DataFrame(codes).assign(gene_index=keys["gene_index"].to_numpy(),
                                       held_out=(keys["split"] == split).to_numpy())
    per_gene = frame.groupby("gene_index").mean()
    idx = per_gene.index.to_numpy()
    held_out = per_gene.pop("held_out").to_numpy() > 0.5
    keep = annotated[idx]
    labels = matrix[idx]
    test = keep & held_out
    aucs = heldout_lr_auc(per_gene.to_numpy(), labels, keep & ~held_out, test)
    return pd.DataFrame({"term": list(terms), "n_genes": int(test.sum()),
                         "n_positive": labels[test].sum(axis=0).astype(int), "auc": aucs},
                        columns=["term", "n_genes", "n_positive", "auc"])


def code_reliance(model: keras.Model, images: np.ndarray, invert: bool = True,
                  batch_size: int = 64) -> dict[str, float]:
    """How much a CDAE's reconstructions depend on its code.

    With switch unpooling the decoder also sees where each pooling window's maximum
    was, which can be enough to redraw a section without the code. This compares the
    reconstruction error (mean squared, in the model's [0, 1] space) of the model as it
    is, of the same model with every image given the MEAN code of `images` (the code
    layer's kernel zeroed and its bias set to that mean; the switches still come from
    each image), and of the mean image itself.

    Args:
      model: a CDAE (outputs [code, reconstruction]); its weights are restored afterwards.
      images: float (N, H, W, 1) pixels in [0, 255], N >= 2.
      invert: the model's --cdae_invert.
      batch_size: images per call.

    Returns:
      {"mse": ..., "mse_mean_code": ..., "mse_mean_image": ..., "code_share": the share
      of the model's gain over the mean image that is lost without each image's own
      code, (mse_mean_code - mse) / (mse_mean_image - mse); ~0 when the code is
      bypassed, ~1 when the decoder draws from the code alone}.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"code_reliance: need (N >= 2, H, W, 1) images, got {images.shape}")
    target = np.asarray(scale_images(images, invert))

    def run() -> tuple[np.ndarray, np.ndarray]:
        codes, recons = [], []
        for i in range(0, len(images), batch_size):
            code, recon = model(images[i:i + batch_size], training=False)
            codes.append(np.asarray(code))
            recons.append(np.asarray(recon))
        return np.concatenate(codes), np.concatenate(recons)

    codes, recon = run()
    layer = model.get_layer("code")
    kernel, bias = layer.get_weights()
    try:
        layer.set_weights([np.zeros_like(kernel), codes.mean(axis=0).astype(bias.dtype)])
        _, mean_code_recon = run()
    finally:
        layer.set_weights([kernel, bias])
    mse = float(np.mean((recon - target) ** 2))
    mse_mean_code = float(np.mean((mean_code_recon - target) ** 2))
    mse_mean_image = float(np.mean((target - target.mean(axis=0)) ** 2))
    gap = mse_mean_image - mse
    return {"mse": mse, "mse_mean_code": mse_mean_code, "mse_mean_image": mse_mean_image,
            "code_share": float((mse_mean_code - mse) / gap) if gap > 0 else float("nan")}


def gene_tables(keys: pd.DataFrame, values: np.ndarray, source: str):
    """(image table, gene table) EmbeddingTables of per-image vectors."""
    from ish_tf.data.embeddings import EmbeddingTable, aggregate

    image = EmbeddingTable(keys.drop(columns=["gene_index"], errors="ignore").reset_index(drop=True),
                           values.astype(np.float32), source)
    return image, aggregate(image, ("gene_symbol",))


def whole_pixels(records_dir: str, split: str | Sequence[str], height: int, width: int
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """The grayscale whole sections of the split(s) as stored, in record order.

    Returns:
      (keys as `predict_records`, float32 (N, height, width, 1) pixels in [0, 255]).
    """
    identity = keras.Sequential([keras.Input((height, width, 1)), keras.layers.Identity()])
    keys, pixels = predict_records(identity, records_dir, split)
    return keys, pixels.reshape(-1, height, width, 1)


def pixel_pca(records_dir: str, n_components: int, height: int, width: int,
              splits: Sequence[str] = ("train", "validation", "test"), seed: int = 0,
              invert: bool = True):
    """Baseline: raw downsampled pixels reduced by PCA to `n_components` values per image.

    PCA is fit on the train split's images only and applied to all, like the encoder.

    Returns:
      (image EmbeddingTable, gene EmbeddingTable).
    """
    from sklearn.decomposition import PCA

    keys, pixels = whole_pixels(records_dir, list(splits), height, width)
    pixels = np.asarray(scale_images(pixels, invert)).reshape(len(pixels), -1)
    train = (keys["split"] == "train").to_numpy()
    k = min(n_components, int(train.sum()) - 1, pixels.shape[1])
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(pixels[train])
    return gene_tables(keys, pca.transform(pixels).astype(np.float32), "pixels_pca")


def untrained_encoder(model_config: ModelConfig, records_dir: str,
                      splits: Sequence[str] = ("train", "validation", "test"),
                      recalibrate: bool = True):
    """Baseline: codes of the randomly initialised encoder (same config and seed).

    As for a trained CDAE (`CDAETask.finalize_model`), with batch normalisation its
    statistics are estimated on the first `bn_images` images of the training split's
    stream (clean, seeded, unflipped) unless `recalibrate` is False, when they keep their
    initial values (mean 0, variance 1: the layers pass their inputs through).

    Returns:
      (image EmbeddingTable, gene EmbeddingTable).
    """
    from ish_tf.models import build_model

    cfg = dataclasses.replace(model_config, model="cdae",
                              options={**model_config.options, "init_from": ""})
    model = build_model(cfg)
    opts = cdae_options(cfg)
    bn_images = int(cfg.option("bn_images", DEFAULT_BN_IMAGES))
    if recalibrate and opts["norm"] == "batch" and bn_images > 0:
        stream = whole_dataset(records_dir, "train", batch_size=int(cfg.option("batch_size", 32)),
                               height=opts["height"], width=opts["width"], seed=cfg.seed or 0)
        recalibrate_batch_norm(model, (element["images"] for element in stream), bn_images)
    encoder = encoder_model(model)
    keys, codes = predict_records(encoder, records_dir, list(splits))
    return gene_tables(keys, codes, "untrained_encoder")


# --------------------------------------------------------------------------- command line
def _load_run(run_dir: str) -> tuple[ModelConfig, dict, keras.Model | None]:
    from ish_tf.models import load_model_config

    config = load_model_config(os.path.join(run_dir, "model_config.json"))
    with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
        train = json.load(f)
    path = os.path.join(run_dir, "model.keras")
    model = keras.saving.load_model(path, compile=False) if os.path.isfile(path) else None
    return config, train, model


class CdaeRunError(ValueError):
    """A run that cannot be scored; the message names the run or model."""


def write_term_auc(run_dir: str, records_dir: str = "", split: str = "test",
                   codes_run: str = "", out: str = "") -> tuple[pd.DataFrame, str, str]:
    """Scores a finished cdae_supervised run per term on `split`'s genes (`bin/cdae term_auc`).

    Next to the supervised AUCs (`auc`), the codes of `codes_run` (a CDAE run directory
    or .keras file; default: the run's --cdae_init_from) + logistic regression fit on the
    other splits' genes are scored on the same genes (`auc_codes_lr`).

    Args:
      run_dir: the cdae_supervised run.
      records_dir: whole-section records; empty = the run's.
      split: held-out split to score.
      codes_run: see above; empty = the run's --cdae_init_from, if any.
      out: directory of term_auc_{split}.csv; empty = run_dir.

    Returns:
      (the table, its path, a one-line summary).

    Raises:
      CdaeRunError: the run or the codes model cannot be loaded, or the run holds no
        finished cdae_supervised model.
    """
    config, train, model = _load_checked(run_dir)
    records_dir = records_dir or train.get("records_dir", "")
    if model is None or config.model != "cdae_supervised":
        raise CdaeRunError(f"{run_dir} holds no finished cdae_supervised model")
    groups = load_term_groups(config.option("gaf", ""), config.option("annotations", ""))
    terms = config.option("terms")
    table = term_auc(model, records_dir, terms, groups, split)
    codes_run = codes_run or str(config.option("init_from", "") or "")
    if codes_run:  # the two-stage alternative, on the same held-out genes
        try:  # a run directory or a .keras file, as --cdae_init_from takes
            cdae = keras.saving.load_model(cdae_model_path(codes_run, "--codes_run"),
                                           compile=False)
        except (OSError, ValueError) as e:
            raise CdaeRunError(str(e)) from e
        codes = codes_term_auc(encoder_model(cdae), records_dir, terms, groups, split)
        table["auc_codes_lr"] = codes["auc"].to_numpy()
    path = os.path.join(out or run_dir, f"term_auc_{split}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, table.to_csv(index=False))
    line = (f"term_auc: {int(table['auc'].notna().sum())} of {len(table)} terms scored on "
            f"{split} genes, mean AUC supervised {table['auc'].mean():.3f}")
    if codes_run:
        line += f", codes of {codes_run} + logistic regression {codes['auc'].mean():.3f}"
    return table, path, line


def write_baselines(run_dir: str, records_dir: str = "", out: str = "") -> list[str]:
    """The baselines of a CDAE run, as embedding tables (`bin/cdae baselines`).

    Writes, to `out` (default RUN/baselines), image- and gene-level tables of pixel PCA
    to the code size and of the untrained encoder (the run's seed), and for a finished
    cdae run code_reliance.json (how much the decoder takes from the code vs the
    switches, on up to 512 training images).

    Returns:
      One summary line per thing written.

    Raises:
      CdaeRunError: the run cannot be loaded.
    """
    from ish_tf.data.embeddings import write_embedding_table

    config, train, model = _load_checked(run_dir)
    records_dir = records_dir or train.get("records_dir", "")
    out = out or os.path.join(run_dir, "baselines")
    os.makedirs(out, exist_ok=True)
    opts = cdae_options(config)
    made = {"pixels_pca": pixel_pca(records_dir, opts["code_size"], opts["height"],
                                    opts["width"], seed=config.seed or 0,
                                    invert=opts["invert"]),
            "untrained_encoder": untrained_encoder(config, records_dir)}
    lines = []
    for name, (image, gene) in made.items():
        path = os.path.join(out, f"{name}_gene_embeddings.csv")
        write_embedding_table(os.path.join(out, f"{name}_image_embeddings.csv"), image)
        write_embedding_table(path, gene)
        lines.append(f"baselines: {name}: {len(gene)} genes x {gene.dim} -> {path}")
    if model is not None and config.model == "cdae":
        pixels = whole_pixels(records_dir, "train", opts["height"], opts["width"])[1]
        reliance = code_reliance(model, pixels[:512], invert=opts["invert"])
        path = os.path.join(out, "code_reliance.json")
        atomic_write_text(path, json.dumps(reliance, indent=1))
        lines.append(f"baselines: reconstruction mse {reliance['mse']:.5f}, with every image "
                     f"given the mean code {reliance['mse_mean_code']:.5f}, mean image "
                     f"{reliance['mse_mean_image']:.5f}: the code accounts for "
                     f"{reliance['code_share']:.0%} of the gain over the mean image -> {path}")
    return lines


def _load_checked(run_dir: str):
    try:
        return _load_run(run_dir)
    except (OSError, ValueError) as e:
        raise CdaeRunError(f"{run_dir}: {e}") from e
