"""The CDAE's baselines and scores after training (`bin/cdae baselines|term_auc`).

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

from ish_tf.export.saved_model import keras_file_problem
from ish_tf.families import ModelConfig
from ish_tf.families.cdae.data import whole_dataset
from ish_tf.families.cdae.model import (
    cdae_model_path,
    cdae_options,
    encoder_model,
    scale_images,
)
from ish_tf.families.cdae.terms import (
    codes_term_auc,
    load_term_groups,
    predict_records,
    term_auc,
)
from ish_tf.io_utils import atomic_write_text
from ish_tf.models.batch_norm import recalibrate_batch_norm


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
    from ish_tf.families import build_model

    cfg = dataclasses.replace(model_config, model="cdae",
                              family=dataclasses.replace(model_config.family, init_from=""))
    model = build_model(cfg)
    opts = cdae_options(cfg)
    bn_images = int(cfg.family.bn_images)
    if recalibrate and opts["norm"] == "batch" and bn_images > 0:
        # tf.data's seeded shuffle also takes TensorFlow's global seed: fix it as the
        # trainer does, so the images the statistics come from depend on the seed alone,
        # not on what ran before in the process (the quickstart runs every command in one).
        keras.utils.set_random_seed(cfg.seed or 0)
        stream = whole_dataset(records_dir, "train", batch_size=int(cfg.family.batch_size),
                               height=opts["height"], width=opts["width"], seed=cfg.seed or 0)
        recalibrate_batch_norm(model, (element["images"] for element in stream), bn_images)
    encoder = encoder_model(model)
    keys, codes = predict_records(encoder, records_dir, list(splits))
    return gene_tables(keys, codes, "untrained_encoder")


# --------------------------------------------------------------------------- command line
#: Families `bin/cdae baselines` accepts, and the one `bin/cdae term_auc` needs.
CDAE_FAMILIES = ("cdae", "cdae_supervised")


def _load_run(run_dir: str, families: Sequence[str] = CDAE_FAMILIES,
              tool: str = "baselines") -> tuple[ModelConfig, dict, keras.Model | None]:
    """The run's model config, train config and model.keras (None before the last step).

    Raises:
      CdaeRunError: a run whose model_config.json is not one of `families` (naming the
        run and its family), or a truncated or corrupt model.keras (naming it).
      OSError, ValueError: missing or unreadable config files.
    """
    from ish_tf.families import load_model_config

    config_path = os.path.join(run_dir, "model_config.json")
    config = load_model_config(config_path)
    if config.model not in families:
        raise CdaeRunError(f"{run_dir}: a {config.model!r} run ({config_path}), so it holds "
                           f"no finished {' or '.join(families)} model: bin/cdae {tool} needs "
                           f"a {' or '.join(repr(f) for f in families)} run")
    with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
        train = json.load(f)
    path = os.path.join(run_dir, "model.keras")
    model = None
    if os.path.isfile(path):
        problem = keras_file_problem(path)
        if problem is not None:
            raise CdaeRunError(f"{path}: {problem}; re-finish the training run {run_dir} "
                               f"(bin/train --flagfile={os.path.join(run_dir, 'flags.cfg')})")
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:  # Keras raises TypeError/ValueError for unknown layers etc.
            raise CdaeRunError(f"{path}: cannot load the Keras model "
                               f"({type(e).__name__}: {e})") from e
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
    config, train, model = _load_checked(run_dir, ("cdae_supervised",), "term_auc")
    records_dir = records_dir or train.get("records_dir", "")
    if model is None:
        raise CdaeRunError(f"{run_dir} holds no finished cdae_supervised model (no "
                           "model.keras: has the training run reached its last step?)")
    groups = load_term_groups(config.family.gaf, config.family.annotations)
    terms = config.family.terms
    table = term_auc(model, records_dir, terms, groups, split)
    codes_run = codes_run or str(config.family.init_from or "")
    if codes_run:  # the two-stage alternative, on the same held-out genes
        try:  # a run directory or a .keras file, as --cdae_init_from takes
            codes_path = cdae_model_path(codes_run, "--codes_run")
            problem = keras_file_problem(codes_path)
            if problem is not None:
                raise CdaeRunError(f"--codes_run={codes_run}: {codes_path}: {problem}")
            cdae = keras.saving.load_model(codes_path, compile=False)
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


def _load_checked(run_dir: str, families: Sequence[str] = CDAE_FAMILIES,
                  tool: str = "baselines"):
    try:
        return _load_run(run_dir, families, tool)
    except CdaeRunError:
        raise
    except (OSError, ValueError) as e:
        raise CdaeRunError(f"{run_dir}: {e}") from e

