"""The shared family harness: every registered family, through the whole chain.

For each name in `family_names()`: the registry entry describes the family, its default
config instantiates and validates, its tiny setup (`FamilySpec.tiny`) trains 2 steps,
a run stopped after step 1 and resumed ends with exactly the weights of an uninterrupted
run, the model exports as a SavedModel, a fresh process reloads it and runs its
`tf_example` signature on the family's records, and `bin/embed`'s library call
(`embed_records`) stores what the Keras model computes. A new family gets all of this by
registering.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ish_tf.families import family_names, get_family, make_task
from ish_tf.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RELOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf
from ish_tf.data import shards
from ish_tf.data.pipeline import list_shards
export, records_dir, split, out = sys.argv[1:5]
loaded = tf.saved_model.load(export)
fn = loaded.signatures["tf_example"]
name = list(fn.structured_input_signature[1])[0]
files = list_shards(records_dir, split)
serialized = [r.numpy() for f in files for r in tf.data.TFRecordDataset(f, compression_type=shards.compression_of(f) or "")]
result = fn(**{name: tf.constant(serialized)})
np.savez(out, **{k: v.numpy() for k, v in result.items()})
print(json.dumps({"signatures": sorted(loaded.signatures), "n": len(serialized)}))
"""


def _weights(path: str) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).get_weights()]


def _train_config(run_dir: str, fields: dict) -> TrainConfig:
    return TrainConfig(run_dir=run_dir, steps=2, decay_start=2, checkpoint_every=1, log_every=1,
                       image_summaries=False, learning_rate=1e-3, seed=0, strategy="default",
                       **fields)


def _decoded_inputs(records_dir: str, split: str, spec) -> np.ndarray:
    """The records' inputs decoded in Python, as the model takes them (float32)."""
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards

    stored = shards.records_input_spec(records_dir)
    out = []
    for f in list_shards(records_dir, split):
        for raw in tf.data.TFRecordDataset(f, compression_type=shards.compression_of(f) or ""):
            feats = records.parse_example(raw, kind=spec.kind)
            if spec.kind == "vector":
                out.append(records.decode_vector(feats).numpy())
            else:
                image = tf.cast(records.decode_image(feats, spec=stored), tf.float32)
                assert image.shape[-1] == spec.channels, (stored, spec)
                assert tuple(image.shape[:2]) == (spec.height, spec.width), (stored, spec)
                out.append(image.numpy())
    return np.stack(out).astype(np.float32)


def _transformed(spec, run_dir: str, records_dir: str, split: str, inputs: np.ndarray):
    """The family's export transform applied to decoded inputs, with the records' features."""
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards
    from ish_tf.families import resolve_ref

    with open(os.path.join(run_dir, "model_config.json"), encoding="utf-8") as f:
        transform = resolve_ref(spec.export_transform)(run_dir, json.load(f))
    serialized = [r.numpy() for f in list_shards(records_dir, split)
                  for r in tf.data.TFRecordDataset(f, compression_type=shards.compression_of(f)
                                                   or "")]
    feats = tf.io.parse_example(tf.constant(serialized),
                                records.feature_spec(list(transform.record_keys)))
    return np.asarray(transform.from_records(tf.constant(inputs), feats))


@pytest.mark.slow
@pytest.mark.parametrize("name", family_names())
def test_family_harness(name, tmp_path):
    from ish_tf.embed import EmbedConfig, embed_records
    from ish_tf.export.saved_model import export_run, read_metadata
    from ish_tf.train.trainer import train

    spec = get_family(name)
    # The registry entry describes the family; its default config is valid.
    assert spec.outputs and spec.inputs.kind in ("image", "vector")
    default = spec.config_cls()
    if hasattr(default, "validate"):
        default.validate()

    model_config, fields = spec.tiny_setup(str(tmp_path / "data"), seed=0)
    input_spec = spec.input_spec(model_config)

    # Two steps uninterrupted, and stopped after one then resumed: the same weights.
    run_a, run_b = str(tmp_path / "run_a"), str(tmp_path / "run_b")
    cfg_a = _train_config(run_a, fields)
    result = train(make_task(copy.deepcopy(model_config), cfg_a), cfg_a)
    assert result.step == 2 and np.isfinite(result.loss)
    cfg_b = _train_config(run_b, fields)
    stopped = train(make_task(copy.deepcopy(model_config), cfg_b), cfg_b, stop_after=1)
    assert stopped.step == 1 and not stopped.model_path
    resumed = train(make_task(copy.deepcopy(model_config), cfg_b), cfg_b)
    assert (resumed.start_step, resumed.step) == (1, 2)
    for wa, wb in zip(_weights(result.model_path), _weights(resumed.model_path), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-6)

    # Export, then reload in a fresh process and run the tf_example signature.
    export = export_run(run_a, str(tmp_path / "export"), family=name)
    meta = read_metadata(export)
    assert meta["family"] == name and tuple(meta["outputs"]) == spec.outputs
    if "probabilities" in spec.outputs:  # a classifier's columns are named in the sidecar
        stored = meta["extra"]["model_config"]["config"]["family"]
        names = stored.get("classes") or stored.get("terms")
        assert meta["class_names"] == list(names)
        assert meta["output_shapes"]["probabilities"][-1] == len(names)
    else:
        assert meta["class_names"] is None
    records_dir = fields.get("records_dir")
    if not records_dir:  # a family trained on something else (U-Net: image/mask pairs)
        from ish_tf.families.testing import tiny_records

        records_dir = tiny_records(str(tmp_path / "embed_records"), input_spec)
    out_npz = str(tmp_path / "served.npz")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RELOAD, export, records_dir, "test", out_npz],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tf_example" in info["signatures"] and "serving_default" in info["signatures"]
    served = np.load(out_npz)

    import keras

    model = keras.saving.load_model(result.model_path, compile=False)
    inputs = _decoded_inputs(records_dir, "test", input_spec)
    assert len(inputs) == info["n"]
    if spec.export_transform:  # raw input -> model input in the graph (fluorescence: per plate)
        assert meta["input_transform"]
        inputs = _transformed(spec, run_a, records_dir, "test", inputs)
    want = model(inputs, training=False)
    want = want if isinstance(want, (list, tuple)) else [want]
    for output_name, value in zip(spec.outputs, want, strict=True):
        np.testing.assert_allclose(served[output_name], np.asarray(value), rtol=1e-4, atol=1e-5)

    # bin/embed's library call stores the first output of each record.
    first = np.asarray(want[0]).reshape(len(inputs), -1)
    if first.shape[1] <= 4096:
        out = tmp_path / "embed"
        embed_records(EmbedConfig(saved_model=export, records_dir=records_dir, out_dir=str(out),
                                  splits=("test",), levels=("patch",)), progress=False)
        from ish_tf.data.embeddings import read_embedding_table

        table = read_embedding_table(str(out / "patch_embeddings.csv"))
        order = np.argsort(table.keys["image_id"].to_numpy())
        np.testing.assert_allclose(table.values[order], first, rtol=1e-4, atol=1e-5)
