"""CDAE family: builder, corruption and losses, whole-section records, training, export,
embedding, baselines and the supervised variant (ish_tf.families.cdae.model, ish_tf.families.cdae.task,
ish_tf.families.cdae.whole)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from ish_tf import cli
from ish_tf.families import ModelConfig, build_model, make_task
from ish_tf.families.cdae.config import CdaeConfig
from ish_tf.families.cdae.model import build_cdae, cdae_options, encoder_model, scale_images
from ish_tf.families.cdae.task import corrupt, reconstruction_loss
from ish_tf.train import TrainConfig
from ish_tf.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = {"depth": 2, "filters": (4, 8), "code_size": 6, "batch_size": 4, "noise": "masking",
        "noise_level": 0.2, "loss": "bce", "image_every": 2, "norm": "batch"}


def _cfg(model="cdae", size=16, **options) -> ModelConfig:
    return ModelConfig(model=model, input_size=size, seed=0,
                       family=CdaeConfig(**{**OPTS, **options}))


# --------------------------------------------------------------------------- builder
@pytest.mark.parametrize("unpool,size,aspect,norm", [("switches", 16, 1.0, "batch"),
                                                     ("nearest", 18, 1.0, "none"),
                                                     ("switches", 13, 1.5, "none")])
def test_cdae_shapes_for_even_odd_and_wide_inputs(unpool, size, aspect, norm):
    model = build_cdae(_cfg(size=size, unpool=unpool, aspect=aspect, norm=norm))
    assert any(isinstance(x, keras.layers.BatchNormalization) for x in model.layers) == \
        (norm == "batch")
    width = round(size * aspect)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, width, 1)).astype(np.float32)
    code, recon = model(x)
    assert code.shape == (2, 6) and recon.shape == (2, size, width, 1)
    r = recon.numpy()
    assert (r >= 0).all() and (r <= 1).all()
    assert encoder_model(model)(x).shape == (2, 6)


def test_average_code_is_translation_invariant_and_flatten_is_not():
    # Stain on a white slide, shifted by a multiple of the pooling grid (4 = 2**2 before
    # the last block) while staying clear of the borders: the last block's features move
    # with it over a constant background, so their average (the code's input) is unchanged.
    rng = np.random.default_rng(0)
    x = np.full((1, 32, 32, 1), 255.0, np.float32)
    x[0, 6:14, 5:15, 0] = rng.uniform(0, 200, (8, 10))
    shifted = np.roll(x, (8, 12), axis=(1, 2))
    average = build_cdae(_cfg(size=32, code_pooling="average", unpool="switches"))
    flat = build_cdae(_cfg(size=32, code_pooling="flatten"))
    a, b = average(x)[0].numpy(), average(shifted)[0].numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(a).max() > 1e-3
    assert np.abs(flat(x)[0].numpy() - flat(shifted)[0].numpy()).max() > 1e-2
    # The decoder still reconstructs the shifted layout (through the switches).
    assert average(x)[1].shape == (1, 32, 32, 1)
    assert average.get_layer("enc_global_pool") is not None


@pytest.mark.parametrize("bad,match", [({"unpool": "bilinear"}, "--cdae_unpool"),
                                       ({"depth": 0}, "--cdae_depth"),
                                       ({"code_size": 0}, "--cdae_code_size"),
                                       ({"code_pooling": "max"}, "--cdae_code_pooling"),
                                       ({"norm": "layer"}, "--cdae_norm"),
                                       ({"depth": 5}, "too small")])
def test_bad_options_name_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        cdae_options(_cfg(**bad))


def test_corruptions_are_seeded_and_bounded():
    x = tf.fill((2, 32, 32, 1), 0.6)
    seed = tf.constant([0, 5], tf.int64)
    m = corrupt(x, "masking", 0.3, seed).numpy()
    assert set(np.unique(m)) <= {0.0, np.float32(0.6)}
    assert 0.25 < (m == 0).mean() < 0.35
    np.testing.assert_array_equal(m, corrupt(x, "masking", 0.3, seed).numpy())
    assert not np.array_equal(m, corrupt(x, "masking", 0.3, seed + [0, 1]).numpy())
    sp = corrupt(x, "salt_pepper", 0.4, seed).numpy()
    hit = sp != np.float32(0.6)
    assert 0.35 < hit.mean() < 0.45 and set(np.unique(sp[hit])) <= {0.0, 1.0}
    g = corrupt(x, "gaussian", 0.5, seed).numpy()
    assert g.min() >= 0 and g.max() <= 1 and g.std() > 0.2
    np.testing.assert_array_equal(corrupt(x, "none", 0.5, seed).numpy(), x.numpy())
    with pytest.raises(ValueError, match="--cdae_noise"):
        corrupt(x, "speckle", 0.1)


def test_reconstruction_losses():
    t = tf.constant([[0.0, 1.0, 0.5]])
    r = tf.constant([[0.1, 0.8, 0.5]])
    np.testing.assert_allclose(reconstruction_loss(t, r, "mse").numpy(), [[0.01, 0.04, 0.0]],
                               atol=1e-7)
    want = [[-np.log(0.9), -np.log(0.8), -np.log(0.5)]]
    np.testing.assert_allclose(reconstruction_loss(t, r, "bce").numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(scale_images(tf.constant([255.0, 0.0]), True).numpy(), [0, 1])


# --------------------------------------------------------------------------- whole sections
def test_whole_section_crops_to_tissue_and_pads_with_background():
    from ish_tf.families.cdae.whole import tissue_box, whole_section

    rgb = np.full((60, 100, 3), 230, np.uint8)
    rgb[10:30, 20:80] = 40  # tissue: 20 x 60, wider than tall
    mask = np.zeros((60, 100), bool)
    mask[10:30, 20:80] = True
    assert tissue_box(mask) == (20, 10, 80, 30)
    out, box, side = whole_section(rgb, mask, size=12, aspect=1.0, margin=0.0)
    assert out.shape == (12, 12) and box == (20, 10, 80, 30) and side == 60
    # Padded top and bottom (centred) with the slide grey; the tissue band in the middle.
    assert abs(int(out[0, 6]) - 230) <= 2 and abs(int(out[-1, 6]) - 230) <= 2
    assert abs(int(out[6, 6]) - 40) <= 2
    wide, _, _ = whole_section(rgb, mask, size=10, aspect=3.0, margin=0.0)
    assert wide.shape == (10, 30) and abs(int(wide[5, 15]) - 40) <= 2
    with pytest.raises(ValueError, match="empty mask"):
        tissue_box(np.zeros((4, 4), bool))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic study and its 16x16 whole-section records (split by gene)."""
    from ish_tf.data.synthetic import SynthConfig, generate_dataset
    from ish_tf.families.cdae.whole import WholeConfig, run_whole

    root = tmp_path_factory.mktemp("cdae")
    synth = str(root / "synth")
    generate_dataset(SynthConfig(out_dir=synth, n_genes=12, n_donors=2, donors_per_gene=2,
                                 images_per_gene_donor=1, height=64, width=80, n_groups=3, seed=0))
    records = str(root / "whole")
    summary = run_whole(WholeConfig(manifest=os.path.join(synth, "manifest.csv"), out_dir=records,
                                    size=16, num_shards=2, split_fractions=(0.5, 0.25, 0.25)),
                        progress_enabled=False)
    return {"root": root, "synth": synth, "records": records, "summary": summary}


def test_whole_records_one_per_image_and_resume(data):
    from ish_tf.data import shards
    from ish_tf.families.cdae.whole import WholeConfig, run_whole

    s = data["summary"]
    assert sum(v["images"] for v in s["splits"].values()) == 24
    assert sum(v["patches"] for v in s["splits"].values()) == 24 and not s["skipped"]
    info = shards.load_dataset_info(data["records"])
    assert info.patch_size == 16 and info.extra["whole"] == {"height": 16, "width": 16,
                                                            "channels": 1}
    report = pd.read_csv(os.path.join(data["records"], "whole_report.csv"))
    assert len(report) == 24 and (report["status"] == "ok").all()
    again = run_whole(WholeConfig(manifest=os.path.join(data["synth"], "manifest.csv"),
                                  out_dir=data["records"], size=16, num_shards=2,
                                  split_fractions=(0.5, 0.25, 0.25)), progress_enabled=False)
    assert again["shards_written"] == 0 and again["shards_resumed"] == s["shards_written"]
    from ish_tf.data.patches import ExtractError

    with pytest.raises(ExtractError, match="other settings"):
        run_whole(WholeConfig(manifest=os.path.join(data["synth"], "manifest.csv"),
                              out_dir=data["records"], size=24, num_shards=2,
                              split_fractions=(0.5, 0.25, 0.25)), progress_enabled=False)


def test_bin_extract_whole_images(data, tmp_path, capsys):
    manifest = os.path.join(data["synth"], "manifest.csv")
    out = tmp_path / "cli_whole"
    assert cli.invoke("extract", [f"--manifest={manifest}", f"--out={out}", "--whole_images",
                                  "--whole_size=16", "--whole_aspect=1.5", "--format=png",
                                  "--num_shards=1", "--workers=1"]) == 0
    printed = capsys.readouterr().out
    assert "whole sections 16x24 grayscale png" in printed and "sections" in printed
    assert (out / "whole_report.csv").exists() and (out / "extract_flags.cfg").exists()
    assert cli.invoke("extract", [f"--manifest={manifest}", f"--out={out}", "--whole_images",
                                  "--split_fractions=0.9,0.1"]) == 2
    assert "split_fractions must be three numbers" in capsys.readouterr().err


def test_whole_gene_filter_is_the_patch_extractions(data, tmp_path, caplog):
    """--genes selects the same way for whole sections as for patches: unknown genes are
    named and ignored, and a list with none of the manifest's genes is an error."""
    from ish_tf.data import shards
    from ish_tf.data.patches import ExtractError
    from ish_tf.families.cdae.whole import WholeConfig, run_whole

    manifest = os.path.join(data["synth"], "manifest.csv")
    gene = sorted(pd.read_csv(manifest)["gene_symbol"].astype(str).unique())[0]
    out = str(tmp_path / "one_gene")
    with caplog.at_level("WARNING"):
        s = run_whole(WholeConfig(manifest=manifest, out_dir=out, size=16, num_shards=1,
                                  genes=(gene, "NOT_A_GENE")), progress_enabled=False)
    assert "NOT_A_GENE" in caplog.text
    assert sum(v["images"] for v in s["splits"].values()) == 2  # 2 donors x 1 image
    info = shards.load_dataset_info(out)
    assert [g.gene_symbol for g in info.genes] == [gene] and info.source_size == 0
    with pytest.raises(ExtractError, match=r"manifest\.csv: none of the requested genes"):
        run_whole(WholeConfig(manifest=manifest, out_dir=str(tmp_path / "none"), size=16,
                              genes=("NOT_A_GENE",)), progress_enabled=False)


def test_invert_mismatch_warns_for_the_other_kind_of_slide(data, tmp_path, caplog):
    """--cdae_invert suits brightfield records; records of fluorescence sections
    (--mask_background=dark) want --nocdae_invert, and training says so."""
    from PIL import Image
    from test_segment import _fluorescence

    from ish_tf.data.manifest import write_manifest
    from ish_tf.data.segment import MaskConfig
    from ish_tf.families.cdae.data import invert_mismatch
    from ish_tf.families.cdae.whole import WholeConfig, run_whole

    assert invert_mismatch(data["records"], True) is None
    brightfield = invert_mismatch(data["records"], False)
    assert "brightfield" in brightfield and "pass --cdae_invert" in brightfield
    assert invert_mismatch(str(tmp_path / "not_records"), True) is None

    df = pd.read_csv(os.path.join(data["synth"], "manifest.csv")).head(8)
    for i, row in df.iterrows():
        truth = np.asarray(Image.open(os.path.join(data["synth"], "masks",
                                                   f"{row['image_id']}.png"))) > 127
        path = tmp_path / f"fluo_{row['image_id']}.png"
        Image.fromarray(_fluorescence(truth, i)).save(path)
        df.loc[i, "path"] = str(path)
    write_manifest(df, str(tmp_path / "manifest.csv"))
    dark = str(tmp_path / "dark")
    run_whole(WholeConfig(manifest=str(tmp_path / "manifest.csv"), out_dir=dark, size=16,
                          num_shards=1, split_fractions=(1.0, 0.0, 0.0),
                          mask=MaskConfig(background="dark")), progress_enabled=False)
    assert invert_mismatch(dark, False) is None
    fluorescence = invert_mismatch(dark, True)
    assert "fluorescence" in fluorescence and "pass --nocdae_invert" in fluorescence
    task = make_task(_cfg(), _train_cfg(tmp_path / "run", dark))
    with caplog.at_level("WARNING"):
        task.make_records_dataset(None)
        task.make_records_dataset(None)  # once per task, not per input pipeline
    assert [r.getMessage() for r in caplog.records if "cdae_invert" in r.getMessage()] == \
        [fluorescence]


def test_whole_dataset_is_resumable_by_step(data):
    from ish_tf.families.cdae.data import whole_dataset

    def batches(start, n):
        ds = whole_dataset(data["records"], "train", batch_size=4, height=16, width=16,
                           start_step=start)
        return [b for _, b in zip(range(n), ds, strict=False)]

    full, resumed = batches(0, 4), batches(2, 2)
    assert full[0]["images"].shape == (4, 16, 16, 1)
    for a, b in zip(full[2:], resumed, strict=True):
        assert int(a["step"]) == int(b["step"])
        np.testing.assert_array_equal(a["images"].numpy(), b["images"].numpy())


# --------------------------------------------------------------------------- training
def _train_cfg(run_dir, records="", steps=6, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), records_dir=records, steps=steps, decay_start=steps,
                       learning_rate=3e-3, checkpoint_every=3, log_every=2, flips=False, seed=0,
                       **kw)


def test_cdae_trains_on_records_with_reconstruction_images_and_exports(data, tmp_path):
    from ish_tf.embed import EmbedConfig, embed_records
    from ish_tf.export.saved_model import export_run, read_metadata
    from ish_tf.train.tensorboard import event_tags

    run = tmp_path / "run"
    cfg = _train_cfg(run, data["records"], steps=8)
    result = train(make_task(_cfg(), cfg), cfg)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["step"]) == [2, 4, 6, 8]
    assert {"mse", "mae", "code_rms"} <= set(metrics.columns)
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0]
    tags = event_tags(str(run / "logs"))
    assert tags.get("clean_noisy_reconstruction") == 4  # steps 2, 4, 6, 8
    assert "cdae_reconstructions" in tags
    # Export through the shared exporter and embed one code per image and per gene.
    out = export_run(result.run_dir, str(tmp_path / "export"))
    assert read_metadata(out)["outputs"] == ["code", "reconstruction"]
    emb = embed_records(EmbedConfig(saved_model=out, records_dir=data["records"],
                                    out_dir=str(tmp_path / "emb")).validate(), progress=False)
    del emb
    image = pd.read_csv(tmp_path / "emb" / "image_embeddings.csv")
    gene = pd.read_csv(tmp_path / "emb" / "gene_embeddings.csv")
    assert len(image) == 24 and len(gene) == 12
    dims = [c for c in gene.columns if c.startswith("dim_")]
    assert len(dims) == 6
    # The served code is the Keras encoder's code.
    model = keras.saving.load_model(str(run / "model.keras"), compile=False)
    from ish_tf.families.cdae.terms import predict_records

    keys, codes = predict_records(encoder_model(model), data["records"], ["train", "validation",
                                                                         "test"])
    served = image.set_index("image_id").loc[keys["image_id"], dims].to_numpy()
    np.testing.assert_allclose(served, codes, rtol=1e-4, atol=1e-4)


def test_tune_cdae_on_validation_loss(data, tmp_path):
    """bin/tune's path for families without a HyperModel of their own: the CDAE's trials are
    ordinary runs scored by the task's loss on the validation split; best.cfg replays the
    best one with the CDAE's flags."""
    from ish_tf.cli import train as train_cli
    from ish_tf.cli import tune as tune_cli
    from ish_tf.tune import hypermodels

    out = tmp_path / "tune"
    argv = ["--model=cdae", f"--records_dir={data['records']}", f"--out={out}",
            "--input_size=16", "--cdae_depth=2", "--cdae_filters=4,8", "--cdae_code_size=6",
            "--cdae_batch_size=4", "--cdae_image_every=0", "--noimage_summaries",
            "--strategy=default", "--log_every=1", "--tuner=grid", "--max_trials=2",
            "--val_batches=2", "--tune_flips=false", "--tune_learning_rate=3e-3,1e-5",
            "--tune_steps=3", "--executions_per_trial=2"]
    fv = cli.parse("tune", argv)
    model_cfg, base = train_cli.model_config(fv), train_cli.train_config(fv)
    hm = hypermodels.make_hypermodel(model_cfg, base, tune_cli.tune_config(fv))
    assert type(hm) is hypermodels.TaskHyperModel
    assert (hm.objective.name, hm.objective.direction) == ("val_loss", "min")
    assert cli.invoke("tune", argv) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "COMPLETED").all()
    assert np.isfinite(trials["val_loss"]).all()
    assert sorted(trials["learning_rate"]) == [1e-5, 3e-3]
    best = trials.loc[trials["val_loss"].idxmin()]
    # The validation loss is the task's own loss on the validation split with the trial's
    # weights, averaged over its two executions (seeds 0 and 1): recomputed here from the
    # executions' models.
    per_execution = []
    for e in range(2):
        trial_model, trial_train = hm.trial_configs(
            {"learning_rate": best["learning_rate"], "flips": False, "steps": 3},
            run_dir=os.path.join(best["run_dir"], f"e{e}"), execution=e)
        assert trial_train.seed == e
        task = make_task(trial_model, dataclasses.replace(trial_train, split="validation"))
        model = keras.saving.load_model(os.path.join(best["run_dir"], f"e{e}", "model.keras"),
                                        compile=False)
        keras.utils.set_random_seed(e)  # as the scoring does: tf.data shuffles use it
        per_execution.append(np.mean([float(task.compute_loss(model, b, training=False)[0])
                                      for b in task.make_records_dataset(None, 0).take(2)]))
    assert per_execution[0] != per_execution[1]
    assert best["val_loss"] == pytest.approx(np.mean(per_execution), rel=1e-5)
    cfg_text = (out / "best.cfg").read_text()
    assert f"Best trial {best['trial_id']} " in cfg_text
    for line in ("--model=cdae", "--cdae_code_size=6", "--cdae_filters=4,8", "--noflips",
                 f"--learning_rate={best['learning_rate']:g}", "--steps=3"):
        assert line in cfg_text.splitlines(), line


def test_cdae_mixed_precision(data, tmp_path):
    """--mixed_precision (bfloat16 on CPU): the switch pooling and unpooling layers run in
    bfloat16, code and reconstruction leave the model as float32, and the run exports."""
    from ish_tf.export.saved_model import export_run

    cfg = _train_cfg(tmp_path / "run", data["records"], steps=3, mixed_precision=True,
                     image_summaries=False)
    result = train(make_task(_cfg(image_every=0), cfg), cfg)
    assert np.isfinite(result.loss)
    model = keras.saving.load_model(result.model_path, compile=False)
    assert model.get_layer("enc0_pool").dtype_policy.compute_dtype == "bfloat16"
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 1)).astype(np.float32)
    code, recon = model(x)
    assert code.dtype == recon.dtype == tf.float32
    served = tf.saved_model.load(export_run(result.run_dir, str(tmp_path / "export")))
    out = served.signatures["encode_images"](images=tf.constant(x))
    assert out["code"].dtype == tf.float32
    # bfloat16 keeps 8 bits of mantissa: codes agree to its relative rounding.
    np.testing.assert_allclose(out["code"].numpy(), code.numpy(), rtol=2e-2, atol=5e-2)


def test_cdae_trains_under_xla(data, tmp_path):
    """--jit_compile: the switch pooling switches to its XLA-compilable implementation; the
    compiled loss and gradients equal the uncompiled model's with the same weights."""
    cfg = _train_cfg(tmp_path / "jit", data["records"], steps=4, jit_compile=True,
                     image_summaries=False)
    task = make_task(_cfg(image_every=0), cfg)
    result = train(task, cfg)
    assert np.isfinite(result.loss)
    compiled = keras.saving.load_model(result.model_path, compile=False)
    assert compiled.get_layer("enc0_pool").implementation == "window"
    plain = build_cdae(_cfg())
    assert plain.get_layer("enc0_pool").implementation == "kernel"
    plain.set_weights(compiled.get_weights())
    batch = next(iter(task.make_records_dataset(None, 0)))

    def loss_and_grads(model):
        with tf.GradientTape() as tape:
            loss, _ = task.compute_loss(model, batch, training=False)
        return loss, tape.gradient(loss, model.trainable_variables)

    want_loss, want_grads = loss_and_grads(plain)
    got_loss, got_grads = tf.function(lambda: loss_and_grads(compiled), jit_compile=True)()
    np.testing.assert_allclose(got_loss.numpy(), want_loss.numpy(), rtol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-6)


def test_cdae_resume_matches_uninterrupted(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg_a, cfg_b = _train_cfg(a, data["records"]), _train_cfg(b, data["records"])
    train(make_task(_cfg(image_every=0), cfg_a), cfg_a)
    train(make_task(_cfg(image_every=0), cfg_b), cfg_b, stop_after=3)
    train(make_task(_cfg(image_every=0), cfg_b), cfg_b)
    wa = keras.saving.load_model(str(a / "model.keras"), compile=False).get_weights()
    wb = keras.saving.load_model(str(b / "model.keras"), compile=False).get_weights()
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_final_model_has_the_batch_norm_statistics_of_clean_images(data, tmp_path):
    """Training sees masked images; model.keras gets batch-norm statistics of clean ones
    (the first --cdae_bn_images of the run's stream), rewriting it gives the same model,
    and --cdae_bn_images=0 keeps the checkpoint's moving averages."""
    opts = {"image_every": 0, "noise_level": 0.5, "bn_images": 10}
    run = tmp_path / "run"
    cfg = _train_cfg(run, data["records"], steps=4)
    task = make_task(_cfg(**opts), cfg)
    train(task, cfg)
    final = keras.saving.load_model(str(run / "model.keras"), compile=False)
    # The first convolution has no batch norm before it: its clean outputs' statistics
    # over the first 10 images of the stream are exact.
    images = np.concatenate([b["images"].numpy() for b in task.make_dataset(None, 0).take(3)])[:10]
    conv = keras.Model(final.inputs[0], final.get_layer("enc0_conv0").output)
    out = conv(images).numpy().reshape(-1, 4)
    bn = final.get_layer("enc0_conv0_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), out.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), out.var(axis=0), rtol=1e-4, atol=1e-6)
    # The checkpoint keeps the moving averages of training (masked inputs, momentum 0.99).
    restored = build_model(_cfg(**opts))
    tf.train.Checkpoint(model=restored).read(tf.train.latest_checkpoint(str(run / "checkpoints"))
                                             ).expect_partial()
    stored = restored.get_layer("enc0_conv0_bn").moving_mean.numpy()
    assert np.abs(stored - out.mean(axis=0)).max() > 1e-3
    others = [(a, b) for a, b in zip(restored.weights, final.weights, strict=True)
              if "moving" not in a.path]
    for a, b in others:
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A finished run whose model.keras is gone writes the same model again.
    os.remove(run / "model.keras")
    train(make_task(_cfg(**opts), cfg), cfg)
    again = keras.saving.load_model(str(run / "model.keras"), compile=False)
    for a, b in zip(final.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Without re-estimation model.keras holds the checkpoint's weights.
    off = tmp_path / "off"
    cfg_off = _train_cfg(off, data["records"], steps=4)
    train(make_task(_cfg(**{**opts, "bn_images": 0}), cfg_off), cfg_off)
    kept = keras.saving.load_model(str(off / "model.keras"), compile=False)
    np.testing.assert_allclose(kept.get_layer("enc0_conv0_bn").moving_mean.numpy(), stored,
                               rtol=1e-5, atol=1e-6)


def test_statistics_reestimated_from_in_memory_rgb_batches(tmp_path):
    """A dataset_fn of bare RGB batches (no step, no dict): the re-estimation sees the
    same grayscale images the model trains on."""
    from ish_tf.families.cdae.data import to_gray

    rgb = np.random.default_rng(1).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    cfg = _train_cfg(tmp_path / "run", steps=2, image_summaries=False)
    task = make_task(_cfg(image_every=0, bn_images=8),
                     cfg, lambda ctx: tf.data.Dataset.from_tensors(rgb).repeat())
    final = keras.saving.load_model(train(task, cfg).model_path, compile=False)
    conv = keras.Model(final.inputs[0], final.get_layer("enc0_conv0").output)
    out = conv(to_gray(tf.constant(rgb))).numpy().reshape(-1, 4)
    np.testing.assert_allclose(final.get_layer("enc0_conv0_bn").moving_mean.numpy(),
                               out.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_baselines_and_supervised_from_cdae(data, tmp_path, capsys):
    from ish_tf.families.cdae.baselines import pixel_pca, untrained_encoder
    from ish_tf.families.cdae.terms import codes_term_auc, load_term_groups, term_auc, term_matrix

    # A CDAE run to initialise from.
    cdae_run = tmp_path / "cdae"
    cfg = _train_cfg(cdae_run, data["records"], steps=2)
    train(make_task(_cfg(image_every=0), cfg), cfg)
    image, gene = pixel_pca(data["records"], 6, 16, 16)
    assert image.values.shape == (24, 6) and gene.values.shape == (12, 6)
    _, capped = pixel_pca(data["records"], 100, 16, 16)
    assert capped.values.shape == (12, 11)  # 12 training images: at most 11 components
    _, ugene = untrained_encoder(_cfg(), data["records"])
    assert ugene.values.shape == (12, 6)
    # Its batch-norm statistics are estimated on the training images, as a trained
    # CDAE's are; as initialised (mean 0, variance 1) they give other codes.
    _, init_bn = untrained_encoder(_cfg(), data["records"], recalibrate=False)
    _, no_images = untrained_encoder(_cfg(bn_images=0), data["records"])
    assert np.abs(ugene.values - init_bn.values).max() > 1e-3
    np.testing.assert_array_equal(no_images.values, init_bn.values)

    gaf = os.path.join(data["synth"], "go.gaf")
    groups = load_term_groups(gaf=gaf)
    terms, matrix, annotated = term_matrix(data["records"], groups, min_genes=1, max_genes=100)
    assert matrix.shape == (12, len(terms)) and annotated.all()
    assert (matrix.sum(axis=1) >= 1).all()
    with pytest.raises(ValueError, match="--cdae_term_min_genes"):
        term_matrix(data["records"], groups, min_genes=50)

    sup_cfg = _cfg("cdae_supervised", gaf=gaf, term_min_genes=1, term_max_genes=100,
                   init_from=str(cdae_run))
    run = tmp_path / "sup"
    tcfg = _train_cfg(run, data["records"], steps=2)
    task = make_task(sup_cfg, tcfg)
    assert list(task.model_config.family.terms) == terms
    model = task.build_model()
    trained = keras.saving.load_model(str(cdae_run / "model.keras"), compile=False)
    np.testing.assert_array_equal(model.get_layer("code").get_weights()[0],
                                  trained.get_layer("code").get_weights()[0])
    train(task, tcfg)
    saved = json.loads((run / "model_config.json").read_text())
    assert saved["config"]["family"]["terms"] == terms
    assert pd.read_csv(run / "terms.csv")["term"].tolist() == terms
    model = keras.saving.load_model(str(run / "model.keras"), compile=False)
    table = term_auc(model, data["records"], terms, groups, split="test")
    assert list(table.columns) == ["term", "n_genes", "n_positive", "auc"]
    assert (table["n_genes"] == 3).all()
    scored = table["auc"].dropna()
    assert ((scored >= 0) & (scored <= 1)).all()
    # Codes of the CDAE the model started from + logistic regression, on the same genes.
    encoder = encoder_model(keras.saving.load_model(str(cdae_run / "model.keras"), compile=False))
    codes = codes_term_auc(encoder, data["records"], terms, groups, split="test")
    assert list(codes.columns) == list(table.columns)
    assert codes["term"].tolist() == terms
    assert codes["n_positive"].tolist() == table["n_positive"].tolist()
    # A term the supervised model cannot score (no positive or negative held-out gene)
    # cannot be scored from codes either.
    assert (codes["auc"].isna() | table["auc"].notna()).all()
    assert ((codes["auc"].dropna() >= 0) & (codes["auc"].dropna() <= 1)).all()
    # The command writes both side by side (codes from the run's --cdae_init_from).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "ish_tf.cli.cdae", "term_auc",
                           f"--run_dir={run}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "codes of" in done.stdout and "logistic regression" in done.stdout
    # The other calls run in this process (the command line itself was exercised above).
    from ish_tf.cli import invoke

    def cdae(*args):
        capsys.readouterr()
        rc = invoke("cdae", list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    # --codes_run takes a .keras file as --cdae_init_from does, and names a missing one.
    keras_file = str(cdae_run / "model.keras")
    out = tmp_path / "codes_from_file"
    rc, _, err = cdae("term_auc", f"--run_dir={run}", f"--codes_run={keras_file}", f"--out={out}")
    assert rc == 0, err[-2000:]
    from_file = pd.read_csv(out / "term_auc_test.csv")
    from_run = pd.read_csv(run / "term_auc_test.csv")
    np.testing.assert_allclose(from_file["auc_codes_lr"], from_run["auc_codes_lr"], atol=1e-6)
    rc, _, err = cdae("term_auc", f"--run_dir={run}", f"--codes_run={tmp_path / 'nothing'}")
    assert rc == 1 and "--codes_run=" in err
    assert "model.keras not found" in err
    rc, stdout, err = cdae("baselines", f"--run_dir={cdae_run}")
    assert rc == 0, err[-2000:]
    base = cdae_run / "baselines"
    assert (base / "pixels_pca_gene_embeddings.csv").exists()
    assert (base / "untrained_encoder_gene_embeddings.csv").exists()
    reliance = json.loads((base / "code_reliance.json").read_text())
    assert set(reliance) == {"mse", "mse_mean_code", "mse_mean_image", "code_share"}
    assert "of the gain over the mean image" in stdout
    rc, _, err = cdae("term_auc", f"--run_dir={cdae_run}")
    assert rc == 1 and "holds no finished cdae_supervised model" in err
    written = pd.read_csv(run / "term_auc_test.csv")
    assert list(written.columns) == ["term", "n_genes", "n_positive", "auc", "auc_codes_lr"]
    np.testing.assert_allclose(written["auc_codes_lr"], codes["auc"], equal_nan=True)


def test_heldout_lr_auc_fits_on_some_rows_and_scores_others():
    from ish_tf.families.cdae.terms import heldout_lr_auc

    rng = np.random.default_rng(0)
    n = 80
    y = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n), np.zeros(n)], axis=1)
    x = np.column_stack([y[:, 0] * 3.0 + rng.normal(0, 0.3, n), rng.normal(0, 1, (n, 2))])
    fit = np.arange(n) < 60
    aucs = heldout_lr_auc(x, y, fit, ~fit)
    assert aucs[0] == 1.0  # label 0 is readable from feature 0
    assert 0.15 < aucs[1] < 0.85  # label 1 is noise
    assert np.isnan(aucs[2])  # no positive at all
    # Fitting on the held-out rows' labels flipped turns a perfect AUC into 0.
    flipped = y.copy()
    flipped[fit, 0] = 1 - flipped[fit, 0]
    assert heldout_lr_auc(x, flipped, fit, ~fit)[0] == 0.0


def test_bin_train_and_extract_flags(data, tmp_path, capsys):
    from ish_tf.cli import train as train_cli

    run = tmp_path / "run"
    argv = [f"--flagfile={os.path.join(ROOT, 'configs', 'cdae_quickstart.cfg')}",
            f"--records_dir={data['records']}", f"--run_dir={run}", "--input_size=16",
            "--cdae_depth=2", "--cdae_filters=4,8", "--cdae_code_size=6", "--steps=2",
            "--log_every=1", "--small_run"]
    family = train_cli.model_config(cli.parse("train", argv)).family
    assert family.batch_size == 8 and family.unpool == "switches"
    assert family.filters == (4, 8)
    assert cli.invoke("train", argv) == 0
    assert "steps 0->2" in capsys.readouterr().out
    saved = json.loads((run / "model_config.json").read_text())["config"]
    assert saved["model"] == "cdae" and saved["family"]["code_size"] == 6
    # The mouse config parses into a valid model configuration.
    fv = cli.parse("train", [f"--flagfile={os.path.join(ROOT, 'configs', 'cdae_mouse.cfg')}"])
    mcfg = train_cli.model_config(fv)
    opts = cdae_options(mcfg)
    assert (opts["height"], opts["width"], opts["code_size"]) == (128, 192, 256)
    model = build_model(dataclasses.replace(
        mcfg, family=dataclasses.replace(mcfg.family, filters=(2,))))
    assert model.outputs[0].shape[-1] == 256


def test_code_reliance_measures_what_the_decoder_takes_from_the_code():
    from ish_tf.families.cdae.baselines import code_reliance

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (6, 16, 16, 1)).astype(np.float32)
    images[:3] *= 0.2  # two kinds of image, so the mean image is a poor reconstruction
    model = build_cdae(_cfg(unpool="nearest"))
    before = [w.copy() for w in model.get_weights()]
    got = code_reliance(model, images, batch_size=4)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the code layer is put back
    target = 1.0 - images / 255.0
    assert got["mse"] == pytest.approx(float(np.mean((model(images)[1].numpy() - target) ** 2)),
                                       rel=1e-5)
    # Without switches the decoder sees only the code: one code, one reconstruction for
    # every image, which cannot beat the best constant image.
    assert got["mse_mean_code"] >= got["mse_mean_image"] - 1e-7
    assert got["mse_mean_image"] == pytest.approx(float(np.mean((target - target.mean(0)) ** 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        code_reliance(model, images[:1])


def test_whole_record_of_a_real_allen_mouse_section(tmp_path):
    """A real Allen Mouse Brain Atlas section (Prox1, sagittal, downsample 2) becomes one
    64x96 grayscale record cropped to the tissue, padded with the slide's white, that the
    CDAE encodes."""
    import shutil

    from conftest import shared_data_path

    from ish_tf.data import manifest as mf
    from ish_tf.families.cdae.baselines import whole_pixels
    from ish_tf.families.cdae.terms import predict_records
    from ish_tf.families.cdae.whole import WholeConfig, run_whole

    src = shared_data_path("allen", "mouse_prox1_sagittal_ds2.jpg")
    os.makedirs(tmp_path / "img")
    shutil.copy(src, tmp_path / "img" / "prox1.jpg")
    mf.write_manifest(pd.DataFrame([{
        "image_id": 1, "experiment_id": 69289763, "study": "mouse", "gene_symbol": "Prox1",
        "donor_id": "mouse", "plane_of_section": "sagittal", "width": 2980, "height": 1888,
        "path": "img/prox1.jpg"}]), str(tmp_path / "manifest.csv"))
    out = str(tmp_path / "whole")
    s = run_whole(WholeConfig(manifest=str(tmp_path / "manifest.csv"), out_dir=out, size=64,
                              aspect=1.5, num_shards=1), progress_enabled=False)
    assert s["splits"]["train"]["status"] == {"ok": 1}
    row = pd.read_csv(os.path.join(out, "whole_report.csv")).iloc[0]
    # The section fills most of the slide: its box (plus the 2% margin) spans > 90% of it.
    assert row["x1"] - row["x0"] > 0.9 * 2980 and row["y1"] - row["y0"] > 0.9 * 1888
    assert 0.5 < row["tissue_fraction"] < 0.7  # 0.589 measured (tests/test_segment.py)
    _, pixels = whole_pixels(out, "train", 64, 96)
    img = pixels[0].reshape(64, 96)
    assert img[0].mean() > 235 and img[-1].mean() > 235  # slide background at the edges
    assert img[24:40, 32:64].mean() < 225  # tissue in the middle
    assert img.min() < 120  # the dentate gyrus's dark Prox1 stain survives downsampling
    model = build_cdae(ModelConfig(model="cdae", input_size=64, seed=0, family=CdaeConfig(
        depth=3, filters=(8, 8, 8), code_size=16, aspect=1.5, norm="batch")))
    keys, codes = predict_records(encoder_model(model), out, "train")
    assert keys["gene_symbol"].tolist() == ["Prox1"] and codes.shape == (1, 16)
    assert np.isfinite(codes).all()
