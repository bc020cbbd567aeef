"""`bin/quickstart --family=ish_cnn`: the ISH CNN recipe of the README.

A synthetic pair of sections (animal0 labelled by its spots, animal1 held out) ->
record sets per patch size -> one ISH CNN per size -> dense prediction on animal1 ->
per-class Dice of each model, their ensemble and two baselines (majority class, random
labels at the truth's frequencies), written to WORKDIR/summary.json.

Four of the README table's patch sizes (16-64 px), 300 steps each: about two minutes on
2 cores. The 128 px model alone takes about four more (262 s measured), which would
take the quickstart past six minutes; the README's full recipe includes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd

from ish_tf.families.recipes import run_commands, write_summary

SIZES = (16, 32, 48, 64)


def recipe(workdir: str, root: str = ".", seed: int = 0, sizes=SIZES
           ) -> list[tuple[str, str, list[str]]]:
    """The recipe's command lines, paths below `workdir` (`root`: the repository)."""
    j = lambda *a: os.path.join(workdir, *a)  # noqa: E731
    sections, records = j("sections"), j("records")
    commands = [("synthetic pair and record sets", "spatial",
                 [f"--flagfile={os.path.join(root, 'configs', 'spatial_quickstart.cfg')}",
                  f"--synthetic_pair={sections}", f"--out={records}",
                  "--patch_sizes=" + ",".join(str(s) for s in sizes), f"--seed={seed}"])]
    for size in sizes:
        commands.append((f"training p{size}", "train",
                         [f"--flagfile={os.path.join(root, 'configs', 'ish_cnn_quickstart.cfg')}",
                          f"--records_dir={records}", f"--input_size={size}",
                          f"--run_dir={j('runs', f'p{size}')}", f"--seed={seed}"]))
    commands.append(("prediction and Dice on the second animal", "predict",
                     ["--model_dirs=" + ",".join(j("runs", f"p{s}") for s in sizes),
                      f"--section_image={os.path.join(sections, 'animal1.png')}",
                      f"--spot_table={os.path.join(sections, 'animal1_spots.csv')}",
                      f"--section_mask={os.path.join(sections, 'animal1_mask.png')}",
                      f"--out={j('predict')}", f"--seed={seed}"]))
    return commands


def run_quickstart(workdir: str, root: str = ".", seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Runs the recipe; returns (and writes to WORKDIR/summary.json) the Dice table."""
    os.makedirs(workdir, exist_ok=True)
    times = run_commands(recipe(workdir, root, seed), log)
    table = pd.read_csv(os.path.join(workdir, "predict", "dice.csv"))
    mean = {str(r.model): round(float(r.mean_dice), 4) for r in table.itertuples()}
    baselines = {k: v for k, v in mean.items() if k.startswith("baseline_")}
    summary = {
        "family": "ish_cnn",
        "headline": "mean Dice over classes (two genes, tissue, background) on the held-out "
                    "animal's section",
        "mean_dice": {k: v for k, v in mean.items() if not k.startswith("baseline_")},
        "baselines": baselines,
        "dice_table": table.to_dict(orient="records"),
        "seconds": times,
        "paths": {"dice": os.path.join(workdir, "predict", "dice.csv"),
                  "report": os.path.join(workdir, "predict", "report.html")},
    }
    summary["path"] = write_summary(workdir, summary)
    log("mean Dice on animal1: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    return summary
