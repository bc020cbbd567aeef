"""A synthetic cohort where a donor-level condition changes expression in a small region.

The test bed of attention pooling (`ish_tf.evaluate.attention_mil`): donors are cases or
controls; in cases, the sections of a few *affected* genes gain expression only inside
one cortical layer within a small part of the tissue (`region_fraction`, a few percent
of it). Averaging a section's patch embeddings dilutes such a change; an attention pool
can find it. The generator knows which pixels changed, so each patch carries its truth.

How a changed section is made: `ish_tf.data.synthetic.render_section_full` draws the
tissue and cells from the section's RNG independently of the gene, so rendering the
same RNG state with the gene and with its *boosted* version (expression in `layer` at
full propensity, `boost` times the intensity, at least level "+++") gives the same
tissue, cells and noise; the boosted pixels replace the plain ones inside the region:
the pixels of `layer` nearest to a random point of that layer, as many as
`region_fraction` of the tissue.

Patches: a grid of `patch` × `patch` windows whose tissue covers at least half,
at most 50 per section (the closest to the section's centre), each with the fraction
of its pixels that changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ish_tf.data.synthetic import image_rng, render_section_full
from ish_tf.data.synthetic_specs import LEVEL_OD, make_donors, make_genes


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """What `make_cohort` renders.

    Attributes:
      n_donors: donors (half cases, half controls).
      n_genes: genes, each assayed in every donor (one section each).
      n_affected: genes whose case sections change (the first n_affected).
      size: section side in pixels.
      patch: patch side in pixels.
      layer: cortical layer index (0..5 = layers 1..6) that changes.
      region_fraction: changed pixels as a fraction of the section's tissue.
      boost: intensity factor of the changed expression.
      region: brain region of every section.
      seed: everything follows from it.
    """

    n_donors: int = 40
    n_genes: int = 4
    n_affected: int = 2
    size: int = 192
    patch: int = 24
    layer: int = 3
    region_fraction: float = 0.04
    boost: float = 2.5
    region: str = "MTG"
    seed: int = 0

    def __post_init__(self):
        if self.n_donors < 4 or not 0 <= self.n_affected <= self.n_genes:
            raise ValueError("CohortConfig: n_donors >= 4 and 0 <= n_affected <= n_genes")
        if not 0 < self.region_fraction < 1 or not 0 <= self.layer <= 5:
            raise ValueError("CohortConfig: region_fraction in (0, 1), layer in 0..5")


@dataclasses.dataclass
class Cohort:
    """Rendered sections with their patches and truth.

    Attributes:
      manifest: one row per section: image_id, gene_symbol, donor_id, diagnosis,
        affected (gene), changed (this section has a changed region), changed_pixels.
      patches: one row per patch: image_id, patch_index, x, y (top-left), gene_symbol,
        donor_id, changed_fraction.
      images: image_id -> uint8 (size, size, 3).
    """

    manifest: pd.DataFrame
    patches: pd.DataFrame
    images: dict


def boosted(gene, layer: int, boost: float):
    """The gene with expression in `layer` at full propensity and `boost` × intensity."""
    profile = list(gene.profile)
    profile[layer] = 1.0
    return dataclasses.replace(
        gene, profile=tuple(profile), fraction=max(gene.fraction, 0.6),
        intensity=max(gene.intensity * boost, LEVEL_OD[3]),
        class_weights=tuple(max(w, 0.8) for w in gene.class_weights))


def _region(layers: np.ndarray, mask: np.ndarray, layer: int, fraction: float,
            rng: np.random.Generator) -> np.ndarray:
    """The pixels of `layer` nearest a random pixel of it, `fraction` of the tissue."""
    ys, xs = np.nonzero(layers == layer)
    out = np.zeros(layers.shape, bool)
    if len(ys) == 0:
        return out
    c = rng.integers(len(ys))
    d2 = (ys - ys[c]) ** 2 + (xs - xs[c]) ** 2
    n = min(len(ys), max(1, int(round(fraction * mask.sum()))))
    pick = np.argsort(d2, kind="stable")[:n]
    out[ys[pick], xs[pick]] = True
    return out


def _patches(mask: np.ndarray, changed: np.ndarray, patch: int, max_patches: int = 50):
    size = mask.shape[0]
    rows = []
    for y in range(0, size - patch + 1, patch):
        for x in range(0, size - patch + 1, patch):
            tissue = mask[y:y + patch, x:x + patch].mean()
            if tissue >= 0.5:
                rows.append((x, y, float(changed[y:y + patch, x:x + patch].mean())))
    centre = (size - patch) / 2
    rows.sort(key=lambda r: (r[0] - centre) ** 2 + (r[1] - centre) ** 2)
    rows = sorted(rows[:max_patches], key=lambda r: (r[1], r[0]))
    return rows


def make_cohort(config: CohortConfig) -> Cohort:
    """Renders the cohort (see module docstring)."""
    rng = np.random.default_rng(config.seed)
    genes = make_genes(config.n_genes, rng, n_groups=min(2, config.n_genes))
    donors = make_donors(config.n_donors, rng)
    manifest, patches, images = [], [], {}
    image_id = 0
    for g, gene in enumerate(genes):
        affected = g < config.n_affected
        for donor in donors:
            image_id += 1
            case = donor.diagnosis == "schizophrenia"
            r = render_section_full(gene, donor, image_rng(config.seed, image_id),
                                    config.size, config.size, config.region)
            rgb = r.rgb
            changed = np.zeros(r.mask.shape, bool)
            if affected and case:
                mod = render_section_full(boosted(gene, config.layer, config.boost), donor,
                                          image_rng(config.seed, image_id), config.size,
                                          config.size, config.region)
                changed = _region(r.layers, r.mask, config.layer, config.region_fraction,
                                  np.random.default_rng([config.seed, image_id, 7]))
                rgb = np.where(changed[..., None], mod.rgb, r.rgb)
            images[image_id] = rgb
            manifest.append({"image_id": image_id, "gene_symbol": gene.symbol,
                             "entrez_id": gene.entrez_id, "donor_id": donor.donor_id,
                             "diagnosis": donor.diagnosis, "affected": affected,
                             "changed": bool(changed.any()),
                             "changed_pixels": float(changed.sum() / max(r.mask.sum(), 1))})
            for k, (x, y, frac) in enumerate(_patches(r.mask, changed, config.patch)):
                patches.append({"image_id": image_id, "patch_index": k, "x": x, "y": y,
                                "gene_symbol": gene.symbol, "donor_id": donor.donor_id,
                                "changed_fraction": frac})
    return Cohort(pd.DataFrame(manifest), pd.DataFrame(patches), images)


def patch_pixels(cohort: Cohort, patch: int) -> np.ndarray:
    """(P, patch, patch, 3) uint8 pixels of every patch, in the patches table's order."""
    return np.stack([cohort.images[i][y:y + patch, x:x + patch]
                     for i, x, y in cohort.patches[["image_id", "x", "y"]].itertuples(
                         index=False)])
