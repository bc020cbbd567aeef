"""Training tasks of the CDAE family (`--model=cdae`, `--model=cdae_supervised`).

* `cdae`: denoising reconstruction. Batches are `{"images": float32 (b, S_h, S_w, 1)
  in [0, 255], "step": int64 scalar}` (the global step of the batch: it seeds the
  corruption, so a resumed run corrupts exactly as an uninterrupted one, and times
  the reconstruction images). The clean image scaled to the model's [0, 1] space is
  the target; while training the input is corrupted in that space (`noise`
  = none | gaussian (std = `noise_level`) | masking (a fraction `noise_level` of
  pixels set to 0, i.e. to background) | salt_pepper (a fraction set to 0 or 1)).
  Loss (`loss`): per-pixel mse or binary cross-entropy, averaged over the global batch.
  Stats: mse, mae (always, [0, 1] units, against the clean target) and code_rms.
  Before model.keras is written, the batch-norm statistics are re-estimated on
  `bn_images` clean training images (`finalize_model`; the checkpoints keep the moving
  averages of the corrupted inputs).
* `cdae_supervised`: the CDAE encoder + a sigmoid head over annotation terms
  (`gaf` or `annotations`, terms with `term_min_genes`..`term_max_genes`
  training genes; `ish_tf.families.cdae.terms`); labels joined to records by gene_index
  at dataset time. Loss: mean binary cross-entropy over terms; stats: bce, accuracy,
  positive_rate. After training, `bin/cdae term_auc` reports per-term AUC on held-out
  genes (`ish_tf.families.cdae.baselines`).

Both read whole-section records (`bin/extract --whole_images`) through
`ish_tf.families.cdae.data.whole_dataset`; the global batch is `--cdae_batch_size`.

TensorBoard: `image_summaries` (step 0) shows inputs, corrupted inputs and the
untrained reconstructions; every `image_every` steps the cdae task writes
[clean | corrupted | reconstruction] strips to RUN/logs/reconstruction.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from ish_tf.families import ModelConfig
from ish_tf.families.cdae.config import LOSSES, NOISES
from ish_tf.families.cdae.data import invert_mismatch, to_gray, unpack_batch, whole_dataset
from ish_tf.families.cdae.model import (
    cdae_options,
    scale_images,
    unscale_images,
)
from ish_tf.families.cdae.terms import load_term_groups, term_matrix
from ish_tf.models.batch_norm import recalibrate_batch_norm
from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean

RECON_LOG = "reconstruction"
TERMS_NAME = "terms.csv"
_EPS = 1e-7


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


# --------------------------------------------------------------------------- cdae task
class _WholeTask(Task):
    """Shared pieces: batch size from the config, the model kept for image summaries."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.opts = cdae_options(model_config)  # fail at construction on bad options
        self.batch_size = int(model_config.family.batch_size)
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
            self.model_config = dataclasses.replace(self.model_config, family=dataclasses.replace(
                self.model_config.family, pool_implementation="window"))
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



class CDAETask(_WholeTask):
    """Denoising reconstruction of whole sections (see the module docstring)."""

    stat_names = ("mse", "mae", "code_rms")

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.noise = str(model_config.family.noise)
        self.noise_level = float(model_config.family.noise_level)
        self.loss = str(model_config.family.loss)
        if self.noise not in NOISES:
            raise ValueError(f"--cdae_noise must be one of {NOISES}, got {self.noise!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--cdae_loss must be one of {LOSSES}, got {self.loss!r}")
        if self.noise_level < 0 or (self.noise != "gaussian" and self.noise_level > 1):
            raise ValueError(f"--cdae_noise_level must be in [0, 1] for {self.noise}, got "
                             f"{self.noise_level}")
        self.image_every = int(model_config.family.image_every)
        self.bn_images = int(model_config.family.bn_images)
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
        batches = (to_gray(unpack_batch(element)[0]) for element in self.make_dataset(None, 0))
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
        images, step, _ = unpack_batch(batch)
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
        images, step, _ = unpack_batch(batch)
        target, noisy = self.corrupted(images[:4], step)
        out = {"cdae_inputs": self._display(target), "cdae_noisy_inputs": self._display(noisy)}
        if self._model is not None:
            _, recon = self._model(unscale_images(noisy, self.opts["invert"]), training=False)
            out["cdae_reconstructions"] = self._display(tf.cast(recon, tf.float32))
        return out



class CDAESupervisedTask(_WholeTask):
    """Encoder + multi-label sigmoid head over annotation terms (see the module docstring).

    The selected terms are stored in `model_config.family.terms` (so the run's
    model_config.json rebuilds the same head) and in RUN/terms.csv.
    """

    stat_names = ("bce", "accuracy", "positive_rate")

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.label_matrix: np.ndarray | None = None
        if not model_config.family.terms and dataset_fn is None:
            groups = load_term_groups(model_config.family.gaf,
                                      model_config.family.annotations)
            terms, self.label_matrix, _ = term_matrix(
                self._require_records(), groups,
                min_genes=int(model_config.family.term_min_genes),
                max_genes=int(model_config.family.term_max_genes))
            model_config.family.terms = tuple(terms)
        elif model_config.family.terms and dataset_fn is None:
            groups = load_term_groups(model_config.family.gaf,
                                      model_config.family.annotations)
            _, self.label_matrix, _ = term_matrix(self._require_records(), groups,
                                                  model_config.family.terms)
        if not model_config.family.terms:
            raise ValueError("cdae_supervised: no terms to predict")

    def build_model(self) -> keras.Model:
        model = super().build_model()
        path = os.path.join(self.train_config.run_dir, TERMS_NAME)
        os.makedirs(self.train_config.run_dir, exist_ok=True)
        pd.DataFrame({"term": list(self.model_config.family.terms)}).to_csv(path, index=False)
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
        images, _, labels = unpack_batch(batch)
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
        images, _, _ = unpack_batch(batch)
        return {"cdae_supervised_inputs": tf.clip_by_value(to_gray(images[:4]) / 255.0, 0.0, 1.0)}


# --------------------------------------------------------------------------- evaluation
