"""Exports and embedding of every input kind: RGB patches, 6-channel uint16 images, vectors.

Each kind: a tiny Keras model, a record set written with `write_record_set`, an export
reloaded in a fresh process; its `tf_example` signature on the shards' serialized
records and its `serving_default` on the documented input must equal the Keras model
on the same inputs decoded here in numpy (not with the export's decoding code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ish_tf import embed  # noqa: E402
from ish_tf.data import records, shards  # noqa: E402
from ish_tf.data.embeddings import read_embedding_table  # noqa: E402
from ish_tf.data.inputs import InputSpec  # noqa: E402
from ish_tf.data.record_sets import write_record_set  # noqa: E402
from ish_tf.export import saved_model as sm  # noqa: E402

S = 16          # model input side
STORED_SIX = 20  # the 6-channel images are stored larger: tf_example must resize them
DIM = 7
N = 6           # records per kind

# kind -> (model input shape, input spec of the record set, output width)
KINDS = {
    "rgb": ((S, S, 3), InputSpec.image(3, S, S), 4),
    "six": ((S, S, 6), InputSpec.image(6, STORED_SIX, STORED_SIX, dtype="uint16"), 5),
    "vector": ((DIM,), InputSpec.vector(DIM), 3),
}


def _model(kind: str) -> keras.Model:
    shape, spec, width = KINDS[kind]
    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape)
    if spec.kind == "vector":
        x = keras.layers.Dense(8, activation="tanh")(inputs)
    else:
        scale = 1 / 255.0 if spec.dtype == "uint8" else 1 / 65535.0
        x = keras.layers.Rescaling(scale)(inputs)
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(width)(x), name=f"tiny_{kind}")


def _payload(kind: str, i: int) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    if kind == "rgb":
        return rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    if kind == "six":
        return rng.integers(0, 65536, (STORED_SIX, STORED_SIX, 6), dtype=np.uint16)
    return rng.normal(0, 2, DIM).astype(np.float32)


def _model_input(kind: str, payload: np.ndarray) -> np.ndarray:
    """What the model should see for a stored payload: float32, resized like the reader."""
    x = payload.astype(np.float32)
    if kind != "vector" and x.shape[:2] != (S, S):
        x = tf.image.resize(x, [S, S], method="bilinear", antialias=True).numpy()
    return x


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """kind -> dict(model, records_dir, export, payloads {image_id: payload})."""
    base = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, (_, spec, _) in KINDS.items():
        payloads = {200 + i: _payload(kind, i) for i in range(N)}
        examples = []
        for i, (image_id, payload) in enumerate(payloads.items()):
            ex = {"identity": f"g{i % 2}", "group": f"d{i % 3}", "image_id": image_id}
            ex["vector" if kind == "vector" else "image"] = payload
            if kind != "vector":
                ex.update(patch_index=i, x=3 * i, y=5 * i)
            examples.append(ex)
        records_dir = str(base / f"records_{kind}")
        write_record_set(records_dir, {"train": examples[:4], "test": examples[4:]}, spec)
        model = _model(kind)
        # The 6-channel export gets the set's spec (uint16); the others derive theirs.
        export_spec = InputSpec.image(6, dtype="uint16") if kind == "six" else None
        export = sm.export_saved_model(model, str(base / f"export_{kind}"), family="custom",
                                       outputs=["embedding"], input_spec=export_spec)
        out[kind] = {"model": model, "records_dir": records_dir, "export": export,
                     "payloads": payloads}
    return out


def _serialized(records_dir: str) -> list[bytes]:
    index = shards.load_index(records_dir)
    files = [os.path.join(records_dir, s["file"])
             for s in sorted(index["shards"], key=lambda s: (s["split"], s["index"]))]
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def _image_id(serialized: bytes) -> int:
    return int(records.parse_example(serialized, ["image_id"])["image_id"])


FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    jobs = json.loads(sys.argv[1])
    report = {}
    for kind, job in jobs.items():
        m = tf.saved_model.load(job["export"])
        data = np.load(job["inputs"], allow_pickle=True)
        out = m.signatures["tf_example"](examples=tf.constant(list(data["records"])))
        np.save(job["out"] + "_tf_example.npy", out["embedding"].numpy())
        fn = m.signatures["serving_default"]
        (name, spec), = fn.structured_input_signature[1].items()
        feed = (tf.constant(list(data["default"])) if spec.dtype == tf.string
                else tf.constant(data["default"].astype(np.float32)))
        np.save(job["out"] + "_default.npy", fn(**{name: feed})["embedding"].numpy())
        report[kind] = {"signatures": sorted(m.signatures), "default_input": name,
                        "default_dtype": spec.dtype.name, "default_shape": spec.shape.as_list()}
    assert "ish_tf" not in sys.modules
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def served(setup, tmp_path_factory):
    """Runs every export's tf_example and serving_default in one fresh process."""
    tmp = tmp_path_factory.mktemp("fresh")
    jobs, expected = {}, {}
    for kind, job in setup.items():
        serialized = _serialized(job["records_dir"])
        ids = [_image_id(s) for s in serialized]
        want_in = np.stack([_model_input(kind, job["payloads"][i]) for i in ids])
        if kind == "rgb":
            default = np.array([tf.io.encode_png(job["payloads"][i]).numpy() for i in ids],
                               dtype=object)
        else:
            default = want_in
        path = str(tmp / f"{kind}.npz")
        np.savez(path, records=np.array(serialized, dtype=object), default=default)
        jobs[kind] = {"export": job["export"], "inputs": path, "out": str(tmp / kind)}
        expected[kind] = job["model"](want_in, training=False).numpy()
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp),
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    report = json.loads(line.split(" ", 1)[1])
    results = {kind: {"tf_example": np.load(tmp / f"{kind}_tf_example.npy"),
                      "default": np.load(tmp / f"{kind}_default.npy")} for kind in KINDS}
    return report, results, expected


@pytest.mark.parametrize("kind", list(KINDS))
def test_tf_example_in_a_fresh_process_matches_keras(served, kind):
    _, results, expected = served
    got = results[kind]["tf_example"]
    assert got.shape == (N, KINDS[kind][2])
    np.testing.assert_allclose(got, expected[kind], rtol=1e-5, atol=1e-6)
    # Different inputs give different outputs: a constant model would not pass unnoticed.
    assert np.abs(got[0] - got[1]).max() > 1e-4


@pytest.mark.parametrize("kind, name, dtype, shape", [
    ("rgb", "image_bytes", "string", [None]),
    ("six", "images", "float32", [None, S, S, 6]),
    ("vector", "vectors", "float32", [None, DIM]),
])
def test_serving_default_takes_the_documented_input(served, kind, name, dtype, shape):
    report, results, expected = served
    assert report[kind]["default_input"] == name
    assert report[kind]["default_dtype"] == dtype
    assert report[kind]["default_shape"] == shape
    np.testing.assert_allclose(results[kind]["default"], expected[kind], rtol=1e-5, atol=1e-6)
    decoded = "predict_vectors" if kind == "vector" else "predict_images"
    assert report[kind]["signatures"] == sorted(["serving_default", decoded, "tf_example"])


def test_sidecar_records_the_input_spec_and_signatures(setup):
    six = sm.read_metadata(setup["six"]["export"])
    assert six["input_spec"] == InputSpec.image(6, S, S, dtype="uint16").to_dict()
    assert six["input_kind"] == "image"
    assert six["input"] == {"height": S, "width": S, "channels": 6, "dtype": "float32",
                            "range": [0, 65535]}
    assert six["signature_names"] == {"serving_default": "serving_default",
                                      "serving_default_input": "images",
                                      "decoded": "predict_images", "records": "tf_example"}
    assert set(six["signatures"]) == {"serving_default", "predict_images", "tf_example"}
    vec = sm.read_metadata(setup["vector"]["export"])
    assert vec["input_spec"] == InputSpec.vector(DIM).to_dict()
    assert vec["input"]["dim"] == DIM and vec["input_size"] is None
    assert vec["signature_names"]["serving_default_input"] == "vectors"
    rgb = sm.read_metadata(setup["rgb"]["export"])
    assert rgb["input_spec"] == InputSpec.image(3, S, S).to_dict()
    assert rgb["signature_names"]["serving_default_input"] == "image_bytes"


def test_tf_example_rejects_records_of_another_kind(setup):
    loaded = tf.saved_model.load(setup["six"]["export"])
    rgb_records = _serialized(setup["rgb"]["records_dir"])[:2]
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["tf_example"](examples=tf.constant(rgb_records))
    loaded = tf.saved_model.load(setup["vector"]["export"])
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["tf_example"](examples=tf.constant(rgb_records))


def test_export_checks_the_spec_against_the_model():
    with pytest.raises(sm.ExportError, match="channels 6"):
        sm.export_saved_model(_model("six"), "/nonexistent/never", family="custom",
                              outputs=["embedding"], input_spec=InputSpec.image(3))
    with pytest.raises(sm.ExportError, match="takes vectors"):
        sm.export_saved_model(_model("vector"), "/nonexistent/never", family="custom",
                              outputs=["embedding"], input_spec=InputSpec.image(3))


def _expected_table(job: dict, kind: str, image_ids) -> np.ndarray:
    inputs = np.stack([_model_input(kind, job["payloads"][int(i)]) for i in image_ids])
    return job["model"](inputs, training=False).numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_embed_records_feeds_tf_example_for_every_kind(setup, kind, tmp_path):
    job = setup[kind]
    res = embed.embed_records(embed.EmbedConfig(
        saved_model=job["export"], records_dir=job["records_dir"], out_dir=str(tmp_path),
        batch_size=4))
    assert res.skipped == 0 and res.rows["patch"] == N
    assert res.dim == KINDS[kind][2]
    summary = json.load(open(tmp_path / embed.SUMMARY_NAME))
    assert (summary["signature"], summary["feeds"]) == ("tf_example", "records")
    table = read_embedding_table(res.tables["patch"])
    np.testing.assert_allclose(table.values, _expected_table(job, kind, table.keys.image_id),
                               rtol=1e-5, atol=1e-6)
    frame = pd.read_csv(res.tables["patch"])
    row = frame[frame.image_id == 203].iloc[0]
    assert (row.gene_symbol, row.donor_id, row.split) == ("g1", "d0", "train")
    if kind == "vector":  # no image position in a vector record
        assert (frame[["patch_index", "x", "y"]] == 0).all().all()
    else:
        assert (row.patch_index, row.x, row.y) == (3, 9, 15)
    gene = pd.read_csv(res.tables["gene"]).set_index("gene_symbol")
    assert sorted(gene.index) == ["g0", "g1"]


def test_serving_default_of_a_vector_export_embeds_through_tf_example(setup, tmp_path):
    # bin/embed's --signature=serving_default cannot feed records as vectors: tf_example does.
    job = setup["vector"]
    served = embed.ServedModel(job["export"], "serving_default")
    assert (served.signature, served.feeds) == ("tf_example", "records")
    with pytest.raises(embed.EmbedError, match="one tf.string input"):
        embed.ServedModel(job["export"], "predict_vectors")


def _old_style_export(model: keras.Model, path: str) -> None:
    """A SavedModel as exported before input kinds: serving_default on image bytes only."""

    def serve_bytes(image_bytes):
        return {"embedding": model(sm.decode_images(image_bytes, (S, S), 3), training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.write_out(path, verbose=False)
    # Exports of that time had the version-1 sidecar (bin/embed refuses SavedModels without).
    os.makedirs(os.path.join(path, sm.SIDECAR_DIR))
    with open(os.path.join(path, sm.SIDECAR_DIR, sm.SIDECAR_NAME), "w") as f:
        json.dump({"format_version": 1, "family": "triplet", "outputs": ["embedding"],
                   "input": {"height": S, "width": S, "channels": 3}}, f)


def test_old_export_without_tf_example_still_embeds_image_bytes(setup, tmp_path):
    job = setup["rgb"]
    old = str(tmp_path / "old" / "1")
    _old_style_export(job["model"], old)
    assert "tf_example" not in tf.saved_model.load(old).signatures
    res = embed.embed_records(embed.EmbedConfig(
        saved_model=old, records_dir=job["records_dir"], out_dir=str(tmp_path / "out")))
    summary = json.load(open(tmp_path / "out" / embed.SUMMARY_NAME))
    assert (summary["signature"], summary["feeds"]) == ("serving_default", "image_bytes")
    table = read_embedding_table(res.tables["patch"])
    np.testing.assert_allclose(table.values, _expected_table(job, "rgb", table.keys.image_id),
                               rtol=1e-5, atol=1e-6)
    # Asking for the image-bytes path of a new export gives the same numbers.
    new = embed.embed_records(embed.EmbedConfig(
        saved_model=job["export"], records_dir=job["records_dir"],
        out_dir=str(tmp_path / "bytes"), signature="serving_default"))
    np.testing.assert_allclose(read_embedding_table(new.tables["patch"]).values, table.values,
                               rtol=1e-6)
