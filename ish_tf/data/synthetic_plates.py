"""Synthetic 6-channel fluorescence plates in the RxRx1 challenge layout.

`bin/synth --modality=fluorescence` calls `generate_plates`; `bin/ingest --layout=rxrx1`
reads what it writes (`ish_tf.data.rxrx1` holds that layout's schema).

Interface (stable; the mean-teacher family and its quickstart build on it)::

    cfg = PlateSynthConfig(cell_types=4, experiments=2, test_experiments=1, plates=2,
                           class_groups=2, classes_per_group=12, positive_controls=2,
                           sites=2, site_size=64, seed=0)
    result = generate_plates("data/plates", cfg)     # -> PlateSynthResult

Written under OUT (the RxRx1 challenge layout):

    OUT/{train,test}/{experiment}/Plate{p}/{well}_s{site}_w{channel}.png   uint8 gray PNG
    OUT/train.csv           id_code, experiment, plate, well, sirna        (treatments)
    OUT/test.csv            id_code, experiment, plate, well               (no labels)
    OUT/train_controls.csv  id_code, experiment, plate, well, sirna, well_type
    OUT/test_controls.csv   id_code, experiment, plate, well, sirna, well_type
    OUT/truth.csv           every well: id_code, experiment, plate, well, sirna, well_type,
                            dataset, cell_type, class_group (the generator's truth, test
                            wells included: use it to score held-out experiments)
    OUT/synth_plates.json   the config, class counts and each plate's noise parameters

Experiments are named like RxRx1's (`HEPG2-01`, `HUVEC-02`, ...): per cell type,
`experiments` labelled ones (dataset "train") and then `test_experiments` unlabelled
ones (dataset "test"). Classes (siRNA ids, as RxRx1's `sirna`): treatments
0 .. class_groups*classes_per_group-1, then the positive controls, then one negative
control (RxRx1: 1,108 treatments in 4 groups of 277, 30 positive controls 1108..1137,
negative control 1138). Each plate holds the treatments of one class group, each once,
plus every control once, in shuffled wells of the inner 14 x 22 wells of a 384-well
plate (rows B..O, columns 02..23, as RxRx1); plate p of experiment e holds group
(e + p - 1) mod class_groups, so an experiment's plates cover the groups.

What the images hold. Cells (nucleus, cytoplasm, membrane, organelles) in six
channels like RxRx1's: w1 nuclei (Hoechst), w2 endoplasmic reticulum (ConA), w3 actin
at the membrane (phalloidin), w4 nucleoli and cytoplasmic RNA (SYTO14), w5
mitochondria (MitoTracker), w6 Golgi and membrane (WGA). Each cell type has its own
morphology; each class shifts cell morphology (nucleus size, cytoplasm ratio,
elongation, membrane width, organelle counts, cell density) and per-channel intensity
a little (`effect` scales it; positive controls 3x, the negative control not at all),
partly shared across cell types and partly cell-type specific.

Technical noise (`noise` scales it) is strong: per experiment and per plate channel
gains (log-normal, sigma 0.5 and 0.2) and offsets, a per-plate illumination gradient
and vignetting, per-plate focus blur, dimmer edge wells, and shot and read noise. Gains
and offsets are affine per (experiment, plate, channel), so per-plate normalisation
(`ish_tf.data.plate_norm`) removes most of it; a model of raw intensities meets gains it
never saw on an unseen experiment.

Deterministic: the same config and seed give the same bytes (every site draws from its
own generator seeded by (seed, experiment, plate, well, site)); numpy only, vectorised
over the cells of a site.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from ish_tf.data.rxrx1 import encode_png_gray8
from ish_tf.io_utils import atomic_write_text

#: RxRx1's cell types, in the order synthetic experiments use them.
CELL_TYPES: tuple[str, ...] = ("HEPG2", "HUVEC", "RPE", "U2OS")
#: RxRx1's six channels (w1..w6).
CHANNELS: tuple[str, ...] = ("nuclei", "er", "actin", "rna", "mitochondria", "golgi_membrane")
N_CHANNELS = 6
#: The wells RxRx1 uses: rows B..O, columns 02..23 of a 384-well plate.
WELL_ROWS = "BCDEFGHIJKLMNO"
WELL_COLUMNS = tuple(range(2, 24))
TRUTH_NAME = "truth.csv"
INFO_NAME = "synth_plates.json"

# Class effect parameters (log-scale shifts unless said): their spread at effect=1.
_EFFECT_NAMES = ("nucleus_size", "cytoplasm_ratio", "elongation", "membrane_width",
                 "mito_count", "density") + tuple(f"intensity_w{c + 1}" for c in range(6))
_EFFECT_SCALE = np.array([0.10, 0.10, 0.12, 0.20, 0.25, 0.15] + [0.15] * 6)

# Cell-type morphology at 64 px: nucleus radius (px), cytoplasm/nucleus ratio,
# elongation, cells per site, membrane width (px).
_CELL_TYPE_BASE = {
    "HEPG2": (3.0, 1.8, 0.10, 14.0, 0.9),
    "HUVEC": (3.3, 2.3, 0.45, 10.0, 0.8),
    "RPE": (3.6, 2.0, 0.20, 11.0, 1.0),
    "U2OS": (3.9, 2.4, 0.15, 9.0, 1.1),
}


@dataclasses.dataclass(frozen=True)
class PlateSynthConfig:
    """Size and strength of a synthetic plate set.

    Attributes:
      cell_types: cell types (1..4), the first of `CELL_TYPES`.
      experiments: labelled experiments (dataset "train") per cell type.
      test_experiments: unlabelled experiments (dataset "test") per cell type.
      plates: plates per experiment (RxRx1: 4).
      class_groups: groups of treatment classes; a plate holds one group (RxRx1: 4).
      classes_per_group: treatment classes (siRNAs) per group (RxRx1: 277).
      positive_controls: positive-control classes on every plate (RxRx1: 30).
      sites: imaged sites per well (RxRx1: 2).
      site_size: side of a site image in pixels (RxRx1: 512); cells scale with it.
      effect: scale of the class effects on morphology and intensity.
      noise: scale of the technical noise (gains, offsets, gradients, blur, edges).
      seed: seed of everything.
    """

    cell_types: int = 4
    experiments: int = 2
    test_experiments: int = 1
    plates: int = 2
    class_groups: int = 2
    classes_per_group: int = 12
    positive_controls: int = 2
    sites: int = 2
    site_size: int = 64
    effect: float = 1.0
    noise: float = 1.0
    seed: int = 0

    def validate(self) -> PlateSynthConfig:
        """Returns self; raises ValueError naming the field that is out of range."""
        checks = (("cell_types", 1 <= self.cell_types <= len(CELL_TYPES),
                   f"between 1 and {len(CELL_TYPES)}"),
                  ("experiments", self.experiments >= 1, ">= 1"),
                  ("test_experiments", self.test_experiments >= 0, ">= 0"),
                  ("plates", self.plates >= 1, ">= 1"),
                  ("class_groups", self.class_groups >= 1, ">= 1"),
                  ("classes_per_group", self.classes_per_group >= 1, ">= 1"),
                  ("positive_controls", self.positive_controls >= 0, ">= 0"),
                  ("sites", self.sites >= 1, ">= 1"),
                  ("site_size", self.site_size >= 16, ">= 16"),
                  ("effect", self.effect >= 0, ">= 0"),
                  ("noise", self.noise >= 0, ">= 0"),
                  ("wells_per_plate", self.wells_per_plate <= len(WELL_ROWS) * len(WELL_COLUMNS),
                   f"<= {len(WELL_ROWS) * len(WELL_COLUMNS)} (classes_per_group + "
                   "positive_controls + 1)"))
        for name, ok, want in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"PlateSynthConfig.{name} must be {want}, got {value}")
        return self

    @property
    def n_treatments(self) -> int:
        return self.class_groups * self.classes_per_group

    @property
    def n_classes(self) -> int:
        """Treatments + positive controls + the negative control."""
        return self.n_treatments + self.positive_controls + 1

    @property
    def wells_per_plate(self) -> int:
        return self.classes_per_group + self.positive_controls + 1

    @property
    def negative_control(self) -> int:
        return self.n_classes - 1


@dataclasses.dataclass
class PlateSynthResult:
    """What `generate_plates` wrote.

    Attributes:
      out_dir: the root of the challenge layout.
      experiments: experiment -> dataset ("train" | "test").
      n_wells, n_sites, n_images: counts written (an image = one channel PNG).
      n_classes: classes (treatments + controls).
      truth: the truth table (one row per well).
    """

    out_dir: str
    experiments: dict[str, str]
    n_wells: int
    n_sites: int
    n_images: int
    n_classes: int
    truth: pd.DataFrame


# --------------------------------------------------------------------------- design
def plate_wells() -> list[tuple[str, int, int]]:
    """The usable wells (name, row index, column index), row-major: B02, B03, ..., O23."""
    return [(f"{r}{c:02d}", i, j) for i, r in enumerate(WELL_ROWS)
            for j, c in enumerate(WELL_COLUMNS)]


def experiment_names(cfg: PlateSynthConfig) -> list[tuple[str, str, str]]:
    """(experiment, cell_type, dataset) in generation order: per cell type, the labelled
    experiments `{TYPE}-01..` then the unlabelled ones."""
    out = []
    for t in CELL_TYPES[:cfg.cell_types]:
        for k in range(cfg.experiments + cfg.test_experiments):
            out.append((f"{t}-{k + 1:02d}", t, "train" if k < cfg.experiments else "test"))
    return out


def class_effects(cfg: PlateSynthConfig) -> np.ndarray:
    """Class effect parameters, (cell_types, n_classes, len(_EFFECT_NAMES)), in the
    units of `_EFFECT_SCALE` times `effect` (positive controls 3x, negative control 0)."""
    rng = np.random.default_rng([cfg.seed, 101])
    k = len(_EFFECT_NAMES)
    shared = rng.normal(size=(cfg.n_classes, k))
    specific = rng.normal(size=(len(CELL_TYPES), cfg.n_classes, k))
    effects = (0.8 * shared[None] + 0.6 * specific)[:cfg.cell_types] * _EFFECT_SCALE
    strength = np.ones(cfg.n_classes)
    strength[cfg.n_treatments:cfg.negative_control] = 3.0
    strength[cfg.negative_control] = 0.0
    return effects * strength[None, :, None] * cfg.effect


def _cell_type_intensity(cfg: PlateSynthConfig) -> np.ndarray:
    """Base per-channel brightness of each cell type, (cell_types, 6)."""
    rng = np.random.default_rng([cfg.seed, 102])
    return np.exp(rng.normal(0.0, 0.25, size=(len(CELL_TYPES), N_CHANNELS)))[:cfg.cell_types]


def _plate_noise(cfg: PlateSynthConfig, e: int, plate: int, exp_gain: np.ndarray,
                 exp_offset: np.ndarray) -> dict:
    """Technical noise of one plate (shared by its wells and sites)."""
    rng = np.random.default_rng([cfg.seed, 202, e, plate])
    n = cfg.noise
    return {
        "gain": (exp_gain * np.exp(rng.normal(0.0, 0.2 * n, N_CHANNELS))).tolist(),
        "offset": (exp_offset + rng.uniform(0.0, 8.0 * n, N_CHANNELS)).tolist(),
        "gradient": float(rng.uniform(0.0, 0.35 * n)),
        "gradient_angle": float(rng.uniform(0.0, 2 * np.pi)),
        "vignetting": float(rng.uniform(0.0, 0.3 * n)),
        "blur": float(rng.uniform(0.0, 1.0 * n)),
        "edge_dimming": float(rng.uniform(0.0, 0.35 * n)),
        "plate_layout_seed": int(rng.integers(2**31)),
    }


def plate_layout(cfg: PlateSynthConfig, group: int, layout_seed: int) -> list[tuple[int, str]]:
    """(sirna, well_type) of each well of a plate holding `group`, in `plate_wells()`
    order: the group's treatments and every control, shuffled."""
    classes = [(cfg.classes_per_group * group + i, "treatment")
               for i in range(cfg.classes_per_group)]
    classes += [(cfg.n_treatments + i, "positive_control") for i in range(cfg.positive_controls)]
    classes.append((cfg.negative_control, "negative_control"))
    order = np.random.default_rng(layout_seed).permutation(len(classes))
    return [classes[i] for i in order]


# --------------------------------------------------------------------------- rendering
def _soft(d: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Soft inside-mask of a normalised distance d (1 at the edge), ~1 px edge width."""
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) * radius * 1.6, 30)))


def _splat(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, w: np.ndarray,
           sigma: float) -> np.ndarray:
    out = np.zeros(shape, np.float64)
    iy = np.clip(np.round(ys).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(xs).astype(int), 0, shape[1] - 1)
    inside = (ys >= -0.5) & (ys < shape[0] - 0.5) & (xs >= -0.5) & (xs < shape[1] - 0.5)
    np.add.at(out, (iy[inside], ix[inside]), w[inside])
    return ndimage.gaussian_filter(out, sigma, mode="constant") * (2 * np.pi * sigma**2)


def render_cells(rng: np.random.Generator, size: int, cell_type: int, effect: np.ndarray,
                 intensity: np.ndarray) -> np.ndarray:
    """The biological signal of one site, float (6, size, size), before technical noise.

    Args:
      rng: the site's generator.
      size: side in pixels; cells scale with size / 64.
      cell_type: index into `CELL_TYPES`.
      effect: the class's effect parameters (`_EFFECT_NAMES`).
      intensity: the cell type's base brightness per channel (6,).
    """
    scale = size / 64.0
    r_nuc, ratio, elong, density, membrane = _CELL_TYPE_BASE[CELL_TYPES[cell_type]]
    e = dict(zip(_EFFECT_NAMES, effect, strict=True))
    n = max(1, int(rng.poisson(density * np.exp(e["density"]))))
    cy, cx = rng.uniform(0, size, n), rng.uniform(0, size, n)
    theta = rng.uniform(0, np.pi, n)
    r = r_nuc * scale * np.exp(e["nucleus_size"] + rng.normal(0, 0.12, n))
    el = np.clip(elong + e["elongation"] + rng.normal(0, 0.08, n), 0.0, 0.9)
    a_n, b_n = r * (1 + el / 2), r / (1 + el / 2)
    k = ratio * np.exp(e["cytoplasm_ratio"] + rng.normal(0, 0.1, n))
    a_c, b_c = a_n * k * (1 + 0.3 * el), b_n * k
    # The cytoplasm's centre sits a little off the nucleus's.
    off = rng.normal(0, 0.25, (2, n)) * r
    width = membrane * scale * np.exp(e["membrane_width"])
    cell_gain = np.exp(rng.normal(0, 0.15, (n, N_CHANNELS))) * intensity \
        * np.exp(effect[6:12])

    # Each cell is drawn in its own window of side W (enough for its cytoplasm and
    # membrane), all windows at once, then added onto a canvas padded by W.
    reach = float(np.max(np.maximum(a_c, b_c)) + np.max(np.abs(off)) + 3 * width + 2)
    side = int(np.ceil(2 * reach)) + 1
    oy = np.floor(cy).astype(int) - side // 2
    ox = np.floor(cx).astype(int) - side // 2
    grid = np.arange(side, dtype=np.float32)
    dy = (oy[:, None] + grid[None] - cy[:, None]).astype(np.float32)[:, :, None]
    dx = (ox[:, None] + grid[None] - cx[:, None]).astype(np.float32)[:, None, :]
    col = lambda v: np.asarray(v, np.float32)[:, None, None]  # noqa: E731
    c, si = col(np.cos(theta)), col(np.sin(theta))
    u, v = dx * c + dy * si, -dx * si + dy * c
    d_n = np.sqrt((u / col(a_n)) ** 2 + (v / col(b_n)) ** 2)
    uc, vc = u - col(off[1]), v - col(off[0])
    d_c = np.sqrt((uc / col(a_c)) ** 2 + (vc / col(b_c)) ** 2)
    rc = col(np.sqrt(a_c * b_c))
    m_n = _soft(d_n, col(r))
    m_c = _soft(d_c, rc)
    ring = np.exp(-(((d_c - 1.0) * rc / np.float32(width)) ** 2))
    patterns = (1.6 * m_n,                                        # w1 nuclei
                np.clip(m_c - 0.7 * m_n, 0, None) * np.exp(-d_c),  # w2 ER near the nucleus
                ring + 0.12 * m_c,                                 # w3 cortical actin
                0.25 * np.clip(m_c - 0.5 * m_n, 0, None),          # w4 cytoplasmic RNA
                None,                                              # w5 spots only
                0.45 * ring)                                       # w6 membrane (WGA)
    cells = np.zeros((n, N_CHANNELS, side, side), np.float32)
    for ch, p in enumerate(patterns):
        if p is not None:
            cells[:, ch] = p * col(cell_gain[:, ch])
    canvas = np.zeros((N_CHANNELS, size + 2 * side, size + 2 * side), np.float32)
    for i in range(n):
        canvas[:, oy[i] + side:oy[i] + 2 * side, ox[i] + side:ox[i] + 2 * side] += cells[i]
    signal = canvas[:, side:side + size, side:side + size].astype(np.float64)
    # Organelles: spots splatted and blurred. Mitochondria in the cytoplasm, nucleoli
    # in the nucleus, a Golgi cluster beside the nucleus.
    shape = (size, size)
    spot_sigma = 0.7 * scale

    def spots(counts, radius_lo, radius_hi, angle_centre=None, spread=np.pi):
        owner = np.repeat(np.arange(n), counts)
        ang = (rng.uniform(0, 2 * np.pi, owner.size) if angle_centre is None else
               angle_centre[owner] + rng.uniform(-spread, spread, owner.size))
        hi = np.maximum(np.broadcast_to(radius_hi, (n,))[owner], radius_lo + 0.2)
        rad = (radius_lo + (hi - radius_lo) * rng.uniform(0, 1, owner.size)) * r[owner]
        return owner, cy[owner] + rad * np.sin(ang), cx[owner] + rad * np.cos(ang)

    mito = rng.poisson(6 * np.exp(e["mito_count"]) * k / ratio, n)
    o, ys, xs = spots(mito, 1.1, 0.95 * k + 0.2)
    signal[4] += _splat(shape, ys, xs, 0.9 * cell_gain[o, 4], spot_sigma)
    nucleoli = rng.integers(1, 4, n)
    o, ys, xs = spots(nucleoli, 0.0, 0.5)
    signal[3] += _splat(shape, ys, xs, 0.8 * cell_gain[o, 3], spot_sigma)
    golgi = rng.integers(3, 7, n)
    o, ys, xs = spots(golgi, 1.05, 1.5, rng.uniform(0, 2 * np.pi, n), 0.5)
    signal[5] += _splat(shape, ys, xs, 0.7 * cell_gain[o, 5], spot_sigma)
    # Nuclear texture (chromatin).
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.2 * scale)
    signal[0] *= np.clip(1.0 + 1.5 * texture, 0.3, None)
    return np.clip(signal, 0, None) * 90.0


def apply_noise(rng: np.random.Generator, signal: np.ndarray, plate_noise: dict,
                well_rc: tuple[int, int], noise: float) -> np.ndarray:
    """Technical noise of one site: blur, gains, gradients, edge dimming, offsets, shot
    and read noise; returns uint8 (6, S, S)."""
    size = signal.shape[-1]
    scale = size / 64.0
    sigma = (plate_noise["blur"] + rng.uniform(0, 0.3) * noise) * scale
    if sigma > 0.05:
        signal = ndimage.gaussian_filter(signal, (0, sigma, sigma))
    lin = np.linspace(-1, 1, size)
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    ang = plate_noise["gradient_angle"]
    illum = (1.0 + plate_noise["gradient"] * (np.cos(ang) * gx + np.sin(ang) * gy)
             - plate_noise["vignetting"] * (gx**2 + gy**2) / 2)
    row, col = well_rc
    ry = (row - (len(WELL_ROWS) - 1) / 2) / ((len(WELL_ROWS) - 1) / 2)
    rx = (col - (len(WELL_COLUMNS) - 1) / 2) / ((len(WELL_COLUMNS) - 1) / 2)
    edge = 1.0 - plate_noise["edge_dimming"] * max(abs(ry), abs(rx)) ** 4
    gain = np.asarray(plate_noise["gain"])[:, None, None] * illum[None] * edge
    image = signal * gain + np.asarray(plate_noise["offset"])[:, None, None]
    image += rng.normal(size=image.shape) * np.sqrt(0.3 * np.clip(image, 0, None) + 4.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing
def _write_png(path: str, image: np.ndarray) -> None:
    # Written in place: the CSVs (written last, removed first) say whether a set is complete.
    with open(path, "wb") as f:
        f.write(encode_png_gray8(image))


def _csv(path: str, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def generate_plates(out_dir: str, cfg: PlateSynthConfig,
                    progress: bool = False) -> PlateSynthResult:
    """Writes a synthetic plate set in the RxRx1 challenge layout (module docstring).

    Rerunning with the same config rewrites the same bytes.

    Args:
      out_dir: the root to write (created).
      cfg: sizes, strengths and seed.
      progress: print a steady line per experiment.

    Returns:
      What was written.

    Raises:
      ValueError: an invalid config (naming the field).
    """
    cfg.validate()
    os.makedirs(out_dir, exist_ok=True)
    # The tables go first and come back last: a set without them is incomplete.
    for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv",
                 TRUTH_NAME, INFO_NAME):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    wells = plate_wells()
    effects = class_effects(cfg)
    intensity = _cell_type_intensity(cfg)
    exps = experiment_names(cfg)
    rows, plate_info = [], []
    n_sites = 0
    for e, (experiment, cell_type, dataset) in enumerate(exps):
        t = CELL_TYPES.index(cell_type)
        rng = np.random.default_rng([cfg.seed, 201, e])
        exp_gain = np.exp(rng.normal(0.0, 0.5 * cfg.noise, N_CHANNELS))
        exp_offset = rng.uniform(0.0, 25.0 * cfg.noise, N_CHANNELS)
        for plate in range(1, cfg.plates + 1):
            noise = _plate_noise(cfg, e, plate, exp_gain, exp_offset)
            group = (e + plate - 1) % cfg.class_groups
            plate_info.append({"experiment": experiment, "plate": plate, "class_group": group,
                               **noise})
            folder = os.path.join(out_dir, dataset, experiment, f"Plate{plate}")
            os.makedirs(folder, exist_ok=True)
            for w, (sirna, well_type) in enumerate(plate_layout(cfg, group,
                                                                noise["plate_layout_seed"])):
                well, wr, wc = wells[w]
                rows.append({"id_code": f"{experiment}_{plate}_{well}", "experiment": experiment,
                             "plate": plate, "well": well, "sirna": sirna, "well_type": well_type,
                             "dataset": dataset, "cell_type": cell_type, "class_group":
                             group if well_type == "treatment" else -1})
                for site in range(1, cfg.sites + 1):
                    site_rng = np.random.default_rng([cfg.seed, 301, e, plate, w, site])
                    signal = render_cells(site_rng, cfg.site_size, t, effects[t, sirna],
                                          intensity[t])
                    image = apply_noise(site_rng, signal, noise, (wr, wc), cfg.noise)
                    for ch in range(N_CHANNELS):
                        _write_png(os.path.join(folder, f"{well}_s{site}_w{ch + 1}.png"),
                                   image[ch])
                    n_sites += 1
        if progress:
            print(f"synth: {experiment} ({dataset}) written: {cfg.plates} plates x "
                  f"{cfg.wells_per_plate} wells x {cfg.sites} sites", flush=True)

    truth = pd.DataFrame(rows)
    base = ["id_code", "experiment", "plate", "well"]
    for dataset in ("train", "test"):
        part = truth[truth["dataset"] == dataset]
        treat = part[part["well_type"] == "treatment"]
        _csv(os.path.join(out_dir, f"{dataset}.csv"),
             treat[base + (["sirna"] if dataset == "train" else [])])
        _csv(os.path.join(out_dir, f"{dataset}_controls.csv"),
             part[part["well_type"] != "treatment"][base + ["sirna", "well_type"]])
    _csv(os.path.join(out_dir, TRUTH_NAME), truth)
    info = {"config": dataclasses.asdict(cfg), "n_classes": cfg.n_classes,
            "n_treatments": cfg.n_treatments, "negative_control": cfg.negative_control,
            "positive_controls": list(range(cfg.n_treatments, cfg.negative_control)),
            "channels": list(CHANNELS), "experiments": {x: d for x, _, d in exps},
            "plates": plate_info, "effect_names": list(_EFFECT_NAMES)}
    atomic_write_text(os.path.join(out_dir, INFO_NAME), json.dumps(info, indent=1) + "\n")
    return PlateSynthResult(out_dir, {x: d for x, _, d in exps}, len(truth), n_sites,
                            n_sites * N_CHANNELS, cfg.n_classes, truth)


def read_truth(out_dir: str) -> pd.DataFrame:
    """The generator's truth table (one row per well) of a synthetic plate set."""
    return pd.read_csv(os.path.join(out_dir, TRUTH_NAME))


def well_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """Simple per-site features (per-channel mean, std and 90th percentile), (n, 18):
    the hand-made baseline the generator's own checks use."""
    out = []
    for im in images:
        x = np.asarray(im, np.float64).reshape(-1, N_CHANNELS)
        out.append(np.concatenate([x.mean(0), x.std(0), np.percentile(x, 90, axis=0)]))
    return np.asarray(out)
