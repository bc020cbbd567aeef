"""`bin/tune`: KerasTuner search over ordinary bin/train runs.

Examples:
  bin/tune --flagfile=configs/tune_triplet.cfg --records_dir=DIR --out=tune/triplet
  bin/tune --flagfile=configs/tune_triplet.cfg --records_dir=DIR --out=tune/t \\
      --tuner=hyperband --steps_scale=0.01             # a quick, scaled-down search
  bin/train --flagfile=tune/triplet/best.cfg           # train the best trial

Accepts every bin/train flag (the base of each trial) plus the tune flags. Writes
OUT/trials.csv, OUT/best.cfg, OUT/runs/ (trial run directories; TensorBoard logdir
with HParams) and OUT/tuner/ (KerasTuner state). Rerunning with the same --out
resumes the search. Distributed: run the same command with KERASTUNER_TUNER_ID
(chief / tuner0, tuner1, ...), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set
(see ish_tf.tune.search).
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import definer, run, usage_errors
from ish_tf.cli import train as train_cli

NAME = "tune"


def define_tune(fv) -> None:
    """Flags of `bin/tune` (KerasTuner search over bin/train runs; see ish_tf.tune)."""
    d = definer(fv, NAME)
    d.string("out", "", "Output directory: trials.csv, best.cfg, runs/, tuner/.")
    d.enum("tuner", "random", ["grid", "random", "bayesian", "hyperband"],
           "KerasTuner oracle choosing each trial's hyperparameters.")
    d.integer("max_trials", 20, "Most trials (hyperband: its own budget too).",
              lower_bound=1)
    d.integer("executions_per_trial", 1, "Trainings per trial (seeds seed, seed+1, "
              "...); the objective is their mean.", lower_bound=1)
    d.float("steps_scale", 1.0, "Multiplies each trial's --steps (small runs); "
            "best.cfg keeps the full length.")
    d.string("validation_split", "validation", "Split the objective is computed on.")
    d.integer("val_batch_size", 64, "Patches per inference batch when scoring.",
              lower_bound=1)
    d.integer("val_batches", 20, "Validation batches of the task loss (families "
              "scored by validation loss).", lower_bound=1)
    d.bool("tune_overwrite", False, "Discard an existing search in --out instead "
           "of resuming it.")
    d.integer("hyperband_max_epochs", 9, "Hyperband's largest budget, in units of "
              "max(--tune_steps)/hyperband_max_epochs steps.", lower_bound=1)
    d.integer("hyperband_factor", 3, "Hyperband's reduction factor.", lower_bound=2)
    d.list("tune_flips", ["true", "false"], "Search values of --flips.")
    d.list("tune_P", ["5", "10", "12", "14", "16", "17", "18", "20", "40", "50", "60"],
           "Search values of --triplet_P (genes per batch); K = tune_batch_images // P.")
    d.integer("tune_batch_images", 300, "Images per global batch of a trial.",
              lower_bound=4)
    d.list("tune_margin", ["soft", "0.5", "1"], "Search values of --triplet_margin.")
    d.list("tune_learning_rate", ["1e-4", "9e-5", "8e-5", "7e-5", "6e-5", "5e-5", "1e-5"],
           "Search values of --learning_rate.")
    d.list("tune_metric", ["euclidean", "sqeuclidean", "cityblock"],
           "Search values of --triplet_metric.")
    d.list("tune_steps", ["10000", "15000", "20000", "30000"],
           "Search values of --steps (before --steps_scale).")


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"--{name}: {text!r} is not true or false")


def _parse_numbers(name: str, values, kind):
    try:
        return tuple(kind(float(v)) if kind is int else kind(v) for v in config.parse_list(values))
    except ValueError as e:
        raise ValueError(f"--{name}: expected a comma-separated list of numbers, got "
                         f"{values!r}") from e


def tune_config(fv):
    """`ish_tf.tune.TuneConfig` from the tune flags (and --seed, --small_run).

    Raises:
      ish_tf.tune.TuneError (a ValueError): a value is malformed or out of range.
    """
    from ish_tf.tune import TuneConfig, TuneSpace

    space = TuneSpace(
        flips=tuple(_parse_bool("tune_flips", v) for v in config.parse_list(fv.tune_flips)),
        P=_parse_numbers("tune_P", fv.tune_P, int), batch_images=fv.tune_batch_images,
        margin=tuple(config.parse_list(fv.tune_margin)),
        learning_rate=_parse_numbers("tune_learning_rate", fv.tune_learning_rate, float),
        metric=tuple(config.parse_list(fv.tune_metric)),
        steps=_parse_numbers("tune_steps", fv.tune_steps, int))
    return TuneConfig(
        out_dir=fv.out, tuner=fv.tuner, max_trials=fv.max_trials,
        executions_per_trial=fv.executions_per_trial, steps_scale=fv.steps_scale,
        validation_split=fv.validation_split, val_batch_size=fv.val_batch_size,
        val_batches=fv.val_batches, space=space, overwrite=fv.tune_overwrite,
        hyperband_max_epochs=fv.hyperband_max_epochs, hyperband_factor=fv.hyperband_factor,
        small_run=fv.small_run, seed=fv.seed).validate()


def define_flags(fv) -> None:
    """bin/train's flags (the base of every trial) and the tune flags."""
    train_cli.define_flags(fv)
    define_tune(fv)


def train_flag_names() -> list[str]:
    """Names of the flags `bin/train` defines (so best.cfg holds nothing it rejects)."""
    from absl import flags

    fv = flags.FlagValues()
    train_cli.define_flags(fv)
    return sorted(fv)


def main(fv, argv: list[str]) -> int:
    """Runs (or resumes) the search; returns the exit status (0 ok, 1 no trial completed)."""
    with usage_errors():
        model_cfg = train_cli.model_config(fv)
        train_cfg = train_cli.train_config(fv)
        tune_cfg = tune_config(fv)

    from ish_tf.tune import TuneError
    from ish_tf.tune.search import run_search

    base = {}
    for name in train_flag_names():
        line = fv[name].serialize()
        if line:
            base[name] = line
    os.makedirs(tune_cfg.out_dir, exist_ok=True)
    config.write_flagfile(os.path.join(tune_cfg.out_dir, "tune_flags.cfg"), fv)
    try:
        result = run_search(model_cfg, train_cfg, tune_cfg, base)
    except KeyboardInterrupt:
        print(f"tune: interrupted; rerun the same command to resume the search in "
              f"{tune_cfg.out_dir}", file=sys.stderr)
        return 130
    except (TuneError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 1
    if result.role == "worker":
        print(f"tune: worker {os.environ.get('KERASTUNER_TUNER_ID', '')} done; the chief "
              f"writes {os.path.join(result.out_dir, 'trials.csv')}")
        return 0
    print(f"tune: {result.completed} trial(s) completed, {result.failed} failed in {result.out_dir}")
    if result.best_cfg:
        print(f"  best:     trial {result.best_trial_id}, {result.objective} {result.best_value:.4f}")
        print(f"  best.cfg: {result.best_cfg} (bin/train --flagfile={result.best_cfg})")
    print(f"  trials:   {result.trials_csv}")
    print(f"  tensorboard --logdir {os.path.join(result.out_dir, 'runs')}")
    return 0 if result.completed else 1



if __name__ == "__main__":
    run(NAME, define_flags, main)
