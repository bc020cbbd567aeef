"""`bin/train`: train a model family on TFRecord patches (or whole sections).

Examples:
  bin/train --flagfile=configs/triplet_quickstart.cfg --records_dir=work/quickstart/records
  bin/train --flagfile=configs/triplet_resnet50.cfg --records_dir=DIR --run_dir=runs/paper
  bin/train --flagfile=runs/paper/flags.cfg          # replay / resume a run

Writes RUN/flags.cfg (the resolved flags, first), RUN/checkpoints/, RUN/logs/train
(TensorBoard), RUN/metrics.csv, RUN/validation.csv, RUN/train.log (every log line, with
absl's prefixes), and at the end RUN/model.keras + RUN/model_config.json.
Rerunning with the same --run_dir resumes from the latest checkpoint.

Flags: --model and --input_size, each family's settings generated from its typed config
(`--triplet_*`, `--cdae_*`, `--unet_*`, `--ish_cnn_*`; --help groups them by family),
and the runtime settings of `TrainConfig`. This module also
defines the sections bin/tune and bin/quickstart reuse (`define_model`, `define_train`).
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, log_file, run, usage_errors

NAME = "train"
_MODULE = "ish_tf.cli.train"


# --------------------------------------------------------------------------- model
def define_model(fv) -> None:
    """--model, --input_size and every family's config flags (one section per prefix)."""
    from ish_tf import families

    d = definer(fv, NAME)
    names = families.family_names()
    d.enum("model", "triplet", names, "Model family: " + "; ".join(
        f"{n} ({families.get_family(n).description})" for n in names) + ".")
    d.integer("input_size", 256, "Side of the square input images, in pixels (height of the "
              "CDAE's whole sections; unused by vector families).", lower_bound=1)
    for prefix, spec in families.flag_sections():
        config.define_flags(spec.config_cls, prefix, fv,
                            module_name=f"ish_tf.families.{prefix}")


def model_config(fv):
    """`ish_tf.families.ModelConfig` from --model, --input_size, --seed and the family's
    flags; --small_run shrinks the family's batch (`shrunk_for_small_run`).

    Raises:
      ValueError: an unknown family or a value the family's config rejects (naming the flag).
    """
    from ish_tf.families import ModelConfig, get_family

    spec = get_family(fv.model)
    family = config.from_flags(spec.config_cls, spec.prefix, fv)
    if fv.small_run:
        family = family.shrunk_for_small_run()
    return ModelConfig(model=spec.name, input_size=fv.input_size, seed=fv.seed, family=family)


# --------------------------------------------------------------------------- train runtime
def define_train(fv) -> None:
    """The runtime settings of a training run, generated from `ish_tf.train.TrainConfig`
    (each default written once, there)."""
    from ish_tf.train import TrainConfig

    config.define_flags(TrainConfig, "", fv, module_name=_MODULE)


def train_config(fv):
    """`ish_tf.train.TrainConfig` (runtime settings) from the train flags; --small_run
    shrinks it.

    Raises:
      ValueError: a value out of range, naming the flag.
    """
    from ish_tf.train import TrainConfig

    cfg = config.from_flags(TrainConfig, "", fv)
    if fv.small_run:
        cfg = cfg.shrunk_for_small_run()
    return cfg.validate()


# --------------------------------------------------------------------------- pipeline
def define_pipeline(fv) -> None:
    """Flags of the tf.data readers (`ish_tf.data.pipeline.PipelineConfig`).

    --flips and --deterministic belong to the train section; `pipeline_config` uses them
    when defined.
    """
    d = definer(fv, NAME)
    d.bool("standardize", False, "Per-image standardisation (mean 0, std 1) instead of "
           "pixels in [0, 255].")
    d.integer("shuffle_buffer", 4096, "Records in the shuffle buffer of the plain reader "
              "(mixes genes, which lie contiguous in the shards).", lower_bound=0)
    d.integer("cycle_length", 0, "Shards read concurrently by the plain reader (0 = number "
              "of cores).", lower_bound=0)


def pipeline_config(fv):
    """`ish_tf.data.pipeline.PipelineConfig` from the pipeline flags (+ --flips and
    --deterministic where defined); --small_run shrinks the shuffle buffer."""
    from ish_tf.data.pipeline import PipelineConfig

    # getattr: FlagValues raises AttributeError for a flag the command did not define.
    flips = getattr(fv, "flips", True)
    deterministic = getattr(fv, "deterministic", False)
    small = getattr(fv, "small_run", False)
    shuffle_buffer = min(fv.shuffle_buffer, 256) if small else fv.shuffle_buffer
    return PipelineConfig(flips=flips, standardize=fv.standardize,
                          shuffle_buffer=shuffle_buffer, deterministic=deterministic,
                          cycle_length=fv.cycle_length)


# --------------------------------------------------------------------------- command
def define_flags(fv) -> None:
    """bin/train's flags: common, model + families, train runtime."""
    define_common(fv)
    define_model(fv)
    define_train(fv)


def main(fv, argv: list[str]) -> int:
    """Trains; returns the exit status (0 ok, 1 training error, 130 Ctrl-C).

    Every failure is one line `train: error: ...` naming what failed (the shard and
    record, the flag, the path that cannot be written, the run directory).
    """
    with usage_errors():
        model_cfg = model_config(fv)
        train_cfg = train_config(fv)
    flags_path = os.path.join(train_cfg.run_dir, "flags.cfg")
    for path, write in ((train_cfg.run_dir, lambda: os.makedirs(train_cfg.run_dir, exist_ok=True)),
                        (flags_path, lambda: config.write_flagfile(flags_path, fv))):
        try:
            write()
        except OSError as e:
            print(f"train: error: {path}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 1

    import tensorflow as tf

    from ish_tf.families import make_task
    from ish_tf.models.backbones import BackboneWeightsError
    from ish_tf.train.trainer import TrainingError, train

    try:
        with log_file(os.path.join(train_cfg.run_dir, "train.log")):
            task = make_task(model_cfg, train_cfg)
            result = train(task, train_cfg)
    except KeyboardInterrupt:
        print(f"train: interrupted; rerun the same command to resume from {train_cfg.run_dir}",
              file=sys.stderr)
        return 130
    except (BackboneWeightsError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"train: error: {e.filename or train_cfg.run_dir}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    except tf.errors.OpError as e:
        # Anything else TensorFlow raised while training: one line, exit 1 (the trainer
        # has stopped the input pipeline, so the process exits).
        lines = (e.message or "").strip().splitlines()
        print(f"train: error: {type(e).__name__}: {lines[0] if lines else ''} "
              f"(run {train_cfg.run_dir})", file=sys.stderr)
        return 1
    if result.start_step == result.step:
        print(f"train: {result.run_dir} had already reached step {result.step}; nothing to do")
    else:
        # Only the triplet family has a backbone; the others would print a misleading one.
        backbone = getattr(model_cfg.family, "backbone", "") if model_cfg.model == "triplet" else ""
        name = model_cfg.model + (f"/{backbone}" if backbone else "")
        print(f"train: {name} steps {result.start_step}->{result.step} "
              f"in {result.run_dir}: loss {result.loss:.4f}, {result.images_per_sec:.1f} images/s")
    print(f"  checkpoints: {result.checkpoint}")
    print(f"  metrics:     {os.path.join(result.run_dir, 'metrics.csv')}")
    if result.model_path:
        print(f"  model:       {result.model_path} (+ model_config.json)")
    print(f"  flags:       {os.path.join(result.run_dir, 'flags.cfg')}")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)
