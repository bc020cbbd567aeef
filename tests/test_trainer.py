"""The shared trainer, the schedule, the task registry and bin/train (ish_tf.train, ish_tf.cli.train)."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ish_tf import cli
from ish_tf.families import ModelConfig, build_model, family_names, load_model_config, make_task
from ish_tf.families.triplet.config import TripletConfig
from ish_tf.train import TrainConfig
from ish_tf.train.schedules import HoldThenExponentialDecay, hold_then_exp_decay
from ish_tf.train.trainer import TrainingError, run_paths, train

R = 32
P, K = 4, 4


# --------------------------------------------------------------------------- schedule
def test_schedule_paper_values():
    lr0 = 7e-5
    sched = HoldThenExponentialDecay(lr0, 25_000, 30_000, 0.001)
    for step, want in [(0, lr0), (24_999, lr0), (25_000, lr0), (27_500, lr0 * math.sqrt(0.001)),
                       (30_000, lr0 * 0.001), (40_000, lr0 * 0.001)]:
        assert hold_then_exp_decay(step, lr0, 25_000, 30_000, 0.001) == pytest.approx(want, rel=1e-9)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5)
    # Exponential in between: equal ratios over equal step intervals.
    a, b, c = (float(sched(s)) for s in (26_000, 27_000, 28_000))
    assert b / a == pytest.approx(c / b, rel=1e-5) == pytest.approx(0.001 ** 0.2, rel=1e-5)


def test_schedule_serialises_and_degenerate_case():
    sched = HoldThenExponentialDecay(1e-3, 10, 20, 0.01)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    assert isinstance(again, HoldThenExponentialDecay) and again.get_config() == sched.get_config()
    short = HoldThenExponentialDecay(1.0, 100, 10, 0.5)  # run ends before the decay
    assert float(short(9)) == 1.0 and float(short(10)) == 0.5
    with pytest.raises(ValueError, match="final_fraction"):
        HoldThenExponentialDecay(1e-3, 10, 20, 0.0)


# --------------------------------------------------------------------------- config
def test_train_config_validation_and_small_run():
    cfg = TrainConfig()
    assert TripletConfig().global_batch_size == 289
    small = cfg.shrunk_for_small_run()
    family = TripletConfig().shrunk_for_small_run()
    assert (small.steps, family.P, family.K) == (20, 4, 4)
    assert small.decay_start == round(25_000 * 20 / 30_000)
    assert small.checkpoint_every <= small.steps and small.log_every <= 5
    with pytest.raises(ValueError, match="--triplet_P"):
        TripletConfig(P=1).validate()
    with pytest.raises(ValueError, match="--final_lr_fraction"):
        TrainConfig(final_lr_fraction=2.0).validate()


def test_task_registry():
    assert "triplet" in family_names()
    with pytest.raises(ValueError, match="--model='nope'"):
        make_task(ModelConfig(model="nope"), TrainConfig())
    with pytest.raises(ValueError, match="mining"):
        make_task(ModelConfig(family=TripletConfig(mining="hardest")), TrainConfig())


# --------------------------------------------------------------------------- trainer
def _easy_batches(n_batches=10, classes=10, seed=0):
    """Each class is a fixed random texture; patches are noisy copies of it."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (classes, R, R, 3)).astype("float32")
    xs, ys = [], []
    for _ in range(n_batches):
        labels = np.repeat(rng.choice(classes, P, replace=False), K)
        xs.append(0.6 * templates[labels] + rng.uniform(0, 100, (P * K, R, R, 3)))
        ys.append(labels)
    return np.stack(xs).astype("float32"), np.stack(ys).astype("int32")


X, Y = _easy_batches()


def _dataset_fn(ctx):
    return tf.data.Dataset.from_tensor_slices((X, Y)).repeat()


MODEL_CFG = ModelConfig(input_size=R, seed=0, family=TripletConfig(
    backbone="small_cnn", backbone_weights="none", head_units=64, embedding_dim=16, P=P, K=K))


def _config(run_dir, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), steps=24, decay_start=20, learning_rate=1e-3,
                log_every=4, checkpoint_every=6, strategy="default", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg, **kw):
    return train(make_task(MODEL_CFG, cfg, _dataset_fn), cfg, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 24-step run, and one stopped at 12 then resumed to 24."""
    root = tmp_path_factory.mktemp("runs")
    full_cfg = _config(root / "full")
    full = _train(full_cfg)
    part_cfg = _config(root / "part")
    first = _train(part_cfg, stop_after=12)
    second = _train(part_cfg)
    return {"full": (full_cfg, full), "first": first, "second": (part_cfg, second)}


def test_run_writes_checkpoints_events_metrics_and_model(runs):
    cfg, result = runs["full"]
    paths = run_paths(cfg.run_dir)
    assert result.step == 24 and result.start_step == 0
    steps = sorted(int(p.split("-")[-1].split(".")[0])
                   for p in glob.glob(os.path.join(paths["checkpoints"], "ckpt-*.index")))
    assert steps == [12, 18, 24]  # every 6 steps, the last 3 kept
    assert glob.glob(os.path.join(paths["logs"], "train", "events.out.tfevents.*"))
    with open(paths["metrics"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert {"loss", "lr", "active_fraction", "top1", "embedding_norm", "images_per_sec"} <= set(rows[0])
    assert float(rows[-1]["lr"]) == pytest.approx(hold_then_exp_decay(23, 1e-3, 20, 24, 0.001), rel=1e-5)
    model = keras.saving.load_model(result.model_path)
    assert model(X[0]).shape == (P * K, 16)
    # model_config.json rebuilds the same architecture; the saved weights fit it.
    rebuilt = build_model(load_model_config(paths["model_config"]))
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_allclose(rebuilt(X[0]).numpy(), model(X[0]).numpy(), atol=1e-5)
    assert json.load(open(paths["train_config"]))["steps"] == 24


def test_tensorboard_scalars_written(runs):
    cfg, _ = runs["full"]
    tags = set()
    for path in glob.glob(os.path.join(run_paths(cfg.run_dir)["logs"], "train", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"loss/train", "train/lr", "train/active_fraction", "train/top1",
            "train/embedding_norm", "train/images_per_sec", "input_patches"} <= tags


def test_loss_decreases_on_easy_problem(runs):
    cfg, _ = runs["full"]
    with open(run_paths(cfg.run_dir)["metrics"], newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses


def test_resume_matches_uninterrupted_run(runs):
    first = runs["first"]
    assert first.step == 12 and first.model_path == ""
    cfg, second = runs["second"]
    assert second.start_step == 12 and second.step == 24
    full = keras.saving.load_model(runs["full"][1].model_path).get_weights()
    resumed = keras.saving.load_model(second.model_path).get_weights()
    for a, b in zip(full, resumed, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with open(run_paths(cfg.run_dir)["metrics"], newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8, 12, 16, 20, 24]


def test_finished_run_is_not_retrained(runs):
    cfg, result = runs["full"]
    mtime = os.path.getmtime(result.model_path)
    again = _train(cfg)
    assert again.start_step == again.step == 24
    assert os.path.getmtime(result.model_path) == mtime


def test_mixed_precision_trains_resumes_exports_and_restores_the_policy(tmp_path):
    """--mixed_precision on CPU is mixed_bfloat16 (float16 with loss scaling needs a GPU):
    the layers compute in bfloat16 with float32 weights, the embedding leaves the model as
    float32, the run resumes and exports, and the process's global policy is the caller's
    again afterwards (models built later, e.g. an untrained baseline, stay float32)."""
    from ish_tf.export.saved_model import export_run

    assert keras.mixed_precision.global_policy().name == "float32"
    cfg = _config(tmp_path / "mixed", steps=12, mixed_precision=True, image_summaries=False)
    _train(cfg, stop_after=6)
    assert keras.mixed_precision.global_policy().name == "float32"
    result = _train(cfg)
    assert result.start_step == 6 and result.step == 12 and math.isfinite(result.loss)
    model = keras.saving.load_model(result.model_path, compile=False)

    def leaves(m):
        for layer in m.layers:
            yield from (leaves(layer) if isinstance(layer, keras.Model) else [layer])

    compute = {layer.dtype_policy.compute_dtype for layer in leaves(model) if layer.weights}
    assert compute == {"bfloat16"}, compute
    assert {w.dtype for w in model.weights} == {"float32"}
    out = model(X[0][:4])
    assert out.dtype == tf.float32 and np.isfinite(out.numpy()).all()
    assert {layer.dtype_policy.name for layer in leaves(build_model(MODEL_CFG))} == {"float32"}
    # The served model is the mixed one, its embedding float32 too.
    served = tf.saved_model.load(export_run(cfg.run_dir, str(tmp_path / "export")))
    emb = served.signatures["embed_images"](images=tf.constant(X[0][:4]))["embedding"]
    assert emb.dtype == tf.float32
    # bfloat16 keeps 8 bits of mantissa: graph and eager execution round differently.
    np.testing.assert_allclose(emb.numpy(), out.numpy(), atol=1e-2)
    assert np.abs(emb.numpy() - out.numpy()).mean() < 2e-3


def test_float16_loss_scaling_path(tmp_path, monkeypatch):
    """The GPU's --mixed_precision (mixed_float16 with a LossScaleOptimizer), forced on CPU:
    the first step's loss and the logged gradient norm (the scale divided out) agree with
    float32, and a run resumes from its checkpoint (the loss scale included)."""
    from ish_tf.train import trainer

    logged = {}
    for name, policy in (("f32", False), ("f16", True)):
        if policy:
            monkeypatch.setattr(trainer, "set_precision", lambda enabled: (
                keras.mixed_precision.set_global_policy("mixed_float16") or "mixed_float16"))
        cfg = _config(tmp_path / name, steps=6, log_every=1, checkpoint_every=3,
                      mixed_precision=policy, image_summaries=False)
        if policy:
            _train(cfg, stop_after=3)
        result = _train(cfg)
        assert result.step == 6 and math.isfinite(result.loss)
        with open(run_paths(cfg.run_dir)["metrics"], newline="") as f:
            logged[name] = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged["f16"]] == [1, 2, 3, 4, 5, 6]
    first32, first16 = logged["f32"][0], logged["f16"][0]
    assert float(first16["loss"]) == pytest.approx(float(first32["loss"]), rel=2e-2)
    assert float(first16["grad_norm"]) == pytest.approx(float(first32["grad_norm"]), rel=5e-2)
    model = keras.saving.load_model(os.path.join(tmp_path, "f16", "model.keras"), compile=False)
    assert model(X[0][:2]).dtype == tf.float32
    assert keras.mixed_precision.global_policy().name == "float32"


def test_jit_compile_trains_like_the_uncompiled_step(tmp_path):
    """--jit_compile (XLA) compiles the whole train step; the first step's loss (initial
    weights, the same batch) equals the uncompiled one's, and the run finishes."""
    first = {}
    for jit in (False, True):
        cfg = _config(tmp_path / f"jit{jit}", steps=4, log_every=1, jit_compile=jit,
                      image_summaries=False)
        result = _train(cfg)
        assert result.step == 4 and math.isfinite(result.loss)
        with open(run_paths(cfg.run_dir)["metrics"], newline="") as f:
            first[jit] = float(next(csv.DictReader(f))["loss"])
    assert first[True] == pytest.approx(first[False], rel=1e-5)


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    bad = X.copy()
    bad[0, 0, 0, 0, 0] = np.nan

    def nan_fn(ctx):
        return tf.data.Dataset.from_tensor_slices((bad, Y)).repeat()

    cfg = _config(tmp_path / "nan", steps=2, log_every=1, image_summaries=False)
    # A NaN pixel reaches the loss (group norm spreads it over the image) or, where the
    # loss masks it, the gradients: either way training stops at step 1 and says why.
    with pytest.raises(TrainingError, match=r"(non-finite gradients|loss is nan) at step 1"):
        train(make_task(MODEL_CFG, cfg, nan_fn), cfg)


def test_incompatible_checkpoint_is_reported(runs, tmp_path):
    cfg, _ = runs["full"]
    other = dataclasses.replace(
        MODEL_CFG, family=dataclasses.replace(MODEL_CFG.family, embedding_dim=8))
    new_cfg = dataclasses.replace(cfg, steps=30)
    with pytest.raises(TrainingError, match="new --run_dir"):
        train(make_task(other, new_cfg, _dataset_fn), new_cfg)


# --------------------------------------------------------------------------- bin/train
def _write_records(out_dir, genes=6, per_gene=4, size=16, seed=0):
    """A tiny uncompressed records directory in the bin/extract layout."""
    from ish_tf.data import records, shards

    rng = np.random.default_rng(seed)
    symbols = [f"G{i}" for i in range(genes)]
    vocab = shards.make_gene_vocabulary(symbols)
    index = {g.gene_symbol: g.gene_index for g in vocab}
    with shards.ShardWriter(str(out_dir), "train", 0, 1) as writer:
        image_id = 0
        for g in symbols:
            for _ in range(per_gene):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                png = tf.io.encode_png(img).numpy()
                writer.write(records.make_example(encoded=png, height=size, width=size,
                                                  image_id=image_id, gene_symbol=g,
                                                  gene_index=index[g]), g, image_id)
                image_id += 1
    shards.update_index(str(out_dir), writer.info)
    shards.write_dataset_info(str(out_dir), shards.DatasetInfo(genes=vocab, patch_size=size,
                                                                 format="png"))
    return str(out_dir)


def _run_cli(argv):
    return cli.invoke("train", argv)


def test_bin_train_quickstart_config_runs_resumes_and_replays(tmp_path, capsys):
    pytest.importorskip("ish_tf.data.pipeline")
    from ish_tf.cli import train as train_cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    records_dir = _write_records(tmp_path / "records")
    run_dir = str(tmp_path / "run")
    # Patches are 16x16, the model takes 32x32: the task resizes in the pipeline.
    argv = [f"--flagfile={os.path.join(root, 'configs', 'triplet_quickstart.cfg')}",
            f"--records_dir={records_dir}", f"--run_dir={run_dir}", "--steps=3", "--triplet_P=3",
            "--triplet_K=2", "--input_size=32", "--triplet_head_units=16",
            "--triplet_embedding_dim=8", "--log_every=1",
            "--checkpoint_every=2"]
    assert _run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and "steps 0->3" in out
    for name in ("flags.cfg", "model.keras", "model_config.json", "metrics.csv"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    cfg_model = load_model_config(os.path.join(run_dir, "model_config.json"))
    assert (cfg_model.family.backbone, cfg_model.input_size) == ("small_cnn", 32)

    # The flagfile replays to the same configuration...
    fv = cli.parse("train", argv)
    want = (train_cli.model_config(fv), train_cli.train_config(fv))
    fv = cli.parse("train", [f"--flagfile={os.path.join(run_dir, 'flags.cfg')}"])
    got = (train_cli.model_config(fv), train_cli.train_config(fv))
    assert got == want
    # ... and, with more steps, resumes the run.
    assert _run_cli([f"--flagfile={os.path.join(run_dir, 'flags.cfg')}", "--steps=5"]) == 0
    assert "steps 3->5" in capsys.readouterr().out


def test_bin_train_offline_imagenet_fails_clearly(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rc = _run_cli([f"--flagfile={os.path.join(root, 'configs', 'triplet_resnet50.cfg')}",
                   f"--records_dir={tmp_path}", f"--run_dir={tmp_path / 'run'}", "--steps=3"])
    assert rc == 1
    assert "--backbone_weights=none" in capsys.readouterr().err  # (--triplet_backbone_weights)
