"""`bin/quickstart --family=cic`: the cell-identity-code recipe of configs/cic_quickstart.cfg.

synthetic profiles (or `expression=PATH` with `label_column`) -> ingest (stratified; and
whole cell types held out for the unseen-type test) -> cic and cic_classifier training
through the shared trainer -> SavedModels -> codes of every profile through the served
model (.h5ad + table) -> per-unit interpretation (on synthetic data: enrichment of the
known gene programs) -> evaluation on the held-out profiles against PCA, NMF and
KernelPCA, and cell-type classification against PCA features and an SVM on all genes,
written to WORKDIR/summary.json with the training-mean, majority-class and chance figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from ish_tf.families.recipes import run_commands, write_summary

CONFIG = os.path.join("configs", "cic_quickstart.cfg")


def recipe(workdir: str, root: str = ".", seed: int = 0, expression: str = "",
           label_column: str = "", use_raw: bool = False, steps: int = 0
           ) -> list[tuple[str, str, list[str]]]:
    """The recipe's command lines, paths below `workdir` (`root`: the repository).

    Args:
      expression: a matrix to run on instead of synthetic profiles (.h5ad / CSV).
      label_column: its label column (required with `expression`).
      use_raw: read the .h5ad's .raw matrix.
      steps: training steps (0: the config's).
    """
    j = lambda *a: os.path.join(workdir, *a)  # noqa: E731
    cfg = f"--flagfile={os.path.join(root, CONFIG)}"
    source: list[str]
    commands = []
    if expression:
        source = [f"--expression={expression}", f"--label_column={label_column}"]
        if use_raw:
            source.append("--use_raw")
        embed_source = [f"--expression={expression}"] + (["--use_raw"] if use_raw else [])
    else:
        data = j("data")
        commands.append(("synthetic profiles", "synth",
                         ["--modality=expression", f"--out={data}", "--synth_cells=600",
                          "--n_genes=500", f"--seed={seed}"]))
        source = [f"--expression={os.path.join(data, 'counts.csv')}",
                  f"--obs={os.path.join(data, 'obs.csv')}", "--label_column=cell_type",
                  "--group_column=batch"]
        embed_source = [f"--expression={os.path.join(data, 'counts.csv')}",
                        f"--obs={os.path.join(data, 'obs.csv')}"]
    profiles, unseen = j("profiles"), j("profiles_unseen")
    for stage, out, split in (("ingest (stratified splits)", profiles, []),
                              ("ingest (cell types held out)", unseen, ["--split_by=label"])):
        # An ingest refuses to overwrite its records; preprocessing.json is written last,
        # so a directory holding it is finished (a rerun resumes after it).
        if not os.path.exists(os.path.join(out, "preprocessing.json")):
            commands.append((stage, "ingest", [*source, *split, f"--out={out}",
                                               f"--seed={seed}"]))
    extra = [f"--steps={steps}", f"--decay_start={max(1, steps * 2 // 3)}"] if steps else []
    for name, model, records in (("cic", "cic", profiles),
                                 ("cic_classifier", "cic_classifier", profiles),
                                 ("cic_unseen", "cic", unseen)):
        commands.append((f"training {name}", "train",
                         [cfg, f"--model={model}", f"--records_dir={os.path.join(records, 'records')}",
                          f"--run_dir={j('runs', name)}", f"--seed={seed}", *extra]))
        commands.append((f"export {name}", "export",
                         [f"--model_dir={j('runs', name)}", f"--export_dir={j('export', name)}"]))
    gmt = [] if expression else [f"--gmt={os.path.join(j('data'), 'programs.gmt')}"]
    commands += [
        ("interpretation of the code units", "cic",
         ["interpret", f"--run_dir={j('runs', 'cic')}", f"--profiles={profiles}",
          f"--out={j('interpret')}", *gmt]),
        ("codes through the SavedModel", "embed",
         [f"--saved_model={j('export', 'cic')}", *embed_source, f"--out={j('embeddings')}"]),
        ("evaluation", "evaluate",
         ["--task=expression", f"--profiles={profiles}", f"--saved_model={j('export', 'cic')}",
          f"--classifier_model={j('export', 'cic_classifier')}",
          f"--embedding={j('embeddings', 'codes.csv')}", f"--unseen_profiles={unseen}",
          f"--unseen_model={j('export', 'cic_unseen')}", f"--out={j('evaluation')}",
          f"--seed={seed}"]),
    ]
    return commands


def run_quickstart(workdir: str, root: str = ".", seed: int = 0,
                   log: Callable[[str], None] = print, expression: str = "",
                   label_column: str = "", use_raw: bool = False, steps: int = 0) -> dict:
    """Runs the recipe; returns (and writes to WORKDIR/summary.json) the headline figures.

    Raises:
      ValueError: `expression` without `label_column`.
      ish_tf.families.recipes.RecipeError: a command failed.
    """
    if expression and not label_column:
        raise ValueError("--expression needs --label_column (the cell-type column)")
    os.makedirs(workdir, exist_ok=True)
    times = run_commands(recipe(workdir, root, seed, expression, label_column, use_raw, steps),
                         log)
    with open(os.path.join(workdir, "evaluation", "expression_summary.json"),
              encoding="utf-8") as f:
        ev = json.load(f)
    rec = ev["reconstruction"]
    keys = ("mse", "pearson", "spearman", "own_rank1")
    summary = {
        "family": "cic",
        "data": os.path.abspath(expression) if expression else "synthetic profiles "
                "(bin/synth --modality=expression: 600 x 500 genes, 6 types, 2 batches)",
        "headline": "held-out profiles: reconstruction (standardised units) and cell-type "
                    "accuracy, against baselines at the same code width",
        "n_train": ev["n_train"], "n_test": ev["n_test"], "n_genes": ev["n_genes"],
        "code_size": ev["code_size"],
        "reconstruction": {k: {m: round(v[m], 4) for m in keys} for k, v in rec.items()},
        "reconstruction_chance": ev["reconstruction_chance"],
        "classification": {k: v["accuracy"] for k, v in ev["classification"].items() if v},
        "classification_errors": {k: f"{v['errors']}/{v['n_test']}"
                                  for k, v in ev["classification"].items() if v},
        "classification_baselines": {k: v["accuracy"] for k, v in
                                     ev["classification_baselines"].items() if v},
        "unseen": ev["unseen"],
        "interpretation": _interpretation(workdir),
        "noise": ev["noise"],
        "seconds": times,
        "paths": {"evaluation": os.path.join(workdir, "evaluation"),
                  "report": os.path.join(workdir, "evaluation", "report.html"),
                  "saved_model": os.path.join(workdir, "export", "cic"),
                  "codes_h5ad": os.path.join(workdir, "embeddings", "codes.h5ad")},
    }
    summary["path"] = write_summary(workdir, summary)
    i = summary["interpretation"]
    if "sets_found" in i:
        log(f"code units enriched (Bonferroni p < 0.05) for a known program: "
            f"{i['units_with_a_significant_set']} of {i['units']}; programs found "
            f"{len(i['sets_found'])} of {i['gene_sets']}: {', '.join(i['sets_found'])} (PCA at the "
            f"same width: {i['pca_baseline']['units_with_a_significant_set']} components, "
            f"{len(i['pca_baseline']['sets_found'])} programs)")
    c, b = summary["classification"], summary["classification_baselines"]
    log("reconstruction MSE (test): " + ", ".join(
        f"{k} {v['mse']:.3f}" for k, v in summary["reconstruction"].items()))
    log("cell-type accuracy (test): " + ", ".join(f"{k} {v:.3f}" for k, v in c.items())
        + " | " + ", ".join(f"{k} {v:.3f}" for k, v in b.items()))
    return summary


def _interpretation(workdir: str) -> dict:
    """The interpretation's headline: enrichment of the known programs (synthetic), and
    the top 5 genes of the first 3 units."""
    import pandas as pd

    with open(os.path.join(workdir, "interpret", "interpret_summary.json"),
              encoding="utf-8") as f:
        s = json.load(f)
    genes = pd.read_csv(os.path.join(workdir, "interpret", "unit_genes.csv"))
    out = {k: s[k] for k in ("units", "top_genes", "gene_sets", "units_with_a_significant_set",
                             "sets_found", "pca_baseline") if k in s}
    out["top5_of_first_units"] = {
        int(u): [f"{g.gene} {g.change:+.2f}" for g in part.head(5).itertuples()]
        for u, part in genes[genes["unit"] < 3].groupby("unit")}
    return out
