"""Tests of ish_tf.export: versioned SavedModels served from encoded image bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import shared_data_path  # noqa: E402 - tests/ is on sys.path under pytest

from ish_tf.export import saved_model as sm  # noqa: E402
from ish_tf.models.backbones import CaffePreprocess  # noqa: E402
from ish_tf.models.heads import L2Normalize  # noqa: E402

S = 16


def tiny_model(size: int = S, seed: int = 0) -> keras.Model:
    """Registered custom layers + a BatchNorm with non-trivial moving statistics."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, name="dense")(x)
    x = L2Normalize(name="l2")(x)
    model = keras.Model(inputs, x, name="tiny_triplet")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(0, 5, 4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 3, 4).astype("float32"))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, channels)).astype(np.float32)
    # A smooth ramp plus noise: JPEG-like content, not pure noise.
    ramp = np.linspace(0, 120, w, dtype=np.float32)[None, :, None]
    return np.clip(0.5 * base + ramp, 0, 255).astype(np.uint8)


def _reference(model, encoded: list[bytes]) -> np.ndarray:
    """The Keras model on the pixels TensorFlow decodes (resized like the export)."""
    images = []
    for data in encoded:
        img = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32)
        if img.shape[0] != S or img.shape[1] != S:
            img = tf.image.resize(img, [S, S], method="bilinear", antialias=True)
        images.append(img)
    return model(tf.stack(images), training=False).numpy()


def _fake_run(tmp_path, model) -> str:
    run = tmp_path / "run"
    run.mkdir()
    model.save(str(run / "model.keras"))
    (run / "flags.cfg").write_text("# Resolved flags\n--triplet_backbone=small_cnn\n"
                                   "--input_size=16\n--triplet_l2_normalize\n--nojit_compile\n")
    (run / "model_config.json").write_text(json.dumps(
        {"builder": "triplet", "config": {"model": "triplet", "input_size": S}}))
    return str(run)


def test_fresh_process_serving_matches_keras(tmp_path, model):
    run = _fake_run(tmp_path, model)
    path = sm.export_run(run, str(tmp_path / "export" / "tiny"))
    assert path.endswith(os.path.join("tiny", "1"))

    jpeg = tf.io.encode_jpeg(_image(S, S, 1), quality=90).numpy()
    png = tf.io.encode_png(_image(S, S, 2)).numpy()
    png_big = tf.io.encode_png(_image(24, 20, 3)).numpy()      # resized in the graph
    png_gray = tf.io.encode_png(_image(S, S, 4, channels=1)).numpy()  # expanded to RGB
    encoded = [jpeg, png, png_big, png_gray]
    for i, data in enumerate(encoded):
        (tmp_path / f"img{i}.bin").write_bytes(data)
    pixels = np.stack([_image(S, S, 5), _image(S, S, 6)]).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    # The same encoded images as records of the schema, for the tf_example signature.
    from ish_tf.data import records

    for i, data in enumerate(encoded):
        h, w = tf.io.decode_image(data).shape[:2]
        (tmp_path / f"rec{i}.bin").write_bytes(records.make_example(
            image_encoded=data, image_height=h, image_width=w, image_id=i,
            gene_symbol="g", gene_index=0))

    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        m = tf.saved_model.load({path!r})
        # Served without ish_tf: the custom layers live in the graph, not in Python.
        assert "ish_tf" not in sys.modules
        data = [open({str(tmp_path)!r} + f"/img{{i}}.bin", "rb").read() for i in range(4)]
        out = m.signatures["serving_default"](image_bytes=tf.constant(data))
        np.save({str(tmp_path / "served.npy")!r}, out["embedding"].numpy())
        px = np.load({str(tmp_path / "pixels.npy")!r})
        out = m.signatures["embed_images"](images=tf.constant(px))
        np.save({str(tmp_path / "served_px.npy")!r}, out["embedding"].numpy())
        recs = [open({str(tmp_path)!r} + f"/rec{{i}}.bin", "rb").read() for i in range(4)]
        out = m.signatures["tf_example"](examples=tf.constant(recs))
        np.save({str(tmp_path / "served_rec.npy")!r}, out["embedding"].numpy())
        print(sorted(m.signatures))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['embed_images', 'serving_default', 'tf_example']" in proc.stdout

    served = np.load(tmp_path / "served.npy")
    assert served.shape == (4, 8)
    np.testing.assert_allclose(served, _reference(model, encoded), atol=1e-4)
    # Records through tf_example: the same numbers as their bytes through serving_default.
    np.testing.assert_array_equal(np.load(tmp_path / "served_rec.npy"), served)
    served_px = np.load(tmp_path / "served_px.npy")
    np.testing.assert_allclose(served_px, model(pixels, training=False).numpy(), atol=1e-4)
    # The outputs differ per image (the test would not notice a constant model otherwise).
    assert np.abs(served[0] - served[1]).max() > 1e-3


def test_sidecar_describes_the_export(tmp_path, model):
    run = _fake_run(tmp_path, model)
    path = sm.export_run(run, str(tmp_path / "exp"), class_names=["a", "b"])
    meta = sm.read_metadata(path)
    assert meta["family"] == "triplet"
    assert meta["outputs"] == ["embedding"]
    assert meta["output_shapes"] == {"embedding": [None, 8]}
    assert meta["input"] == {"height": S, "width": S, "channels": 3, "dtype": "float32",
                             "range": [0, 255]}
    assert set(meta["signatures"]) == {"serving_default", "embed_images", "tf_example"}
    assert meta["flags"] == {"triplet_backbone": "small_cnn", "input_size": "16",
                             "triplet_l2_normalize": True, "jit_compile": False}
    assert "image/encoded" in meta["schema"]["record_features"]
    assert meta["class_names"] == ["a", "b"]
    assert meta["extra"]["model_config"]["builder"] == "triplet"
    copied = os.path.join(path, "assets.extra", "flags.cfg")
    assert open(copied).read() == open(os.path.join(run, "flags.cfg")).read()


def test_versions_newest_wins_and_keep_prunes(tmp_path, model):
    base = str(tmp_path / "exp")
    assert sm.list_versions(base) == [] and sm.latest_version(base) is None
    for _ in range(3):
        sm.export_saved_model(model, base, keep=2)
    assert sm.list_versions(base) == [2, 3]
    assert sm.resolve_saved_model(base) == os.path.join(base, "3")
    assert sm.export_saved_model(model, base, version=10, keep=2) == os.path.join(base, "10")
    assert sm.list_versions(base) == [3, 10]
    with pytest.raises(sm.ExportError, match="already exists"):
        sm.export_saved_model(model, base, version=10)
    old = os.stat(os.path.join(base, "10", "saved_model.pb")).st_mtime_ns
    sm.export_saved_model(model, base, version=10, overwrite=True, keep=0)
    assert os.stat(os.path.join(base, "10", "saved_model.pb")).st_mtime_ns != old
    assert sm.list_versions(base) == [3, 10]
    # An explicit version older than the kept ones survives its own export.
    sm.export_saved_model(model, base, version=1, keep=2)
    assert sm.list_versions(base) == [1, 3, 10]
    assert sm.prune_versions(base, 1) == [1, 3]
    # Only integer directories are versions; nothing else was left beside them.
    assert sorted(os.listdir(base)) == ["10"]


def test_crash_mid_export_leaves_no_half_version(tmp_path, model, monkeypatch):
    base = str(tmp_path / "exp")
    sm.export_saved_model(model, base)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sm, "_write_sidecar", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        sm.export_saved_model(model, base)
    assert sorted(os.listdir(base)) == ["1"]
    assert sm.resolve_saved_model(base) == os.path.join(base, "1")

    # A killed exporter (dead pid) leaves a scratch directory: ignored, then cleaned up.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(base, f".export-{dead.pid}-abc.tmp")
    os.makedirs(os.path.join(stale, "variables"))
    live = os.path.join(base, f".export-{os.getpid()}-xyz.tmp")
    os.makedirs(live)
    assert sm.list_versions(base) == [1]
    monkeypatch.undo()
    sm.export_saved_model(model, base)
    assert not os.path.exists(stale)
    assert os.path.exists(live)  # a running exporter's directory is left alone
    assert sm.list_versions(base) == [1, 2]


def test_family_outputs_and_input_checks(tmp_path):
    inputs = keras.Input((S, S, 1))
    flat = keras.layers.Flatten()(inputs)
    code = keras.layers.Dense(3, name="code")(flat)
    recon = keras.layers.Reshape((S, S, 1))(keras.layers.Dense(S * S)(code))
    cdae = keras.Model(inputs, [code, recon])
    path = sm.export_saved_model(cdae, str(tmp_path / "cdae"), family="cdae")
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "encode_images", "tf_example"}
    png = tf.io.encode_png(_image(S, S, 7, channels=1)).numpy()
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([png, png]))
    assert out["code"].shape == (2, 3) and out["reconstruction"].shape == (2, S, S, 1)
    px = tf.cast(tf.io.decode_png(png, channels=1), tf.float32)[None]
    np.testing.assert_allclose(out["code"][:1], cdae(px)[0], atol=1e-4)

    with pytest.raises(sm.ExportError, match="2 output"):
        sm.export_saved_model(cdae, str(tmp_path / "bad"), family="triplet")
    with pytest.raises(sm.ExportError, match="unknown model family"):
        sm.export_saved_model(cdae, str(tmp_path / "bad"), family="nope")
    dynamic = keras.Model(*(lambda i: (i, keras.layers.GlobalAveragePooling2D()(i)))(
        keras.Input((None, None, 3))))
    with pytest.raises(sm.ExportError, match="static size"):
        sm.export_saved_model(dynamic, str(tmp_path / "bad"))
    with pytest.raises(sm.ExportError, match="model.keras: not found"):
        sm.export_run(str(tmp_path / "no_run"), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad") or sm.list_versions(str(tmp_path / "bad")) == []


def test_cli_export(tmp_path, model, capsys):
    from ish_tf import cli

    run = _fake_run(tmp_path, model)
    base = str(tmp_path / "exp" / "tiny")
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={base}", "--version=4",
                                 "--keep=1"]) == 0
    out = capsys.readouterr().out
    assert os.path.join(base, "4") in out
    assert f"saved_model_cli show --dir {os.path.join(base, '4')}" in out
    assert sm.list_versions(base) == [4]
    assert cli.invoke("export", [f"--model_dir={tmp_path}/missing", f"--export_dir={base}"]) == 1
    assert "model.keras: not found" in capsys.readouterr().err


def test_parse_flagfile():
    text = "# comment\n--a=1\n--b=x=y\n--flag\n--noother\n\nnot a flag\n--no=3\n"
    assert sm.parse_flagfile(text) == {"a": "1", "b": "x=y", "flag": True, "other": False,
                                       "no": "3"}


def test_real_allen_jpeg_is_served_resized(tmp_path, model):
    jpg = shared_data_path("allen", "mouse_prox1_sagittal_ds2.jpg")
    data = open(jpg, "rb").read()
    # A whole section to a 16-px patch model: only with the documented option.
    path = sm.export_saved_model(model, str(tmp_path / "exp"), serving_resize="any")
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([data]))["embedding"]
    np.testing.assert_allclose(out.numpy(), _reference(model, [data]), atol=1e-4)
    assert "of any size" in sm.read_metadata(path)["signatures"]["serving_default"][
        "inputs"]["image_bytes"]
    # The real section is 2980 x 1888: the in-graph resize must have happened.
    decoded = tf.io.decode_jpeg(data)
    assert tuple(decoded.shape) == (1888, 2980, 3)



def test_classifier_export_names_its_classes_and_refuses_a_mismatch(tmp_path):
    """A classifier's export takes its class names from model_config.json; a count that
    does not match the probabilities' width stops the export, naming both."""
    import keras

    inputs = keras.Input((S, S, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
    classifier = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))

    def run_with(names, name):
        run = tmp_path / name
        run.mkdir()
        classifier.save(str(run / "model.keras"))
        (run / "model_config.json").write_text(json.dumps(
            {"builder": "ish_cnn", "config": {"model": "ish_cnn", "input_size": S,
                                              "family": {"classes": names}}}))
        return str(run)

    path = sm.export_run(run_with(["Gad1", "Pvalb", "Sst"], "ok"), str(tmp_path / "exp_ok"))
    assert sm.read_metadata(path)["class_names"] == ["Gad1", "Pvalb", "Sst"]
    with pytest.raises(sm.ExportError, match="3 class probabilities but 2 class names"):
        sm.export_run(run_with(["Gad1", "Pvalb"], "bad"), str(tmp_path / "exp_bad"))
