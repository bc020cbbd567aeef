"""An RxRx1-layout folder through the commands: synth -> ingest -> extract -> train ->
export -> embed, and the exported model normalises raw sites per plate in the graph
(ish_tf.families.fluorescence.export): bin/embed's embedding of a record equals the Keras
model's embedding of the site normalised with its plate's statistics; serving_default
takes raw pixels with experiment and plate; an unknown plate is an error naming it."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

TOL = 1e-4


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from ish_tf.cli import invoke

    d = tmp_path_factory.mktemp("chain")
    root, man, rec, run, exp, emb = (str(d / n) for n in
                                     ("plates", "man", "rec", "run", "export", "emb"))
    assert invoke("synth", ["--modality=fluorescence", f"--out={root}", "--small_run",
                            "--synth_test_experiments=1", "--synth_experiments=2",
                            "--synth_sites=1"]) == 0
    assert invoke("ingest", ["--layout=rxrx1", f"--images={root}", f"--out={man}",
                             f"--rxrx1_labels={root}/truth.csv"]) == 0
    assert invoke("extract", [f"--manifest={man}/manifest.csv", f"--out={rec}",
                              "--site_size=8", "--num_shards=1"]) == 0
    assert invoke("train", ["--model=mean_teacher", f"--records_dir={rec}", f"--run_dir={run}",
                            "--input_size=8", "--fluorescence_widths=4",
                            "--fluorescence_batch_size=2",
                            "--fluorescence_unlabelled_batch_size=2", "--steps=2",
                            "--strategy=default", "--noimage_summaries"]) == 0
    assert invoke("export", [f"--model_dir={run}", f"--export_dir={exp}"]) == 0
    assert invoke("embed", [f"--saved_model={exp}", f"--records_dir={rec}", f"--out={emb}",
                            "--splits=test"]) == 0
    return {"rec": rec, "run": run, "export": exp, "emb": emb, "dir": d}


def _sites(rec, split):
    """(ids, raw images (n, 8, 8, 6) float32, experiments, plates) of a split's records."""
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards

    spec = shards.records_input_spec(rec)
    keys = ["image/encoded", "image/height", "image/width", "image_id", records.GROUP_KEY,
            "plate"]
    out = {"id": [], "x": [], "e": [], "p": [], "raw": []}
    for f in list_shards(rec, split):
        comp = shards.compression_of(f) or ""
        for r in tf.data.TFRecordDataset(f, compression_type=comp):
            feats = records.parse_example(r, keys, "image")
            out["raw"].append(r.numpy())
            out["id"].append(int(feats["image_id"]))
            out["x"].append(records.decode_image(feats, spec=spec).numpy().astype(np.float32))
            out["e"].append(feats[records.GROUP_KEY].numpy().decode())
            out["p"].append(int(feats["plate"]))
    out["x"] = np.stack(out["x"])
    return out


@pytest.fixture(scope="module")
def keras_view(chain):
    """The test split's sites, normalised with their plate's statistics, through the
    trained Keras model: (sites, normalised x, Keras outputs, Keras on raw pixels)."""
    import ish_tf.families.fluorescence.model  # noqa: F401  (registers the layers)
    from ish_tf.data import plate_norm
    from ish_tf.export.saved_model import load_keras_file

    sites = _sites(chain["rec"], "test")
    stats = plate_norm.read_channel_stats(os.path.join(chain["rec"], plate_norm.STATS_NAME))
    norm = plate_norm.normaliser(stats, jitter=0.0)
    x = np.asarray(norm(sites["x"], np.array(sites["e"]), np.array(sites["p"]), training=False))
    model = load_keras_file(os.path.join(chain["run"], "model.keras"))
    outputs = [np.asarray(t) for t in model(x, training=False)]
    return sites, x, outputs, np.asarray(model(sites["x"], training=False)[0])


def test_embed_equals_the_keras_model_on_plate_normalised_sites(chain, keras_view):
    sites, _, outputs, raw = keras_view
    want = outputs[0]
    table = pd.read_csv(os.path.join(chain["emb"], "patch_embeddings.csv"))
    dims = [c for c in table.columns if c.startswith("dim_")]
    by_id = dict(zip(table["image_id"].astype(int), table[dims].to_numpy(np.float32),
                     strict=True))
    emb = np.stack([by_id[i] for i in sites["id"]])
    np.testing.assert_allclose(emb, want, atol=TOL)
    # Raw pixels through the model would give another embedding: the check can fail.
    assert np.abs(raw - want).max() > 10 * TOL


def test_serving_default_takes_raw_pixels_with_experiment_and_plate(chain):
    import tensorflow as tf

    from ish_tf.export.saved_model import read_metadata, resolve_saved_model

    path = resolve_saved_model(chain["export"])
    meta = read_metadata(path)
    assert meta["input_transform"]["normalization"] == "plate"
    assert set(meta["signatures"]["serving_default"]["inputs"]) == {"images", "experiment",
                                                                    "plate"}
    loaded = tf.saved_model.load(path)
    sites = _sites(chain["rec"], "train")
    served = loaded.signatures["serving_default"](
        images=tf.constant(sites["x"][:3]), experiment=tf.constant(sites["e"][:3]),
        plate=tf.constant(sites["p"][:3], tf.int64))["embedding"].numpy()
    records = loaded.signatures["tf_example"](
        examples=tf.constant(sites["raw"][:3]))["embedding"].numpy()
    np.testing.assert_allclose(served, records, atol=TOL)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NOPE-01/7"):
        loaded.signatures["serving_default"](
            images=tf.constant(sites["x"][:1]), experiment=tf.constant(["NOPE-01"]),
            plate=tf.constant([7], tf.int64))


def test_embed_images_refuses_arrays_without_plates(chain):
    from ish_tf.embed import EmbedError, embed_images

    with pytest.raises(EmbedError, match="per-plate statistics"):
        embed_images(chain["export"], [np.zeros((8, 8, 6), np.float32)])


def test_evaluate_plates_scores_the_export_as_the_keras_model(chain, keras_view, capsys):
    from ish_tf.cli import invoke
    from ish_tf.families.fluorescence import evaluation

    out = str(chain["dir"] / "eval")
    assert invoke("evaluate", ["--task=plates", f"--saved_model={chain['export']}",
                               f"--records_dir={chain['rec']}", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    with open(os.path.join(out, "plates.json"), encoding="utf-8") as f:
        result = json.load(f)
    assert sorted(result["splits"]) == ["test", "validation"]  # every split but train
    m = result["splits"]["test"]
    assert "plate-assigned" in text and "rank-1 across experiments" in text
    # The truth of the held-out experiment: every well labelled; chance 1 / classes.
    labels = evaluation.plate_labels(chain["rec"], "test")
    n_wells = len(labels.drop_duplicates(["experiment", "plate", "well"]))
    assert m["wells"] == n_wells and m["chance"] == pytest.approx(1 / m["classes"])
    assert 0 < m["rank1_chance"] < 1 and 0 <= m["plate_assignment_accuracy"] <= 1
    # The same accuracy from the Keras model on the plate-normalised sites, per well.
    sites, probs = keras_view[0], keras_view[2][1]
    frame = pd.DataFrame({"experiment": sites["e"], "plate": [str(p) for p in sites["p"]],
                          "well": labels["well"],
                          "label": labels["label"]})
    wells, p, _ = evaluation.wells(frame, probs, np.zeros((len(probs), 1), np.float32))
    assert m["accuracy"] == pytest.approx(evaluation.accuracy(p.argmax(1), wells["label"]))
    assert invoke("evaluate", ["--task=plates", f"--saved_model={chain['export']}",
                               f"--records_dir={chain['rec']}", f"--out={out}",
                               "--splits=nope"]) == 1
