"""Synthetic expression profiles: seeded, cell types separable, batch effect present."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ish_tf.data.synthetic_expression import (
    ExpressionSynthConfig,
    synthetic_profiles,
    write_synthetic_profiles,
)

_SMALL = ExpressionSynthConfig(n_cells=240, n_genes=200, n_types=4, n_batches=2,
                               genes_per_program=20, seed=3)


def _log1p_normalised(counts: np.ndarray) -> np.ndarray:
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return np.log1p(counts / totals * 1e4)


def _nearest_centroid_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    """Centroids fitted on even rows, scored on odd rows."""
    train, test = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    names = np.unique(labels)
    centroids = np.stack([x[train][labels[train] == n].mean(axis=0) for n in names])
    d = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1)
    return float(np.mean(names[d.argmin(1)] == labels[test]))


def test_same_seed_same_profiles_other_seed_differs():
    a, obs_a, genes = synthetic_profiles(_SMALL)
    b, obs_b, _ = synthetic_profiles(_SMALL)
    np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(obs_a, obs_b)
    c, _, _ = synthetic_profiles(ExpressionSynthConfig(**{**_SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(a, c)
    assert a.shape == (240, 200) and a.dtype == np.int64 and a.min() >= 0
    assert len(genes) == 200 and list(obs_a.columns) == ["cell_type", "batch"]
    assert obs_a["cell_type"].nunique() == 4 and obs_a["batch"].nunique() == 2
    assert 0.05 < np.mean(a == 0) < 0.9  # dropout and low counts, not all zero


def test_cell_types_separable_well_above_chance():
    counts, obs, _ = synthetic_profiles(_SMALL)
    acc = _nearest_centroid_accuracy(_log1p_normalised(counts), obs["cell_type"].to_numpy())
    assert acc > 0.9, acc  # chance is 0.25
    # Without type programs the same classifier is near chance: the structure is the programs.
    flat, obs_flat, _ = synthetic_profiles(ExpressionSynthConfig(
        **{**_SMALL.__dict__, "program_strength": 0.0}))
    chance = _nearest_centroid_accuracy(_log1p_normalised(flat), obs_flat["cell_type"].to_numpy())
    assert chance < 0.5, chance


def test_batch_effect_present_and_controlled():
    def batch_gap(strength: float) -> float:
        counts, obs, _ = synthetic_profiles(ExpressionSynthConfig(
            **{**_SMALL.__dict__, "batch_strength": strength}))
        x, batch = _log1p_normalised(counts), obs["batch"].to_numpy()
        return float(np.abs(x[batch == "batch0"].mean(0) - x[batch == "batch1"].mean(0)).mean())

    assert batch_gap(0.5) > 2 * batch_gap(0.0)


def test_written_tables_round_trip(tmp_path):
    paths = write_synthetic_profiles(str(tmp_path / "expr"), _SMALL)
    counts, obs, genes = synthetic_profiles(_SMALL)
    table = pd.read_csv(paths["counts"], index_col=0)
    assert list(table.columns) == genes
    np.testing.assert_array_equal(table.to_numpy(), counts)
    pd.testing.assert_frame_equal(pd.read_csv(paths["obs"], index_col=0), obs)


def test_program_gene_sets_are_the_raised_genes(tmp_path):
    """programs.gmt lists each type's program; those genes are higher in that type."""
    from ish_tf.data.synthetic_expression import program_gene_sets

    paths = write_synthetic_profiles(str(tmp_path / "expr"), _SMALL)
    sets = program_gene_sets(_SMALL)
    lines = [ln.split("\t") for ln in open(paths["programs"]).read().splitlines()]
    assert {ln[0]: ln[2:] for ln in lines} == sets
    assert len(sets) == _SMALL.n_types + 1
    counts, obs, genes = synthetic_profiles(_SMALL)
    x = _log1p_normalised(counts)
    cols = [genes.index(g) for g in sets["type0_program"]]
    in_type = obs["cell_type"].to_numpy() == "type0"
    assert x[in_type][:, cols].mean() > x[~in_type][:, cols].mean() + 0.3
