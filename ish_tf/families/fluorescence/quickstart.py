"""`bin/quickstart --family=mean_teacher`: the fluorescence recipe of the README.

Synthetic plates in the RxRx1 challenge layout (4 cell types x (3 labelled + 1
unlabelled) experiments x 2 plates x 15 wells x 2 sites, 27 classes) -> bin/ingest
--layout=rxrx1 (the test experiments' truth attached for scoring only) -> bin/extract
(6-channel site records split by experiment, per-plate channel stats) -> bin/train
--model=fluorescence (per-plate normalisation, ArcFace) -> bin/train --model=mean_teacher
(started from the supervised model; the test experiments' wells unlabelled in every
batch, pseudo-labelled by the teacher's plate-aware assignment) -> bin/export of both
(the mean teacher's export is its teacher) -> evaluation of the exported models on the
held-out experiments: well accuracy, plate-aware assignment (reported apart) and siRNA
rank-1 across experiments, with chance beside each.

The headline split is `test`: experiments never labelled, whose wells the mean teacher
saw unlabelled (the challenge's transductive setting, as DeepNoise). `validation` holds
labelled experiments that neither model saw at all and is reported beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ish_tf.families.recipes import run_commands, write_summary

SPLITS = ("test", "validation")


def recipe(workdir: str, root: str = ".", seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """The recipe's command lines, paths below `workdir` (`root`: the repository)."""
    j = lambda *a: os.path.abspath(os.path.join(workdir, *a))  # noqa: E731
    cfg = lambda name: f"--flagfile={os.path.join(root, 'configs', name)}"  # noqa: E731
    plates, records = j("plates"), j("records")
    return [
        ("synthetic plates", "synth", ["--modality=fluorescence", f"--out={plates}",
                                       "--synth_experiments=3", "--synth_test_experiments=1",
                                       "--synth_plates=2", f"--seed={seed}"]),
        ("ingest (RxRx1 challenge layout)", "ingest",
         ["--layout=rxrx1", f"--images={plates}", f"--rxrx1_labels={plates}/truth.csv",
          f"--out={j('manifest')}"]),
        ("site records and per-plate stats", "extract",
         [f"--manifest={j('manifest', 'manifest.csv')}", f"--out={records}",
          "--site_size=64", "--num_shards=2"]),
        ("supervised training (ArcFace, per-plate normalisation)", "train",
         [cfg("fluorescence_quickstart.cfg"), f"--records_dir={records}",
          f"--run_dir={j('runs', 'supervised')}", f"--seed={seed}"]),
        ("mean-teacher training", "train",
         [cfg("mean_teacher_quickstart.cfg"), f"--records_dir={records}",
          f"--fluorescence_init_from={j('runs', 'supervised', 'model.keras')}",
          f"--run_dir={j('runs', 'mean_teacher')}", f"--seed={seed}"]),
        ("export (supervised)", "export", [f"--model_dir={j('runs', 'supervised')}",
                                           f"--export_dir={j('export', 'supervised')}"]),
        ("export (mean teacher: the teacher)", "export",
         [f"--model_dir={j('runs', 'mean_teacher')}", f"--export_dir={j('export', 'mean_teacher')}"]),
    ]


def evaluate_exports(workdir: str, splits=SPLITS) -> dict:
    """Scores both exports on the held-out splits: {split: {model: metrics}}."""
    from ish_tf.export.saved_model import resolve_saved_model
    from ish_tf.families import load_model_config
    from ish_tf.families.fluorescence.data import make_pipeline
    from ish_tf.families.fluorescence.evaluation import (
        evaluate_split,
        exported_predictor,
        training_class_groups,
    )

    records = os.path.join(workdir, "records")
    groups = training_class_groups(records)
    out: dict[str, dict] = {}
    for name in ("supervised", "mean_teacher"):
        model_config = load_model_config(os.path.join(workdir, "runs", name, "model_config.json"))
        family = model_config.family
        pipeline = make_pipeline(records, family.normalization, 0.0, model_config.input_size)
        predict = exported_predictor(resolve_saved_model(os.path.join(workdir, "export", name)))
        for split in splits:
            out.setdefault(split, {})[name] = evaluate_split(predict, records, split, pipeline,
                                                             groups)
    return out


def run_quickstart(workdir: str, root: str = ".", seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Runs the recipe; returns (and writes to WORKDIR/summary.json) the accuracies."""
    import time

    os.makedirs(workdir, exist_ok=True)
    times = run_commands(recipe(workdir, root, seed), log)
    t0 = time.monotonic()
    log("[quickstart] evaluation of the exported models on the held-out experiments")
    scores = evaluate_exports(workdir)
    times["evaluation"] = round(time.monotonic() - t0, 1)
    test = scores["test"]
    summary = {
        "family": "mean_teacher",
        "headline": "well accuracy (siRNA, 27 classes) on the held-out test experiments, "
                    "whose wells the mean teacher saw unlabelled (pseudo-labelled by its "
                    "plate-aware assignment, so compare it with "
                    "supervised_plate_assignment too); plate assignment reported apart",
        "accuracy": {"supervised": round(test["supervised"]["accuracy"], 4),
                     "mean_teacher": round(test["mean_teacher"]["accuracy"], 4),
                     "supervised_plate_assignment":
                         round(test["supervised"]["plate_assignment_accuracy"], 4),
                     "mean_teacher_plate_assignment":
                         round(test["mean_teacher"]["plate_assignment_accuracy"], 4)},
        "chance": round(test["supervised"]["chance"], 4),
        "plate_assignment_chance": round(test["supervised"]["plate_assignment_chance"], 4),
        "splits": {split: {name: {k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in metrics.items()}
                           for name, metrics in by_model.items()}
                   for split, by_model in scores.items()},
        "seconds": times,
        "paths": {"records": os.path.join(workdir, "records"),
                  "export": os.path.join(workdir, "export")},
    }
    summary["path"] = write_summary(workdir, summary)
    acc = summary["accuracy"]
    log(f"held-out accuracy (chance {summary['chance']:.3f}): supervised {acc['supervised']:.3f}, "
        f"mean teacher {acc['mean_teacher']:.3f}, mean teacher + plate assignment "
        f"{acc['mean_teacher_plate_assignment']:.3f}")
    return summary
