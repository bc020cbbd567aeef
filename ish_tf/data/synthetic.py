"""Synthetic colorimetric ISH sections of a cortex-like tissue, with manifest and annotations.

The generator stands in for the Allen Human Brain (Cortex Study) images wherever real
data is absent: in tests, in the quickstart and in CI. It writes the same manifest
schema as the Allen fetcher (`ish_tf.data.manifest`), so nothing downstream can tell
the sources apart, plus the side tables evaluation needs:

    OUT/images/{image_id}.jpg   RGB section images (white slide, purple-blue stain)
    OUT/masks/{image_id}.png    the TRUE tissue mask, 0/255 (for segmentation IoU)
    OUT/manifest.csv            one row per image (manifest.COLUMNS, all filled)
    OUT/annotations.csv         Zeng et al. 2012-like table: gene_symbol, entrez_id,
                                level (- ... +++++), pattern (widespread | laminar |
                                scattered | sparse | ND), group, group_name,
                                layer_marker, cell_type, marker
    OUT/go.gaf, OUT/go.obo      GO-like gene groups (GAF 2.2) and their tiny ontology
    OUT/specs.json              the full gene and donor parameters (and the config),
                                also used to refuse resuming with a different config

How an image is made (`render_section`): a curved cortical band (pia on one side,
white matter on the other) on a near-white slide; six layers whose cell densities
differ per layer and per region (V1 has a thick, dense layer 4); three cell classes
(pyramidal-like excitatory neurons elongated along the radial axis, round
interneurons, small glia). Every cell is faintly visible; cells of the classes and
layers a gene is expressed in take up a purple-blue precipitate whose optical density
follows the gene's level (cytoplasmic: a paler nucleus, and a short apical dendrite
towards the pia on pyramidal cells). Optical densities add (Beer-Lambert) and are turned into RGB
against the donor's slide colour, then blurred and noised per donor.

Gene identity (stable across donors): per-layer profile, white-matter expression,
which cell classes express, expressing fraction, cell size and elongation, punctate vs
diffuse texture, neuropil haze, per-cell intensity spread and level. Genes of one
GO-like group share pattern, cell type, marker layers, size, shape and texture (with
noise, and 25% of members drawn off-prototype), so group prediction from embeddings is
possible but not trivial. Donor effects are nuisance: stain intensity, stain hue,
slide colour and brightness, tissue tint, blur and noise.

Determinism: gene and donor specs and the study design come from `seed`; each image is
rendered from an RNG seeded by (seed, image_id), so a resumed or partial run
reproduces exactly the same bytes.

Gene and donor specs and the annotation tables are in `ish_tf.data.synthetic_specs`;
this module renders sections and writes the dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ish_tf.data import manifest as manifest_lib
from ish_tf.data.synthetic_specs import (
    CELL_CLASSES,
    WM,
    DonorSpec,
    GeneSpec,
    annotation_table,
    gaf_text,
    make_donors,
    make_genes,
    obo_text,
    uniform,
)
from ish_tf.io_utils import atomic_path, atomic_write_text, progress, remove_stale_tmp

log = logging.getLogger(__name__)

# Relative density of each cell class per layer (L1..L6, white matter).
_DENSITY = {
    "excitatory": np.array([0.0, 1.0, 0.75, 0.95, 0.6, 0.75, 0.02]),
    "interneuron": np.array([0.06, 0.2, 0.18, 0.16, 0.16, 0.14, 0.01]),
    "glia": np.array([0.12, 0.1, 0.1, 0.1, 0.1, 0.12, 0.45]),
}
_BASE_DENSITY = 1.0 / 55.0  # cells per pixel at relative density 1
_CLASS_RADIUS = (2.2, 2.8, 1.5)  # pixels, before the gene's size factor
_TISSUE_VEC = np.array([0.42, 0.68, 0.30])  # pale lavender of unstained tissue
_FAINT_CELL_OD = 0.07  # every cell body is faintly visible


# ---------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """What `generate_dataset` makes. Defaults give a small set (24 genes x 4 donors).

    Attributes:
      out_dir: dataset directory (created).
      n_genes: number of genes (default 24).
      n_donors: number of donors (default 4).
      donors_per_gene: donors each gene is assayed in, >= 2 so that re-identification
        in another donor is possible (default 3, as for most Cortex Study genes).
      images_per_gene_donor: section images per (gene, donor) experiment (default 2).
      height, width: image size in pixels (default 256 x 256; the quickstart uses 384,
        tests 64..128). Cells keep their pixel size, the tissue band scales.
      regions: brain regions; images of an experiment alternate between them. "V1"
        gets primary-visual layering (thick layer 4), others association layering.
      seed: everything follows from it.
      jpeg_quality: JPEG quality of the images (default 90).
      study: the manifest's `study` value (default "synthetic").
      n_groups: number of GO-like gene groups (default 6).
      workers: 0 renders in this process; N > 0 uses N worker processes.
    """

    out_dir: str = "synthetic_data"
    n_genes: int = 24
    n_donors: int = 4
    donors_per_gene: int = 3
    images_per_gene_donor: int = 2
    height: int = 256
    width: int = 256
    regions: tuple[str, ...] = ("V1", "MTG")
    seed: int = 0
    jpeg_quality: int = 90
    study: str = "synthetic"
    n_groups: int = 6
    workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(str(r) for r in self.regions))
        checks = [
            ("n_genes", self.n_genes >= 1, "must be >= 1"),
            ("n_donors", self.n_donors >= 2, "must be >= 2 (re-identification needs another donor)"),
            ("donors_per_gene", 2 <= self.donors_per_gene <= self.n_donors,
             f"must be between 2 and n_donors={self.n_donors}"),
            ("images_per_gene_donor", self.images_per_gene_donor >= 1, "must be >= 1"),
            ("height", self.height >= 32, "must be >= 32 pixels"),
            ("width", self.width >= 32, "must be >= 32 pixels"),
            ("regions", len(self.regions) >= 1 and all(r.strip() for r in self.regions),
             "must name at least one region, none empty"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in 1..100"),
            ("study", bool(self.study.strip()), "must not be empty"),
            ("n_groups", 1 <= self.n_groups <= self.n_genes, f"must be between 1 and n_genes={self.n_genes}"),
            ("workers", self.workers >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r} {why}")


# --------------------------------------------------------------------------- geometry
def region_layers(region: str) -> np.ndarray:
    """Cumulative depth (fraction of cortical thickness) at the bottom of layers 1..6.

    Primary visual cortex ("V1", "VISp", "primary visual ...") has a thick layer 4;
    any other region gets association-cortex layering (thin layer 4).

    Returns:
      Shape (6,), increasing, last value 1.
    """
    name = region.strip().lower()
    if name in ("v1", "visp", "striate") or "primary visual" in name:
        return np.array([0.08, 0.15, 0.35, 0.60, 0.75, 1.0])
    return np.array([0.09, 0.17, 0.45, 0.53, 0.74, 1.0])


@dataclasses.dataclass(frozen=True)
class _Geometry:
    height: int
    width: int
    p0: np.ndarray  # a point on the pia, (2,) as (x, y)
    normal: np.ndarray  # unit vector from pia into depth
    curvature: float  # 1 / radius; > 0 bends around a deep centre (gyral crown)
    thickness: float  # cortical thickness, pixels
    wm_end: float  # depth (in thicknesses) where the section ends beyond white matter
    wobble: tuple[float, float, float]  # amplitude (px), angular frequency, phase
    bounds: np.ndarray  # (6,) cumulative layer bottoms

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth below the pia in units of cortical thickness (< 0: slide)."""
        # Python floats keep float32 grids in float32 (NumPy scalars would promote).
        nx, ny = float(self.normal[0]), float(self.normal[1])
        dx, dy = x - float(self.p0[0]), y - float(self.p0[1])
        tangent = dx * -ny + dy * nx
        if abs(self.curvature) < 1e-9:
            d = dx * nx + dy * ny
        else:
            radius = 1.0 / self.curvature
            d = radius - math.copysign(1.0, radius) * np.hypot(dx - radius * nx, dy - radius * ny)
        amp, freq, phase = (float(v) for v in self.wobble)
        return (d + amp * np.sin(tangent * freq + phase)) * (1.0 / self.thickness)

    def radial_angle(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angle of the radial (pia to white matter) direction at each point."""
        if abs(self.curvature) < 1e-9:
            return np.full(np.shape(x), math.atan2(self.normal[1], self.normal[0]))
        radius = 1.0 / self.curvature
        cx, cy = self.p0[0] + radius * self.normal[0], self.p0[1] + radius * self.normal[1]
        # Towards the centre of curvature for crowns, away from it for fundi.
        return np.arctan2((cy - y) * np.sign(radius), (cx - x) * np.sign(radius))

    def layer_of(self, depth: np.ndarray) -> np.ndarray:
        """Layer index per depth: -1 slide, 0..5 layers 1..6, 6 white matter, -1 past the end."""
        layer = np.searchsorted(self.bounds, depth, side="right").astype(np.int8)
        layer[(depth < 0) | (depth > self.wm_end)] = -1
        return layer


def _draw_geometry(rng: np.random.Generator, height: int, width: int, region: str) -> _Geometry:
    size = float(min(height, width))
    angle = uniform(rng, 0.0, 2.0 * math.pi)
    normal = np.array([math.cos(angle), math.sin(angle)])
    # Slide strip of 8..26% of the image before the pia, measured through the centre.
    centre = np.array([width / 2.0, height / 2.0])
    p0 = centre - normal * size * (0.5 - uniform(rng, 0.08, 0.26))
    curvature = uniform(rng, -1.0, 1.0) / (size * uniform(rng, 0.7, 2.5))
    bounds = region_layers(region) + np.concatenate([rng.uniform(-0.01, 0.01, 5), [0.0]])
    return _Geometry(
        height=height, width=width, p0=p0, normal=normal, curvature=curvature,
        thickness=size * uniform(rng, 0.5, 0.68), wm_end=uniform(rng, 1.25, 2.2),
        wobble=(size * uniform(rng, 0.0, 0.025), uniform(rng, 1.0, 3.0) * 2.0 * math.pi / size,
                uniform(rng, 0.0, 2.0 * math.pi)),
        bounds=np.sort(bounds))


# -------------------------------------------------------------------------- rendering
@dataclasses.dataclass(frozen=True)
class SectionRender:
    """Everything `render_section_full` knows about one rendered section.

    Attributes:
      rgb: uint8 (H, W, 3) image.
      mask: bool (H, W), True where tissue was drawn.
      layers: int8 (H, W): -1 slide, 0..5 cortical layers 1..6, 6 white matter.
      stain_od: float32 (H, W) optical density of the ISH precipitate before the
        donor's stain scale (what the gene put there, donor-free).
      n_cells: number of cell bodies drawn.
      n_expressing: number of cells expressing the gene.
      cell_layers: int8 (n_cells,) layer of each cell.
      cell_expressing: bool (n_cells,) whether each cell expresses.
    """

    rgb: np.ndarray
    mask: np.ndarray
    layers: np.ndarray
    stain_od: np.ndarray
    n_cells: int
    n_expressing: int
    cell_layers: np.ndarray
    cell_expressing: np.ndarray


def _splat(height: int, width: int, x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray,
           theta: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sums soft-edged ellipses into an (H, W) float32 image (vectorised over cells).

    Args:
      height, width: output size.
      x, y: (N,) centres in pixels.
      a, b: (N,) semi-axes along / across `theta`, pixels.
      theta: (N,) orientation, radians.
      weight: (N,) peak value of each ellipse.

    Returns:
      float32 (H, W); overlapping ellipses add (optical densities add).
    """
    if len(x) == 0:
        return np.zeros((height, width), dtype=np.float32)
    k = int(math.ceil(float(max(a.max(), b.max())))) + 1
    # Splat into a canvas padded by the stamp size (and by how far centres lie outside
    # the image), so no bounds test is needed; then crop.
    outside = max(0.0, float(-x.min()), float(x.max()) - width, float(-y.min()), float(y.max()) - height)
    pad = k + int(math.ceil(outside)) + 1
    pw = width + 2 * pad
    offs = np.arange(-k, k + 1, dtype=np.int32)
    ix, iy = np.floor(x).astype(np.int32), np.floor(y).astype(np.int32)
    px = (ix + pad)[:, None, None] + offs[None, None, :]  # (N, 1, K)
    py = (iy + pad)[:, None, None] + offs[None, :, None]  # (N, K, 1)
    dx = (offs[None, :] + (ix + 0.5 - x)[:, None]).astype(np.float32)[:, None, :]  # (N, 1, K)
    dy = (offs[None, :] + (iy + 0.5 - y)[:, None]).astype(np.float32)[:, :, None]  # (N, K, 1)
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    ia = (1.0 / a).astype(np.float32)[:, None, None]
    ib = (1.0 / b).astype(np.float32)[:, None, None]
    u = dx * (c * ia) + dy * (s * ia)
    v = dy * (c * ib) - dx * (s * ib)
    # Flat-topped body with a soft rim of about a third of the radius.
    val = u * u
    val += v * v
    np.subtract(np.float32(1.0), val, out=val)
    val *= np.float32(2.5)
    np.clip(val, np.float32(0.0), np.float32(1.0), out=val)
    val *= weight.astype(np.float32)[:, None, None]
    flat = py * pw + px  # (N, K, K)
    out = np.bincount(flat.ravel(), weights=val.ravel(), minlength=pw * (height + 2 * pad))
    return out.reshape(height + 2 * pad, pw)[pad:pad + height, pad:pad + width].astype(np.float32)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int = 6) -> np.ndarray:
    """A smooth random field in about [0, 1], float32 (H, W): bicubic upsampling of a coarse grid."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)


def _blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 (H, W) plane with reflected edges."""
    if sigma <= 0:
        return plane
    r = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = plane.shape
    p = np.pad(plane, ((0, 0), (r, r)), mode="reflect") if w > r else np.pad(plane, ((0, 0), (r, r)), mode="edge")
    rows = sum(t * p[:, i:i + w] for i, t in enumerate(taps))
    p = np.pad(rows, ((r, r), (0, 0)), mode="reflect") if h > r else np.pad(rows, ((r, r), (0, 0)), mode="edge")
    return sum(t * p[i:i + h] for i, t in enumerate(taps))


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), float32 (H, W) each; cached, read-only."""
    yy, xx = np.indices((height, width), dtype=np.float32) + np.float32(0.5)
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def render_section_full(gene: GeneSpec, donor: DonorSpec, rng: np.random.Generator,
                        height: int, width: int, region: str) -> SectionRender:
    """Renders one colorimetric ISH section of `gene` in `donor`, with its ground truth.

    The draws from `rng` do not depend on the gene's or the donor's parameters, so the
    same RNG state rendered for two donors (or two genes) gives the same tissue and
    cells, differing only by the donor's effects (or the gene's expression).

    Args:
      gene: what is expressed where.
      donor: stain and scan effects.
      rng: random generator for the section's geometry, cells and noise (consumed).
      height, width: image size in pixels.
      region: brain region name (sets the layering, see `region_layers`).

    Returns:
      A SectionRender (rgb (H, W, 3) uint8, mask (H, W) bool, layer map, ...).
    """
    f32 = np.float32
    geom = _draw_geometry(rng, height, width, region)
    xx, yy = _grid(height, width)
    depth = geom.depth(xx, yy).astype(f32)
    layers = geom.layer_of(depth)
    mask = layers >= 0

    # Cells: uniform candidates thinned by the per-layer, per-class density.
    dens = np.stack([_DENSITY[c] for c in CELL_CLASSES], axis=1)  # (7, 3)
    if geom.bounds[3] - geom.bounds[2] > 0.15:  # V1: the dense granular layer 4
        dens = dens.copy()
        dens[3, 0] *= 1.3
    max_total = float(dens.sum(axis=1).max())
    n_cand = int(rng.poisson(height * width * _BASE_DENSITY * max_total))
    cx = rng.uniform(0.0, width, n_cand)
    cy = rng.uniform(0.0, height, n_cand)
    pick = rng.random(n_cand) * max_total
    c_layer = geom.layer_of(geom.depth(cx, cy))
    cum = np.cumsum(dens[np.clip(c_layer, 0, WM)], axis=1)  # (n_cand, 3)
    keep = (c_layer >= 0) & (pick < cum[:, -1])
    c_class = np.minimum((pick[:, None] >= cum).sum(axis=1), 2)
    cx, cy, c_layer, c_class = cx[keep], cy[keep], c_layer[keep], c_class[keep]
    n = len(cx)

    # Every draw below has a fixed size, whatever the gene or donor (see docstring).
    size_jit = rng.uniform(0.8, 1.2, n)
    angle_jit = rng.normal(0.0, 0.25, n)
    express_draw = rng.random(n)
    intensity_draw = rng.normal(0.0, 1.0, n)
    grain = rng.standard_exponential((height, width), dtype=f32)
    tissue_field = _smooth_field(rng, height, width)
    section_scale = uniform(rng, 0.9, 1.1)
    smudge = uniform(rng, 0.0, 1.0) < 0.4
    smudge_xy = rng.uniform(0.0, 1.0, 2) * np.array([width, height])
    smudge_r = uniform(rng, 0.05, 0.15) * min(height, width)
    noise = rng.random((height, width, 3), dtype=f32)

    radial = geom.radial_angle(cx, cy) + angle_jit
    base_r = np.asarray(_CLASS_RADIUS)[c_class] * size_jit
    # Excitatory cells: pyramidal-like, elongated along the radial axis.
    faint = _splat(height, width, cx, cy, base_r * np.where(c_class == 0, 1.3, 1.0), base_r, radial,
                   np.full(n, _FAINT_CELL_OD))

    prop = gene.layer_propensity()[np.clip(c_layer, 0, WM)] * np.asarray(gene.class_weights)[c_class]
    expressing = express_draw < gene.fraction * prop
    ex = np.flatnonzero(expressing)
    r_ex = base_r[ex] * gene.cell_size
    elong = np.sqrt(np.where(c_class[ex] == 0, gene.elongation, 1.0))
    peak = gene.intensity * np.exp(gene.intensity_cv * intensity_draw[ex])
    # ISH signal is cytoplasmic: a cell body, minus a paler nucleus, and for pyramidal
    # cells a short apical dendrite pointing to the pia.
    pyr = c_class[ex] == 0
    back = -1.5 * r_ex[pyr] * elong[pyr]
    ang = radial[ex][pyr]
    stain = _splat(height, width, np.tile(cx[ex], 2), np.tile(cy[ex], 2),
                   np.concatenate([r_ex * elong, 0.45 * r_ex]), np.concatenate([r_ex / elong, 0.45 * r_ex]),
                   np.tile(radial[ex], 2), np.concatenate([peak, -0.45 * peak]))
    np.maximum(stain, 0.0, out=stain)
    stain += _splat(height, width, cx[ex][pyr] + back * np.cos(ang), cy[ex][pyr] + back * np.sin(ang),
                    1.1 * r_ex[pyr] * elong[pyr], np.full(int(pyr.sum()), 0.6), ang, 0.55 * peak[pyr])
    if gene.punctate > 0:  # granular precipitate: same mean, speckled
        stain *= f32(1.0 - gene.punctate) + f32(gene.punctate) * grain
    # Soft tissue edge (about 1.5 px) at the pia and at the end of the section.
    soft = np.clip(np.minimum(depth, f32(geom.wm_end) - depth) * f32(geom.thickness / 1.5), 0.0, 1.0)
    if gene.neuropil > 0 and gene.intensity > 0:  # haze following the layer profile
        edges = np.concatenate([[0.0], geom.bounds])
        centres = np.concatenate([(edges[:-1] + edges[1:]) / 2, [1.15]])
        haze = np.interp(depth, centres, gene.layer_propensity()).astype(f32)
        stain += f32(gene.intensity * gene.neuropil * min(1.0, gene.fraction * 3.0)) * haze * soft
    stain_od = stain

    # Two absorbers: unstained tissue (with faint cells, smudges) and the ISH stain.
    # Optical densities add (Beer-Lambert); the scan blur acts on both alike.
    tissue = soft * (f32(donor.tissue_od) * (f32(0.85) + f32(0.3) * tissue_field)
                     * np.where(layers == WM, f32(1.15), f32(1.0)) + faint)
    if smudge:  # a faint non-tissue mark on the slide (dust, mounting medium)
        d2 = ((xx - f32(smudge_xy[0])) ** 2 + (yy - f32(smudge_xy[1])) ** 2) * f32(1.0 / smudge_r ** 2)
        tissue += f32(0.04) * np.exp(-d2) * ~mask
    tissue = _blur(tissue, donor.blur_sigma)
    ink = _blur(stain * f32(donor.stain_scale * section_scale), donor.blur_sigma)
    od = tissue[..., None] * _TISSUE_VEC.astype(f32) + ink[..., None] * donor.stain_vector().astype(f32)
    rgb = np.asarray(donor.background, dtype=f32) * np.exp(-od)
    # Uniform noise with standard deviation noise_sd (cheaper than Gaussian, same role).
    rgb += (noise - f32(0.5)) * f32(donor.noise_sd * math.sqrt(12.0))
    return SectionRender(
        rgb=np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask=mask, layers=layers,
        stain_od=stain_od, n_cells=n, n_expressing=int(len(ex)),
        cell_layers=c_layer.astype(np.int8), cell_expressing=expressing)


def render_section(gene_spec: GeneSpec, donor_spec: DonorSpec, rng: np.random.Generator,
                   height: int, width: int, region: str) -> tuple[np.ndarray, np.ndarray]:
    """Renders one section: see `render_section_full`.

    Returns:
      (rgb uint8 (H, W, 3), mask bool (H, W)): the image and the true tissue mask.
    """
    r = render_section_full(gene_spec, donor_spec, rng, height, width, region)
    return r.rgb, r.mask


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The RNG of one image, derived from (seed, image_id) only (resumable, order-free)."""
    return np.random.default_rng([int(seed), int(image_id), 0x15A])


# ---------------------------------------------------------------------------- dataset
@dataclasses.dataclass(frozen=True)
class _Task:
    image_id: int
    gene: GeneSpec
    donor: DonorSpec
    region: str
    image_file: str
    mask_file: str
    height: int
    width: int
    seed: int
    jpeg_quality: int


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _readable(path: str, height: int, width: int) -> bool:
    """True if `path` exists, decodes and has the expected size (resume check)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (width, height)
    except (OSError, ValueError):
        return False


def _run_task(task: _Task) -> tuple[int, str]:
    """Renders and writes one image and its mask; returns (image_id, "written"|"kept"|error)."""
    if _readable(task.image_file, task.height, task.width) and _readable(task.mask_file, task.height, task.width):
        return task.image_id, "kept"
    try:
        rgb, mask = render_section(task.gene, task.donor, image_rng(task.seed, task.image_id),
                                   task.height, task.width, task.region)
        for path, data in ((task.mask_file, _encode(mask.astype(np.uint8) * 255, "PNG")),
                           (task.image_file, _encode(rgb, "JPEG", quality=task.jpeg_quality))):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
    except OSError as e:  # disk trouble with one file: record it, go on with the rest
        return task.image_id, f"error: {e}"
    return task.image_id, "written"


def design(cfg: SynthConfig, genes: Sequence[GeneSpec], donors: Sequence[DonorSpec]) -> pd.DataFrame:
    """The study design: which gene is assayed in which donors, and the image ids.

    Each gene is assayed in `donors_per_gene` donors, chosen at random but balanced so
    every donor sees about as many genes. Images of an experiment alternate between
    the regions, starting at a different region per experiment.

    Returns:
      One row per image: image_id, experiment_id, gene (index), donor (index), region,
      section_number (1.. within the experiment).
    """
    rng = np.random.default_rng([cfg.seed, 2])
    load = np.zeros(len(donors))
    rows = []
    exp_index = 0
    image_index = 0
    for g in range(len(genes)):
        # Least-loaded donors first, ties broken at random: balanced and seeded.
        order = np.lexsort((rng.random(len(donors)), load))
        chosen = np.sort(order[: cfg.donors_per_gene])
        load[chosen] += 1
        for d in chosen:
            for j in range(cfg.images_per_gene_donor):
                rows.append({
                    "image_id": 1_000_000 + image_index,
                    "experiment_id": 2_000_000 + exp_index,
                    "gene": g, "donor": int(d),
                    "region": cfg.regions[(exp_index + j) % len(cfg.regions)],
                    "section_number": j + 1,
                })
                image_index += 1
            exp_index += 1
    return pd.DataFrame(rows)


def make_specs(cfg: SynthConfig) -> tuple[list[GeneSpec], list[DonorSpec]]:
    """Gene and donor specs of a config (seeded by cfg.seed only)."""
    genes = make_genes(cfg.n_genes, np.random.default_rng([cfg.seed, 0]), cfg.n_groups)
    donors = make_donors(cfg.n_donors, np.random.default_rng([cfg.seed, 1]))
    return genes, donors


def _specs_json(cfg: SynthConfig, genes: Sequence[GeneSpec], donors: Sequence[DonorSpec]) -> str:
    conf = dataclasses.asdict(cfg)
    for volatile in ("out_dir", "workers"):  # may change between a run and its resume
        conf.pop(volatile)
    return json.dumps({"config": conf, "genes": [dataclasses.asdict(g) for g in genes],
                       "donors": [dataclasses.asdict(d) for d in donors]}, indent=1, sort_keys=True) + "\n"


def generate_dataset(cfg: SynthConfig) -> pd.DataFrame:
    """Writes a synthetic ISH dataset to cfg.out_dir; resumes a partial one.

    Existing images (and masks) that decode at the right size are kept, so a killed
    run picks up where it stopped and reproduces the same bytes. Files that cannot be
    written are logged, listed in OUT/skipped.csv and left out of the manifest.

    Args:
      cfg: what to make.

    Returns:
      The manifest as written to OUT/manifest.csv (typed, sorted by image_id).

    Raises:
      ValueError: OUT already holds a dataset made from a different config (seed,
        sizes, counts...): use a new directory.
    """
    out = cfg.out_dir
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    for sub in ("", "images", "masks"):
        remove_stale_tmp(os.path.join(out, sub))
    genes, donors = make_specs(cfg)
    specs = _specs_json(cfg, genes, donors)
    specs_path = os.path.join(out, "specs.json")
    if os.path.exists(specs_path):
        with open(specs_path, encoding="utf-8") as f:
            old = f.read()
        if old != specs:
            raise ValueError(
                f"{specs_path}: {out} holds a synthetic dataset made with a different config "
                f"(or generator version); write to a new --out directory or delete it first")
    else:
        atomic_write_text(specs_path, specs)

    plan = design(cfg, genes, donors)
    manifest_path = os.path.join(out, manifest_lib.MANIFEST_NAME)
    tasks = [
        _Task(image_id=int(r.image_id), gene=genes[r.gene], donor=donors[r.donor], region=r.region,
              image_file=os.path.join(out, "images", f"{r.image_id}.jpg"),
              mask_file=os.path.join(out, "masks", f"{r.image_id}.png"),
              height=cfg.height, width=cfg.width, seed=cfg.seed, jpeg_quality=cfg.jpeg_quality)
        for r in plan.itertuples(index=False)
    ]
    if cfg.workers > 0 and len(tasks) > 1:
        # spawn, not fork: the caller may have TensorFlow (and its threads) loaded.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(cfg.workers) as pool:
            results = list(progress(pool.imap(_run_task, tasks, chunksize=8), total=len(tasks),
                                    desc="synth"))
    else:
        results = [_run_task(t) for t in progress(tasks, desc="synth")]
    status = dict(results)

    failed = {i: s for i, s in status.items() if s.startswith("error")}
    skipped_path = os.path.join(out, "skipped.csv")
    if failed:
        for image_id, why in failed.items():
            log.warning("synth: image %d not written (%s)", image_id, why)
        atomic_write_text(skipped_path, pd.DataFrame(
            {"image_id": list(failed), "reason": list(failed.values())}).to_csv(index=False))
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)

    rows = []
    for r, t in zip(plan.itertuples(index=False), tasks, strict=True):
        if t.image_id in failed:
            continue
        g, d = genes[r.gene], donors[r.donor]
        rows.append({
            "image_id": t.image_id, "experiment_id": int(r.experiment_id), "study": cfg.study,
            "gene_symbol": g.symbol, "entrez_id": g.entrez_id, "specimen_id": d.specimen_id,
            "donor_id": d.donor_id, "donor_sex": d.sex, "donor_age": d.age, "donor_race": d.race,
            "smoker": d.smoker, "diagnosis": d.diagnosis, "tissue_ph": d.tissue_ph, "pmi": d.pmi,
            "region": r.region, "plane_of_section": "coronal", "section_number": r.section_number,
            "width": cfg.width, "height": cfg.height,
            "path": manifest_lib.relative_image_path(manifest_path, t.image_file),
        })
    written = manifest_lib.write_manifest(pd.DataFrame(rows, columns=list(manifest_lib.COLUMN_NAMES)),
                                          manifest_path)
    atomic_write_text(os.path.join(out, "annotations.csv"), annotation_table(genes).to_csv(index=False))
    atomic_write_text(os.path.join(out, "go.gaf"), gaf_text(genes))
    atomic_write_text(os.path.join(out, "go.obo"), obo_text(genes))
    n_new = sum(1 for s in status.values() if s == "written")
    log.info("synth: %d images written, %d kept from a previous run, %d failed, in %s",
             n_new, len(status) - n_new - len(failed), len(failed), out)
    return written


__all__ = [
    "SynthConfig", "SectionRender", "make_specs", "design", "render_section",
    "render_section_full", "image_rng", "region_layers", "generate_dataset",
]
