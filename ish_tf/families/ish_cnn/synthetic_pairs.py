"""Synthetic paired sections for the ISH CNN: nuclei images and spot tables of two "animals".

Each section is a brightfield-style grey image (white slide, pale tissue, dark nuclei)
of a tissue piece with a wavy outline. Ordinary nuclei fill the tissue; the cells of
each chosen gene's population have their own morphology, so that a CNN can learn to
recognise them from the nuclear stain alone:

* population 0: large, round, pale ("vesicular") nuclei with a dark rim and one or
  two dark nucleoli, spread uniformly;
* population 1: small, elongated, dense dark nuclei, concentrated in a band (a
  "layer") across the tissue;
* populations 2+: variants (size, elongation, darkness and texture shift with the
  index) spread uniformly.

Spot tables list, for the cells of each population, 1 + Poisson(spots_per_cell - 1)
transcripts scattered in the nucleus with Gaussian localisation noise, with a
fraction of cells missed entirely and false-positive spots of random chosen genes
on random tissue; decoy spots of a gene outside the chosen set sit on ordinary cells.
Every animal has its own outline, cell sizes, stain strength, slide level, blur and
noise, so the second section is an independent test of the first one's model.

Layout of `OUT`::

    OUT/sections.csv              animal, image, spots, mask, cells (relative paths)
    OUT/animal{k}.png             uint8 grey section image
    OUT/animal{k}_spots.csv       x, y, gene (pixels)
    OUT/animal{k}_mask.png        tissue mask (255 = tissue)
    OUT/animal{k}_cells.csv       x, y, population, radius_x, radius_y (ground truth)
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
from PIL import Image

from ish_tf.io_utils import atomic_path, atomic_write_text

SECTIONS_NAME = "sections.csv"
DECOY_GENE = "Decoy1"


@dataclasses.dataclass(frozen=True)
class SpatialSynthConfig:
    """Settings of the synthetic section pairs.

    Attributes:
      out_dir: output directory.
      genes: chosen genes; population i carries gene i.
      n_animals: sections to generate (one per animal; 2 = a train/test pair).
      height, width: image size in pixels.
      cell_density: ordinary nuclei per tissue pixel.
      gene_fraction: cells of each gene population per ordinary cell.
      spots_per_cell: mean detected spots of a detected gene cell (>= 1).
      miss_rate: probability that a gene cell has no detected spot.
      false_positive_rate: false-positive spots per true spot.
      decoy_rate: spots of a non-chosen gene per ordinary cell.
      jitter: standard deviation of the spot localisation noise, pixels.
      seed: seed of everything.
    """

    out_dir: str
    genes: tuple[str, ...] = ("Sst", "Pvalb")
    n_animals: int = 2
    height: int = 512
    width: int = 512
    cell_density: float = 0.004
    gene_fraction: float = 0.1
    spots_per_cell: float = 3.0
    miss_rate: float = 0.1
    false_positive_rate: float = 0.03
    decoy_rate: float = 0.05
    jitter: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.genes or len(set(self.genes)) != len(self.genes):
            raise ValueError(f"genes must be distinct and non-empty, got {self.genes}")
        if DECOY_GENE in self.genes:
            raise ValueError(f"{DECOY_GENE} is reserved for decoy spots")
        if self.n_animals < 1:
            raise ValueError(f"n_animals must be >= 1, got {self.n_animals}")
        if min(self.height, self.width) < 64:
            raise ValueError(f"sections must be at least 64 x 64, got {self.width} x {self.height}")
        for name in ("cell_density", "gene_fraction", "false_positive_rate", "decoy_rate",
                     "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.miss_rate < 1:
            raise ValueError(f"miss_rate must be in [0, 1), got {self.miss_rate}")
        if self.spots_per_cell < 1:
            raise ValueError(f"spots_per_cell must be >= 1, got {self.spots_per_cell}")


@dataclasses.dataclass(frozen=True)
class Morphology:
    """How the nuclei of one population look.

    Attributes:
      radius: mean minor radius, pixels.
      aspect: (low, high) range of major/minor radius ratio.
      absorbance: mean absorbance of the nucleus body.
      rim: extra absorbance of a 1.5 px rim (vesicular nuclei), 0 for none.
      nucleoli: number of dark nucleoli (0, 1 or 2 drawn up to this).
      texture: amplitude of the granular texture (relative absorbance noise).
    """

    radius: float
    aspect: tuple[float, float]
    absorbance: float
    rim: float = 0.0
    nucleoli: int = 0
    texture: float = 0.15


ORDINARY = Morphology(radius=4.2, aspect=(1.0, 1.35), absorbance=0.55, texture=0.25)


def population_morphology(i: int) -> Morphology:
    """Morphology of gene population `i` (0: vesicular, 1: small dense, 2+: variants)."""
    if i == 0:
        return Morphology(radius=6.8, aspect=(1.0, 1.15), absorbance=0.25, rim=0.6,
                          nucleoli=2, texture=0.1)
    if i == 1:
        return Morphology(radius=2.8, aspect=(2.0, 2.8), absorbance=1.1, texture=0.05)
    return Morphology(radius=3.5 + 0.8 * (i % 3), aspect=(1.3 + 0.3 * (i % 2), 1.8),
                      absorbance=0.8 + 0.1 * (i % 2), rim=0.3 * (i % 2), nucleoli=i % 2,
                      texture=0.3)


def tissue_outline(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A wavy elliptical tissue piece (low-order Fourier perturbation of the radius).

    Returns:
      bool (H, W), True inside the tissue.
    """
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    ry, rx = rng.uniform(0.36, 0.42) * height, rng.uniform(0.38, 0.44) * width
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = np.arctan2((yy - cy) / ry, (xx - cx) / rx)
    rad = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rad < r


def _place(rng: np.random.Generator, candidates_mask: np.ndarray, occupied: np.ndarray,
           n: int, radius: float, weight: np.ndarray | None = None,
           tries: int = 20) -> list[tuple[float, float]]:
    """Up to n centres in `candidates_mask` whose discs of `radius` miss `occupied`.

    Accepted discs are painted into `occupied` (in place), so later cells keep a
    centre distance of about the sum of the two radii (random sequential packing).
    """
    ys, xs = np.nonzero(candidates_mask)
    if len(xs) == 0 or n <= 0:
        return []
    p = None
    if weight is not None:
        p = weight[ys, xs].astype(np.float64)
        p = p / p.sum()
    picks = rng.choice(len(xs), size=n * tries, replace=True, p=p)
    h, w = occupied.shape
    r = int(math.ceil(radius))
    out = []
    for k in picks:
        if len(out) >= n:
            break
        x = xs[k] + rng.uniform(-0.5, 0.5)
        y = ys[k] + rng.uniform(-0.5, 0.5)
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= radius * radius
        if (occupied[y0:y1, x0:x1] & disc).any():
            continue
        occupied[y0:y1, x0:x1] |= disc
        out.append((x, y))
    return out


def _draw_nucleus(absorb: np.ndarray, rng: np.random.Generator, x: float, y: float,
                  rx: float, ry: float, angle: float, m: Morphology, strength: float) -> None:
    """Adds one nucleus's absorbance to `absorb` (in place)."""
    h, w = absorb.shape
    r = int(math.ceil(max(rx, ry))) + 2
    x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
    y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx - x, yy - y
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    d = np.sqrt(u * u + v * v)
    # Soft edge about one pixel wide.
    alpha = np.clip((1.0 - d) * min(rx, ry), 0.0, 1.0)
    body = m.absorbance * (1.0 + m.texture * rng.standard_normal(d.shape))
    if m.rim > 0:
        rim_width = 1.5 / min(rx, ry)
        body = body + m.rim * np.clip(1.0 - np.abs(d - (1.0 - rim_width)) / rim_width, 0, 1)
    for _ in range(rng.integers(1, m.nucleoli + 1) if m.nucleoli else 0):
        ox, oy = rng.uniform(-0.35, 0.35, 2)
        nx, ny = x + ox * rx, y + oy * ry
        body = body + 0.9 * np.clip(1.3 - np.hypot(xx - nx, yy - ny), 0, 1)
    absorb[y0:y1, x0:x1] += strength * alpha * np.maximum(body, 0.0)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float (H, W) array (edges replicated).

    Pillow blurs only 8-bit images; the rendering stays in float until the end.
    """
    if sigma <= 0:
        return np.asarray(a, np.float64)
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.asarray(a, np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(wt * np.take(p, np.arange(i, i + n), axis=axis) for i, wt in enumerate(k))
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean unit-ish noise smoothed at `scale` pixels."""
    h, w = shape
    small = rng.standard_normal((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    return big / max(float(big.std()), 1e-6)


def generate_section(cfg: SpatialSynthConfig, animal: int
                     ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Renders one animal's section.

    Args:
      cfg: settings.
      animal: animal index (seeds its outline, cells and acquisition effects).

    Returns:
      (image uint8 (H, W), mask bool (H, W), spots DataFrame x, y, gene,
       cells DataFrame x, y, population, radius_x, radius_y; population -1 = ordinary).
    """
    rng = np.random.default_rng([cfg.seed, 101, animal])
    h, w = cfg.height, cfg.width
    mask = tissue_outline(rng, h, w)
    # Animal effects: cell size, stain strength, slide level, blur and noise.
    size_scale = rng.uniform(0.93, 1.07)
    strength = rng.uniform(0.85, 1.15)
    slide_level = rng.uniform(232, 245)
    blur = rng.uniform(0.5, 0.8)
    noise_sd = rng.uniform(2.5, 4.0)

    area = int(mask.sum())
    n_ordinary = int(round(cfg.cell_density * area))
    occupied = ~mask.copy()
    cells = []
    # The band (a "layer") where population 1 concentrates.
    band_y = rng.uniform(0.35, 0.65) * h
    yy = np.arange(h, dtype=np.float64)[:, None]
    band = np.broadcast_to(np.exp(-0.5 * ((yy - band_y) / (0.08 * h)) ** 2) + 0.05, (h, w))
    for i, _gene in enumerate(cfg.genes):
        m = population_morphology(i)
        n = int(round(cfg.gene_fraction * n_ordinary))
        radius = m.radius * m.aspect[1] * size_scale + 1.0
        for x, y in _place(rng, mask, occupied, n, radius, band if i == 1 else None):
            cells.append((x, y, i, m))
    for x, y in _place(rng, mask, occupied, n_ordinary, ORDINARY.radius * 1.15 * size_scale + 0.5):
        cells.append((x, y, -1, ORDINARY))

    absorb = 0.12 * mask.astype(np.float64) * (1.0 + 0.25 * _smooth_noise(rng, (h, w), 12.0))
    rows = []
    for x, y, pop, m in cells:
        ry = max(1.2, rng.normal(m.radius, 0.1 * m.radius) * size_scale)
        rx = ry * rng.uniform(*m.aspect)
        angle = rng.uniform(0, np.pi)
        _draw_nucleus(absorb, rng, x, y, rx, ry, angle, m, strength)
        rows.append((x, y, pop, rx, ry))
    cells_df = pd.DataFrame(rows, columns=["x", "y", "population", "radius_x", "radius_y"])

    image = slide_level * np.exp(-absorb)
    image = gaussian_blur(image, blur)
    image = image + noise_sd * rng.standard_normal(image.shape)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    spots = make_spots(rng, cfg, cells_df, mask)
    return image, mask, spots, cells_df


def make_spots(rng: np.random.Generator, cfg: SpatialSynthConfig, cells: pd.DataFrame,
               mask: np.ndarray) -> pd.DataFrame:
    """Detected transcripts: gene cells' spots with noise and misses, false positives, decoys.

    Args:
      rng: generator.
      cfg: settings (rates, jitter).
      cells: the section's cells (see `generate_section`).
      mask: tissue mask (false positives fall on tissue).

    Returns:
      DataFrame x, y, gene (float pixels inside the image).
    """
    h, w = mask.shape
    xs, ys, genes = [], [], []
    n_true = 0
    for c in cells.itertuples():
        if c.population < 0:
            if rng.random() < cfg.decoy_rate:
                xs.append(c.x + rng.normal(0, cfg.jitter))
                ys.append(c.y + rng.normal(0, cfg.jitter))
                genes.append(DECOY_GENE)
            continue
        if rng.random() < cfg.miss_rate:
            continue
        n = 1 + rng.poisson(cfg.spots_per_cell - 1)
        # Uniform in the inner part of the nucleus, then localisation noise.
        t = rng.uniform(0, 2 * np.pi, n)
        r = 0.6 * np.sqrt(rng.uniform(0, 1, n))
        xs.extend(c.x + r * c.radius_x * np.cos(t) + rng.normal(0, cfg.jitter, n))
        ys.extend(c.y + r * c.radius_y * np.sin(t) + rng.normal(0, cfg.jitter, n))
        genes.extend([cfg.genes[c.population]] * n)
        n_true += n
    n_fp = rng.binomial(n_true, min(cfg.false_positive_rate, 1.0)) if n_true else 0
    tissue_y, tissue_x = np.nonzero(mask)
    if n_fp and len(tissue_x):
        k = rng.integers(0, len(tissue_x), n_fp)
        xs.extend(tissue_x[k] + rng.uniform(-0.5, 0.5, n_fp))
        ys.extend(tissue_y[k] + rng.uniform(-0.5, 0.5, n_fp))
        genes.extend(rng.choice(list(cfg.genes), n_fp))
    df = pd.DataFrame({"x": np.clip(np.asarray(xs, float), 0, w - 1),
                       "y": np.clip(np.asarray(ys, float), 0, h - 1), "gene": genes})
    return df.round({"x": 2, "y": 2})


def generate_pair(cfg: SpatialSynthConfig) -> pd.DataFrame:
    """Writes `cfg.n_animals` sections (image, spots, mask, cells) and `sections.csv`.

    Existing complete outputs of the same settings are rewritten identically (the
    generator is deterministic), so rerunning is safe.

    Args:
      cfg: settings.

    Returns:
      The sections table (animal, image, spots, mask, cells as paths under out_dir).
    """
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows = []
    for k in range(cfg.n_animals):
        image, mask, spots, cells = generate_section(cfg, k)
        stem = f"animal{k}"
        paths = {"image": f"{stem}.png", "spots": f"{stem}_spots.csv",
                 "mask": f"{stem}_mask.png", "cells": f"{stem}_cells.csv"}
        with atomic_path(os.path.join(cfg.out_dir, paths["image"])) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        with atomic_path(os.path.join(cfg.out_dir, paths["mask"])) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        atomic_write_text(os.path.join(cfg.out_dir, paths["spots"]), spots.to_csv(index=False))
        atomic_write_text(os.path.join(cfg.out_dir, paths["cells"]),
                          cells.round(3).to_csv(index=False))
        rows.append({"animal": k, **{key: os.path.join(cfg.out_dir, p) for key, p in paths.items()}})
    table = pd.DataFrame(rows)
    atomic_write_text(os.path.join(cfg.out_dir, SECTIONS_NAME), table.to_csv(index=False))
    return table
