"""The DeepNoise component table on the quickstart's synthetic plates.

One row per component, each on top of the previous one (as the published progression:
random batches -> per-plate normalisation -> ArcFace -> mean teacher -> plate-aware
assignment), scored on the held-out experiments (wells, 27 classes):

  1. no normalisation (pixels / 255), softmax head, supervised
  2. + per-plate normalisation
  3. + ArcFace head (s = 30, m = 0.1)                 = the quickstart's supervised model
  4. + mean teacher (fine-tuned from 3), DeepNoise's argmax pseudo-labels at weight 0.05
  5. + pseudo-labels from the teacher's plate-aware assignment (weight 1, every 50 steps)
                                                      = the quickstart's mean teacher
  6. + plate-aware assignment (5's probabilities)
  and controls: 3 fine-tuned for 4's steps without a teacher (is a gain just more steps?);
  3 fine-tuned on fixed pseudo-labels (3's plate assignment, made once) without the
  consistency term (does the teacher add anything beyond the pseudo-labels?); 3 + plate
  assignment (does training add anything beyond post-processing?).

The baseline is in the same script (row 1, and chance). Usage:

  .venv/bin/python bench/bench_mean_teacher.py --workdir=/tmp/bench_mt [--seed=0]

Prints a Markdown table (test split = held-out experiments the mean teacher saw unlabelled;
validation = held-out labelled experiments neither model saw) and writes components.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_mean_teacher")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    from ish_tf.cli import invoke
    from ish_tf.families import load_model_config
    from ish_tf.families.fluorescence.data import make_pipeline
    from ish_tf.families.fluorescence.evaluation import evaluate_split, training_class_groups
    from ish_tf.families.fluorescence.quickstart import recipe
    from ish_tf.families.recipes import run_commands

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    data = [c for c in recipe(work, ROOT, args.seed) if c[1] in ("synth", "ingest", "extract")]
    run_commands(data, print)
    records = os.path.join(work, "records")
    sup = f"--flagfile={os.path.join(ROOT, 'configs', 'fluorescence_quickstart.cfg')}"
    mt = f"--flagfile={os.path.join(ROOT, 'configs', 'mean_teacher_quickstart.cfg')}"
    common = [f"--records_dir={records}", f"--seed={args.seed}"]
    run = lambda name: os.path.join(work, "runs", name)  # noqa: E731
    # The control trains with the mean teacher's augmentation, so that only the teacher differs.
    with open(os.path.join(ROOT, "configs", "mean_teacher_quickstart.cfg"), encoding="utf-8") as f:
        same_aug = [line.strip() for line in f
                    if line.startswith(("--fluorescence_noise_augment", "--fluorescence_norm_jitter"))]
    runs = {
        "raw_softmax": [sup, "--fluorescence_normalization=none", "--fluorescence_head=softmax"],
        "plate_softmax": [sup, "--fluorescence_head=softmax"],
        "plate_arcface": [sup],
        "mean_teacher_argmax": [mt, f"--fluorescence_init_from={run('plate_arcface')}/model.keras",
                                "--fluorescence_pseudo_labels=argmax",
                                "--fluorescence_pseudo_label_weight=0.05"],
        "mean_teacher": [mt, f"--fluorescence_init_from={run('plate_arcface')}/model.keras"],
        # The pseudo-labels alone: assigned once from the starting model, no consistency.
        "fixed_pseudo_labels": [mt, f"--fluorescence_init_from={run('plate_arcface')}/model.keras",
                                "--fluorescence_pseudo_label_every=0",
                                "--fluorescence_consistency_weight=0"],
        # The control: the same start and steps as the mean teacher, without the teacher.
        "plate_arcface_more": [sup, f"--fluorescence_init_from={run('plate_arcface')}/model.keras",
                               *same_aug],
    }
    seconds = {}
    for name, flags in runs.items():
        t0 = time.monotonic()
        rc = invoke("train", [*flags, *common, f"--run_dir={run(name)}"])
        if rc:
            raise SystemExit(f"training {name} failed ({rc})")
        seconds[name] = round(time.monotonic() - t0, 1)

    groups = training_class_groups(records)
    scores = {}
    for name in runs:
        mc = load_model_config(os.path.join(run(name), "model_config.json"))
        pipeline = make_pipeline(records, mc.family.normalization, 0.0, mc.input_size)
        files = [("", "model.keras")] + ([("student:", "student.keras")]
                                         if name.startswith("mean_teacher") else [])
        for prefix, file in files:
            model = keras.saving.load_model(os.path.join(run(name), file), compile=False)
            scores[prefix + name] = {
                split: evaluate_split(lambda x, m=model: m(x, training=False), records, split,
                                      pipeline, groups)
                for split in ("test", "validation")}
    for name in ("mean_teacher", "mean_teacher_argmax"):
        seconds["student:" + name] = seconds[name]

    rows = [("no normalisation, softmax (baseline)", "raw_softmax", "accuracy"),
            ("+ per-plate normalisation", "plate_softmax", "accuracy"),
            ("+ ArcFace (s=30, m=0.1)", "plate_arcface", "accuracy"),
            ("+ mean teacher, argmax pseudo-labels x 0.05 (the EMA teacher, exported)",
             "mean_teacher_argmax", "accuracy"),
            ("  (its student)", "student:mean_teacher_argmax", "accuracy"),
            ("+ plate-assignment pseudo-labels x 1 (quickstart; the teacher, exported)",
             "mean_teacher", "accuracy"),
            ("  (its student)", "student:mean_teacher", "accuracy"),
            ("+ plate-aware assignment", "mean_teacher", "plate_assignment_accuracy"),
            ("control: 3 fine-tuned supervised as long as 4, same augmentation",
             "plate_arcface_more", "accuracy"),
            ("control: 3 fine-tuned on fixed pseudo-labels (3's assignment), no consistency",
             "fixed_pseudo_labels", "accuracy"),
            ("control: ArcFace supervised + plate assignment", "plate_arcface",
             "plate_assignment_accuracy")]
    print("| component | test accuracy | validation accuracy | test rank-1 across experiments |"
          " train s |")
    print("|---|---|---|---|---|")
    for label, name, key in rows:
        t, v = scores[name]["test"], scores[name]["validation"]
        print(f"| {label} | {t[key]:.3f} | {v[key]:.3f} | "
              f"{t.get('rank1_other_experiment', float('nan')):.3f} | {seconds[name]:.0f} |")
    t = scores["plate_arcface"]["test"]
    print(f"| chance | {t['chance']:.3f} (assignment: {t['plate_assignment_chance']:.3f}) | "
          f"| {t.get('rank1_chance', float('nan')):.3f} | |")
    with open(os.path.join(work, "components.json"), "w", encoding="utf-8") as f:
        json.dump({"scores": scores, "seconds": seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
