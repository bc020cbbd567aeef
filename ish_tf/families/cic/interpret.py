"""What each code unit means: the paper's perturbation test (`bin/cic interpret`).

For each code unit u: the mean code of the training profiles, with unit u set to its
mean + `sd` (2) standard deviations, is decoded, and the genes are ranked by how much
their decoded value changes against the decoded mean code (standardised units; the
sign says up or down). The top `top` genes (100) of each unit are written, and with a
gene-set file (GMT) each unit's top list is tested for over-representation of each set
(hypergeometric; universe: the model's genes; sets cut to the universe; Bonferroni over
the sets tested for that unit).

The decoder is the trained Keras model (RUN/model.keras): the export serves profile ->
code and reconstruction, not code -> profile.

Writes OUT/unit_genes.csv (unit, rank, gene, change), OUT/units/unit_NN.csv (one per
unit), OUT/enrichment.csv (unit, gene_set, overlap, set_size, top_n, universe, p,
p_bonferroni, genes), OUT/pca_enrichment.csv (the baseline: the same test on PCA
components at the code width, perturbed by the same number of SDs) and
OUT/interpret_summary.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_write_text

_CLASSIFIER_LAYERS = ("classifier_dense", "classifier_act", "logits", "probabilities")


class InterpretError(ValueError):
    """A run, gene-set file or setting that cannot be used; the message names it."""


def read_gmt(path: str) -> dict[str, list[str]]:
    """A GMT gene-set file: per line NAME <tab> DESCRIPTION <tab> GENE <tab> GENE ...

    Raises:
      InterpretError: a missing file, a line with no genes, or a repeated set name
        (naming the line).
    """
    if not os.path.exists(path):
        raise InterpretError(f"{path}: no such gene-set file")
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            genes = [g.strip() for g in fields[2:] if g.strip()]
            if len(fields) < 3 or not genes:
                raise InterpretError(f"{path}:{number}: a GMT line needs a name, a description "
                                     "and at least one gene, tab-separated")
            name = fields[0].strip()
            if name in sets:
                raise InterpretError(f"{path}:{number}: gene set {name!r} repeats")
            sets[name] = list(dict.fromkeys(genes))
    if not sets:
        raise InterpretError(f"{path}: no gene sets")
    return sets


def split_model(model):
    """(encoder profile -> code, decoder code -> reconstruction) of a cic Keras model.

    Raises:
      InterpretError: the model has no "code" or "reconstruction" layer.
    """
    import keras

    names = [layer.name for layer in model.layers]
    if "code" not in names or "reconstruction" not in names:
        raise InterpretError(f"model {model.name!r} has no code/reconstruction layers: not a "
                             "cic model")
    encoder = keras.Model(model.inputs[0], model.get_layer("code").output)
    code_size = int(model.get_layer("code").output.shape[-1])
    inputs = keras.Input((code_size,), name="code_in")
    x = inputs
    for layer in model.layers[names.index("code") + 1:]:
        if layer.name in _CLASSIFIER_LAYERS:
            continue
        x = layer(x)
        if layer.name == "reconstruction":
            break
    return encoder, keras.Model(inputs, x, name="decoder")


def hypergeometric_enrichment(top: Sequence[str], sets: dict[str, list[str]],
                              universe: Sequence[str], min_size: int = 3) -> pd.DataFrame:
    """Over-representation of each set in `top` (hypergeometric upper tail).

    Args:
      top: the selected genes (a unit's top list), all in `universe`.
      sets: gene sets; cut to `universe`, those with fewer than `min_size` genes left
        are not tested.
      universe: every gene that could have been selected.

    Returns:
      One row per tested set: gene_set, overlap k, set_size K, top_n n, universe M,
      p = P(X >= k), p_bonferroni = min(1, p x sets tested), genes (the overlap).
    """
    from scipy.stats import hypergeom

    universe_set = set(universe)
    top_set = set(top) & universe_set
    rows = []
    for name, genes in sets.items():
        members = [g for g in genes if g in universe_set]
        if len(members) < min_size:
            continue
        overlap = sorted(top_set.intersection(members))
        p = float(hypergeom.sf(len(overlap) - 1, len(universe_set), len(members), len(top_set)))
        rows.append({"gene_set": name, "overlap": len(overlap), "set_size": len(members),
                     "top_n": len(top_set), "universe": len(universe_set), "p": p,
                     "genes": ";".join(overlap)})
    frame = pd.DataFrame(rows, columns=["gene_set", "overlap", "set_size", "top_n", "universe",
                                        "p", "genes"])
    frame.insert(6, "p_bonferroni", np.minimum(1.0, frame["p"] * max(len(frame), 1)))
    return frame


def perturbation_ranking(encoder, decoder, profiles: np.ndarray, genes: Sequence[str],
                         top: int = 100, sd: float = 2.0) -> pd.DataFrame:
    """Per code unit, the genes ranked by |decode(mean code + sd x SD in that unit) -
    decode(mean code)| (the top `top`); columns unit, rank, gene, change."""
    codes = np.asarray(encoder.predict(profiles, verbose=0, batch_size=256), np.float64)
    mean, spread = codes.mean(axis=0), codes.std(axis=0)
    n_units = codes.shape[1]
    perturbed = np.repeat(mean[None], n_units + 1, axis=0)
    perturbed[np.arange(n_units), np.arange(n_units)] += sd * spread
    decoded = np.asarray(decoder.predict(perturbed.astype(np.float32), verbose=0), np.float64)
    change = decoded[:n_units] - decoded[n_units]  # last row: the unperturbed mean code
    top = min(top, len(genes))
    rows = []
    for u in range(n_units):
        order = np.argsort(-np.abs(change[u]), kind="stable")[:top]
        rows += [{"unit": u, "rank": r + 1, "gene": genes[i], "change": float(change[u, i])}
                 for r, i in enumerate(order)]
    return pd.DataFrame(rows)


def pca_ranking(profiles: np.ndarray, genes: Sequence[str], n_units: int, top: int = 100,
                sd: float = 2.0, seed: int = 0) -> pd.DataFrame:
    """The same test for PCA at the code width (the baseline): moving component k by `sd`
    of its training spread changes gene g by sd x spread_k x loading[k, g]."""
    from sklearn.decomposition import PCA

    n = int(min(n_units, profiles.shape[0] - 1, profiles.shape[1]))
    pca = PCA(n_components=n, random_state=seed).fit(profiles)
    change = sd * np.sqrt(pca.explained_variance_)[:, None] * pca.components_
    top = min(top, len(genes))
    rows = []
    for u in range(n):
        order = np.argsort(-np.abs(change[u]), kind="stable")[:top]
        rows += [{"unit": u, "rank": r + 1, "gene": genes[i], "change": float(change[u, i])}
                 for r, i in enumerate(order)]
    return pd.DataFrame(rows)


def _enrich(ranking: pd.DataFrame, sets, universe, min_size: int) -> pd.DataFrame:
    frames = []
    for u, part in ranking.groupby("unit"):
        e = hypergeometric_enrichment(part["gene"].tolist(), sets, universe, min_size)
        e.insert(0, "unit", int(u))
        frames.append(e)
    return pd.concat(frames, ignore_index=True).sort_values(["unit", "p"])


def interpret_run(run_dir: str, profiles_dir: str, out_dir: str, *, top: int = 100,
                  sd: float = 2.0, gmt: str = "", min_set_size: int = 3,
                  alpha: float = 0.05) -> dict:
    """Runs the perturbation test (module docstring); returns the summary (also written).

    Args:
      run_dir: a cic or cic_classifier run (RUN/model.keras), or the .keras file.
      profiles_dir: its `bin/ingest --expression` directory (the training profiles give
        the code means and SDs; genes.csv the names).
      out_dir: OUT.
      top: genes kept per unit.
      sd: the perturbation, in standard deviations of the unit over training codes.
      gmt: gene sets for the enrichment ("" = none).
      alpha: Bonferroni-corrected level reported as significant.

    Raises:
      InterpretError: a missing model, a gene count that does not match, a bad GMT.
    """
    import keras

    from ish_tf.data.expression import read_ingested

    path = run_dir if run_dir.endswith(".keras") else os.path.join(run_dir, "model.keras")
    if not os.path.exists(path):
        raise InterpretError(f"{path}: no trained model (train with --model=cic first)")
    if top < 1 or sd <= 0:
        raise InterpretError(f"--top_genes must be >= 1 and --perturb_sd > 0, got {top}, {sd}")
    sets = read_gmt(gmt) if gmt else {}
    model = keras.models.load_model(path, compile=False)
    encoder, decoder = split_model(model)
    _, prep, splits = read_ingested(profiles_dir, ("train",))
    if "train" not in splits:
        raise InterpretError(f"{profiles_dir}: no training profiles")
    train = splits["train"].values
    if int(model.inputs[0].shape[-1]) != train.shape[1]:
        raise InterpretError(f"{path} takes {model.inputs[0].shape[-1]} genes; {profiles_dir} "
                             f"holds {train.shape[1]}")
    ranking = perturbation_ranking(encoder, decoder, train, prep.genes, top, sd)
    os.makedirs(os.path.join(out_dir, "units"), exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "unit_genes.csv"), ranking.to_csv(index=False))
    for u, part in ranking.groupby("unit"):
        atomic_write_text(os.path.join(out_dir, "units", f"unit_{int(u):02d}.csv"),
                          part.drop(columns="unit").to_csv(index=False))
    n_units = int(ranking["unit"].max()) + 1
    summary = {"model": os.path.abspath(path), "profiles": os.path.abspath(profiles_dir),
               "units": n_units, "top_genes": int(ranking.groupby("unit").size().iloc[0]),
               "perturbation_sd": sd, "n_training_profiles": int(train.shape[0]),
               "unit_genes": os.path.join(out_dir, "unit_genes.csv")}
    if sets:
        enrichment = _enrich(ranking, sets, prep.genes, min_set_size)
        enrichment_path = os.path.join(out_dir, "enrichment.csv")
        atomic_write_text(enrichment_path, enrichment.to_csv(index=False))
        significant = enrichment[enrichment["p_bonferroni"] < alpha]
        # The baseline: PCA components at the same width, the same test.
        pca = _enrich(pca_ranking(train, prep.genes, n_units, top, sd), sets, prep.genes,
                      min_set_size)
        atomic_write_text(os.path.join(out_dir, "pca_enrichment.csv"), pca.to_csv(index=False))
        pca_significant = pca[pca["p_bonferroni"] < alpha]
        summary.update({
            "gmt": os.path.abspath(gmt), "gene_sets": len(sets),
            "gene_sets_tested": int(enrichment.groupby("unit").size().max()) if len(
                enrichment) else 0,
            "alpha_bonferroni": alpha, "enrichment": enrichment_path,
            "units_with_a_significant_set": int(significant["unit"].nunique()),
            "significant": {int(u): part["gene_set"].tolist()
                            for u, part in significant.groupby("unit")},
            "sets_found": sorted(set(significant["gene_set"])),
            "pca_baseline": {
                "units": int(pca["unit"].nunique()),
                "units_with_a_significant_set": int(pca_significant["unit"].nunique()),
                "sets_found": sorted(set(pca_significant["gene_set"]))},
        })
    atomic_write_text(os.path.join(out_dir, "interpret_summary.json"),
                      json.dumps(summary, indent=1) + "\n")
    return summary
