"""bin/tune: KerasTuner search over ordinary training runs (ish_tf.tune)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras_tuner = pytest.importorskip("keras_tuner")

from ish_tf import cli  # noqa: E402
from ish_tf.families import ModelConfig  # noqa: E402
from ish_tf.families.triplet import hypermodel as triplet_hm  # noqa: E402
from ish_tf.families.triplet.config import TripletConfig  # noqa: E402
from ish_tf.train import TrainConfig  # noqa: E402
from ish_tf.tune import TuneConfig, TuneError, TuneSpace, hypermodels, search  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


def write_records(out_dir: str, seed: int = 0) -> str:
    """Train genes G0..G5 and validation genes V0..V2, each imaged in two donors.

    Each gene is a fixed random texture plus noise, so a model can learn something.
    """
    from ish_tf.data import records, shards

    rng = np.random.default_rng(seed)
    layout = {"train": [f"G{i}" for i in range(6)], "validation": [f"V{i}" for i in range(3)]}
    vocab = shards.make_gene_vocabulary([g for genes in layout.values() for g in genes])
    index = {g.gene_symbol: g.gene_index for g in vocab}
    image_id = 0
    for split, genes in layout.items():
        with shards.ShardWriter(out_dir, split, 0, 1) as writer:
            for gene in genes:
                template = rng.uniform(0, 255, (S, S, 3))
                for donor in ("D1", "D2"):
                    for _ in range(2):  # images per (gene, donor)
                        image_id += 1
                        for p in range(3):  # patches per image
                            px = np.clip(0.7 * template + rng.uniform(0, 80, (S, S, 3)), 0, 255)
                            png = tf.io.encode_png(px.astype(np.uint8)).numpy()
                            writer.write(records.make_example(
                                image_encoded=png, image_height=S, image_width=S,
                                image_id=image_id, patch_index=p, gene_symbol=gene,
                                gene_index=index[gene], donor_id=donor), gene, image_id)
        shards.update_index(out_dir, writer.info)
    shards.write_dataset_info(out_dir, shards.DatasetInfo(genes=vocab, patch_size=S,
                                                            format="png"))
    return out_dir


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    return write_records(str(tmp_path_factory.mktemp("records")))


MODEL = ModelConfig(input_size=S, seed=0, family=TripletConfig(
    backbone="small_cnn", backbone_weights="none", head_units=16, embedding_dim=8))
SPACE = TuneSpace(flips=(True, False), P=(2, 3), batch_images=12, margin=("soft", "0.5"),
                  learning_rate=(1e-3, 5e-4), metric=("euclidean", "cityblock"), steps=(4, 6))


def _train_config(records_dir, **kw):
    base = dict(records_dir=records_dir, steps=30, decay_start=25, log_every=1,
                checkpoint_every=100, strategy="default", image_summaries=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- pure parts
def test_space_and_config_validation():
    assert TuneSpace().validate().P[0] == 5 and 300 // 60 == 5
    with pytest.raises(TuneError, match="--tune_P"):
        TuneSpace(P=(2, 200)).validate()
    with pytest.raises(TuneError, match="--tuner"):
        TuneConfig(out_dir="x", tuner="annealing").validate()
    with pytest.raises(TuneError, match="--out"):
        TuneConfig(out_dir="").validate()
    assert TuneConfig(out_dir="x", steps_scale=0.01).scaled_steps(15000) == 150
    assert TuneConfig(out_dir="x", steps_scale=1e-6).scaled_steps(10) == 1


def test_triplet_hypermodel_space_configs_and_flags(tmp_path):
    tune = TuneConfig(out_dir=str(tmp_path), space=SPACE, steps_scale=0.5)
    base = _train_config("recs")
    hm = hypermodels.make_hypermodel(MODEL, base, tune)
    assert isinstance(hm, triplet_hm.TripletHyperModel)
    assert hm.objective.name == "val_rank1" and hm.objective.direction == "max"
    hp = keras_tuner.HyperParameters()
    hm.declare_hyperparameters(hp)
    assert {p.name for p in hp.space} == {"flips", "P", "margin", "learning_rate", "metric", "steps"}
    values = {"flips": False, "P": 3, "margin": "0.5", "learning_rate": 5e-4,
              "metric": "cityblock", "steps": 6}
    mc, tc = hm.trial_configs(values, run_dir=str(tmp_path / "r"), execution=1)
    assert (mc.family.P, mc.family.K, tc.flips, mc.family.margin, mc.family.metric) == (
        3, 4, False, "0.5", "cityblock")
    assert tc.learning_rate == 5e-4 and tc.steps == 3  # 6 x 0.5
    assert tc.decay_start == round(3 * 25 / 30) and tc.seed == 1 and mc.seed == 1
    assert tc.run_dir == str(tmp_path / "r") and tc.records_dir == "recs"
    # best.cfg records the unscaled steps and the base run's hold fraction.
    over = hm.flag_overrides(values)
    assert over["steps"] == 6 and over["decay_start"] == 5 and over["triplet_K"] == 4
    assert hm.hparams(values)["K"] == 4
    # A single value is fixed, not searched.
    hp1 = keras_tuner.HyperParameters()
    hypermodels.make_hypermodel(MODEL, base, dataclasses.replace(
        tune, space=dataclasses.replace(SPACE, metric=("euclidean",)))).declare_hyperparameters(hp1)
    assert type(hp1._hps["metric"][0]).__name__ == "Fixed"
    # Hyperband owns the step budget.
    hb = hypermodels.make_hypermodel(MODEL, base, dataclasses.replace(
        tune, tuner="hyperband", hyperband_max_epochs=3))
    hp2 = keras_tuner.HyperParameters()
    hb.declare_hyperparameters(hp2)
    assert "steps" not in {p.name for p in hp2.space}
    assert hb.unscaled_steps({"tuner/epochs": 2}) == 4  # 2 x (6 / 3)
    with pytest.raises(ValueError, match="nope"):  # TuneError is a ValueError
        hypermodels.make_hypermodel(dataclasses.replace(MODEL, model="nope"), base, tune)


def test_render_flagfile_overrides_and_bools():
    text = search.render_flagfile({"triplet_P": "--triplet_P=17", "flips": "--flips", "out": ""},
                                  {"triplet_P": 5, "flips": False, "learning_rate": 1e-4}, "hello")
    assert text.splitlines() == ["# hello", "--triplet_P=5", "--noflips",
                                 "--learning_rate=0.0001"]


def test_image_embeddings_average_patches(records_dir):
    calls = []

    def model(x, training=False):
        calls.append(x.shape)
        return tf.reduce_mean(x, axis=[1, 2])  # (B, 3): the mean colour

    frame, values = triplet_hm.image_embeddings(model, records_dir, "validation", batch_size=5)
    assert len(frame) == 3 * 2 * 2 and values.shape == (12, 3)
    assert set(frame["donor_id"]) == {"D1", "D2"} and frame["image_id"].is_unique
    keys = triplet_hm.validation_keys(records_dir, "validation")
    assert len(keys) == 36 and keys["gene_symbol"].nunique() == 3


def test_check_data_needs_two_donors(tmp_path, records_dir):
    tune = TuneConfig(out_dir=str(tmp_path), space=SPACE)
    hm = hypermodels.make_hypermodel(MODEL, _train_config(records_dir), tune)
    hm.check_data()
    with pytest.raises(TuneError, match="test"):
        hypermodels.make_hypermodel(MODEL, _train_config(records_dir),
                                    dataclasses.replace(tune, validation_split="test")).check_data()


# --------------------------------------------------------------------------- a search
def _run_cli(argv):
    return cli.invoke("tune", argv)


def _argv(records_dir, out, *extra):
    return [f"--flagfile={os.path.join(ROOT, 'configs', 'tune_triplet.cfg')}",
            f"--records_dir={records_dir}", f"--out={out}",
            "--triplet_backbone=small_cnn", "--triplet_backbone_weights=none",
            f"--input_size={S}", "--triplet_head_units=16", "--triplet_embedding_dim=8",
            "--log_every=1", "--noimage_summaries", "--strategy=default",
            "--tune_P=2,3", "--tune_batch_images=12", "--tune_learning_rate=1e-3,5e-4",
            "--tune_steps=4,6", "--steps_scale=0.5", "--val_batch_size=16", *extra]


@pytest.fixture(scope="module")
def searched(records_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tune"))
    rc = _run_cli(_argv(records_dir, out, "--max_trials=2", "--tuner=random"))
    return out, rc


def test_search_writes_trials_csv_and_best_cfg(searched, capsys):
    out, rc = searched
    assert rc == 0
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    assert len(trials) == 2 and (trials["status"] == "COMPLETED").all()
    for col in ("trial_id", "val_rank1", "flips", "P", "K", "margin", "learning_rate", "metric",
                "steps", "val_map", "val_chance", "seconds", "run_dir"):
        assert col in trials.columns, col
    assert trials["val_rank1"].between(0, 1).all() and (trials["seconds"] > 0).all()
    assert set(trials["K"]) <= {6, 4} and (trials["K"] == 12 // trials["P"]).all()
    # Each execution is an ordinary run directory with its own replayable flags.cfg.
    run = os.path.join(trials["run_dir"].iloc[0], "e0")
    for name in ("flags.cfg", "model.keras", "metrics.csv", "checkpoints"):
        assert os.path.exists(os.path.join(run, name)), name
    best = open(os.path.join(out, "best.cfg")).read()
    best_id = int(best.splitlines()[0].split("Best trial ")[1].split()[0])
    best_row = trials.set_index("trial_id").loc[best_id]
    assert best_row["val_rank1"] == trials["val_rank1"].max()
    assert f"--triplet_P={int(best_row['P'])}" in best
    assert f"--triplet_K={int(best_row['K'])}" in best
    assert f"--steps={int(best_row['steps'])}" in best  # unscaled
    assert "--tuner" not in best and "--tune_P" not in best  # only bin/train's flags


def test_best_cfg_is_accepted_by_bin_train(searched, tmp_path, capsys):
    """bin/train parses OUT/best.cfg as is (a fresh interpreter: only bin/train's flags)."""
    out, _ = searched
    best = os.path.join(out, "best.cfg")
    code = ("import sys; from ish_tf import cli; from ish_tf.cli import train; "
            "fv = cli.parse('train', sys.argv[1:]); m = train.model_config(fv); "
            "t = train.train_config(fv); "
            "print(m.family.backbone, m.family.P, m.family.K, t.steps, t.run_dir)")
    proc = subprocess.run([sys.executable, "-c", code, f"--flagfile={best}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backbone, p, k, steps, run_dir = proc.stdout.split()
    assert backbone == "small_cnn" and int(p) * int(k) <= 12 and int(steps) in (4, 6)
    assert run_dir == os.path.join(out, "best_run")
    # ... and it starts training (one step, in this process).
    assert cli.invoke("train", [f"--flagfile={best}", f"--run_dir={tmp_path / 'best'}",
                                "--steps=1"]) == 0
    assert "steps 0->1" in capsys.readouterr().out


def test_hparams_written_for_trials(searched):
    from ish_tf.train.tensorboard import event_tags

    tags = event_tags(os.path.join(searched[0], "runs"))
    assert "_hparams_/experiment" in tags and "_hparams_/session_start_info" in tags
    assert tags.get("val_rank1") == 2 and "loss/train" in tags


def test_search_resumes_and_extends(searched, records_dir, capsys):
    out, _ = searched
    before = pd.read_csv(os.path.join(out, "trials.csv"))
    # Same search, one more trial allowed: the two finished trials are not rerun.
    assert _run_cli(_argv(records_dir, out, "--max_trials=3", "--tuner=random")) == 0
    after = pd.read_csv(os.path.join(out, "trials.csv"))
    assert len(after) == 3
    pd.testing.assert_series_equal(after["seconds"].iloc[:2], before["seconds"], check_names=False)
    assert "3 trial(s) completed" in capsys.readouterr().out


def test_interrupted_trial_is_retried_from_its_checkpoint(records_dir, tmp_path, monkeypatch):
    from ish_tf.train import trainer

    out = str(tmp_path / "tune")
    real_train = trainer.train
    calls = []

    def killed_midway(task, config, **kw):
        calls.append(config.run_dir)
        if len(calls) == 1:
            real_train(task, config, stop_after=1)  # a checkpoint at step 1, then "Ctrl-C"
            raise KeyboardInterrupt
        return real_train(task, config, **kw)

    monkeypatch.setattr(trainer, "train", killed_midway)
    tune = TuneConfig(out_dir=out, tuner="grid", max_trials=1, space=dataclasses.replace(
        SPACE, flips=(True,), P=(2,), margin=("soft",), learning_rate=(1e-3,),
        metric=("euclidean",), steps=(3,)))
    train_cfg = _train_config(records_dir, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(MODEL, train_cfg, tune)
    result = search.run_search(MODEL, train_cfg, tune)
    assert result.completed == 1 and calls[0] == calls[1]
    metrics = pd.read_csv(os.path.join(calls[1], "metrics.csv"))
    assert list(metrics["step"]) == [1, 2, 3]  # steps 2..3 continued from the checkpoint
    assert os.path.exists(result.best_cfg)


def test_failed_trial_is_recorded(records_dir, tmp_path, monkeypatch):
    from ish_tf.train import trainer

    def diverges(task, config, **kw):
        raise trainer.TrainingError("loss is nan at step 1")

    monkeypatch.setattr(trainer, "train", diverges)
    tune = TuneConfig(out_dir=str(tmp_path), tuner="random", max_trials=1, space=SPACE)
    result = search.run_search(MODEL, _train_config(records_dir), tune)
    assert result.completed == 0 and result.failed == 1 and result.best_cfg == ""
    row = pd.read_csv(result.trials_csv).iloc[0]
    assert row["status"] == "FAILED" and "loss is nan" in row["error"]


# --------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_search_chief_and_two_workers(records_dir, tmp_path):
    """KerasTuner chief/worker mode on 127.0.0.1: the chief serves, two workers train."""
    out = str(tmp_path / "dist")
    port = _free_port()
    argv = [sys.executable, "-m", "ish_tf.cli.tune",
            *_argv(records_dir, out, "--max_trials=2", "--tuner=random", "--tune_steps=2",
                   "--steps_scale=1")]
    procs = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        env = dict(os.environ, KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port), CUDA_VISIBLE_DEVICES="",
                   TF_CPP_MIN_LOG_LEVEL="2")
        procs[tuner_id] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    outputs = {}
    try:
        for tuner_id, proc in procs.items():
            outputs[tuner_id], _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for tuner_id, proc in procs.items():
        assert proc.returncode == 0, f"{tuner_id}:\n{outputs.get(tuner_id, '')[-3000:]}"
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    assert len(trials) == 2 and (trials["status"] == "COMPLETED").all()
    assert os.path.exists(os.path.join(out, "best.cfg"))
    assert "2 trial(s) completed" in outputs["chief"]
    # The chief only served: the trials' run directories were written by the workers.
    assert all("worker" in outputs[w] for w in ("tuner0", "tuner1"))
