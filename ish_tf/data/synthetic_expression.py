"""Synthetic gene-expression profiles with known structure (`bin/synth --modality=expression`).

A cell's expected expression of gene g is

    mean[c, g] = size[c] * exp(base[g] + housekeeping[g] + program[type(c), g] + batch[b(c), g])

with `base` the gene's baseline (log scale), `housekeeping` a shared program (a module
of genes raised in every cell), `program[t]` cell type t's program (its own module of
`genes_per_program` genes raised by type-specific log-fold loadings, some shared with
other types' modules), `batch[b]` a per-gene shift of batch b (the batch effect), and
`size[c]` a log-normal library-size factor. Counts are negative-binomial (a
gamma-Poisson mixture with dispersion `dispersion`; 0 gives Poisson), and a fraction
`dropout` of the entries are then zeroed at random (technical dropout). Everything is
drawn from one seed, so a seed gives the same matrix.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

COUNTS_NAME = "counts.csv"
OBS_NAME = "obs.csv"
PROGRAMS_NAME = "programs.gmt"


@dataclasses.dataclass(frozen=True)
class ExpressionSynthConfig:
    """What `synthetic_profiles` draws.

    Attributes:
      n_cells: profiles (samples).
      n_genes: genes.
      n_types: cell types.
      n_batches: batches (the group of each profile).
      genes_per_program: genes in each cell type's program (and the housekeeping one).
      program_strength: mean log-fold raise of a program's genes.
      batch_strength: standard deviation of the per-gene log shift of each batch.
      dispersion: negative-binomial dispersion phi (variance = mu + phi mu^2); 0: Poisson.
      dropout: fraction of entries zeroed after sampling.
      mean_count: typical count of a baseline gene in an average cell.
      seed: the seed of every draw.
    """

    n_cells: int = 600
    n_genes: int = 500
    n_types: int = 6
    n_batches: int = 2
    genes_per_program: int = 30
    program_strength: float = 1.5
    batch_strength: float = 0.3
    dispersion: float = 0.2
    dropout: float = 0.1
    mean_count: float = 2.0
    seed: int = 0

    def validate(self) -> ExpressionSynthConfig:
        """Raises ValueError naming the field of a bad value; returns self."""
        for name in ("n_cells", "n_genes", "n_types", "n_batches", "genes_per_program"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.genes_per_program > self.n_genes:
            raise ValueError(f"genes_per_program={self.genes_per_program} exceeds "
                             f"n_genes={self.n_genes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dispersion < 0 or self.batch_strength < 0 or self.mean_count <= 0:
            raise ValueError("dispersion and batch_strength must be >= 0, mean_count > 0")
        return self


def synthetic_profiles(cfg: ExpressionSynthConfig = ExpressionSynthConfig()
                       ) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Draws a samples x genes count matrix with cell-type programs and batch effects.

    Args:
      cfg: what to draw (see `ExpressionSynthConfig`).

    Returns:
      (counts int64 (n_cells, n_genes), obs DataFrame indexed by sample name
      ("cell00000", ...) with columns cell_type ("type0", ...) and batch ("batch0", ...),
      gene names ("gene0000", ...)).

    Raises:
      ValueError: a bad config value.
    """
    counts, obs, genes, _ = _draw(cfg)
    return counts, obs, genes


def program_gene_sets(cfg: ExpressionSynthConfig = ExpressionSynthConfig()
                      ) -> dict[str, list[str]]:
    """The genes of each program `synthetic_profiles` draws with `cfg`: "housekeeping" and
    "type0_program", ... (the known structure that interpretation should find)."""
    return _draw(cfg)[3]


def _draw(cfg: ExpressionSynthConfig):
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n, g = cfg.n_cells, cfg.n_genes
    base = rng.normal(np.log(cfg.mean_count), 0.7, size=g)
    housekeeping = np.zeros(g)
    hk_genes = rng.choice(g, cfg.genes_per_program, replace=False)
    housekeeping[hk_genes] = rng.uniform(1.5, 3.0)
    programs = np.zeros((cfg.n_types, g))
    modules = {"housekeeping": sorted(int(i) for i in hk_genes)}
    for t in range(cfg.n_types):
        module = rng.choice(g, cfg.genes_per_program, replace=False)
        modules[f"type{t}_program"] = sorted(int(i) for i in module)
        programs[t, module] = rng.gamma(4.0, cfg.program_strength / 4.0, size=module.size)
    batch_shift = rng.normal(0.0, cfg.batch_strength, size=(cfg.n_batches, g))
    types = np.arange(n) % cfg.n_types
    rng.shuffle(types)
    batches = rng.integers(0, cfg.n_batches, size=n)
    size = rng.lognormal(0.0, 0.3, size=n)
    log_mean = base + housekeeping + programs[types] + batch_shift[batches]
    mean = size[:, None] * np.exp(log_mean)
    if cfg.dispersion > 0:
        mean = mean * rng.gamma(1.0 / cfg.dispersion, cfg.dispersion, size=mean.shape)
    counts = rng.poisson(mean).astype(np.int64)
    if cfg.dropout > 0:
        counts[rng.random(counts.shape) < cfg.dropout] = 0
    obs = pd.DataFrame({"cell_type": [f"type{t}" for t in types],
                        "batch": [f"batch{b}" for b in batches]},
                       index=pd.Index([f"cell{i:05d}" for i in range(n)], name="sample_id"))
    names = [f"gene{j:04d}" for j in range(g)]
    return counts, obs, names, {k: [names[i] for i in v] for k, v in modules.items()}


def write_synthetic_profiles(out_dir: str, cfg: ExpressionSynthConfig = ExpressionSynthConfig()
                             ) -> dict[str, str]:
    """Writes `synthetic_profiles` as OUT/counts.csv (samples x genes, first column
    sample_id), OUT/obs.csv (sample_id, cell_type, batch) and OUT/programs.gmt (the genes
    of each program, a gene-set file for `bin/cic interpret --gmt`).

    Returns:
      {"counts": path, "obs": path, "programs": path}.
    """
    from ish_tf.io_utils import atomic_write_text

    counts, obs, genes, modules = _draw(cfg)
    os.makedirs(out_dir, exist_ok=True)
    table = pd.DataFrame(counts, index=obs.index, columns=genes)
    paths = {"counts": os.path.join(out_dir, COUNTS_NAME), "obs": os.path.join(out_dir, OBS_NAME),
             "programs": os.path.join(out_dir, PROGRAMS_NAME)}
    atomic_write_text(paths["counts"], table.to_csv())
    atomic_write_text(paths["obs"], obs.to_csv())
    atomic_write_text(paths["programs"], "".join(
        f"{name}\tsynthetic program\t" + "\t".join(members) + "\n"
        for name, members in modules.items()))
    return paths
