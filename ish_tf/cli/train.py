"""`bin/train`: train a model family (triplet now) on TFRecord patches.

Examples:
  bin/train --flagfile=configs/triplet_quickstart.cfg --records_dir=work/quickstart/records
  bin/train --flagfile=configs/triplet_resnet50.cfg --records_dir=DIR --run_dir=runs/paper
  bin/train --flagfile=runs/paper/flags.cfg          # replay / resume a run

Writes RUN/flags.cfg (the resolved flags, first), RUN/checkpoints/, RUN/logs/train
(TensorBoard), RUN/metrics.csv, and at the end RUN/model.keras + RUN/model_config.json.
Rerunning with the same --run_dir resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_model()
flags.define_train()
flags.define_cdae()
flags.define_unet()
flags.define_ish_cnn()
FLAGS = flags.FLAGS



def main(argv: list[str]) -> int:
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        model_cfg = flags.model_config(FLAGS)
        train_cfg = flags.train_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(train_cfg.run_dir, exist_ok=True)
    flags.write_flagfile(os.path.join(train_cfg.run_dir, "flags.cfg"))

    from ish_tf.models.backbones import BackboneWeightsError
    from ish_tf.train.tasks import make_task
    from ish_tf.train.trainer import TrainingError, train

    try:
        task = make_task(model_cfg, train_cfg)
        result = train(task, train_cfg)
    except KeyboardInterrupt:
        print(f"train: interrupted; rerun the same command to resume from {train_cfg.run_dir}",
              file=sys.stderr)
        return 130
    except (BackboneWeightsError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    if result.start_step == result.step:
        print(f"train: {result.run_dir} had already reached step {result.step}; nothing to do")
    else:
        # Only the triplet family has a --backbone; the others would print a misleading one.
        name = model_cfg.model + (f"/{model_cfg.backbone}" if model_cfg.model == "triplet" else "")
        print(f"train: {name} steps {result.start_step}->{result.step} "
              f"in {result.run_dir}: loss {result.loss:.4f}, {result.images_per_sec:.1f} images/s")
    print(f"  checkpoints: {result.checkpoint}")
    print(f"  metrics:     {os.path.join(result.run_dir, 'metrics.csv')}")
    if result.model_path:
        print(f"  model:       {result.model_path} (+ model_config.json)")
    print(f"  flags:       {os.path.join(result.run_dir, 'flags.cfg')}")
    return 0


if __name__ == "__main__":
    app.run(main)
