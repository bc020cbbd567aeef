"""The ISH CNN builder, its fully convolutional twin, and training through `bin/train`'s task."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from ish_tf.families import ModelConfig, build_model
from ish_tf.families.ish_cnn.config import IshCnnConfig

keras = pytest.importorskip("keras")


def _config(size=16, pooling="avg", **opts):
    options = {"classes": ("A", "B", "tissue", "background"), "filters": (4, 8, 8),
               "pooling": pooling, "head_units": 8, **opts}
    return ModelConfig(model="ish_cnn", input_size=size, seed=3, family=IshCnnConfig(**options))


def _perturb_batch_norm(model):
    # Non-trivial moving statistics, so inference-mode BN is exercised too.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([g * 1.3, b + 0.1, m + 0.2, v * 1.7])


def test_plan_blocks():
    from ish_tf.families.ish_cnn.model import plan_blocks

    assert plan_blocks(16) == (2, 1)
    assert plan_blocks(32) == (2, 5)
    assert plan_blocks(48) == (3, 2)
    assert plan_blocks(128) == (4, 4)
    assert plan_blocks(128, convs_per_block=1, max_blocks=3) == (3, 14)
    with pytest.raises(ValueError, match="too small"):
        plan_blocks(5)


def test_build_shapes_and_registry():
    from ish_tf.families.ish_cnn.model import stride_of

    model = build_model(_config(24))
    assert model.input_shape == (None, 24, 24, 3) and model.output_shape == (None, 4)
    x = np.random.default_rng(0).uniform(0, 255, (3, 24, 24, 3)).astype(np.float32)
    p = np.asarray(model(x, training=False))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert stride_of(model) == 4
    with pytest.raises(ValueError, match="at least two classes"):
        build_model(ModelConfig(model="ish_cnn", input_size=16))
    with pytest.raises(ValueError, match="pooling"):
        build_model(_config(16, pooling="max"))


@pytest.mark.parametrize("size,pooling", [(16, "avg"), (24, "flatten"), (48, "avg")])
def test_dense_prediction_equals_patchwise(size, pooling):
    """The fully convolutional twin reproduces the classifier at the same window centres."""
    from ish_tf.families.ish_cnn.model import dense_model, predict_windows, stride_of
    from ish_tf.families.ish_cnn.spatial import crop_patches

    model = build_model(_config(size, pooling))
    _perturb_batch_norm(model)
    dense = dense_model(model)
    s = stride_of(model)
    image = np.random.default_rng(1).integers(0, 256, (size + 3 * s + 1, size + 4 * s + 2)
                                              ).astype(np.uint8)
    out = np.asarray(dense(np.repeat(image[None, ..., None].astype(np.float32), 3, -1)))[0]
    assert out.shape == ((image.shape[0] - size) // s + 1, (image.shape[1] - size) // s + 1, 4)
    ii, jj = np.meshgrid(np.arange(out.shape[0]), np.arange(out.shape[1]), indexing="ij")
    # Window with top-left (i s, j s) = centre (i s + R//2, j s + R//2).
    xs, ys = (jj * s + size // 2).ravel(), (ii * s + size // 2).ravel()
    windows = crop_patches(image, xs, ys, size)
    np.testing.assert_allclose(out.reshape(-1, 4), predict_windows(model, windows), atol=1e-5)
    # A second twin of the same model works too (layers shared, not consumed).
    np.testing.assert_allclose(np.asarray(dense_model(model)(
        np.repeat(image[None, ..., None].astype(np.float32), 3, -1)))[0], out, atol=1e-6)


def test_dense_model_rejects_branching_models():
    from ish_tf.families.ish_cnn.model import dense_model

    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(2, 3)(inp)
    b = keras.layers.Conv2D(2, 3)(inp)
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="not supported"):
        dense_model(keras.Model(inp, out))


def test_task_trains_on_spatial_records_and_saves_classes(tmp_path):
    """`--model=ish_cnn` through the shared trainer on bin/spatial's records (tiny run)."""
    from ish_tf.families import load_model_config, make_task
    from ish_tf.families.ish_cnn import spatial
    from ish_tf.families.ish_cnn.synthetic_pairs import SpatialSynthConfig, generate_pair
    from ish_tf.train import TrainConfig
    from ish_tf.train.trainer import train

    table = generate_pair(SpatialSynthConfig(out_dir=str(tmp_path / "sec"), height=96, width=96,
                                             n_animals=1, seed=1))
    out = str(tmp_path / "rec")
    spatial.run_spatial(spatial.SpatialConfig(
        images=(table["image"][0],), spot_tables=(table["spots"][0],), masks=(table["mask"][0],),
        out_dir=out, labels=spatial.LabelConfig(genes=("Sst", "Pvalb"), radius=4,
                                                max_per_class=20, balance=False),
        patch_sizes=(16,)))
    run = str(tmp_path / "run")
    mcfg = ModelConfig(model="ish_cnn", input_size=16, family=IshCnnConfig(
        head_units=8, filters=(4, 8), dropout=0.0, P=4, K=2))
    tcfg = TrainConfig(run_dir=run, records_dir=out, steps=3, decay_start=3,
                       checkpoint_every=3, log_every=1, learning_rate=1e-3, image_summaries=True)
    task = make_task(mcfg, tcfg)
    assert type(task).__name__ == "IshCnnTask"
    result = train(task, tcfg)
    assert result.step == 3 and np.isfinite(result.loss)
    saved = load_model_config(os.path.join(run, "model_config.json"))
    assert saved.family.classes == ("Sst", "Pvalb", "tissue", "background")
    with open(os.path.join(run, "metrics.csv")) as f:
        header = f.readline()
    assert "accuracy" in header
    from ish_tf.train.tensorboard import event_tags

    tags = event_tags(os.path.join(run, "logs"))
    # Patches framed by true and predicted class, at step 0 and at the checkpoint.
    assert tags.get("predicted_class", 0) >= 2 and "true_class" in tags
    # --mixed_precision (bfloat16 on CPU) trains too, and its fully convolutional twin gives
    # float32 probabilities.
    import keras

    from ish_tf.families.ish_cnn.model import dense_model

    mixed_cfg = TrainConfig(run_dir=str(tmp_path / "mixed"), records_dir=out, steps=3,
                            decay_start=3, checkpoint_every=3, log_every=1, learning_rate=1e-3,
                            image_summaries=False, mixed_precision=True)
    mixed = train(make_task(mcfg, mixed_cfg), mixed_cfg)
    assert mixed.step == 3 and np.isfinite(mixed.loss)
    probs = dense_model(keras.saving.load_model(mixed.model_path, compile=False))(
        np.random.default_rng(0).uniform(0, 255, (1, 40, 40, 3)).astype(np.float32))
    assert probs.dtype == "float32"
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    # Wrong patch size / class list / P are refused with the reason.
    with pytest.raises(ValueError, match="p24"):
        make_task(dataclasses.replace(mcfg, input_size=24), tcfg)
    with pytest.raises(ValueError, match="have classes"):
        make_task(dataclasses.replace(
            mcfg, family=dataclasses.replace(mcfg.family, classes=("x", "y"))), tcfg)
    with pytest.raises(ValueError, match="--ish_cnn_P=5"):
        make_task(dataclasses.replace(mcfg, family=dataclasses.replace(mcfg.family, P=5)), tcfg)


def test_compute_loss_matches_crossentropy():
    import tensorflow as tf

    from ish_tf.families import make_task
    from ish_tf.train import TrainConfig

    cfg = _config(16, P=4, K=2)
    task = make_task(cfg, TrainConfig(), dataset_fn=lambda ctx: None)
    model = task.build_model()
    x = np.random.default_rng(2).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)
    loss, stats = task.compute_loss(model, (tf.constant(x), tf.constant(y)), training=False)
    p = np.asarray(model(x, training=False))
    assert float(loss) == pytest.approx(float(-np.log(p[np.arange(8), y]).mean()), rel=1e-4)
    assert float(stats["accuracy"]) == pytest.approx(float((p.argmax(-1) == y).mean()))


def test_flags_fill_options():
    from ish_tf import cli, config
    from ish_tf.cli import train as train_cli

    mc = train_cli.model_config(cli.parse("train", ["--model=ish_cnn"]))
    assert mc.family.filters == (16, 32, 64, 64, 96) and mc.family.classes == ()
    json.dumps(config.to_dict(mc.family))  # serialisable into model_config.json
    mc = train_cli.model_config(cli.parse("train", ["--model=ish_cnn", "--ish_cnn_P=5",
                                                    "--ish_cnn_classes=a,b"]))
    assert (mc.family.P, mc.family.classes) == (5, ("a", "b"))


def test_intensity_jitter_is_seeded_and_resumable():
    import tensorflow as tf

    from ish_tf.families.ish_cnn.task import jitter_intensity

    ds = tf.data.Dataset.from_tensors((tf.fill([2, 4, 4, 3], 100.0), tf.constant([0, 1]))).repeat(5)
    full = [x.numpy() for x, _ in jitter_intensity(ds, 0.2, seed=3)]
    resumed = [x.numpy() for x, _ in jitter_intensity(ds.skip(2), 0.2, seed=3, start_element=2)]
    for a, b in zip(full[2:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    values = np.stack(full)[..., 0, 0, 0]  # (5 batches, 2 images)
    assert (values >= 80).all() and (values <= 120).all() and len(np.unique(values)) == 10
