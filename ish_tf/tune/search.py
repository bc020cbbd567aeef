"""The search: KerasTuner oracles driving ordinary training runs, results, resume, distribution.

Layout of OUT::

    OUT/tuner/                      KerasTuner project (oracle.json, trial_<id>/trial.json)
    OUT/runs/                       TensorBoard logdir (HParams config at its top)
    OUT/runs/trial_<id>/            one HParams session per trial + trial_info.json
    OUT/runs/trial_<id>/e<i>/       execution i: an ordinary bin/train run directory
                                    (flags.cfg, checkpoints/, logs/, metrics.csv, model.keras)
    OUT/trials.csv                  every trial: hyperparameters, objective, metrics,
                                    seconds, status, run directory, error
    OUT/best.cfg                    the best trial as a bin/train flagfile (full length)

Resume: rerunning with the same OUT reloads the oracle (KerasTuner `overwrite=False`);
a trial that was running when the search stopped is retried under the same id, and
its run directory resumes from its last checkpoint, so no finished step is redone.

Distributed tuning (KerasTuner chief/worker): every process runs the same
`bin/tune` command on a shared OUT with

    KERASTUNER_ORACLE_IP=<chief host> KERASTUNER_ORACLE_PORT=<port>
    KERASTUNER_TUNER_ID=chief      (one process: serves the oracle, trains nothing)
    KERASTUNER_TUNER_ID=tuner0, tuner1, ...   (workers: each trains one trial at a time)

The chief returns when every trial has ended and every worker has been told to stop;
it then writes trials.csv and best.cfg. Workers write their trials' run directories
and trial_info.json under OUT/runs, so OUT must be a shared filesystem.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import keras_tuner
import numpy as np
import pandas as pd
from absl import logging
from keras_tuner.engine import base_tuner

from ish_tf.families import ModelConfig
from ish_tf.io_utils import atomic_write_text
from ish_tf.train import TrainConfig
from ish_tf.tune import TuneConfig, TuneError
from ish_tf.tune.hypermodels import HYPERBAND_PREVIOUS, FamilyHyperModel, make_hypermodel

TRIALS_NAME = "trials.csv"
BEST_NAME = "best.cfg"
RUNS_DIR = "runs"
PROJECT_NAME = "tuner"
INFO_NAME = "trial_info.json"

# Fields of ModelConfig that are not bin/train flags of the same name.
_NOT_FLAGS = {"family"}


# --------------------------------------------------------------------------- flagfiles
def flag_line(name: str, value: Any) -> str:
    """One flagfile line: `--name=value`, `--name` / `--noname` for bools.

    Args:
      name: flag name.
      value: bool, number, text or list (comma-joined).

    Returns:
      The line, without newline.
    """
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if isinstance(value, float):
        value = repr(value)
    return f"--{name}={value}"


def config_flag_lines(model_config: ModelConfig, train_config: TrainConfig) -> dict[str, str]:
    """bin/train flag lines equivalent to the configs (model, family and runtime flags).

    Used when no resolved flags are given (library use); `bin/tune` passes its resolved
    flags instead.

    Returns:
      {flag name: line}.
    """
    from ish_tf.config import flag_fields, flag_name

    lines = {}
    for cfg in (model_config, train_config):
        for field in dataclasses.fields(cfg):
            value = getattr(cfg, field.name)
            if field.name in _NOT_FLAGS or value is None:
                continue
            lines[field.name] = flag_line(field.name, value)
    prefix = model_config.spec.prefix
    for field in flag_fields(type(model_config.family)):
        name = flag_name(prefix, field.name)
        lines[name] = flag_line(name, getattr(model_config.family, field.name))
    return lines


def render_flagfile(base: Mapping[str, str], overrides: Mapping[str, Any],
                    header: str = "") -> str:
    """A flagfile: the base lines, with `overrides` replacing (or adding) flags.

    Args:
      base: {flag name: line} (e.g. `absl.flags.Flag.serialize()` output).
      overrides: {flag name: value}.
      header: comment lines put first (without leading '#').

    Returns:
      The file's text.
    """
    lines = [f"# {line}" for line in header.splitlines() if header]
    for name, line in base.items():
        if name in overrides:
            lines.append(flag_line(name, overrides[name]))
        elif line:
            lines.append(line)
    lines.extend(flag_line(n, v) for n, v in overrides.items() if n not in base)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tuner
def make_oracle(tune_config: TuneConfig, objective: keras_tuner.Objective) -> keras_tuner.Oracle:
    """The KerasTuner oracle named by `tune_config.tuner`.

    KerasTuner treats seed 0 as "random", so the oracle gets `seed + 1`.
    """
    seed = tune_config.seed + 1
    if tune_config.tuner == "grid":
        return keras_tuner.oracles.GridSearchOracle(objective=objective, seed=seed,
                                                    max_trials=tune_config.max_trials)
    if tune_config.tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(objective=objective, seed=seed,
                                                      max_trials=tune_config.max_trials)
    if tune_config.tuner == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(
            objective=objective, seed=seed, max_trials=tune_config.max_trials)
    if tune_config.tuner == "hyperband":
        return keras_tuner.oracles.HyperbandOracle(
            objective=objective, seed=seed, max_epochs=tune_config.hyperband_max_epochs,
            factor=tune_config.hyperband_factor, hyperband_iterations=1)
    raise TuneError(f"--tuner={tune_config.tuner!r} is not one of grid, random, bayesian, hyperband")


def trial_dir(out_dir: str, trial_id: str) -> str:
    """OUT/runs/trial_<id> (the trial's HParams session and its executions)."""
    return os.path.join(out_dir, RUNS_DIR, f"trial_{trial_id}")


def execution_dir(out_dir: str, trial_id: str, execution: int) -> str:
    """OUT/runs/trial_<id>/e<i>: the run directory of one execution."""
    return os.path.join(trial_dir(out_dir, trial_id), f"e{execution}")


class TrainingTuner(base_tuner.BaseTuner):
    """A KerasTuner tuner whose trial is `ish_tf.train.trainer.train` + validation scoring.

    Args:
      hypermodel: the family's HyperModel.
      oracle: a KerasTuner oracle (see `make_oracle`).
      tune_config: the search settings (OUT, executions per trial, overwrite).
      base_flags: {flag name: line} of bin/train's resolved flags; each execution's
        flags.cfg and best.cfg are these with the trial's values.
    """

    def __init__(self, hypermodel: FamilyHyperModel, oracle: keras_tuner.Oracle,
                 tune_config: TuneConfig, base_flags: Mapping[str, str]):
        self.tune_config = tune_config
        self.base_flags = dict(base_flags)
        super().__init__(oracle=oracle, hypermodel=hypermodel, directory=tune_config.out_dir,
                         project_name=PROJECT_NAME, overwrite=tune_config.overwrite)

    def _populate_initial_space(self):
        # BaseTuner builds the model repeatedly to discover conditional hyperparameters;
        # ours has none, and building a ResNet50 to learn the space would be wasteful.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def search(self, *args, **kwargs):
        """Runs trials until the oracle stops (the chief serves the oracle instead)."""
        from keras_tuner.src.distribute import utils as dist_utils

        if dist_utils.is_chief_oracle():
            self.oracle.verbose = kwargs.get("verbose", 0)
            self.save()
            serve_oracle(self.oracle)
            return
        super().search(*args, **kwargs)

    def is_worker(self) -> bool:
        """True in a distributed search's worker processes."""
        return self._is_worker()

    @staticmethod
    def _batch_flags(model_config: ModelConfig) -> dict[str, int]:
        """The trial's batch shape as flags (after a small run's shrinking)."""
        from ish_tf.config import flag_name

        prefix = model_config.spec.prefix
        return {flag_name(prefix, k): getattr(model_config.family, k)
                for k in ("P", "K", "batch_size") if hasattr(model_config.family, k)}

    def _execution(self, trial, execution: int) -> tuple[dict[str, float], str]:
        import keras

        from ish_tf.families import make_task
        from ish_tf.train.trainer import train

        hp = trial.hyperparameters
        out = self.tune_config.out_dir
        run_dir = execution_dir(out, trial.trial_id, execution)
        model_config, train_config = self.hypermodel.trial_configs(hp, run_dir, execution)
        previous = hp.values.get(HYPERBAND_PREVIOUS)
        ckpt = os.path.join(run_dir, "checkpoints")
        if previous and not os.path.isdir(ckpt):
            # Hyperband promotes a trial: continue its weights instead of starting over.
            src = os.path.join(execution_dir(out, previous, execution), "checkpoints")
            if os.path.isdir(src):
                shutil.copytree(src, ckpt)
        os.makedirs(run_dir, exist_ok=True)
        overrides = {**self.hypermodel.flag_overrides(hp.values), "run_dir": run_dir,
                     "steps": train_config.steps, "decay_start": train_config.decay_start,
                     "seed": train_config.seed, "small_run": False,
                     "checkpoint_every": train_config.checkpoint_every,
                     "log_every": train_config.log_every,
                     **self._batch_flags(model_config)}
        atomic_write_text(os.path.join(run_dir, "flags.cfg"), render_flagfile(
            self.base_flags, overrides, f"Trial {trial.trial_id}, execution {execution} of "
            f"bin/tune; replay with bin/train --flagfile=THIS"))
        result = train(make_task(model_config, train_config), train_config)
        model = keras.saving.load_model(result.model_path)
        try:
            metrics = self.hypermodel.score(model, model_config, train_config)
        finally:
            del model
            keras.backend.clear_session()
        metrics["train_loss"] = result.loss
        return metrics, run_dir

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        """Trains the trial's executions and returns the mean of their metrics.

        Returns:
          {objective name: value, other metrics..., "seconds": wall time}.

        Raises:
          keras_tuner.errors.FailedTrialError: training diverged (not retried).
        """
        from ish_tf.train.trainer import TrainingError

        start = time.monotonic()
        tdir = trial_dir(self.tune_config.out_dir, trial.trial_id)
        os.makedirs(tdir, exist_ok=True)
        runs: list[str] = []
        try:
            all_metrics = []
            for i in range(self.tune_config.executions_per_trial):
                metrics, run_dir = self._execution(trial, i)
                all_metrics.append(metrics)
                runs.append(run_dir)
            names = all_metrics[0].keys()
            mean = {k: float(np.mean([m[k] for m in all_metrics])) for k in names}
        except Exception as e:
            seconds = time.monotonic() - start
            _write_info(tdir, {"status": "FAILED", "seconds": seconds, "runs": runs,
                               "error": f"{type(e).__name__}: {e}"})
            logging.warning("trial %s failed after %.1f s: %s: %s", trial.trial_id, seconds,
                            type(e).__name__, e)
            if isinstance(e, TrainingError):
                raise keras_tuner.errors.FailedTrialError(str(e)) from e
            raise
        mean["seconds"] = time.monotonic() - start
        _write_info(tdir, {"status": "COMPLETED", "seconds": mean["seconds"], "runs": runs,
                           "metrics": mean})
        from ish_tf.train.tensorboard import write_hparams_session

        write_hparams_session(tdir, self.hypermodel.hparams(trial.hyperparameters.values),
                              mean, trial_id=f"trial_{trial.trial_id}")
        logging.info("trial %s: %s %.4f in %.1f s (%s)", trial.trial_id,
                     self.hypermodel.objective_name, mean[self.hypermodel.objective_name],
                     mean["seconds"], _describe(self.hypermodel.hparams(trial.hyperparameters.values)))
        return mean

    def on_trial_end(self, trial):
        """Ends the trial in the oracle, then refreshes trials.csv / best.cfg."""
        super().on_trial_end(trial)
        if not self.is_worker():
            write_results(self.tune_config.out_dir, self.oracle, self.hypermodel, self.base_flags)

    def save_model(self, trial_id, model, step=0):
        """Nothing to do: the trainer already wrote RUN/model.keras."""

    def load_model(self, trial):
        """The trained model of a trial's first execution."""
        import keras

        return keras.saving.load_model(os.path.join(
            execution_dir(self.tune_config.out_dir, trial.trial_id, 0), "model.keras"))


def serve_oracle(oracle, poll_seconds: float = 0.5) -> None:
    """Serves `oracle` to the workers over gRPC until the search is over (the chief).

    KerasTuner's own `oracle_chief.start_server`, with one change: once a worker has
    been told to stop, it re-checks every `poll_seconds` (not every 20 s) whether the
    other workers' trials have ended, so the chief returns as soon as the search does.
    Address: KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT, and only that interface.

    Security: the oracle's gRPC port has no authentication and no encryption (KerasTuner
    offers none): anyone who reaches it can read and steer the search. Run it on a
    trusted network only, and give KERASTUNER_ORACLE_IP the interface the workers use
    (127.0.0.1 on one machine), not a wildcard; a wildcard address is warned about.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    host = os.environ["KERASTUNER_ORACLE_IP"]
    address = f"{host}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        logging.warning("the tuning oracle listens on every interface (%s) without "
                        "authentication: use it on a trusted network only, or set "
                        "KERASTUNER_ORACLE_IP to the one interface the workers reach", address)
    if not server.add_insecure_port(address):
        raise TuneError(f"the chief cannot listen on {address} (port in use?)")
    server.start()
    logging.info("chief: serving the oracle on %s", address)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1)


def _describe(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def _write_info(tdir: str, info: dict) -> None:
    atomic_write_text(os.path.join(tdir, INFO_NAME), json.dumps(info, indent=2, default=str) + "\n")


def _read_info(tdir: str) -> dict:
    try:
        with open(os.path.join(tdir, INFO_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- results
def trials_frame(out_dir: str, oracle, hypermodel: FamilyHyperModel) -> pd.DataFrame:
    """One row per trial, in start order.

    Columns: trial_id, status, the objective, the hyperparameters (K included for
    triplet), the other metrics, seconds, run_dir, error.
    """
    rows = []
    objective = hypermodel.objective_name
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        info = _read_info(trial_dir(out_dir, trial_id))
        row: dict[str, Any] = {"trial_id": trial_id, "status": trial.status}
        metrics = {name: trial.metrics.get_last_value(name)
                   for name in trial.metrics.metrics if trial.metrics.exists(name)}
        row[objective] = metrics.pop(objective, np.nan)
        row.update(hypermodel.hparams(trial.hyperparameters.values))
        seconds = metrics.pop("seconds", info.get("seconds", np.nan))
        row.update(metrics)
        row["seconds"] = seconds
        row["run_dir"] = trial_dir(out_dir, trial_id)
        error = info.get("error", "") if trial.status != "COMPLETED" else ""
        if not error and trial.message:
            error = trial.message.strip().splitlines()[-1]
        row["error"] = error
        rows.append(row)
    return pd.DataFrame(rows)


def best_trial(oracle, objective_name: str):
    """The best COMPLETED trial with a finite objective, or None."""
    done = [t for t in oracle.get_best_trials(len(oracle.trials) or 1)
            if t.status == "COMPLETED" and t.metrics.exists(objective_name)
            and math.isfinite(t.metrics.get_last_value(objective_name))]
    return done[0] if done else None


def write_results(out_dir: str, oracle, hypermodel: FamilyHyperModel,
                  base_flags: Mapping[str, str]) -> tuple[str, str]:
    """Writes OUT/trials.csv and (once a trial completed) OUT/best.cfg, atomically.

    Returns:
      (trials.csv path, best.cfg path or "").
    """
    frame = trials_frame(out_dir, oracle, hypermodel)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    trials_path = os.path.join(out_dir, TRIALS_NAME)
    atomic_write_text(trials_path, buf.getvalue())
    best = best_trial(oracle, hypermodel.objective_name)
    if best is None:
        return trials_path, ""
    values = best.hyperparameters.values
    overrides = dict(hypermodel.flag_overrides(values))
    overrides["run_dir"] = os.path.join(out_dir, "best_run")
    score = best.metrics.get_last_value(hypermodel.objective_name)
    header = (f"Best trial {best.trial_id} of bin/tune in {out_dir}: "
              f"{hypermodel.objective_name}={score:.6g}\n"
              f"Full-length settings (trials ran x{hypermodel.tune_config.steps_scale:g} steps).\n"
              f"Usage: bin/train --flagfile={os.path.join(out_dir, BEST_NAME)}")
    best_path = os.path.join(out_dir, BEST_NAME)
    atomic_write_text(best_path, render_flagfile(base_flags, overrides, header))
    return trials_path, best_path


# --------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class SearchResult:
    """What `run_search` did.

    Attributes:
      out_dir: OUT.
      trials_csv: OUT/trials.csv ("" in a worker).
      best_cfg: OUT/best.cfg, "" when no trial completed (or in a worker).
      best_trial_id: id of the best trial ("" if none).
      best_value: its objective (nan if none).
      objective: the objective's name.
      completed: completed trials.
      failed: failed or invalid trials.
      role: "single", "chief" or "worker".
    """

    out_dir: str
    trials_csv: str
    best_cfg: str
    best_trial_id: str
    best_value: float
    objective: str
    completed: int
    failed: int
    role: str


def search_role() -> str:
    """"chief", "worker" or "single", from KerasTuner's environment variables.

    Raises:
      TuneError: KERASTUNER_ORACLE_IP is set without a port or tuner id.
    """
    from keras_tuner.src.distribute import utils as dist_utils

    try:
        if not dist_utils.has_chief_oracle():
            return "single"
    except RuntimeError as e:
        raise TuneError(str(e)) from e
    return "chief" if dist_utils.is_chief_oracle() else "worker"


def run_search(model_config: ModelConfig, train_config: TrainConfig, tune_config: TuneConfig,
               base_flags: Mapping[str, str] | None = None) -> SearchResult:
    """Runs (or resumes, or joins as a chief/worker) a hyperparameter search.

    Args:
      model_config: base model configuration (bin/train's model flags).
      train_config: base training configuration; `records_dir` is required.
      tune_config: the search settings.
      base_flags: {flag name: serialized line} of bin/train's resolved flags (best.cfg
        and each run's flags.cfg start from them); default: from the configs.

    Returns:
      SearchResult.

    Raises:
      TuneError: bad settings or unusable validation data.
    """
    tune_config.validate()
    if not train_config.records_dir:
        raise TuneError("--records_dir is required: the TFRecords written by bin/extract")
    role = search_role()
    hypermodel = make_hypermodel(model_config, train_config, tune_config)
    if role != "chief":
        hypermodel.check_data()
    base = dict(base_flags) if base_flags is not None else config_flag_lines(model_config,
                                                                              train_config)
    os.makedirs(tune_config.out_dir, exist_ok=True)
    oracle = make_oracle(tune_config, hypermodel.objective)
    tuner = TrainingTuner(hypermodel, oracle, tune_config, base)
    if role != "worker":
        from ish_tf.train.tensorboard import write_hparams_config

        hp = oracle.get_space()
        domains = hypermodel.hparam_domains({p.name: _domain_values(p) for p in hp.space})
        write_hparams_config(os.path.join(tune_config.out_dir, RUNS_DIR), domains,
                             [hypermodel.objective_name, "seconds"])
    tuner.search(verbose=0)
    if role == "worker":
        return SearchResult(tune_config.out_dir, "", "", "", math.nan,
                            hypermodel.objective_name, 0, 0, role)
    trials_csv, best_cfg = write_results(tune_config.out_dir, tuner.oracle, hypermodel, base)
    best = best_trial(tuner.oracle, hypermodel.objective_name)
    statuses = [t.status for t in tuner.oracle.trials.values()]
    return SearchResult(
        out_dir=tune_config.out_dir, trials_csv=trials_csv, best_cfg=best_cfg,
        best_trial_id=best.trial_id if best else "",
        best_value=best.metrics.get_last_value(hypermodel.objective_name) if best else math.nan,
        objective=hypermodel.objective_name, completed=statuses.count("COMPLETED"),
        failed=sum(s in ("FAILED", "INVALID") for s in statuses), role=role)


def _domain_values(hp) -> list:
    """The values a KerasTuner hyperparameter can take (Fixed, Boolean, Choice)."""
    config = hp.get_config()
    if "values" in config:
        return list(config["values"])
    if "value" in config:
        return [config["value"]]
    if type(hp).__name__ == "Boolean":
        return [True, False]
    return [config.get("default")]
