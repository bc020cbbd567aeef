"""`bin/tune`: KerasTuner search over ordinary bin/train runs.

Examples:
  bin/tune --flagfile=configs/tune_triplet.cfg --records_dir=DIR --out=tune/triplet
  bin/tune --flagfile=configs/tune_triplet.cfg --records_dir=DIR --out=tune/t \
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
import subprocess
import sys

from absl import app

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info
from ish_tf.cli import train as _train_cli  # noqa: F401 - defines exactly bin/train's flags

flags.define_common()
flags.define_model()
flags.define_train()
flags.define_tune()
FLAGS = flags.FLAGS

_LIST_TRAIN_FLAGS = ("from ish_tf.cli import train; from ish_tf import flags; "
                     "print('\\n'.join(f.name for f in flags.FLAGS.get_flags_for_module("
                     "'ish_tf.flags')))")


def train_flag_names() -> list[str]:
    """Names of the flags `bin/train` defines (so best.cfg holds nothing it rejects).

    Asked of a fresh interpreter: this process may have defined other stages' flags
    (tests import several CLIs). Importing ish_tf.cli.train does not import TensorFlow.

    Raises:
      RuntimeError: the interpreter failed.
    """
    proc = subprocess.run([sys.executable, "-c", _LIST_TRAIN_FLAGS], capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode:
        raise RuntimeError(f"cannot list bin/train's flags: {proc.stderr.strip()[-500:]}")
    return [line for line in proc.stdout.split() if line]


def main(argv: list[str]) -> int:
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        model_cfg = flags.model_config(FLAGS)
        train_cfg = flags.train_config(FLAGS)
        tune_cfg = flags.tune_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e

    from ish_tf.tune import TuneError
    from ish_tf.tune.search import run_search

    base = {}
    for name in train_flag_names():
        if name in FLAGS:
            line = FLAGS[name].serialize()
            if line:
                base[name] = line
    os.makedirs(tune_cfg.out_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(tune_cfg.out_dir, "tune_flags.cfg"))
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
    app.run(main)
