"""Synthetic genes and donors, and the GO-like annotations of the genes' groups.

The specs say everything a synthetic section depends on besides its RNG: a gene's
annotation (symbol, level, pattern, group, layer marker, cell type) and the parameters
that shape its expression image; a donor's manifest metadata and the nuisance effects of
its slides. Genes of one group share a prototype (pattern, cell type, marker layers,
size, shape, texture), with noise and a quarter of them off-prototype.

The annotation tables written beside a synthetic dataset come from the specs alone:
`annotation_table` (Zeng et al. 2012-like), `gaf_text` (GAF 2.2) and `obo_text` (a tiny
OBO ontology of the groups). Rendering and the dataset run are in `ish_tf.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

LEVEL_LABELS: tuple[str, ...] = ("-", "+", "++", "+++", "++++", "+++++")
PATTERNS: tuple[str, ...] = ("widespread", "laminar", "scattered", "sparse", "ND")
# Pattern frequencies of generated genes. Zeng et al. have 43% widespread, 27% ND,
# 16% scattered, 13% laminar, 2% sparse; ND genes all look alike (nothing to
# re-identify), so fewer of them and more laminar/sparse ones keep the set learnable.
PATTERN_WEIGHTS: tuple[float, ...] = (0.33, 0.22, 0.2, 0.1, 0.15)
N_LAYERS = 6
WM = N_LAYERS  # layer index of white matter in layer maps and profiles
CELL_CLASSES: tuple[str, ...] = ("excitatory", "interneuron", "glia")
# Peak optical density of an expressing cell per level ("-" ... "+++++").
LEVEL_OD: tuple[float, ...] = (0.0, 0.22, 0.45, 0.75, 1.1, 1.5)
# Laminar marker sets (layer indices 0..5 = layers 1..6) and their Zeng-style names.
LAMINAR_MARKERS: tuple[tuple[tuple[int, ...], str], ...] = (
    ((1, 2), "layer 2/3"), ((1,), "layer 2"), ((2,), "layer 3"), ((3,), "layer 4"),
    ((4,), "layer 5"), ((5,), "layer 6"), ((4, 5), "layer 5/6"), ((2, 4), "layer 3/5"),
)
# Stain absorption per RGB channel: NBT/BCIP ranges from blue to purple between donors.
_STAIN_BLUE = np.array([0.95, 0.85, 0.40])
_STAIN_PURPLE = np.array([0.62, 1.0, 0.36])


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class GeneSpec:
    """A synthetic gene: its annotation and everything that shapes its expression image.

    Attributes:
      symbol, entrez_id: identifiers ("SG001", 900001).
      group: index of its GO-like group.
      level: 0..5 for "-" ... "+++++".
      pattern: one of PATTERNS ("ND" = no determinable pattern).
      profile: expression propensity per cortical layer L1..L6 (6 values in [0, 1]).
      wm_expression: propensity in white matter (glial genes).
      class_weights: propensity per cell class (excitatory, interneuron, glia).
      fraction: probability that a cell of weight 1 in a layer of profile 1 expresses.
      intensity: peak optical density of an expressing cell (follows `level`).
      intensity_cv: spread of intensity between expressing cells (log-normal sigma).
      cell_size: size factor of expressing cells (1 = class default).
      elongation: radial elongation of expressing excitatory cells (1 = round).
      punctate: 0 = diffuse, 1 = strongly granular signal.
      neuropil: diffuse background stain in expressing layers, relative to intensity.
      layer_marker: "layer 4" etc. for laminar genes, "" otherwise.
      cell_type: "neuron", "interneuron", "oligodendrocyte", "astrocyte" or "".
    """

    symbol: str
    entrez_id: int
    group: int
    level: int
    pattern: str
    profile: tuple[float, ...]
    wm_expression: float
    class_weights: tuple[float, float, float]
    fraction: float
    intensity: float
    intensity_cv: float
    cell_size: float
    elongation: float
    punctate: float
    neuropil: float
    layer_marker: str = ""
    cell_type: str = ""

    @property
    def level_label(self) -> str:
        return LEVEL_LABELS[self.level]

    def layer_propensity(self) -> np.ndarray:
        """Expression propensity per layer L1..L6 and white matter, shape (7,)."""
        return np.array(list(self.profile) + [self.wm_expression], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class DonorSpec:
    """A synthetic donor: manifest metadata and the nuisance effects of its slides.

    Attributes:
      donor_id, specimen_id, sex, age, race, smoker, diagnosis, tissue_ph, pmi: the
        manifest's donor columns.
      stain_scale: multiplies every stain optical density (0.75..1.3).
      hue: 0 = blue, 1 = purple stain colour.
      background: RGB of the bare slide (near white, tinted).
      tissue_od: optical density of unstained tissue.
      blur_sigma: Gaussian blur of the scan, pixels.
      noise_sd: pixel noise, grey levels.
    """

    donor_id: str
    specimen_id: int
    sex: str
    age: float
    race: str
    smoker: str
    diagnosis: str
    tissue_ph: float
    pmi: float
    stain_scale: float
    hue: float
    background: tuple[float, float, float]
    tissue_od: float
    blur_sigma: float
    noise_sd: float

    def stain_vector(self) -> np.ndarray:
        """Absorption of the stain per RGB channel, shape (3,)."""
        return (1.0 - self.hue) * _STAIN_BLUE + self.hue * _STAIN_PURPLE


@dataclasses.dataclass(frozen=True)
class _GroupPrototype:
    pattern: str
    cell_type: str
    marker: int  # index into LAMINAR_MARKERS
    cell_size: float
    elongation: float
    punctate: float
    neuropil: float
    intensity_cv: float


def gene_symbol(i: int, n: int) -> str:
    """Symbol of the i-th (0-based) of n synthetic genes: SG001, SG002, ..."""
    return f"SG{i + 1:0{max(3, len(str(n)))}d}"


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw of U(lo, hi) as a Python float."""
    return float(rng.uniform(lo, hi))


def _pattern_quota(n_groups: int, rng: np.random.Generator) -> list[str]:
    """Group patterns in proportion to PATTERN_WEIGHTS (largest remainder), shuffled."""
    share = np.asarray(PATTERN_WEIGHTS) * n_groups
    counts = np.floor(share).astype(int)
    for k in np.argsort(-(share - counts), kind="stable")[: n_groups - counts.sum()]:
        counts[k] += 1
    return [str(p) for p in rng.permutation(np.repeat(PATTERNS, counts))]


def _make_prototype(rng: np.random.Generator, pattern: str | None = None) -> _GroupPrototype:
    if pattern is None:
        pattern = str(rng.choice(PATTERNS, p=PATTERN_WEIGHTS))
    if pattern in ("widespread", "laminar"):
        cell_type = "neuron"
    elif pattern == "scattered":
        cell_type = str(rng.choice(["interneuron", "oligodendrocyte", "astrocyte"], p=[0.6, 0.2, 0.2]))
    elif pattern == "sparse":
        cell_type = "interneuron"
    else:
        cell_type = ""
    return _GroupPrototype(
        pattern=pattern, cell_type=cell_type, marker=int(rng.integers(len(LAMINAR_MARKERS))),
        cell_size=uniform(rng, 0.8, 1.35), elongation=uniform(rng, 1.0, 2.2), punctate=uniform(rng, 0.0, 1.0),
        neuropil=uniform(rng, 0.0, 0.12), intensity_cv=uniform(rng, 0.1, 0.6))


def _gene_from_prototype(i: int, n: int, group: int, proto: _GroupPrototype,
                         rng: np.random.Generator) -> GeneSpec:
    # A quarter of a group's members are off-prototype in pattern/cell type (keeping the
    # group's cell shape and texture), so a group is a tendency of shared
    # characteristics, not a label readable from one feature.
    if rng.random() < 0.25:
        other = _make_prototype(rng)
        proto = dataclasses.replace(proto, pattern=other.pattern, cell_type=other.cell_type,
                                    marker=other.marker)
    pattern, cell_type = proto.pattern, proto.cell_type
    marker_layers, marker_name = LAMINAR_MARKERS[proto.marker]
    if pattern == "laminar" and rng.random() < 0.3:
        marker_layers, marker_name = LAMINAR_MARKERS[int(rng.integers(len(LAMINAR_MARKERS)))]

    if pattern == "ND":
        level = int(rng.choice([0, 1], p=[0.45, 0.55]))
    elif pattern == "laminar":
        level = int(rng.choice([1, 2, 3, 4, 5], p=[0.04, 0.14, 0.32, 0.28, 0.22]))
    else:
        level = int(rng.choice([2, 3, 4, 5], p=[0.22, 0.32, 0.22, 0.24]))

    profile = np.zeros(N_LAYERS)
    wm = uniform(rng, 0.0, 0.08)
    weights = (1.0, 0.0, 0.0)
    fraction = 0.0
    layer_marker = ""
    if pattern == "widespread":
        profile = rng.uniform(0.55, 1.0, N_LAYERS)
        profile[0] = uniform(rng, 0.0, 0.15)
        weights = (1.0, uniform(rng, 0.3, 1.0), uniform(rng, 0.0, 0.2))
        fraction = uniform(rng, 0.45, 0.9)
    elif pattern == "laminar":
        profile = rng.uniform(0.0, 0.1, N_LAYERS)
        for k in marker_layers:
            for adj in (k - 1, k + 1):
                if 0 <= adj < N_LAYERS and adj not in marker_layers:
                    profile[adj] = max(profile[adj], uniform(rng, 0.05, 0.3))
        for k in marker_layers:
            profile[k] = uniform(rng, 0.85, 1.0)
        weights = (1.0, uniform(rng, 0.0, 0.2), 0.0)
        fraction = uniform(rng, 0.55, 0.95)
        layer_marker = marker_name
    elif pattern == "scattered":
        if cell_type == "interneuron":
            profile = rng.uniform(0.5, 1.0, N_LAYERS)
            profile[0] = uniform(rng, 0.3, 0.8)
            weights = (uniform(rng, 0.0, 0.04), 1.0, 0.0)
            fraction = uniform(rng, 0.45, 0.9)
        elif cell_type == "oligodendrocyte":
            profile = rng.uniform(0.15, 0.45, N_LAYERS)
            profile[0] = uniform(rng, 0.0, 0.1)
            wm = uniform(rng, 0.7, 1.0)
            weights = (0.0, 0.0, 1.0)
            fraction = uniform(rng, 0.45, 0.8)
        else:  # astrocyte: everywhere, densest under the pia and in white matter
            profile = rng.uniform(0.4, 0.8, N_LAYERS)
            profile[0] = uniform(rng, 0.8, 1.0)
            wm = uniform(rng, 0.5, 0.8)
            weights = (0.0, 0.0, 1.0)
            fraction = uniform(rng, 0.5, 0.9)
    elif pattern == "sparse":
        profile = rng.uniform(0.3, 1.0, N_LAYERS)
        weights = (uniform(rng, 0.0, 0.03), 1.0, 0.0)
        fraction = uniform(rng, 0.06, 0.18)
    elif level > 0:  # ND with a faint, patternless signal
        profile = rng.uniform(0.6, 1.0, N_LAYERS)
        weights = (1.0, 1.0, 1.0)
        fraction = uniform(rng, 0.15, 0.45)

    jitter = lambda v, s, lo, hi: float(np.clip(v + rng.normal(0.0, s), lo, hi))  # noqa: E731
    return GeneSpec(
        symbol=gene_symbol(i, n), entrez_id=900_000 + i + 1, group=group, level=level,
        pattern=pattern, profile=tuple(round(float(p), 4) for p in profile),
        wm_expression=round(float(wm), 4), class_weights=tuple(round(float(w), 4) for w in weights),
        fraction=round(float(fraction), 4),
        intensity=round(LEVEL_OD[level] * uniform(rng, 0.88, 1.12), 4),
        intensity_cv=round(jitter(proto.intensity_cv, 0.08, 0.05, 0.8), 4),
        cell_size=round(jitter(proto.cell_size, 0.08, 0.7, 1.5), 4),
        elongation=round(jitter(proto.elongation, 0.15, 1.0, 2.5), 4),
        punctate=round(jitter(proto.punctate, 0.12, 0.0, 1.0), 4),
        neuropil=round(jitter(proto.neuropil, 0.02, 0.0, 0.18), 4),
        layer_marker=layer_marker, cell_type=cell_type)


def make_genes(n: int, rng: np.random.Generator, n_groups: int = 6) -> list[GeneSpec]:
    """Draws n genes in n_groups GO-like groups of shared expression characteristics.

    Args:
      n: number of genes.
      rng: random generator (consumed).
      n_groups: number of groups; genes are dealt to groups evenly, in random order.

    Returns:
      GeneSpecs with symbols SG001... and entrez ids 900001...

    Raises:
      ValueError: n < 1 or n_groups not in 1..n.
    """
    if n < 1 or not 1 <= n_groups <= n:
        raise ValueError(f"make_genes: need n >= 1 and 1 <= n_groups <= n, got n={n}, n_groups={n_groups}")
    protos = [_make_prototype(rng, p) for p in _pattern_quota(n_groups, rng)]
    groups = rng.permutation(np.arange(n) % n_groups)
    return [_gene_from_prototype(i, n, int(groups[i]), protos[groups[i]], rng) for i in range(n)]


def make_donors(n: int, rng: np.random.Generator) -> list[DonorSpec]:
    """Draws n donors; half of them (rounded down) have a schizophrenia diagnosis.

    Args:
      n: number of donors.
      rng: random generator (consumed).

    Returns:
      DonorSpecs with ids SYN-D001... and specimen ids 800001...
    """
    if n < 1:
        raise ValueError(f"make_donors: need n >= 1, got {n}")
    diagnoses = rng.permutation(["schizophrenia"] * (n // 2) + ["control"] * (n - n // 2))
    donors = []
    for j in range(n):
        brightness = uniform(rng, 228.0, 250.0)
        tint = rng.uniform(-6.0, 6.0, 3)
        bg = np.clip(brightness + tint, 200.0, 255.0)
        donors.append(DonorSpec(
            donor_id=f"SYN-D{j + 1:03d}", specimen_id=800_000 + j + 1,
            sex=str(rng.choice(["M", "F"])), age=round(uniform(rng, 22.0, 68.0), 1),
            race=str(rng.choice(["White or Caucasian", "Black or African American", "Hispanic", "Asian"],
                                p=[0.6, 0.2, 0.1, 0.1])),
            smoker=str(rng.choice(["yes", "no", "unknown"], p=[0.4, 0.45, 0.15])),
            diagnosis=str(diagnoses[j]), tissue_ph=round(uniform(rng, 6.1, 6.9), 2),
            pmi=round(uniform(rng, 4.0, 36.0), 1), stain_scale=round(uniform(rng, 0.75, 1.3), 4),
            hue=round(uniform(rng, 0.0, 1.0), 4), background=tuple(round(float(c), 2) for c in bg),
            tissue_od=round(uniform(rng, 0.08, 0.16), 4), blur_sigma=round(uniform(rng, 0.3, 1.2), 4),
            noise_sd=round(uniform(rng, 1.0, 3.0), 4)))
    return donors


# ------------------------------------------------------------------------ annotations
def group_term(group: int) -> str:
    """GO-like id of a gene group: GO:9910000 + group."""
    return f"GO:{9_910_000 + group:07d}"


# Family terms (parents of the group terms) by cell type.
_FAMILIES = {
    "neuron": ("GO:9900001", "synthetic neuronal signalling"),
    "interneuron": ("GO:9900002", "synthetic inhibitory interneuron function"),
    "oligodendrocyte": ("GO:9900003", "synthetic glial function"),
    "astrocyte": ("GO:9900003", "synthetic glial function"),
    "": ("GO:9900004", "synthetic housekeeping process"),
}
_ROOT = ("GO:9900000", "synthetic cortical gene function")


def _group_names(genes: Sequence[GeneSpec]) -> dict[int, tuple[str, str]]:
    """Name and family cell type of each group, from its members' majority pattern/cell type."""
    out = {}
    for g in sorted({x.group for x in genes}):
        members = [x for x in genes if x.group == g]
        pattern = pd.Series([m.pattern for m in members]).mode().iloc[0]
        cell_type = pd.Series([m.cell_type for m in members]).mode().iloc[0]
        label = f"{pattern} {cell_type}".strip()
        out[g] = (f"synthetic process {g + 1} ({label})", cell_type)
    return out


def annotation_table(genes: Sequence[GeneSpec]) -> pd.DataFrame:
    """Zeng et al.-shaped annotations: gene_symbol, entrez_id, level, pattern, group, ...

    `marker` joins layer marker and cell type like Zeng's "Cortical marker (human)"
    column (e.g. "layer 4", "interneuron", "oligodendrocyte").
    """
    names = _group_names(genes)
    rows = []
    for x in genes:
        marker = x.layer_marker or (x.cell_type if x.cell_type not in ("", "neuron") else "")
        rows.append({
            "gene_symbol": x.symbol, "entrez_id": x.entrez_id, "level": x.level_label,
            "pattern": x.pattern, "group": group_term(x.group), "group_name": names[x.group][0],
            "layer_marker": x.layer_marker, "cell_type": x.cell_type, "marker": marker,
        })
    return pd.DataFrame(rows)


def gaf_text(genes: Sequence[GeneSpec], date: str = "20240101") -> str:
    """A GAF 2.2 file assigning every gene to its group's GO-like term (aspect P)."""
    lines = ["!gaf-version: 2.2", "!generated-by: ish_tf.data.synthetic",
             "!note: synthetic GO-like groups of genes with shared expression characteristics"]
    for x in genes:
        cols = ["synthetic", str(x.entrez_id), x.symbol, "involved_in", group_term(x.group),
                "GO_REF:0000000", "IEA", "", "P", f"synthetic gene {x.symbol}", "", "gene",
                "taxon:9606", date, "synthetic", "", ""]
        lines.append("\t".join(cols))
    return "\n".join(lines) + "\n"


def obo_text(genes: Sequence[GeneSpec]) -> str:
    """A tiny OBO 1.2 ontology: root <- cell-type families <- group terms (is_a edges)."""
    names = _group_names(genes)
    terms: dict[str, tuple[str, str | None]] = {_ROOT[0]: (_ROOT[1], None)}
    for g, (name, cell_type) in names.items():
        fam_id, fam_name = _FAMILIES.get(cell_type, _FAMILIES[""])
        terms.setdefault(fam_id, (fam_name, _ROOT[0]))
        terms[group_term(g)] = (name, fam_id)
    parts = ["format-version: 1.2", "ontology: synthetic-go", ""]
    for term_id in sorted(terms):
        name, parent = terms[term_id]
        parts += ["[Term]", f"id: {term_id}", f"name: {name}", "namespace: biological_process"]
        if parent:
            parts.append(f"is_a: {parent} ! {terms[parent][0]}")
        parts.append("")
    return "\n".join(parts)
