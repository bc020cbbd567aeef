"""TF Serving checks of the exports of every family: signatures, fresh-process calls, requests."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ish_tf.export import saved_model as sm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16
# family -> output names, in the Keras model's output order.
FAMILY_OUTPUTS = {"triplet": ("embedding",), "cdae": ("code", "reconstruction"),
                  "ish_cnn": ("probabilities",)}


def _family_model(family: str) -> keras.Model:
    """A tiny model with the family's outputs (float32 [0, 255] images in)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((S, S, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(h)
    if family == "triplet":
        outputs = keras.layers.Dense(6)(pooled)
    elif family == "cdae":
        code = keras.layers.Dense(5, name="code")(pooled)
        up = keras.layers.Reshape((8, 8, 4))(h)
        recon = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same",
                                             activation="sigmoid", name="reconstruction")(up)
        outputs = [code, recon]
    else:
        outputs = keras.layers.Dense(3, activation="softmax")(pooled)
    return keras.Model(inputs, outputs, name=f"tiny_{family}")


def _images(n: int = 4) -> tuple[list[bytes], np.ndarray]:
    """Encoded JPEG and PNG patches and their decoded pixels (float32 (n, S, S, 3))."""
    rng = np.random.default_rng(1)
    encoded, pixels = [], []
    for i in range(n):
        px = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
        data = (tf.io.encode_png(px) if i % 2 else tf.io.encode_jpeg(px, quality=95)).numpy()
        encoded.append(data)
        pixels.append(tf.cast(tf.io.decode_image(data, channels=3), tf.float32).numpy())
    return encoded, np.stack(pixels)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILY_OUTPUTS:
        model = _family_model(family)
        version_dir = sm.export_saved_model(
            model, str(base / family), family=family,
            class_names=["low", "mid", "high"] if family == "ish_cnn" else None)
        out[family] = (model, version_dir)
    return out


FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
paths, images = json.loads(sys.argv[1]), np.load(sys.argv[2], allow_pickle=True)
encoded = tf.constant(list(images["encoded"]))
result = {}
for family, path in paths.items():
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    args, kwargs = fn.structured_input_signature
    spec = kwargs["image_bytes"]
    outs = fn(image_bytes=encoded)
    result[family] = {"input": [spec.dtype.name, spec.shape.as_list()],
                      "outputs": sorted(fn.structured_outputs)}
    np.savez(sys.argv[3] + f"/{family}.npz", **{k: v.numpy() for k, v in outs.items()})
print("SIGNATURES " + json.dumps(result))
"""


def test_every_family_served_from_bytes_in_a_fresh_process(exports, tmp_path):
    encoded, pixels = _images()
    np.savez(tmp_path / "images.npz", encoded=np.array(encoded, dtype=object))
    paths = {f: path for f, (_, path) in exports.items()}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(paths),
                           str(tmp_path / "images.npz"), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("SIGNATURES ")][-1]
    signatures = json.loads(line.split(" ", 1)[1])
    for family, (model, _) in exports.items():
        sig = signatures[family]
        assert sig["input"] == ["string", [None]]
        assert sig["outputs"] == sorted(FAMILY_OUTPUTS[family])
        served = np.load(tmp_path / f"{family}.npz")
        want = model(pixels, training=False)
        want = want if isinstance(want, (list, tuple)) else [want]
        for name, expected in zip(FAMILY_OUTPUTS[family], want, strict=True):
            np.testing.assert_allclose(served[name], np.asarray(expected), atol=1e-5,
                                       err_msg=f"{family}/{name}")
    probs = np.load(tmp_path / "ish_cnn.npz")["probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    meta = sm.read_metadata(exports["ish_cnn"][1])
    assert json.dumps(meta).count("high") >= 1  # class names travel with the export


def _request_tensors(signature, encoded: list[bytes]) -> dict:
    """TensorProtos for a PredictRequest's `inputs`, checked against the signature."""
    _, kwargs = signature.structured_input_signature
    tensors = {}
    for name, spec in kwargs.items():
        proto = tf.make_tensor_proto(encoded, dtype=spec.dtype)
        assert proto.dtype == spec.dtype.as_datatype_enum
        shape = [d.size for d in proto.tensor_shape.dim]
        assert spec.shape.is_compatible_with(shape), (name, spec.shape, shape)
        tensors[name] = proto
    return tensors


def test_predict_request_matches_the_serving_signature(exports):
    """The gRPC PredictRequest (and REST body) a client would send are valid inputs."""
    encoded, _ = _images(3)
    model, path = exports["cdae"]
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    tensors = _request_tensors(signature, encoded)
    assert set(tensors) == {sm.BYTES_INPUT}
    # The request's tensors, decoded back, drive the signature to the direct call's outputs.
    from_proto = signature(**{k: tf.constant(tf.make_ndarray(v)) for k, v in tensors.items()})
    direct = signature(image_bytes=tf.constant(encoded))
    for name in FAMILY_OUTPUTS["cdae"]:
        np.testing.assert_array_equal(from_proto[name].numpy(), direct[name].numpy())
    # REST: binary inputs go base64-encoded as {"b64": ...} (TF Serving's JSON convention).
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(e).decode("ascii")} for e in encoded]})
    decoded = [base64.b64decode(i["b64"]) for i in json.loads(body)["instances"]]
    assert decoded == encoded

    predict_pb2 = pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2",
        reason="tensorflow-serving-api is not installed (pip install tensorflow-serving-api); "
               "the TensorProto inputs above were checked without it")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cdae"
    request.model_spec.signature_name = "serving_default"
    for name, proto in tensors.items():
        request.inputs[name].CopyFrom(proto)
    again = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert list(again.inputs) == [sm.BYTES_INPUT]
    assert list(again.inputs[sm.BYTES_INPUT].string_val) == encoded


def test_served_images_far_from_the_input_size_are_rejected(exports, tmp_path):
    """serving_default resizes images near the model's input size (within 2x) and refuses
    ones far from it (a whole section to a patch model), naming both sizes; the input
    size is documented in the sidecar and the signature's description."""
    _, version_dir = exports["triplet"]
    meta = sm.read_metadata(version_dir)
    assert meta["input_size"] == S and meta["serving_resize"] == "near"
    described = meta["signatures"]["serving_default"]["inputs"]["image_bytes"]
    assert f"of about {S}x{S} px" in described and "rejected" in described
    fn = tf.saved_model.load(version_dir).signatures["serving_default"]
    rng = np.random.default_rng(0)

    def png(h, w):
        return tf.io.encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy()

    assert fn(image_bytes=tf.constant([png(S, S), png(24, 12)]))["embedding"].shape[0] == 2
    for h, w in ((4 * S, 4 * S), (S, S // 4)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"input {S}x{S}"):
            fn(image_bytes=tf.constant([png(h, w)]))
