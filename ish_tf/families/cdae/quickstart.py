"""`bin/quickstart --family=cdae`: the CDAE recipe of configs/cdae_quickstart.cfg.

synthetic sections -> whole-section records -> CDAE training -> SavedModel -> codes
through the served model -> baselines (untrained encoder, pixel PCA) -> GO-like group
prediction from each, written to WORKDIR/summary.json with chance (AUC 0.5).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd

from ish_tf.families.recipes import run_commands, write_summary

CONFIG = os.path.join("configs", "cdae_quickstart.cfg")


def recipe(workdir: str, root: str = ".", seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """The recipe's command lines, paths below `workdir` (`root`: the repository)."""
    j = lambda *a: os.path.join(workdir, *a)  # noqa: E731
    synth, whole, run = j("data"), j("records"), j("run")
    export, embed, evaluation = j("export", "cdae"), j("embeddings"), j("evaluation")
    return [
        ("synthetic dataset", "synth",
         [f"--flagfile={os.path.join(root, 'configs', 'synth_quickstart.cfg')}", f"--out={synth}",
          f"--seed={seed}"]),
        ("whole-section records", "extract",
         [f"--manifest={os.path.join(synth, 'manifest.csv')}", f"--out={whole}", "--whole_images",
          "--whole_size=64", "--format=png", "--num_shards=4", "--workers=2", f"--seed={seed}"]),
        ("training", "train",
         [f"--flagfile={os.path.join(root, CONFIG)}", f"--records_dir={whole}", f"--run_dir={run}",
          f"--seed={seed}"]),
        ("export", "export", [f"--model_dir={run}", f"--export_dir={export}"]),
        ("embedding through the SavedModel", "embed",
         [f"--saved_model={export}", f"--records_dir={whole}", f"--out={embed}"]),
        ("baselines", "cdae", ["baselines", f"--run_dir={run}"]),
        ("GO-like group prediction", "evaluate",
         ["--task=annotations", f"--gaf={os.path.join(synth, 'go.gaf')}", "--go_min_genes=3",
          "--go_max_genes=500", f"--out={evaluation}", "--map_method=none", f"--seed={seed}",
          # Every gene, as the CDAE papers score them: the codes are learned without the
          # GO labels (bin/evaluate would otherwise score the held-out genes alone).
          "--splits=all",
          "--embeddings=" + ",".join([
              f"cdae={os.path.join(embed, 'gene_embeddings.csv')}",
              f"pixels_pca={os.path.join(run, 'baselines', 'pixels_pca_gene_embeddings.csv')}",
              f"untrained={os.path.join(run, 'baselines', 'untrained_encoder_gene_embeddings.csv')}",
          ])]),
    ]


def run_quickstart(workdir: str, root: str = ".", seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Runs the recipe; returns (and writes to WORKDIR/summary.json) the headline figures."""
    os.makedirs(workdir, exist_ok=True)
    times = run_commands(recipe(workdir, root, seed), log)
    summary_csv = os.path.join(workdir, "evaluation", "annotations_summary.csv")
    table = pd.read_csv(summary_csv)
    go = table[table["category"] == "go"] if "go" in set(table["category"]) else table
    auc = {str(r.embedding): round(float(r.mean_auc), 4) for r in go.itertuples()}
    metrics = pd.read_csv(os.path.join(workdir, "run", "metrics.csv"))
    summary = {
        "family": "cdae",
        "headline": "mean AUC of GO-like group prediction from gene codes (5-fold logistic "
                    "regression per group)",
        "mean_auc": auc, "chance_auc": 0.5,
        "baselines": {"untrained": "the same encoder at its random initialisation "
                                   "(batch-norm statistics re-estimated the same way)",
                      "pixels_pca": "PCA of the downsampled pixels to the code size"},
        "final_train_loss": round(float(metrics["loss"].iloc[-1]), 5),
        "final_train_mse": round(float(metrics["mse"].iloc[-1]), 5),
        "seconds": times,
        "paths": {"evaluation": os.path.dirname(summary_csv),
                  "saved_model": os.path.join(workdir, "export", "cdae"),
                  "report": os.path.join(workdir, "evaluation", "report.html")},
    }
    summary["path"] = write_summary(workdir, summary)
    log("GO-like groups, mean AUC (chance 0.5): " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
    return summary
