"""Dense prediction of ISH CNN models over whole sections, and Dice against spot-derived truth.

Dense prediction (`dense_probabilities`): each patch classifier is evaluated at
window centres on a grid of step `stride` covering the section (reflect padding at
the borders, the patch convention of `ish_tf.families.ish_cnn.spatial`), either

* "dense": the classifier's fully convolutional twin (`ish_cnn.dense_model`) on the
  padded section, whose output cells are the windows at multiples of its total
  stride s; strides below s are obtained by shift-and-stitch (s/stride shifted
  passes per axis), multiples of s by subsampling; large sections are processed in
  tiles; or
* "sliding": windows cropped and classified in batches (any stride; slower).

Each pixel takes the probabilities of its nearest centre, giving (H, W, C) maps per
patch size; the ensemble is their mean. Class maps are the argmax.

Ground truth (`rasterize_truth`) on an independent section: gene g = pixels closer
than `radius` to a spot of g (pixels near spots of two genes are ignored), general
tissue = the rest of the tissue mask, background = the rest. `dice_scores` gives
per-class Dice 2|P∩T| / (|P| + |T|) over non-ignored pixels (NaN when a class is
absent from both), and the tables add the mean over classes, the pixel accuracy and
two baselines: the majority class of the truth everywhere, and labels drawn at
random with the truth's class frequencies.

`run_segmentation` (`bin/predict`) writes OUT/dice.csv, OUT/maps/*.png (class
overlays on the section, the truth included), OUT/classes.csv and OUT/report.html.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ish_tf.families.ish_cnn import sections, spatial
from ish_tf.io_utils import atomic_path, atomic_write_text

IGNORE = -1
METHODS = ("dense", "sliding")
DICE_NAME = "dice.csv"
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (128, 128, 0)]
_TISSUE_COLOR = (255, 225, 25)
_BACKGROUND_COLOR = (40, 40, 160)


class SegmentationError(ValueError):
    """Models, sections or settings that cannot be evaluated; the message names them."""


# --------------------------------------------------------------------------- prediction
def check_stride(stride: int, native: int) -> int:
    """The prediction stride for a model of native stride `native` (0 = native).

    Raises:
      SegmentationError: a stride that neither divides nor is a multiple of `native`.
    """
    t = int(stride) or native
    if t < 1 or (t % native and native % t):
        raise SegmentationError(f"--predict_stride={stride} must divide or be a multiple of the "
                                f"model's native stride {native} (or 0 for the native stride)")
    return t


def _grid_shape(shape: tuple[int, int], t: int) -> tuple[int, int]:
    return math.ceil(shape[0] / t), math.ceil(shape[1] / t)


def grid_to_pixels(grid: np.ndarray, shape: tuple[int, int], t: int) -> np.ndarray:
    """Per-pixel values from a grid of centres at multiples of `t` (nearest centre).

    Args:
      grid: (gh, gw, C) values at centres (i t, j t).
      shape: (H, W) of the section.
      t: grid step.

    Returns:
      (H, W, C).
    """
    h, w = shape
    iy = np.minimum((np.arange(h) + t // 2) // t, grid.shape[0] - 1)
    ix = np.minimum((np.arange(w) + t // 2) // t, grid.shape[1] - 1)
    return grid[iy][:, ix]


def sliding_grid(model, image: np.ndarray, stride: int, batch_size: int = 256) -> np.ndarray:
    """Classifier outputs at centres (i t, j t) by cropping and classifying windows.

    Args:
      model: patch classifier (B, R, R, 3) -> (B, C).
      image: uint8 (H, W) section.
      stride: grid step t >= 1.
      batch_size: windows per call.

    Returns:
      float32 (ceil(H/t), ceil(W/t), C).
    """
    from ish_tf.families.ish_cnn.model import patch_size_of, predict_windows

    size = patch_size_of(model)
    gh, gw = _grid_shape(image.shape, stride)
    padded = spatial.pad_for_patches(image, size)
    ys, xs = np.meshgrid(np.arange(gh) * stride, np.arange(gw) * stride, indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    n_classes = int(model.output_shape[-1])
    out = np.empty((len(xs), n_classes), np.float32)
    # Crop in chunks so memory stays at one batch of windows.
    for i in range(0, len(xs), batch_size):
        win = spatial.crop_patches(image, xs[i:i + batch_size], ys[i:i + batch_size], size, padded)
        out[i:i + batch_size] = predict_windows(model, win, batch_size)
    return out.reshape(gh, gw, n_classes)


def dense_grid(model, image: np.ndarray, stride: int = 0, tile: int = 1024,
               dense=None) -> np.ndarray:
    """Classifier outputs at centres (i t, j t) with the fully convolutional twin.

    Args:
      model: patch classifier built by `build_ish_cnn` (chain of conv/pool/dense).
      image: uint8 (H, W) section.
      stride: grid step t (0 = the model's native stride s); must divide or be a
        multiple of s.
      tile: most output cells per tile side (bounds memory on large sections).
      dense: `dense_model(model)` when already built.

    Returns:
      float32 (ceil(H/t), ceil(W/t), C).

    Raises:
      SegmentationError: incompatible stride.
    """
    from ish_tf.families.ish_cnn.model import dense_model, patch_size_of, stride_of

    size, s = patch_size_of(model), stride_of(model)
    t = check_stride(stride, s)
    dense = dense or dense_model(model)
    h, w = image.shape
    gh, gw = _grid_shape((h, w), t)
    n_classes = int(model.output_shape[-1])
    grid = np.zeros((gh, gw, n_classes), np.float32)
    pad = size + s
    padded = spatial.pad_for_patches(image, size, extra=s).astype(np.float32)
    step = min(t, s)
    # Window of centre c starts at padded coordinate c - size//2 + pad.
    base = pad - size // 2
    offsets = range(0, s, step)
    for oy in offsets:
        for ox in offsets:
            ni = math.ceil((h - oy) / s)
            nj = math.ceil((w - ox) / s)
            for ti in range(0, ni, tile):
                for tj in range(0, nj, tile):
                    ci, cj = min(tile, ni - ti), min(tile, nj - tj)
                    y0, x0 = base + oy + ti * s, base + ox + tj * s
                    crop = padded[y0:y0 + (ci - 1) * s + size, x0:x0 + (cj - 1) * s + size]
                    x = np.repeat(crop[None, ..., None], 3, axis=-1)
                    out = np.asarray(dense(x, training=False))[0, :ci, :cj]
                    rows = np.arange(ti, ti + ci) * s + oy
                    cols = np.arange(tj, tj + cj) * s + ox
                    # With t a multiple of s, only every (t/s)-th native cell is kept.
                    keep_r = rows % t == 0
                    keep_c = cols % t == 0
                    if keep_r.any() and keep_c.any():
                        grid[np.ix_(rows[keep_r] // t, cols[keep_c] // t)] = out[keep_r][:, keep_c]
    return grid


def dense_probabilities(model, image: np.ndarray, stride: int = 0, method: str = "dense",
                        batch_size: int = 256, tile: int = 1024) -> tuple[np.ndarray, int]:
    """Per-pixel class probabilities of one patch classifier over a section.

    Args:
      model: patch classifier.
      image: uint8 (H, W).
      stride: centre grid step (0 = native stride for "dense", 4 for "sliding").
      method: "dense" or "sliding".
      batch_size: windows per call ("sliding").
      tile: output cells per tile side ("dense").

    Returns:
      (float32 (H, W, C) probabilities, the stride used).

    Raises:
      SegmentationError: unknown method or incompatible stride.
    """
    if method not in METHODS:
        raise SegmentationError(f"--predict_method must be one of {METHODS}, got {method!r}")
    image = np.asarray(image)
    if method == "dense":
        from ish_tf.families.ish_cnn.model import stride_of

        t = check_stride(stride, stride_of(model))
        grid = dense_grid(model, image, t, tile)
    else:
        t = int(stride) or 4
        grid = sliding_grid(model, image, t, batch_size)
    return grid_to_pixels(grid, image.shape, t), t


# --------------------------------------------------------------------------- truth, Dice
def rasterize_truth(shape: tuple[int, int], spots: pd.DataFrame, mask: np.ndarray,
                    genes: Sequence[str], radius: float) -> np.ndarray:
    """Ground-truth class map of a section from its spots and tissue mask.

    Args:
      shape: (H, W).
      spots: canonical frame (x, y, gene) in pixels.
      mask: bool (H, W) tissue mask.
      genes: gene classes 0..G-1 (tissue = G, background = G + 1).
      radius: disc radius around each spot, pixels.

    Returns:
      int32 (H, W) labels; `IGNORE` where discs of two genes overlap.
    """
    g = len(genes)
    truth = np.where(np.asarray(mask, bool), g, g + 1).astype(np.int32)
    count = np.zeros(shape, np.int32)
    for i, gene in enumerate(genes):
        sel = spots["gene"].to_numpy() == gene
        disc = spatial.disc_raster(shape, spots.loc[sel, "x"].to_numpy(),
                                   spots.loc[sel, "y"].to_numpy(), radius)
        truth[disc] = i
        count += disc
    truth[count > 1] = IGNORE
    return truth


def dice_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class Dice over pixels whose truth is not `IGNORE`.

    Args:
      pred: int (H, W) predicted labels.
      truth: int (H, W) true labels (`IGNORE` = not scored).
      n_classes: C.

    Returns:
      float64 (C,); NaN for a class absent from both prediction and truth.
    """
    valid = truth != IGNORE
    p, t = np.asarray(pred)[valid].astype(np.int64), truth[valid].astype(np.int64)
    both = np.bincount(t[p == t], minlength=n_classes)[:n_classes].astype(np.float64)
    pc = np.bincount(p, minlength=n_classes)[:n_classes].astype(np.float64)
    tc = np.bincount(t, minlength=n_classes)[:n_classes].astype(np.float64)
    denom = pc + tc
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * both / np.maximum(denom, 1), np.nan)


def baseline_maps(truth: np.ndarray, n_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The majority-class and random-label baselines for a truth map.

    Returns:
      {"majority": truth's most frequent class everywhere, "random": labels drawn
       independently per pixel with the truth's class frequencies}.
    """
    valid = truth[truth != IGNORE]
    freq = np.bincount(valid, minlength=n_classes)[:n_classes].astype(np.float64)
    if freq.sum() == 0:
        freq[:] = 1
    rng = np.random.default_rng([seed, 5])
    return {"majority": np.full(truth.shape, int(freq.argmax()), np.int32),
            "random": rng.choice(n_classes, size=truth.shape, p=freq / freq.sum()).astype(np.int32)}


def dice_row(name: str, pred: np.ndarray, truth: np.ndarray, classes: Sequence[str],
             **extra) -> dict:
    """One row of the Dice table: dice_<class> columns, mean_dice, pixel_accuracy."""
    d = dice_scores(pred, truth, len(classes))
    valid = truth != IGNORE
    row = {"model": name, **extra}
    row.update({f"dice_{c}": float(v) for c, v in zip(classes, d, strict=True)})
    row["mean_dice"] = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
    row["pixel_accuracy"] = float((np.asarray(pred)[valid] == truth[valid]).mean()) if valid.any() \
        else float("nan")
    return row


# --------------------------------------------------------------------------- overlays
def class_colors(n_classes: int) -> np.ndarray:
    """uint8 (C, 3): gene colours, then tissue (yellow) and background (dark blue)."""
    genes = [_PALETTE[i % len(_PALETTE)] for i in range(n_classes - 2)]
    return np.asarray([*genes, _TISSUE_COLOR, _BACKGROUND_COLOR], np.uint8)


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str, n_classes: int,
                 max_size: int = 1600) -> None:
    """PNG of the grey section with class colours blended in (genes stronger).

    Args:
      image: uint8 (H, W).
      labels: int (H, W) class map (`IGNORE` pixels untinted).
      path: output PNG, written atomically.
      n_classes: C (gene classes first, tissue and background last).
      max_size: longest side of the written image.
    """
    colors = class_colors(n_classes).astype(np.float32)
    alpha = np.full(n_classes, 0.6, np.float32)
    alpha[-2:] = 0.2  # tissue and background: a light tint keeps the nuclei visible
    rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=-1)
    valid = labels != IGNORE
    lab = np.where(valid, labels, 0)
    a = np.where(valid, alpha[lab], 0.0)[..., None]
    out = (1 - a) * rgb + a * colors[lab]
    im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    scale = min(1.0, max_size / max(im.size))
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


# --------------------------------------------------------------------------- stage
@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    """Settings of `bin/predict`.

    Attributes:
      model_dirs: training run directories (RUN/model.keras + model_config.json) or
        .keras files, one per patch size.
      image, spots, mask: the independent section (mask "" = computed).
      mask_config: `segment.MaskConfig` of a computed mask (None: the default, brightfield).
      out_dir: output directory.
      radius: disc radius of the gene truth, pixels.
      stride: centre grid step (0 = each model's native stride).
      method: "dense" or "sliding".
      spot_scale: spot units -> pixels.
      outside: "error" or "drop" spots outside the image.
      batch_size: windows per call of the sliding method.
      seed: seed of the random baseline.
      report: also write OUT/report.html.
    """

    model_dirs: tuple[str, ...]
    image: str
    spots: str
    out_dir: str
    mask: str = ""
    radius: float = 6.0
    stride: int = 4
    method: str = "dense"
    spot_scale: float = 1.0
    outside: str = "drop"
    batch_size: int = 256
    seed: int = 0
    report: bool = True
    mask_config: object = None
    max_pixels: int = sections.DEFAULT_MAX_PIXELS

    def validate(self) -> SegmentationConfig:
        """Checks the settings; returns self.

        Raises:
          SegmentationError: naming the flag at fault.
        """
        if not self.model_dirs:
            raise SegmentationError("--model_dirs is required: training runs (or .keras files), "
                                    "one per patch size")
        for name in ("image", "spots", "out_dir"):
            if not getattr(self, name):
                flag = {"image": "--section_image", "spots": "--spot_table", "out_dir": "--out"}[name]
                raise SegmentationError(f"{flag} is required")
        if self.method not in METHODS:
            raise SegmentationError(f"--predict_method must be one of {METHODS}, got {self.method!r}")
        if self.radius <= 0:
            raise SegmentationError(f"--truth_radius must be > 0, got {self.radius}")
        if self.stride < 0:
            raise SegmentationError(f"--predict_stride must be >= 0, got {self.stride}")
        return self


def load_classifier(path: str):
    """Loads a trained ISH CNN and its class names.

    Args:
      path: a run directory (model.keras + model_config.json) or a .keras file
        (class names then from a model_config.json beside it, else class_0..).

    Returns:
      (keras.Model, list of class names).

    Raises:
      SegmentationError: no model file, or class names that do not fit the outputs.
    """
    import keras

    from ish_tf.families import load_model_config

    model_path = os.path.join(path, "model.keras") if os.path.isdir(path) else path
    if not os.path.exists(model_path):
        raise SegmentationError(f"{path}: no model.keras (has the training run finished?)")
    model = keras.saving.load_model(model_path, compile=False)
    n = int(model.output_shape[-1])
    cfg_path = os.path.join(os.path.dirname(model_path), "model_config.json")
    classes = [f"class_{i}" for i in range(n)]
    if os.path.exists(cfg_path):
        try:
            listed = load_model_config(cfg_path).family.classes
        except ValueError as e:
            raise SegmentationError(str(e)) from e
        if listed:
            classes = [str(c) for c in listed]
    if len(classes) != n:
        raise SegmentationError(f"{cfg_path}: {len(classes)} class names for a model with {n} outputs")
    return model, classes


def run_segmentation(cfg: SegmentationConfig, log=None) -> dict:
    """Dense prediction of every model on the section, the ensemble, Dice, overlays, report.

    Args:
      cfg: settings.
      log: optional `fn(str)` for progress lines.

    Returns:
      {"table": Dice DataFrame, "dice_csv", "maps": {name: png}, "report": path or "",
       "classes": list}.

    Raises:
      SegmentationError: models with different classes, bad settings or inputs.
      ish_tf.families.ish_cnn.spatial.SpatialError: unreadable section inputs.
    """
    from ish_tf.families.ish_cnn.model import patch_size_of

    cfg.validate()
    log = log or (lambda s: None)
    models = []
    for path in cfg.model_dirs:
        model, classes = load_classifier(path)
        models.append((path, model, classes))
    classes = models[0][2]
    for path, _, c in models[1:]:
        if c != classes:
            raise SegmentationError(f"{path}: classes {c} differ from {cfg.model_dirs[0]}'s {classes}")
    if classes[-2:] != [spatial.TISSUE, spatial.BACKGROUND]:
        raise SegmentationError(f"{cfg.model_dirs[0]}: classes {classes} must end with "
                                f"'{spatial.TISSUE}', '{spatial.BACKGROUND}' (an ISH CNN run)")
    genes = classes[:-2]
    section = sections.load_section(cfg.image, cfg.spots, cfg.mask, scale=cfg.spot_scale,
                                   genes=genes, outside=cfg.outside,
                                   mask_config=cfg.mask_config, max_pixels=cfg.max_pixels)
    truth = rasterize_truth(section.shape, section.spots, section.mask, genes, cfg.radius)
    maps_dir = os.path.join(cfg.out_dir, "maps")
    os.makedirs(maps_dir, exist_ok=True)
    n = len(classes)
    rows, figures, maps, probs_sum = [], [], {}, None
    truth_png = os.path.join(maps_dir, "truth.png")
    save_overlay(section.image, truth, truth_png, n)
    maps["truth"] = truth_png
    figures.append(("Ground truth: spot discs (genes), tissue mask, background", truth_png))
    names_seen: set[str] = set()
    for path, model, _ in models:
        size = patch_size_of(model)
        name = f"p{size}"
        if name in names_seen:
            name = f"{name}_{os.path.basename(os.path.normpath(path))}"
        names_seen.add(name)
        probs, used = dense_probabilities(model, section.image, cfg.stride, cfg.method,
                                          cfg.batch_size)
        probs_sum = probs if probs_sum is None else probs_sum + probs
        pred = probs.argmax(-1).astype(np.int32)
        row = dice_row(name, pred, truth, classes, patch_size=size, stride=used)
        rows.append(row)
        png = os.path.join(maps_dir, f"{name}.png")
        save_overlay(section.image, pred, png, n)
        maps[name] = png
        figures.append((f"{name}: mean Dice {row['mean_dice']:.3f}", png))
        log(f"{name}: mean Dice {row['mean_dice']:.3f} (stride {used})")
    ensemble = (probs_sum / len(models)).argmax(-1).astype(np.int32)
    ens = dice_row("ensemble", ensemble, truth, classes, patch_size=0, stride=cfg.stride)
    rows.append(ens)
    png = os.path.join(maps_dir, "ensemble.png")
    save_overlay(section.image, ensemble, png, n)
    maps["ensemble"] = png
    figures.insert(1, (f"Ensemble (mean of {len(models)} probability maps): mean Dice "
                       f"{ens['mean_dice']:.3f}", png))
    for name, pred in baseline_maps(truth, n, cfg.seed).items():
        rows.append(dice_row(f"baseline_{name}", pred, truth, classes, patch_size=0, stride=0))
    table = pd.DataFrame(rows)
    dice_csv = os.path.join(cfg.out_dir, DICE_NAME)
    atomic_write_text(dice_csv, table.to_csv(index=False))
    atomic_write_text(os.path.join(cfg.out_dir, "classes.csv"),
                      pd.DataFrame({"label": range(n), "class_name": classes,
                                    "color": ["#{:02x}{:02x}{:02x}".format(*c) for c in class_colors(n)]}
                                   ).to_csv(index=False))
    report = ""
    if cfg.report:
        from ish_tf.evaluate.report import Section, write_report

        text = (f"Per-pixel classes of {cfg.image} predicted by {len(models)} ISH CNN(s) "
                f"({cfg.method} prediction) and their ensemble (mean of the probability maps), "
                f"scored by Dice against the section's own spots rasterised to discs of radius "
                f"{cfg.radius:g} px (genes), its tissue mask (tissue) and the rest (background). "
                "Baselines: the truth's majority class everywhere, and random labels drawn "
                "with the truth's class frequencies.")
        settings = {k: v for k, v in dataclasses.asdict(cfg).items()}
        settings["classes"] = classes
        report = write_report(cfg.out_dir, [Section(
            title="ISH CNN segmentation (Dice on an independent section)", text=text,
            tables=[("Dice per class", table)], figures=figures, settings=settings)],
            title="ish_tf ISH CNN segmentation", inputs={"section": cfg.image, "spots": cfg.spots,
                                                         "models": list(cfg.model_dirs)})
    atomic_write_text(os.path.join(cfg.out_dir, "segmentation.json"),
                      json.dumps({"classes": classes, "models": list(cfg.model_dirs),
                                  "dice_csv": dice_csv, "maps": maps}, indent=1) + "\n")
    return {"table": table, "dice_csv": dice_csv, "maps": maps, "report": report,
            "classes": classes}
